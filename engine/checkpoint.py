"""Checkpoints: write them atomically, find the newest complete one, prune old ones, load one.

A checkpoint is a folder OUTPUT_DIR/checkpoints/step-00000012 holding

- weights.safetensors: the trainable weights (the LoRA adapter, or every weight in full training);
- best_weights.safetensors: the best weights so far, when an early-stopping plugin keeps them;
- optimizer.bin, custom_checkpoint_0.pkl (the scheduler), scaler.pt (fp16 only) and
  random_states_<process>.pkl (python, numpy, torch and CUDA generators of every process):
  written by Accelerate's save_state;
- plugins.pt: what each stateful plugin returned from plugin_state;
- trainer_state.json: the step counters and data position (TrainState), the logged-loss window, the
  run identity (for the change warnings) and the length of each log file in the run folder.

It is written into checkpoints/.tmp-step-00000012 and renamed into place when every file is on disk,
so a folder named step-N is always complete. Old checkpoints are deleted only after that rename.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.errors import RunFailed, UserError

FOLDER = "checkpoints"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
BEST_FILE = "best_weights.safetensors"
PLUGINS_FILE = "plugins.pt"
LOG_SUFFIXES = (".jsonl", ".csv", ".tsv", ".log")  # append-only logs a resume cuts back to the checkpoint
_NAME = re.compile(r"^step-(\d+)$")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ finding checkpoints
def name_for(step: int) -> str:
    return f"step-{step:08d}"


def complete(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run folder as (step, folder), oldest first."""
    root = Path(out) / FOLDER
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _NAME.match(entry.name)
            if match and (entry / STATE_FILE).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def newest(out: Path) -> Path | None:
    found = complete(out)
    return found[-1][1] if found else None


def resume_point(train_cfg: Any, out: Path) -> Path | None:
    """The checkpoint train.resume asks for (None: start from the beginning). Checked before data loads."""
    spec = train_cfg.resume
    if not spec:
        return None
    if train_cfg.overwrite:
        raise UserError("train.resume and train.overwrite: both are set; resume continues the run, overwrite deletes it. Choose one")
    if spec == "auto":
        found = newest(out)
        if found is None and (out / "metrics.json").exists():
            raise UserError(
                f"train.resume: '{out}' holds a finished run with no checkpoint to continue from; "
                f"choose another train.output_dir, or add train.overwrite=true (without train.resume) to replace it"
            )
        return found
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"train.resume: '{spec}' is not a complete checkpoint folder (no {STATE_FILE}); "
            f"use \"auto\" for the newest one, or a folder like {out / FOLDER / name_for(12)}"
        )
    if not belongs_to(path, out) and ((out / "recipe.toml").exists() or (out / "metrics.json").exists()):
        raise UserError(
            f"train.resume: checkpoint '{spec}' is not one of '{out}', which holds another run; "
            f"choose an empty train.output_dir to continue from it"
        )
    return path


def belongs_to(checkpoint: Path, out: Path) -> bool:
    return Path(checkpoint).resolve().parent == (Path(out) / FOLDER).resolve()


def unfinished_run_problem(out: Path) -> str | None:
    """A message when `out` holds a run that did not finish (train.resume or train.overwrite needed)."""
    if not (out / "recipe.toml").exists() or (out / "metrics.json").exists():
        return None
    found = newest(out)
    held = f"an unfinished run with checkpoints (newest: {found.name})" if found else "an unfinished run (no checkpoint)"
    return (
        f"train.output_dir: '{out}' holds {held}; add train.resume=auto to continue it, "
        f"or train.overwrite=true to start over"
    )


# ------------------------------------------------------------------ run identity
IDENTITY_LABELS = {
    "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "seed": "train.seed",
    "world_size": "number of processes",
    "data": "training data (data.train, the tokenizer or data.max_length; fingerprint of the token blocks)",
    "total_steps": "number of steps (train.epochs or train.max_steps)",
}


def identity(train_cfg: Any, world_size: int, blocks: list[torch.Tensor], total_steps: int) -> dict[str, Any]:
    """What a resume compares against the checkpoint: a change in any of these changes the run."""
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block.numpy().tobytes())
        digest.update(b"|")
    return {
        "batch_size": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.gradient_accumulation_steps,
        "seed": train_cfg.seed,
        "world_size": world_size,
        "data": f"{len(blocks)} blocks, sha256 {digest.hexdigest()[:16]}",
        "total_steps": total_steps,
    }


