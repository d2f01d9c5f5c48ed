"""Checkpoints: write them atomically, find the newest complete one, prune old ones, load one.

A checkpoint is a folder OUTPUT_DIR/checkpoints/step-00000012 holding

- weights.safetensors: the trainable weights (the LoRA adapter, or every weight in full training);
- best_weights.safetensors: the best weights so far, when an early-stopping plugin keeps them;
- optimizer.bin: the optimizer's state_dict (tensors, numbers, lists: read with torch.load(weights_only=True));
- scheduler.json, scaler.json (fp16 only): the scheduler's and the gradient scaler's state_dict, as JSON;
- rng_state_<process>.json: the python, numpy, torch and CUDA generators of every process, as JSON;
- plugins.pt: what each stateful plugin returned from plugin_state (torch.load(weights_only=True));
- trainer_state.json: the step counters and data position (TrainState), the logged-loss window, the
  run identity (for the change warnings and the checks) and the length of each log file in the run folder.

Nothing a resume reads can run code: tensors come through safetensors or torch.load(weights_only=True),
everything else is JSON. Accelerate's save_state/load_state are not used (they unpickle the scheduler
and random states with weights_only=False); pickle files of older checkpoints are never opened.
Everything is checked (the files, the tensor names, shapes and dtypes against the model, the names
of the log files) before a resume changes anything in the run folder.

It is written into checkpoints/.tmp-step-00000012 and renamed into place when every file is on disk,
so a folder named step-N is always complete. Old checkpoints are deleted only after that rename.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
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
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
LEGACY_PICKLES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scaler.pt")  # written by Accelerate's save_state
LOG_SUFFIXES = (".jsonl", ".csv", ".tsv", ".log")  # append-only logs a resume cuts back to the checkpoint
_NAME = re.compile(r"^step-(\d+)$")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ finding checkpoints
def name_for(step: int) -> str:
    return f"step-{step:08d}"


def complete(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run folder as (step, folder), oldest first."""
    return [(step, folder) for step, folder in _step_folders(out) if (folder / STATE_FILE).is_file()]


def _step_folders(out: Path) -> list[tuple[int, Path]]:
    root = Path(out) / FOLDER
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def newest(out: Path) -> Path | None:
    found = complete(out)
    return found[-1][1] if found else None


def incomplete_after(out: Path, step: int) -> list[Path]:
    """Checkpoint folders newer than `step` that are not complete (no trainer_state.json), and half-written ones."""
    root = Path(out) / FOLDER
    partial = [folder for s, folder in _step_folders(out) if s > step and not (folder / STATE_FILE).is_file()]
    if root.is_dir():
        partial += sorted(p for p in root.iterdir() if p.name.startswith(".tmp-step-"))
    return partial


def previous_complete(checkpoint: Path) -> Path | None:
    """The newest complete checkpoint of the same run older than `checkpoint` (None: there is none)."""
    checkpoint = Path(checkpoint)
    match = _NAME.match(checkpoint.name)
    if not match:
        return None
    older = [folder for step, folder in complete(checkpoint.parent.parent) if step < int(match.group(1))]
    return older[-1] if older else None


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


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
        if _main_process():
            for folder in incomplete_after(out, int(found.name.split("-")[1]) if found else -1):
                older = f"resuming from the older {found.name}" if found else "no complete checkpoint is left"
                warn(f"train.resume: checkpoint {folder} is incomplete (no {STATE_FILE}; the run was stopped while writing it); {older}")
            if found is None and (out / "recipe.toml").exists():
                warn(f"train.resume=auto: the unfinished run in '{out}' has no complete checkpoint; it starts over from step 0")
            elif found is None:
                warn(f"train.resume=auto: '{out}' has no checkpoint to resume from; starting from step 0")
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


def identity(recipe: Any, world_size: int, blocks: list[torch.Tensor], total_steps: int) -> dict[str, Any]:
    """What a resume compares against the checkpoint: a change in any of these changes the run.

    "model" holds the recipe keys that decide which weights are trained (model.base, model.config,
    model.tokenizer and every lora key): a checkpoint that does not fit the model names the ones that changed.
    """
    train_cfg = recipe.train
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block.numpy().tobytes())
        digest.update(b"|")
    model_keys = {
        "model.base": "" if recipe.model.config else recipe.model.base,
        "model.config": recipe.model.config,
        "model.tokenizer": recipe.model.tokenizer,
        **{f"lora.{k}": v for k, v in dataclasses.asdict(recipe.lora).items()},
    }
    return {
        "batch_size": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.gradient_accumulation_steps,
        "seed": train_cfg.seed,
        "world_size": world_size,
        "data": f"{len(blocks)} blocks, sha256 {digest.hexdigest()[:16]}",
        "total_steps": total_steps,
        "model": json.loads(json.dumps(model_keys)),  # as it reads back from trainer_state.json
    }


