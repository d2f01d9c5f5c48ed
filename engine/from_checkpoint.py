"""A checkpoint's weights as a model to evaluate or sample (python -m engine eval/generate RUN/checkpoints/step-N).

A checkpoint holds only the trainable weights (weights.safetensors: every weight of a full fine-tune,
the adapter of a LoRA run), not a loadable model. The model around them is built the way its run
built it: from the run's final/ (same architecture and tokenizer) when the run finished, otherwise
from its recipe.toml (the base model or model.config, the tokenizer, LoRA) as the training loop does;
then the checkpoint's weights replace the trainable ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import runfolder
from engine.errors import UserError

WEIGHTS_FILE = "weights.safetensors"  # engine.checkpoint.WEIGHTS_FILE


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / WEIGHTS_FILE).is_file() and not runfolder.is_model_folder(Path(folder))


def load(folder: str | Path) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer, "model" or "LoRA adapter") with the checkpoint's weights."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    run = runfolder.run_of(folder)
    if run is None:
        raise UserError(f"{folder}: a checkpoint outside its run folder (no recipe.toml two levels up); it needs its run to be evaluated")
    model, tokenizer, is_adapter = _model_of_run(run)
    weights = load_file(str(folder / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    unknown = sorted(set(weights) - set(params))
    missing = sorted(trainable - set(weights))
    if unknown or missing:
        raise UserError(
            f"{folder}: its weights do not fit the model of {run}/recipe.toml "
            f"({len(unknown)} unknown, {len(missing)} missing, e.g. {(unknown or missing)[0]}); was the run's recipe changed?"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
    model.eval()
    return model, tokenizer, "LoRA adapter" if is_adapter else "model"


def load_any(folder: str | Path) -> tuple[Any, Any, str]:
    """A model folder, an adapter folder or a checkpoint: (model, tokenizer, kind) for inference; kind is
    "model" or "LoRA adapter", prefixed "checkpoint, " for a checkpoint."""
    from engine import model as model_mod

    folder = Path(folder)
    if is_checkpoint(folder):
        model, tokenizer, kind = load(folder)
        return model, tokenizer, f"checkpoint, {kind}"
    model, tokenizer = model_mod.load_trained(folder)
    return model, tokenizer, "LoRA adapter" if (folder / "adapter_config.json").exists() else "model"


def _model_of_run(run: Path) -> tuple[Any, Any, bool]:
    import torch

    from engine import model as model_mod
    from engine import recipe as recipe_mod

    data = runfolder.read_recipe(run)
    final = run / data.get("train", {}).get("final_dir", "final")
    if runfolder.is_model_folder(final):
        model, tokenizer = model_mod.load_trained(final)
        is_adapter = (final / "adapter_config.json").exists()
        if is_adapter:
            for name, p in model.named_parameters():  # the adapter's weights are the ones a checkpoint holds
                p.requires_grad_("lora_" in name)
        else:
            model.requires_grad_(True)
        return model, tokenizer, is_adapter
    # an unfinished run: build what the training loop built
    from engine import chat, formats, tokcache
    from engine.manager import Plugins

    recipe = recipe_mod.from_dict(data, str(run / "recipe.toml"))
    plugins = Plugins([s for s in recipe.plugins if s.kind in ("augmentation", "format")])
    rows = formats.run_rows(recipe, plugins)
    tokenizer = model_mod.load_tokenizer(recipe.model, formats.row_texts(rows.train), tokcache.cache_root(recipe.data))
    added = formats.prepare_tokenizer(plugins, tokenizer, recipe.data)  # a chat template's tokens, as in training
    model = model_mod.load_model(recipe.model, tokenizer)
    added_ids = chat.fit_model(model, tokenizer, added)
    if recipe.lora.enabled:
        model = model_mod.apply_lora(model, recipe.lora, trainable_tokens=added_ids)
    return model.to(torch.float32), tokenizer, recipe.lora.enabled
