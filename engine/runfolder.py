"""Run folders: finding things in one (the model folder to use, the recipe as run, the metrics), and
keeping them safe (the marker that says the engine wrote a folder, file names that stay inside it,
folders that can be written)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

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


# ------------------------------------------------------------------ what the engine may write and delete
MARKER = ".tunesmith-run"  # written into every run folder the engine creates or writes; overwrite needs it


def mark(out: Path) -> None:
    """Record that the engine writes this run folder (train.overwrite deletes run files only where this is)."""
    path = Path(out) / MARKER
    if not path.exists():
        path.write_text(json.dumps({"written_by": "tunesmith", "note": "train.overwrite may delete this folder's run files"}) + "\n", encoding="utf-8")


def check_not_foreign(out: Path, names: Iterable[str]) -> None:
    """Refuse to write a run into a folder whose run-file names (final/, best/, checkpoints/...) the engine did not write."""
    out = Path(out)
    if not out.is_dir() or (out / MARKER).is_file():
        return
    present = sorted(name for name in set(names) if (out / name).exists() or (out / name).is_symlink())
    if present:
        shown = ", ".join(f"{n}/" if (out / n).is_dir() else n for n in present)
        earlier = (
            f"; if an earlier version of tunesmith wrote this run, create an empty {MARKER} file there to let it be continued or replaced"
            if (out / "recipe.toml").is_file() else ""
        )
        raise UserError(
            f"train.output_dir: '{out}' holds {shown} that tunesmith did not write (no {MARKER} file); nothing was deleted. "
            f"Choose another train.output_dir, or move them away yourself{earlier}"
        )


def inside(out: str | Path, name: str, key: str = "filename") -> Path:
    """The path of file `name` inside run folder `out`; UserError when it would be anywhere else.

    For plugins that write files into the run folder: `runfolder.inside(context.output_dir, options.filename)`.
    `name` may hold sub-folders (plots/loss.png) but no '..', and is never absolute; a symbolic link
    that leads out of the folder is refused too. `key` names the option in the error.
    """
    out = Path(out)
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts or str(relative) in (".", ""):
        raise UserError(f"{key}: '{name}' must be a file name inside the run folder {out} (no '..', not absolute)")
    path = out / relative
    root = out.resolve()
    if path.resolve() != root and root not in path.resolve().parents:
        raise UserError(f"{key}: '{name}' leads out of the run folder {out} (a symbolic link?); give a file name inside it")
    return path


def is_plain_relative(name: str) -> bool:
    """A relative path without '..' (what `inside` accepts, before looking at links)."""
    relative = Path(name)
    return bool(name) and not relative.is_absolute() and ".." not in relative.parts and str(relative) != "."


# ------------------------------------------------------------------ can we write there at all
def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, key: str, what: str = "folder") -> None:
    """UserError when folder `path` cannot be created or written (a file in the way, no permission, read-only).

    Nothing is created: the probe is an anonymous temporary file in the folder, or in the nearest
    folder above it that exists.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}: '{path}' is a file, not a {what}; choose a folder")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"{key}: '{path}' cannot be created: '{existing}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f"'{path}'" if existing == Path(os.path.abspath(path)) else f"'{path}' (in '{existing}')"
        raise UserError(f"{key}: cannot write the {what} {where}: {reason}; choose a folder you can write to") from None


def check_can_write(recipe: Any) -> None:
    """The run folder and the tokenization cache can be written: checked before any model loads (and by `check`)."""
    check_writable(recipe.train.output_dir, "train.output_dir", "run folder")
    if recipe.data.cache:
        from engine import tokcache

        root = tokcache.cache_root(recipe.data)
        if root is not None:
            key = "data.cache_dir" if recipe.data.cache_dir else ("the cache folder $TUNESMITH_CACHE" if os.environ.get("TUNESMITH_CACHE") else "the cache folder ~/.cache/tunesmith")
            try:
                check_writable(root, key, "cache folder")
            except UserError as exc:
                raise UserError(f"{exc.lines[0]}, or set data.cache = false") from None