def identity_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [
        f"resuming with a changed {label}: {saved.get(key)} in the checkpoint, {now.get(key)} now; "
        f"the run will not repeat an uninterrupted one"
        for key, label in IDENTITY_LABELS.items()
        if saved.get(key) != now.get(key)
    ]


# ------------------------------------------------------------------ writing
def register(accelerator: Any, scheduler: Any) -> None:
    """Have Accelerate's save_state/load_state include the scheduler (it is not passed to prepare)."""
    if callable(getattr(scheduler, "state_dict", None)) and callable(getattr(scheduler, "load_state_dict", None)):
        accelerator.register_for_checkpointing(scheduler)
    else:
        warn(f"the scheduler {type(scheduler).__name__} has no state_dict; a resumed run restarts its schedule")


def _any_process(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([int(flag)], device=accelerator.device)).max().item())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(folder: Path) -> None:
    """Delete a folder by renaming it out of the way first, so a kill never leaves a half-deleted step-N."""
    trash = folder.with_name(f".trash-{folder.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def clear_leftovers(out: Path) -> None:
    """Remove half-written (.tmp-*) and half-deleted (.trash-*) folders left by a killed run."""
    root = Path(out) / FOLDER
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(entry, ignore_errors=True)


def log_sizes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(out).iterdir()) if p.is_file() and p.suffix in LOG_SUFFIXES}


def write(
    out: Path,
    accelerator: Any,
    state: Any,
    weights: Callable[[], dict[str, torch.Tensor]],
    best_weights: dict[str, torch.Tensor] | None,
    plugin_states: dict[str, Any],
    progress: dict[str, Any],
    run_identity: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of optimizer step `state.step`, atomically; then prune old ones.

    weights: called on the main process only, returns the trainable weights (CPU tensors).
    Raises RunFailed (exit 1) when a file cannot be written (disk full...) or the weights are not
    finite; the previous checkpoints are left as they were.
    """
    from safetensors.torch import save_file

    root = Path(out) / FOLDER
    final = root / name_for(state.step)
    tmp = root / f".tmp-{final.name}"
    previous = newest(out)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    problem = ""
    if accelerator.is_main_process:
        try:
            clear_leftovers(out)
            tmp.mkdir(parents=True)
        except OSError as exc:
            problem = f"could not write checkpoint {final}: {exc.strerror or exc} ({exc.filename or tmp}); {kept}"
    accelerator.wait_for_everyone()
    if not problem:
        try:
            if accelerator.is_main_process:
                current = weights()
                bad = [name for name, t in current.items() if not torch.isfinite(t).all()]
                if bad:
                    raise FloatingPointError(bad[0])
                save_file({k: v.contiguous() for k, v in current.items()}, str(tmp / WEIGHTS_FILE))
                if best_weights is not None:
                    save_file({k: v.contiguous() for k, v in best_weights.items()}, str(tmp / BEST_FILE))
                torch.save(plugin_states, tmp / PLUGINS_FILE)
            handle = accelerator.register_save_state_pre_hook(lambda models, model_weights, folder: model_weights.clear())
            try:  # optimizer, scheduler, scaler, RNG of every process; the model weights are ours (above)
                accelerator.save_state(str(tmp))
            finally:
                handle.remove()
        except FloatingPointError as exc:
            problem = (
                f"the weights are not finite after step {state.step} ({exc}); no checkpoint was written and {kept}. "
                f"Lower train.learning_rate or check the data"
            )
        except OSError as exc:
            problem = f"could not write checkpoint {final}: {exc.strerror or exc} ({exc.filename or tmp}); {kept}"
    if _any_process(accelerator, bool(problem)):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(problem or f"another process could not write checkpoint {final}; {kept}")
    if accelerator.is_main_process:
        record = {
            "format": 1,
            "step": state.step,
            "state": dataclasses.asdict(state),
            "progress": progress,
            "identity": run_identity,
            "logs": log_sizes(out),
        }
        try:
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            for path in tmp.iterdir():
                _fsync(path)
            if final.exists():  # the same step written again after resuming from an older checkpoint
                _discard(final)
            os.rename(tmp, final)
            _fsync(root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunFailed(f"could not write checkpoint {final}: {exc.strerror or exc} ({exc.filename or tmp}); {kept}") from None
        prune(out, keep, protect_step=state.best_step)
    accelerator.wait_for_everyone()
    return final


def prune(out: Path, keep: int, protect_step: int) -> None:
    """Delete all but the `keep` newest complete checkpoints, never the one of the best step."""
    found = complete(out)
    for step, folder in found[: max(0, len(found) - keep)]:
        if step != protect_step:
            _discard(folder)


# ------------------------------------------------------------------ loading
@dataclass
class Restored:
    path: Path
    state: dict[str, Any]
    progress: dict[str, Any]
    identity: dict[str, Any]
    logs: dict[str, int]
    weights: dict[str, torch.Tensor]
    best_weights: dict[str, torch.Tensor] | None
    plugin_states: dict[str, Any]


def load(path: Path, accelerator: Any, run_identity: dict[str, Any], trainable_names: set[str]) -> Restored:
    """Read a checkpoint and restore the optimizer, scheduler, scaler and RNG states through Accelerate.

    The weights, counters and plugin states are returned for the loop to put in place. Warns (never
    silently) about a changed run identity and about RNG state that is missing or not restored.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        record = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(path / WEIGHTS_FILE))
        best = load_file(str(path / BEST_FILE)) if (path / BEST_FILE).exists() else None
        plugin_states = torch.load(path / PLUGINS_FILE, weights_only=True) if (path / PLUGINS_FILE).exists() else {}
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"train.resume: could not read checkpoint {path}: {exc}") from None
    if set(weights) != trainable_names:
        raise UserError(
            f"train.resume: checkpoint {path} holds weights of another model ({len(weights)} tensors, "
            f"this run trains {len(trainable_names)}); check model.base, model.config and lora.enabled"
        )
    if accelerator.is_main_process:
        for line in identity_changes(record.get("identity", {}), run_identity):
            warn(line)
    handle = accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
    try:
        accelerator.load_state(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"train.resume: could not load checkpoint {path}: {exc}") from None
    finally:
        handle.remove()
    _check_rng(path, accelerator)
    return Restored(path, record["state"], record.get("progress", {}), record.get("identity", {}), record.get("logs", {}), weights, best, plugin_states)


