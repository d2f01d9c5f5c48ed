"""The run folder: refusing to replace a run by accident (and what the engine did not write), clearing
one, saving a model into it; finding things in it afterwards (the model folder to use, the recipe as
run, the metrics); file names that stay inside it, and folders that can be written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

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
    check_can_write(recipe)  # a file in the way, no permission, a read-only mount: before any model loads
    check_not_foreign(out, {*RUN_FILES, final_dir})  # never write over (or delete) what the engine did not write
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
        if path.is_dir() and not path.is_symlink():
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


# ------------------------------------------------------------------ what the engine may write and delete
MARKER = ".tunesmith-run"  # written into every run folder the engine creates or writes; overwrite needs it


def mark_as_run(out: Path) -> None:
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


# ------------------------------------------------------------------ files plugins write
PLUGIN_FILES = ".plugin-files"  # names handed out by TrainContext.run_file, one a line: train.overwrite removes them


def inside(out: str | Path, name: str, key: str = "") -> Path:
    """The path of `name` inside the run folder `out`; a UserError when it would lead out of it.

    `name` is a file or folder name relative to the run folder (subfolders allowed: "tb/events");
    absolute paths, ".." that climbs out, a symbolic link that leads out, and an empty name are refused.
    `key` (e.g. "curves.filename") names the option in the error.
    """
    where = f"{key}: " if key else ""
    if not isinstance(name, str) or not name.strip() or name.strip() in (".", "./"):
        raise UserError(f"{where}{name!r}: expected a file name inside the run folder {out} (e.g. metrics.csv)")
    root = Path(out).resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or path == root or root not in path.parents:
        raise UserError(
            f"{where}'{name}': a plugin's files go inside the run folder {out}; give a plain name such as "
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
