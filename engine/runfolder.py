"""Finding things in a run folder: the model folder to use, the recipe as run, the metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine import tomlfile
from engine.errors import UserError


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def model_folder(path: str | Path) -> Path:
    """A model or adapter folder as given (final/, best/, a checkpoint, any save_pretrained folder), or a run's final/."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder; give a run folder or a model folder (final/, best/, a checkpoint)")
    if is_model_folder(path) or (path / "weights.safetensors").is_file():  # a checkpoint: engine/from_checkpoint.py
        return path
    final_dir = read_recipe(path).get("train", {}).get("final_dir", "final") if (path / "recipe.toml").exists() else "final"
    if is_model_folder(path / final_dir):
        return path / final_dir
    if (path / "recipe.toml").exists():
        raise UserError(f"{path}: the run has no final/ model yet (unfinished?); give one of its model folders (best/, a checkpoint)")
    raise UserError(f"{path}: holds neither a model (config.json) nor a LoRA adapter (adapter_config.json) nor a run's final/")


def run_of(model_dir: Path) -> Path | None:
    """The run folder a model folder belongs to (final/, best/, checkpoints/NAME/), if any."""
    for folder in (model_dir, model_dir.parent, model_dir.parent.parent):
        if (folder / "recipe.toml").exists():
            return folder
    return None


def read_recipe(run_dir: Path) -> dict[str, Any]:
    return tomlfile.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.exists():
        raise UserError(f"{run_dir}: not a finished run (no metrics.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_history(run_dir: Path, filename: str = "metrics.jsonl") -> list[dict[str, Any]]:
    path = run_dir / filename
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