def _check_rng(path: Path, accelerator: Any) -> None:
    """Accelerate skips RNG state it cannot load without a word; say so."""
    from accelerate.utils import load as accelerate_load

    rank = accelerator.process_index
    rng_file = path / f"random_states_{rank}.pkl"
    consequence = "dropout and other random draws will not repeat the uninterrupted run"
    if not rng_file.exists():
        warn(f"{path}: no random number generator state for process {rank} ({rng_file.name}); {consequence}")
        return
    try:
        saved = accelerate_load(rng_file)
        restored = torch.equal(saved["torch_manual_seed"], torch.get_rng_state())
    except Exception as exc:  # an unreadable file: warn, the run itself can go on
        warn(f"{rng_file}: could not read the random number generator state ({type(exc).__name__}: {exc}); {consequence}")
        return
    if not restored:
        warn(f"{rng_file}: the random number generator state was not restored; {consequence}")


def rewind_run_folder(out: Path, restored: Restored) -> None:
    """Cut the run folder back to the checkpoint: logs to their length then, no summary of a later end."""
    if not belongs_to(restored.path, out):
        return  # a checkpoint of another run, continued in a new folder
    for name, size in restored.logs.items():
        path = Path(out) / name
        if path.exists() and path.stat().st_size > size:
            with path.open("r+b") as f:
                f.truncate(size)
        elif path.exists() and path.stat().st_size < size:
            warn(f"{path} is shorter than when checkpoint {restored.path.name} was written; it continues from its end")
    for path in Path(out).iterdir() if Path(out).is_dir() else []:
        if path.is_file() and path.suffix in LOG_SUFFIXES and path.name not in restored.logs:
            path.unlink()  # written only after the checkpoint
    summary = Path(out) / "metrics.json"
    if summary.exists():
        summary.unlink()
