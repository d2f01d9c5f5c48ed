"""The fault suite: each way to fail leaves everything already written exactly as it was.

For every case below: a non-zero exit, exactly one `error:` line, no traceback, no file outside the
run folder created, changed or removed, and every file of the earlier (finished) run and its
checkpoints byte for byte unchanged. One small finished LoRA run is built once per session and copied
for each case; a case may first plant something in its copy (a damaged or crafted checkpoint file).

Add a row to CASES whenever a new way to fail is found.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from engine import checkpoint, hub, tomlfile
from engine.cli import main
from engine.testing import run_recipe, tiny_recipe

STEP_LAST, STEP_FIRST = checkpoint.name_for(4), checkpoint.name_for(2)


class Planted:
    """Unpickling this creates the file `marker`: proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------ the finished run, built once
@pytest.fixture(scope="session")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished LoRA run (r=4) with checkpoints at steps 2 and 4, and the recipe that made it."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = tiny_recipe(
        folder, sinks=["jsonl"], model={"base": str(tiny_model_dir), "config": {}}, lora={"enabled": True, "r": 4, "alpha": 8},
        train={"max_steps": 4, "save_every_steps": 2, "batch_size": 4, "keep_checkpoints": 2, "log_every_steps": 1},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe(recipe)
    finally:
        torch.set_num_threads(threads)
    run = folder / "run"
    assert [s for s, _ in checkpoint.complete(run)] == [2, 4] and (run / "metrics.json").exists()
    other = folder / "other-model"  # another base model: wider, so the adapter's shapes differ
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(tiny_model_dir)
    config.n_embd = 32
    GPT2LMHeadModel(config).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, other / name)
    return run, recipe, other


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and link under `folder` with a digest of its bytes (link: its target)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


# ------------------------------------------------------------------ what to plant in the copy
def evil_torch(name: str, step: str = STEP_LAST):
    def plant(run: Path, marker: Path) -> None:
        torch.save({"state": Planted(marker)}, run / "checkpoints" / step / name)
    return plant


def truncate(name: str, keep: int = 40, step: str = STEP_LAST):
    def plant(run: Path, marker: Path) -> None:
        path = run / "checkpoints" / step / name
        path.write_bytes(path.read_bytes()[:keep])
    return plant


def edit_state(change: Callable[[dict], None], step: str = STEP_LAST):
    def plant(run: Path, marker: Path) -> None:
        path = run / "checkpoints" / step / checkpoint.STATE_FILE
        record = json.loads(path.read_text())
        change(record)
        path.write_text(json.dumps(record))
    return plant


def write_file(name: str, text: str, step: str = STEP_LAST):
    def plant(run: Path, marker: Path) -> None:
        (run / "checkpoints" / step / name).write_text(text)
    return plant


def legacy(run: Path, marker: Path) -> None:
    """A checkpoint as the version before this one wrote it: format 1 and Accelerate's pickles."""
    folder = run / "checkpoints" / STEP_LAST
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (folder / name).write_bytes(pickle.dumps(Planted(marker)))
    edit_state(lambda r: r.update(format=1))(run, marker)


def logs_outside(record: dict) -> None:
    record["logs"] = {"../victim.jsonl": 0, **record["logs"]}


def user_folders(run: Path, marker: Path) -> None:
    """A folder that never held a run, with the user's own best/ and checkpoints/ folders."""
    shutil.rmtree(run)
    (run / "best").mkdir(parents=True)
    (run / "best" / "notes.txt").write_text("mine")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "model.bin").write_text("also mine")


def remove_checkpoints(run: Path, marker: Path) -> None:
    shutil.rmtree(run / "checkpoints")


# ------------------------------------------------------------------ the cases
@dataclass
class Case:
    id: str
    args: list[str]  # after `train RECIPE` unless command is set; {run}, {out}, {other} are filled in
    fragments: list[str]  # each must be in the one error line
    plant: Callable[[Path, Path], None] | None = None
    command: list[str] | None = None  # another command than train (args then follow it)
    env: dict[str, str] = field(default_factory=dict)
    skip_root: bool = False


