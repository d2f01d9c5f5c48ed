"""`python -m engine merge RUN_DIR OUT_DIR`: fold a run's LoRA adapter into its base model (peft's
merge_and_unload) and save a standalone model with its tokenizer, in safetensors, that plain
transformers loads with AutoModelForCausalLM.from_pretrained(OUT_DIR).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from engine import runfolder
from engine.errors import UserError


def merge(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Returns the adapter folder that was merged. The merged weights are fp32."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    adapter = runfolder.model_folder(run_dir)
    out = Path(out_dir)
    if not (adapter / "adapter_config.json").exists():
        raise UserError(
            f"{adapter}: is a full fine-tune, not a LoRA adapter; it is already a standalone model "
            f"(load it with AutoModelForCausalLM.from_pretrained('{adapter}')), there is nothing to merge"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; give a new or empty folder for the merged model")
    with warnings.catch_warnings():  # libraries' deprecation notices about each other are not the user's business
        warnings.simplefilter("ignore", FutureWarning)
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32)
        except OSError as exc:
            raise UserError(f"{adapter}: could not load the adapter's base model ({exc}); is the base model still where the run found it?") from None
        merged = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    _write_card(adapter, out, model.peft_config["default"].base_model_name_or_path)
    return adapter


def _write_card(adapter: Path, out: Path, base: str) -> None:
    """The merged model's card, from the adapter's run (recipe.toml, metrics.json, curves.png) when there is one."""
    from engine import modelcard, recipe as recipe_mod

    run = runfolder.run_of(adapter)
    if run is None:
        return
    try:
        recipe = recipe_mod.from_dict(runfolder.read_recipe(run), str(run / "recipe.toml"))
    except UserError:  # a recipe of another version: no card rather than a wrong one
        return
    summary = runfolder.read_summary(run) if (run / "metrics.json").exists() else None
    note = f"Merged by `python -m engine merge` from the LoRA adapter `{adapter}`."
    modelcard.write(out, recipe, summary, run, kind="merged model", base=base, note=note)
