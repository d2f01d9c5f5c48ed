"""Model cards: a README.md in the Hugging Face format beside every saved model (final/, best/, merge's output).

YAML front matter from huggingface_hub's ModelCardData (base_model when it is a hub id, library_name
transformers or peft, tags, datasets when data.train is a datasets name; the license is left for the
user), then a body with how to load the model, the data, the final metrics, the curves and the recipe
keys set differently from the defaults. Written offline, from what the run folder holds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from engine import report

CARD = "README.md"
CURVES = "curves.png"


def _hub_id(name: str) -> str | None:
    """name when it looks like a hub id (not a local folder), else None."""
    if not name or os.path.isdir(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def _dataset_name(spec: str) -> str | None:
    from engine import data as data_mod

    try:
        kind, names = data_mod.resolve_source(spec, "data.train")
    except Exception:  # files moved or gone since the run: no dataset to name
        return None
    return names[0] if kind == "dataset" else None


def _base_of(recipe: Any) -> str:
    return "" if recipe.model.config else recipe.model.base


def _load_snippet(kind: str, where: str) -> str:
    if kind == "LoRA adapter":
        return (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")  # the base model, then this adapter\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")'
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")'
    )


def _num(value: Any, fmt: str) -> str:
    return report._num(value, fmt)


def card_text(
    recipe: Any, summary: dict[str, Any] | None, kind: str, base: str, data: dict[str, Any] | None = None,
    curves: bool = False, title: str = "", note: str = "",
) -> str:
    """The model card. kind: "model", "LoRA adapter" or "merged model"; base: the base model ("" from scratch)."""
    from huggingface_hub import ModelCardData

    hub_base = _hub_id(base)
    dataset = _dataset_name(recipe.data.train)
    tags = ["tunesmith", "text-generation"] + (["lora"] if kind != "model" else []) + (["merged"] if kind == "merged model" else [])
    meta = ModelCardData(
        base_model=hub_base, library_name="peft" if kind == "LoRA adapter" else "transformers",
        tags=tags, datasets=[dataset] if dataset else None, pipeline_tag="text-generation",
    )
    if not base:
        origin = "trained from scratch (a model built from `model.config`, with a tokenizer trained on its data)"
    elif kind == "LoRA adapter":
        origin = f"a LoRA adapter for `{base}`"
    elif kind == "merged model":
        origin = f"`{base}` with a LoRA adapter merged into its weights"
    else:
        origin = f"fine-tuned from `{base}`"
    lines = [f"# {title or 'tunesmith model'}", "", f"A causal language model {origin}, with tunesmith.", ""]
    if note:
        lines += [note, ""]
    lines += ["## How to load", "", "```python", _load_snippet(kind, "PATH_OR_REPO_ID"), "```", ""]
    if kind == "LoRA adapter" and not hub_base:
        lines += [f"The adapter's base model is the local folder `{base}`; it must be at that path, or edit "
                  "`base_model_name_or_path` in adapter_config.json.", ""]
    lines += ["## Training data", "", f"- training text: `{recipe.data.train}`" + (f" (the dataset `{dataset}`)" if dataset else "")]
    if recipe.data.val:
        lines.append(f"- validation text: `{recipe.data.val}`")
    else:
        lines.append(f"- validation text: {recipe.data.val_split:.0%} of the training documents, held out")
    if data:
        lines.append(
            f"- {data.get('train_documents', 0):,} training documents, {data.get('val_documents', 0):,} validation documents "
            f"({data.get('val_characters', 0):,} characters), blocks of up to {recipe.data.max_length} tokens"
        )
    if summary:
        lines += [
            f"- {summary.get('tokens_seen', 0):,} tokens seen in {summary.get('steps')} optimizer steps ({summary.get('epochs')} epochs)",
            "", "## Results", "", "On the validation text, at the end of training:", "",
            "| metric | value |", "| --- | --- |",
            f"| validation loss (nats per token) | {_num(summary.get('val_loss'), '.4f')} |",
            f"| perplexity | {_num(summary.get('perplexity'), '.3f')} |",
            f"| bits per character | {_num(summary.get('val_bpc'), '.4f')} |",
            f"| best validation loss | {_num(summary.get('best_val_loss'), '.4f')} (step {summary.get('best_step')}) |",
            f"| training loss (last steps) | {_num(summary.get('train_loss'), '.4f')} |",
            f"| trainable parameters | {summary.get('trainable_params', 0):,} of {summary.get('total_params', 0):,} |",
        ]
        if summary.get("stopped_early"):
            lines.append(f"| stopped early | {summary.get('stop_reason')} |")
    lines.append("")
    if curves:
        lines += ["## Curves", "", f"![training and validation loss, learning rate]({CURVES})", ""]
    lines += ["## Recipe", "", "The keys set differently from the defaults (the run's recipe.toml holds every key):", "", "```toml"]
    lines += [f"{key} = {report.value_text(value)}" for key, value in report.changed_keys(recipe).items()]
    lines += ["```", ""]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)


def write(folder: Path, recipe: Any, summary: dict[str, Any] | None, run: Path | None, data: dict[str, Any] | None = None,
          kind: str | None = None, base: str | None = None, note: str = "") -> Path:
    """Write folder/README.md (and copy the run's curves.png beside it). Returns the card's path."""
    folder = Path(folder)
    if kind is None:
        kind = "LoRA adapter" if (folder / "adapter_config.json").exists() else "model"
    curves = run is not None and (run / CURVES).is_file()
    if curves:
        shutil.copyfile(run / CURVES, folder / CURVES)
    title = run.resolve().name if run is not None else folder.resolve().name
    text = card_text(recipe, summary, kind, _base_of(recipe) if base is None else base, data, curves, title, note)
    (folder / CARD).write_text(text, encoding="utf-8")
    return folder / CARD


def write_run_cards(recipe: Any, summary: dict[str, Any], out: Path, data: dict[str, Any]) -> None:
    """The cards of a finished run: its final model and, with early stopping, best/."""
    for name in (recipe.train.final_dir, "best"):
        if (out / name).is_dir():
            note = "The weights of the best evaluation (early stopping); `final/` holds the last step's." if name == "best" else ""
            write(out / name, recipe, summary, out, data, note=note)