RESUME = ["train.resume=auto"]
CASES = [
    Case("resume-lora-r-changed", [*RESUME, "lora.r=8"], ["does not fit this model", "lora.r was 4, now 8", "nothing was changed"]),
    Case("resume-other-base-model", [*RESUME, "model.base={other}"], ["does not fit this model", "model.base was"]),
    Case("resume-no-checkpoint-in-finished-run", RESUME, ["holds a finished run with no checkpoint"], plant=remove_checkpoints),
    Case("resume-pickle-in-optimizer", RESUME, ["is damaged", "optimizer.bin holds more than data"], plant=evil_torch("optimizer.bin")),
    Case("resume-pickle-in-plugin-states", RESUME, ["is damaged", "plugins.pt holds more than data"], plant=evil_torch("plugins.pt")),
    Case("resume-pickle-as-weights", RESUME, ["is damaged", "weights.safetensors"], plant=evil_torch("weights.safetensors")),
    Case("resume-pickle-as-scheduler", RESUME, ["is damaged", "scheduler.json"], plant=evil_torch("scheduler.json")),
    Case("resume-pickle-as-rng-state", RESUME, ["is damaged", "rng_state_0.json"], plant=evil_torch("rng_state_0.json")),
    Case("resume-pickle-as-trainer-state", RESUME, ["is damaged", "trainer_state.json"], plant=evil_torch("trainer_state.json")),
    Case("resume-legacy-pickled-checkpoint", RESUME, ["written by an earlier version", "custom_checkpoint_0.pkl", "no longer opens"], plant=legacy),
    Case("resume-truncated-weights", RESUME, [f"checkpoint {{run}}/checkpoints/{STEP_LAST} is damaged", "weights.safetensors",
                                              f"train.resume={{run}}/checkpoints/{STEP_FIRST}"], plant=truncate("weights.safetensors")),
    Case("resume-truncated-optimizer", RESUME, ["is damaged", "optimizer.bin"], plant=truncate("optimizer.bin")),
    Case("resume-trainer-state-not-json", RESUME, ["is damaged", "trainer_state.json"], plant=write_file(checkpoint.STATE_FILE, "{not json")),
    Case("resume-log-path-outside-run", RESUME, ["is damaged", "'../victim.jsonl'", "not a log file name inside the run folder"],
         plant=edit_state(logs_outside)),
    Case("resume-scheduler-state-wrong", RESUME, ["does not fit this run"], plant=write_file("scheduler.json", '{"a": 1}')),
    Case("overwrite-folders-the-engine-did-not-write", ["train.overwrite=true"], ["tunesmith did not write", "best/", "checkpoints/", "nothing was deleted"],
         plant=user_folders),
    Case("output-dir-is-a-file", ["train.output_dir={run}/metrics.json"], ["train.output_dir:", "is a file, not a run folder"]),
    Case("output-dir-under-a-file", ["train.output_dir={run}/metrics.json/sub"], ["train.output_dir:", "cannot be created", "is a file, not a folder"]),
    Case("cache-dir-is-a-file", ["train.output_dir={out}/new", "data.cache_dir={run}/recipe.toml"], ["data.cache_dir:", "is a file", "data.cache = false"]),
    Case("output-dir-not-writable", ["train.output_dir={run}/sub/new"], ["train.output_dir: cannot write", "Permission denied"],
         plant=lambda run, marker: ((run / "sub").mkdir(), (run / "sub").chmod(0o555)), skip_root=True),
    Case("learning-rate-inf", ["train.learning_rate=inf"], ["command line: train.learning_rate: must be a finite number"]),
    Case("curves-file-outside-run", ['sinks=["jsonl","curves"]', "curves.filename=../../x.png"], ["curves.filename: must be a file name inside the run folder"]),
    Case("jsonl-file-absolute", ["jsonl.filename={out}/x.jsonl"], ["jsonl.filename: must be a file name inside the run folder"]),
    Case("hub-unreachable", ["train.output_dir={out}/new", "model.base=no-such-org/no-such-model"],
         ["is not a local folder", "cannot be reached", "HF_HUB_OFFLINE=1", "local folder"], env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}),
    Case("recipe-is-a-folder", [], ["is a folder, not a recipe file"], command=["train", "{run}"]),
    Case("generate-empty-prompt", [], ["--prompt: empty"], command=["generate", "{run}", "--prompt", ""]),
    Case("runs-plot-under-a-file", [], ["--plot:", "is a file, not a folder"], command=["runs", "{run}", "--plot", "{run}/metrics.json/curves.png"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, finished, tmp_path, capsys, monkeypatch):
    if case.skip_root and os.geteuid() == 0:
        pytest.skip("root writes through permission bits")
    source, recipe, other = finished
    run = tmp_path / "work" / "run"
    shutil.copytree(source, run, symlinks=True)
    marker = tmp_path / "ran-code"
    if case.plant:
        case.plant(run, marker)
    (tmp_path / "victim.jsonl").write_text("outside the run folder\n")
    recipe_path = tmp_path / "recipe.toml"
    recipe_path.write_text(tomlfile.dumps({**recipe, "train": {**recipe["train"], "output_dir": str(run)}}), encoding="utf-8")
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    hub._reachable.cache_clear()
    fill = {"run": str(run), "out": str(tmp_path / "work"), "other": str(other)}
    args = [a.format(**fill) for a in case.args]
    argv = [a.format(**fill) for a in case.command] + args if case.command else ["train", str(recipe_path), *args]
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in case.fragments:
        assert fragment.format(**fill) in errors[0], errors[0]
    assert not marker.exists(), "a checkpoint file ran code"
    assert snapshot(tmp_path) == before  # the run, its checkpoints and everything beside it: unchanged


def test_the_finished_run_still_resumes_after_the_faults(finished, tmp_path, capsys):
    """The copy the fault cases start from is sound: the same resume without the fault continues it."""
    source, recipe, _ = finished
    run = tmp_path / "run"
    shutil.copytree(source, run)
    # planted pickles under the old names are never opened
    marker = tmp_path / "ran-code"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (run / "checkpoints" / STEP_LAST / name).write_bytes(pickle.dumps(Planted(marker)))
    path = tmp_path / "recipe.toml"
    path.write_text(tomlfile.dumps({**recipe, "train": {**recipe["train"], "output_dir": str(run), "max_steps": 6}}), encoding="utf-8")
    assert main(["train", str(path), "train.resume=auto"]) == 0, capsys.readouterr().err
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    assert not marker.exists()


def test_disk_full_while_continuing_keeps_every_earlier_checkpoint(finished, tmp_path, capsys, monkeypatch):
    """Continuing the finished run, the disk fills up as the next checkpoint is written: exit 1 and one
    line naming it; the earlier checkpoints are byte for byte as they were, nothing outside is touched.
    (A process killed with SIGKILL at random moments: tests/test_checkpoint.py.)"""
    import errno

    source, recipe, _ = finished
    run = tmp_path / "work" / "run"
    shutil.copytree(source, run)
    path = tmp_path / "recipe.toml"
    path.write_text(tomlfile.dumps({**recipe, "train": {**recipe["train"], "output_dir": str(run), "max_steps": 6}}), encoding="utf-8")
    checkpoints_before = snapshot(run / "checkpoints")
    outside_before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("work")}
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if os.path.basename(os.path.dirname(os.fspath(f))).startswith(".tmp-step-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert main(["train", str(path), "train.resume=auto"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "No space left on device" in errors[0] and f"the previous checkpoint {run / 'checkpoints' / STEP_LAST} is intact" in errors[0]
    assert snapshot(run / "checkpoints") == checkpoints_before
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("work")} == outside_before
