"""The run folder: refusing to replace a run by accident, clearing one, saving a model into it; and
finding things in it afterwards (the model folder to use, the recipe as run, the metrics)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engine import tomlfile
from engine.errors import UserError

RUN_FILES = ("recipe.toml", "metrics.jsonl", "metrics.json", "final", "best", "checkpoints", "samples.txt", "samples.jsonl", "curves.png")


def check_output_dir(recipe: Any) -> Path:
    """Refuse to replace a finished or unfinished run unless train.overwrite or train.resume is set."""
    from engine import checkpoint

    out = Path(recipe.train.output_dir)
    final_dir = recipe.train.final_dir
    if not final_dir or Path(final_dir).name != final_dir or final_dir in (".", "..", "best", "checkpoints"):
        raise UserError(f"train.final_dir: '{final_dir}' must be a plain folder name other than best or checkpoints (e.g. final)")
    finished = (out / "metrics.json").exists()
    if finished and not (recipe.train.overwrite or recipe.train.resume):
        raise UserError(
            f"train.output_dir: '{out}' holds a finished run (metrics.json); choose another folder, "
            f"add train.overwrite=true to replace it, or train.resume=auto to continue it"
        )
    unfinished = checkpoint.unfinished_run_problem(out)
    if unfinished and not (recipe.train.overwrite or recipe.train.resume):
        raise UserError(unfinished)
    return out


def clear_run_files(out: Path, final_dir: str = "final") -> None:
    """Remove what a run wrote: the engine's files and those plugins asked for with context.run_file."""
    clear_plugin_files(out)
    for name in {*RUN_FILES, final_dir}:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def save_model(model: Any, tokenizer: Any, folder: Path, accelerator: Any, wrapped: Any) -> None:
    """save_pretrained (safetensors) of the model or LoRA adapter, plus the tokenizer, by the main process.

    Called on every process: under FSDP the full weights are gathered from all of them first.
    """
    from engine import distributed

    state_dict = distributed.full_state_dict(accelerator, wrapped)
    if not accelerator.is_main_process:
        return
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


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
