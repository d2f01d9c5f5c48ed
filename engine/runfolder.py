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
    if is_model_folder(path):
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


# ------------------------------------------------------------------ files plugins write
PLUGIN_FILES = ".plugin-files"  # names handed out by TrainContext.run_file, one a line: train.overwrite removes them


def inside(out: str | Path, name: str) -> Path:
    """The path of `name` inside the run folder `out`; a UserError when it would lead out of it.

    `name` is a file or folder name relative to the run folder (subfolders allowed: "tb/events");
    absolute paths, ".." that climbs out and an empty name are refused.
    """
    if not isinstance(name, str) or not name.strip() or name.strip() in (".", "./"):
        raise UserError(f"{name!r}: expected a file name inside the run folder {out} (e.g. metrics.csv)")
    root = Path(out).resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or path == root or root not in path.parents:
        raise UserError(
            f"'{name}': a plugin's files go inside the run folder {out}; give a plain name such as "
            f"metrics.csv (no absolute path, no '..')"
        )
    return Path(out) / path.relative_to(root)


def record_plugin_file(out: str | Path, name: str) -> None:
    """Remember a plugin's file, so that train.overwrite removes it with the rest of the run."""
    manifest = Path(out) / PLUGIN_FILES
    names = manifest.read_text(encoding="utf-8").splitlines() if manifest.exists() else []
    if name not in names:
        Path(out).mkdir(parents=True, exist_ok=True)
        manifest.write_text("".join(f"{n}\n" for n in [*names, name]), encoding="utf-8")


def clear_plugin_files(out: str | Path) -> None:
    """Remove the files and folders plugins wrote through TrainContext.run_file (train.overwrite)."""
    import shutil

    manifest = Path(out) / PLUGIN_FILES
    if not manifest.exists():
        return
    for name in manifest.read_text(encoding="utf-8").splitlines():
        try:
            path = inside(out, name)
        except UserError:
            continue  # never follow a hand-edited manifest out of the run folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    manifest.unlink()