def identity_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    lines = [
        f"resuming with a changed {label}: {saved.get(key)} in the checkpoint, {now.get(key)} now; "
        f"the run will not repeat an uninterrupted one"
        for key, label in IDENTITY_LABELS.items()
        if saved.get(key) != now.get(key)
    ]
    return lines + [
        f"resuming with a changed {key}: {before} in the checkpoint, {after} now; the run will not repeat an uninterrupted one"
        for key, before, after in model_changes(saved, now)
    ]


def model_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, in the checkpoint, now) for each model or lora key that differs (keys the checkpoint lacks are skipped)."""
    before, after = saved.get("model") or {}, now.get("model") or {}
    if not isinstance(before, dict):
        return []
    return [(key, before[key], after.get(key)) for key in before if key in after and before[key] != after[key]]


# ------------------------------------------------------------------ writing
@dataclass
class Parts:
    """What a checkpoint saves and restores beside the weights: the optimizer, the scheduler, the fp16 scaler."""

    accelerator: Any
    model: Any  # as prepared by Accelerate
    optimizer: Any
    scheduler: Any

    @property
    def scheduler_has_state(self) -> bool:
        return callable(getattr(self.scheduler, "state_dict", None)) and callable(getattr(self.scheduler, "load_state_dict", None))


def register(accelerator: Any, model: Any, optimizer: Any, scheduler: Any) -> Parts:
    """The parts of the run a checkpoint saves; warns when the scheduler has no state to save."""
    parts = Parts(accelerator, model, optimizer, scheduler)
    if not parts.scheduler_has_state and accelerator.is_main_process:
        warn(f"the scheduler {type(scheduler).__name__} has no state_dict; a resumed run restarts its schedule")
    return parts


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


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.json"


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) generators of this process, as JSON-ready lists of numbers."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what rng_state() returned. Raises ValueError/TypeError/KeyError on a malformed state."""
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    python = (int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss))
    numpy_state = (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    torch_state = torch.tensor(state["torch"], dtype=torch.uint8)
    cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]] if torch.cuda.is_available() and "cuda" in state else None
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value) + "\n", encoding="utf-8")


def _save_parts(folder: Path, parts: Parts) -> None:
    """optimizer.bin, scheduler.json, scaler.json and this process's rng_state_N.json into `folder`."""
    from engine import distributed

    accelerator = parts.accelerator
    if distributed.is_fsdp(accelerator):  # the optimizer state is sharded: gathered by every process
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, parts.optimizer, parts.model, str(folder))
    elif accelerator.is_main_process:
        torch.save(parts.optimizer.state_dict(), folder / OPTIMIZER_FILE)
    if accelerator.is_main_process:
        if parts.scheduler_has_state:
            _write_json(folder / SCHEDULER_FILE, parts.scheduler.state_dict())
        if accelerator.scaler is not None:
            _write_json(folder / SCALER_FILE, accelerator.scaler.state_dict())
    _write_json(folder / rng_file(accelerator.process_index), rng_state())


def write(
    out: Path,
    parts: Parts,
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

    accelerator = parts.accelerator
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
            _save_parts(tmp, parts)  # optimizer, scheduler, scaler, RNG of every process
        except FloatingPointError as exc:
            problem = (
                f"the weights are not finite after step {state.step} ({exc}); no checkpoint was written and {kept}. "
                f"Lower train.learning_rate or check the data"
            )
        except OSError as exc:
            problem = f"could not write checkpoint {final}: {exc.strerror or exc} ({exc.filename or tmp}); {kept}"
        except (TypeError, ValueError) as exc:  # a scheduler state that is not plain data (JSON)
            problem = f"could not write checkpoint {final}: a state is not plain data ({exc}); {kept}"
    if _any_process(accelerator, bool(problem)):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(problem or f"another process could not write checkpoint {final}; {kept}")
    if accelerator.is_main_process:
        record = {
            "format": FORMAT,
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
FORMAT = 2  # 1: Accelerate's pickles (custom_checkpoint_0.pkl, random_states_N.pkl); never read


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


class _Damaged(Exception):
    """A checkpoint file that is missing, cut short, malformed, or not data-only."""


def _damaged(path: Path, problem: str) -> UserError:
    previous = previous_complete(path)
    where = (
        f"resume from the previous complete checkpoint with train.resume={previous}"
        if previous else "no earlier complete checkpoint exists; start over with train.overwrite=true"
    )
    return UserError(f"train.resume: checkpoint {path} is damaged ({problem}); nothing was changed; {where}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError (cut short, bad header), OSError
        raise _Damaged(f"{path.name}: {exc}") from None


def _read_data_only(path: Path) -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts; no code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _Damaged(f"{path.name} holds more than data and was not loaded: {first}") from None
    except Exception as exc:
        raise _Damaged(f"{path.name}: {type(exc).__name__}: {exc}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Damaged(f"{path.name}: {exc}") from None


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _check_record(record: Any, path: Path) -> None:
    """trainer_state.json: the fields a resume uses, with their types; log names are plain file names."""
    from engine.context import TrainState

    if not isinstance(record, dict):
        raise _Damaged(f"{STATE_FILE}: not a JSON object")
    if record.get("format") != FORMAT:
        legacy = [name for name in LEGACY_PICKLES if (path / name).exists()] or ["format " + str(record.get("format"))]
        raise UserError(
            f"train.resume: checkpoint {path} was written by an earlier version of tunesmith with pickle files "
            f"({', '.join(legacy)}) that a resume no longer opens (unpickling can run code); nothing was changed; "
            f"start over with train.overwrite=true, or finish the run with the version that wrote it"
        )
    state, progress, logs = record.get("state"), record.get("progress"), record.get("logs", {})
    fields = {f.name for f in dataclasses.fields(TrainState)}
    if not isinstance(state, dict) or set(state) - fields or not all(isinstance(state.get(k), int) for k in ("step", "epoch", "step_in_epoch", "tokens_seen")):
        raise _Damaged(f"{STATE_FILE}: 'state' is not the step counters")
    needed = {"loss_window": list, "window_tokens": int, "last_loss": (int, float), "last_eval": dict, "train_seconds": (int, float)}
    if not isinstance(progress, dict) or not all(isinstance(progress.get(k), t) for k, t in needed.items()):
        raise _Damaged(f"{STATE_FILE}: 'progress' lacks the loss window or the timers")
    if not isinstance(logs, dict):
        raise _Damaged(f"{STATE_FILE}: 'logs' is not a table of file names and sizes")
    for name, size in logs.items():
        if not _plain_name(name) or Path(name).suffix not in LOG_SUFFIXES:
            raise _Damaged(f"{STATE_FILE}: 'logs' names {name!r}, which is not a log file name inside the run folder")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _Damaged(f"{STATE_FILE}: 'logs' gives {name} the size {size!r}")


def _check_fits(path: Path, weights: dict[str, torch.Tensor], params: dict[str, torch.Tensor], saved: dict, now: dict) -> None:
    """The checkpoint's tensors against the model's trainable parameters: names, shapes, dtypes."""
    problem = ""
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        problem = (
            f"{len(weights)} tensors in the checkpoint, {len(params)} trained now"
            + (f"; not in the checkpoint: {missing[0]}" if missing else "")
            + (f"; not in this model: {extra[0]}" if extra else "")
        )
    else:
        for name, param in params.items():
            tensor = weights[name]
            if tuple(tensor.shape) != tuple(param.shape):
                problem = f"{name} is {list(tensor.shape)} in the checkpoint, {list(param.shape)} now"
                break
            if tensor.dtype != param.dtype:
                problem = f"{name} is {tensor.dtype} in the checkpoint, {param.dtype} now"
                break
    if not problem:
        return
    changed = "; ".join(f"{key} was {before!r}, now {after!r}" for key, before, after in model_changes(saved, now))
    cause = f"the recipe changed: {changed}" if changed else "check model.base, model.config and the lora keys"
    raise UserError(
        f"train.resume: checkpoint {path} does not fit this model ({problem}); {cause}; nothing was changed. "
        f"Resume with the recipe the checkpoint was written with, or start a new run in another train.output_dir"
    )


def load(path: Path, parts: Parts, run_identity: dict[str, Any]) -> Restored:
    """Read and check a checkpoint, then restore the optimizer, scheduler, scaler and RNG states.

    Every file is read and checked (damaged, crafted, or not fitting the model: one UserError, nothing
    changed) before any state is put in place. The weights, counters and plugin states are returned for
    the loop to put in place. Warns (never silently) about a changed run identity and missing RNG state.
    """
    path = Path(path)
    accelerator = parts.accelerator
    unwrapped = accelerator.unwrap_model(parts.model)
    params = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    try:
        record = _read_json(path / STATE_FILE)
        _check_record(record, path)
        weights = _read_tensors(path / WEIGHTS_FILE)
        best = _read_tensors(path / BEST_FILE) if (path / BEST_FILE).exists() else None
        plugin_states = _read_data_only(path / PLUGINS_FILE) if (path / PLUGINS_FILE).exists() else {}
        if not isinstance(plugin_states, dict):
            raise _Damaged(f"{PLUGINS_FILE}: not a table of plugin states")
        _check_fits(path, weights, params, record.get("identity", {}), run_identity)
        if best is not None:
            _check_fits(path, best, params, record.get("identity", {}), run_identity)
        fsdp = _fsdp(accelerator)
        optimizer_state = None if fsdp else _read_data_only(path / OPTIMIZER_FILE)
        if fsdp and not (path / OPTIMIZER_FILE).exists():
            raise _Damaged(f"{OPTIMIZER_FILE}: missing")
        scheduler_state = _read_json(path / SCHEDULER_FILE) if parts.scheduler_has_state else None
        scaler_state = _read_json(path / SCALER_FILE) if accelerator.scaler is not None and (path / SCALER_FILE).exists() else None
        rng_path = path / rng_file(accelerator.process_index)
        rng = _read_json(rng_path) if rng_path.exists() else None
    except _Damaged as exc:
        raise _damaged(path, str(exc)) from None
    if accelerator.is_main_process:
        for line in identity_changes(record.get("identity", {}), run_identity):
            warn(line)
    try:  # each load_state_dict checks before it changes anything
        if fsdp:  # full state dict: Accelerate reads optimizer.bin with torch.load(weights_only=True)
            from accelerate.utils import load_fsdp_optimizer

            try:
                load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, parts.optimizer, parts.model, str(path))
            except (pickle.UnpicklingError, EOFError, OSError) as exc:
                raise _damaged(path, f"{OPTIMIZER_FILE}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
        else:
            parts.optimizer.load_state_dict(optimizer_state)
        if scheduler_state is not None:
            parts.scheduler.load_state_dict(scheduler_state)
        if scaler_state is not None:
            accelerator.scaler.load_state_dict(scaler_state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise UserError(
            f"train.resume: the optimizer or scheduler state in checkpoint {path} does not fit this run "
            f"({type(exc).__name__}: {exc}); check the optimizer and scheduler plugins and their options"
        ) from None
    _restore_rng(path, rng, accelerator.process_index)
    return Restored(path, record["state"], record["progress"], record.get("identity", {}), record.get("logs", {}), weights, best, plugin_states)


def _fsdp(accelerator: Any) -> bool:
    from engine import distributed

    if not distributed.is_fsdp(accelerator):
        return False
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    if accelerator.state.fsdp_plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        raise UserError(
            "train.resume: under FSDP a checkpoint is resumed only with fsdp_state_dict_type: FULL_STATE_DICT "
            "(a sharded optimizer state is read through pickled metadata); set it in the Accelerate config"
        )
    return True


def _restore_rng(path: Path, state: Any, rank: int) -> None:
    """Put the random generators back; a missing or unreadable state is a warning, never silent."""
    consequence = "dropout and other random draws will not repeat the uninterrupted run"
    if state is None:
        warn(f"{path}: no random number generator state for process {rank} ({rng_file(rank)}); {consequence}")
        return
    try:
        set_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        warn(f"{path / rng_file(rank)}: could not restore the random number generator state ({type(exc).__name__}: {exc}); {consequence}")


def _written_logs(out: Path) -> set[str]:
    """Log names the engine writes, and those plugins asked for with context.run_file (the .plugin-files list)."""
    from engine.runfolder import PLUGIN_FILES

    manifest = Path(out) / PLUGIN_FILES
    names = set(manifest.read_text(encoding="utf-8").splitlines()) if manifest.is_file() else set()
    return names | {"metrics.jsonl", "samples.jsonl"}


def rewind_run_folder(out: Path, restored: Restored) -> None:
    """Cut the run folder back to the checkpoint: logs to their length then, no summary of a later end.

    The log names were checked when the checkpoint was read (plain file names; nothing outside `out`).
    """
    if not belongs_to(restored.path, out):
        return  # a checkpoint of another run, continued in a new folder
    for name, size in restored.logs.items():
        path = Path(out) / name
        if path.is_symlink() or not path.is_file():
            continue
        if path.stat().st_size > size:
            with path.open("r+b") as f:
                f.truncate(size)
        elif path.stat().st_size < size:
            warn(f"{path} is shorter than when checkpoint {restored.path.name} was written; it continues from its end")
    written = _written_logs(out)
    for path in Path(out).iterdir() if Path(out).is_dir() else []:
        if path.name in written and path.is_file() and not path.is_symlink() and path.suffix in LOG_SUFFIXES and path.name not in restored.logs:
            path.unlink()  # the engine or a plugin began it only after the checkpoint (a log of your own is left alone)
    summary = Path(out) / "metrics.json"
    if summary.exists():
        summary.unlink()
