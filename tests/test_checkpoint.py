"""Checkpoints that never lose work: exact resume, kill -9, SIGTERM/Ctrl-C, disk full, NaN, early stopping.

CPU, fp32, fixed seed, one torch thread everywhere (this process and the subprocesses), so that an
interrupted and resumed run can be compared with an uninterrupted one exactly (atol 0).
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint, hookimpl, tomlfile
from engine.cli import main
from engine.errors import Interrupted, RunFailed
from engine.testing import inline_plugin, run_recipe, tiny_recipe
from tests.conftest import REPO

# 3 epochs of 22 steps of 8 blocks (isolated packing, the default); logs every 3 steps so that a logged loss window
# spans a checkpoint; periodic checkpoints every 5 steps.
TRAIN = {"epochs": 3, "max_steps": 0, "batch_size": 8, "save_every_steps": 5, "log_every_steps": 3}
PER_EPOCH, TOTAL = 22, 66
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ test plugins
class Term:
    """Sends this process SIGTERM at the end of the steps in `at` (the realistic way to interrupt)."""

    at: set = set()

    @hookimpl
    def on_step_end(self, context, metrics):
        if context.state.step in Term.at:
            os.kill(os.getpid(), signal.SIGTERM)


class Recorder:
    """Records the token rows of every training forward pass: what the model actually trained on."""

    rows: list = []

    @hookimpl
    def on_train_start(self, context):
        def record(module, args, kwargs):
            if module.training:
                Recorder.rows.extend(tuple(r) for r in kwargs["input_ids"].tolist())

        context.model.register_forward_pre_hook(record, with_kwargs=True)


class Poison:
    """Makes the loss NaN at the steps in `nan_steps`; sets a weight to NaN after the steps in `nan_weights`."""

    nan_steps: set = set()
    nan_weights: set = set()

    @hookimpl
    def on_train_start(self, context):
        def poison(module, args, kwargs, output):
            if module.training and context.state.step + 1 in Poison.nan_steps:
                output.logits = output.logits * float("nan")
            return output

        context.model.register_forward_hook(poison, with_kwargs=True)

    @hookimpl
    def on_step_end(self, context, metrics):
        if context.state.step in Poison.nan_weights:
            with torch.no_grad():
                next(p for p in context.model.parameters() if p.requires_grad).view(-1)[0] = float("nan")


class Captured:
    """Keeps the trainable weights the model holds in memory when training ends."""

    weights: dict = {}

    @hookimpl
    def on_train_end(self, context, summary):
        from engine.loop import trainable_state

        Captured.weights = trainable_state(context.accelerator.unwrap_model(context.model))


@pytest.fixture(scope="module", autouse=True)
def test_plugins():
    with inline_plugin("callback", "term", Term), inline_plugin("callback", "recorder", Recorder), \
            inline_plugin("callback", "poison", Poison), inline_plugin("callback", "captured", Captured):
        yield


# ------------------------------------------------------------------ helpers
def recipe_for(folder: Path, callbacks=("term", "recorder"), **train):
    return tiny_recipe(folder, callbacks=list(callbacks), train={**TRAIN, **train})


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the fields that measure time."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("time"), r.pop("tokens_per_second", None), r.pop("wall_seconds", None)
        out.append(r)
    return out


def optimizer_state(folder: Path) -> dict:
    return torch.load(folder / "optimizer.bin", weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # atol 0


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert_same_tensors(a["state"][i], b["state"][i])


def interrupt(recipe: dict, at: set[int]) -> Interrupted:
    Term.at = at
    try:
        with pytest.raises(Interrupted) as info:
            run_recipe(recipe)
    finally:
        Term.at = set()
    return info.value


def resume(recipe: dict, how: str = "auto") -> dict:
    recipe = {**recipe, "train": {**recipe["train"], "resume": how}}
    return run_recipe(recipe)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: final weights, optimizer state at the end, logs, the rows it trained on."""
    folder = tmp_path_factory.mktemp("reference")
    Recorder.rows = []
    run_recipe(recipe_for(folder))
    run = folder / "run"
    return {
        "weights": load_file(run / "final" / "model.safetensors"),
        "optimizer": optimizer_state(run / "checkpoints" / checkpoint.name_for(TOTAL)),
        "records": records(run),
        "rows": list(Recorder.rows),
    }


def write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.toml"
    path.write_text(tomlfile.dumps(recipe), encoding="utf-8")
    return path


# A test-only driver: runs the CLI in a subprocess with a `slow` callback (a short sleep after each
# step, so that a test can signal the run part-way through) and, when asked, kills itself with
# SIGKILL in the middle of writing checkpoint number N (at its first torch.save).
DRIVER = r"""
import os, signal, sys, time
import torch
from engine import hookimpl
from engine.cli import main
from engine.testing import inline_plugin

slow, kill_in_checkpoint, args = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]

class Slow:
    @hookimpl
    def on_step_end(self, context, metrics):
        time.sleep(slow)

folders = []
real_save = torch.save

def save(obj, f, *a, **k):
    folder = os.path.dirname(os.fspath(f))
    if os.path.basename(folder).startswith(".tmp-step-") and folder not in folders:
        folders.append(folder)
        if len(folders) == kill_in_checkpoint:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)

torch.save = save
with inline_plugin("callback", "slow", Slow):
    sys.exit(main([*args, 'callbacks=["slow"]']))
"""


def start_driver(recipe_path: Path, *overrides: str, slow: float = 0.0, kill_in_checkpoint: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(slow), str(kill_in_checkpoint), "train", str(recipe_path), *overrides],
        cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_lines(proc: subprocess.Popen, path: Path, n: int, timeout: float = 300) -> None:
    """Wait until the run has logged n lines in metrics.jsonl (it is training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before logging {n} lines: {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    raise AssertionError("the run did not start training in time")


# ------------------------------------------------------------------ 1. exact resume
@pytest.mark.slow
@pytest.mark.parametrize("k", [PER_EPOCH, 7, 2 * PER_EPOCH + 5], ids=["epoch-boundary", "mid-epoch", "later-epoch"])
def test_exact_resume_weights_optimizer_and_logged_losses(tmp_path, reference, k):
    recipe = recipe_for(tmp_path)
    stopped = interrupt(recipe, {k})
    run = tmp_path / "run"
    assert stopped.exit_status == 143 and f"after step {k}" in str(stopped)
    assert checkpoint.newest(run).name == checkpoint.name_for(k)
    assert not (run / "final").exists() and not (run / "metrics.json").exists()  # an interruption is not the end
    summary = resume(recipe)
    assert summary["steps"] == TOTAL
    assert_same_tensors(load_file(run / "final" / "model.safetensors"), reference["weights"])
    assert_same_optimizer(optimizer_state(run / "checkpoints" / checkpoint.name_for(TOTAL)), reference["optimizer"])
    assert records(run) == reference["records"]  # every logged loss, lr, eval: no line missing or repeated


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_path_rewinds_the_logs(tmp_path, reference):
    """A path picks that checkpoint; the lines logged after it are cut, so none is repeated."""
    recipe = recipe_for(tmp_path)
    interrupt(recipe, {12})
    run = tmp_path / "run"
    assert [step for step, _ in checkpoint.complete(run)] == [10, 12]
    assert max(r["step"] for r in records(run)) == 12
    resume(recipe, str(run / "checkpoints" / checkpoint.name_for(10)))
    assert records(run) == reference["records"]
    assert_same_tensors(load_file(run / "final" / "model.safetensors"), reference["weights"])


# ------------------------------------------------------------------ 3. the samples seen
@pytest.mark.slow
def test_samples_seen_across_interruptions_equal_the_uninterrupted_sequence(tmp_path, reference):
    recipe = recipe_for(tmp_path)
    Recorder.rows = []
    interrupt(recipe, {9})
    interrupt({**recipe, "train": {**recipe["train"], "resume": "auto"}}, {30})
    resume(recipe)
    assert Recorder.rows == reference["rows"]
    assert len(Recorder.rows) == TOTAL * 8
    for epoch in range(3):  # within an epoch no block is seen twice
        rows = reference["rows"][epoch * PER_EPOCH * 8 : (epoch + 1) * PER_EPOCH * 8]
        assert len(set(rows)) == len(rows)


# ------------------------------------------------------------------ 2. kill -9
@pytest.mark.slow
def test_kill_9_at_random_moments_and_mid_checkpoint_then_resume_auto(tmp_path, reference):
    recipe = recipe_for(tmp_path, callbacks=(), keep_checkpoints=1)
    path = write_recipe(tmp_path, recipe)
    run, log = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    # killed while writing its second checkpoint (step 10): step-5 stays the newest complete one
    proc = start_driver(path, kill_in_checkpoint=2)
    assert proc.wait(timeout=600) == -signal.SIGKILL
    assert (run / "checkpoints" / ".tmp-step-00000010").exists()  # it was written aside, never as step-10
    assert checkpoint.newest(run).name == checkpoint.name_for(5)
    rng = random.Random(4)
    steps_at_kill = []
    for _ in range(2):  # killed at random moments while training
        lines = len(log.read_text().splitlines())
        proc = start_driver(path, "train.resume=auto", slow=0.05)
        wait_for_lines(proc, log, lines + 1)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        found = checkpoint.newest(run)
        steps_at_kill.append(int(found.name.split("-")[1]))
        assert (found / checkpoint.STATE_FILE).exists() and (found / checkpoint.WEIGHTS_FILE).exists()
    assert steps_at_kill[-1] > 5  # the killed runs went on from the checkpoints before them
    summary = resume(recipe)
    assert summary["steps"] == TOTAL
    assert_same_tensors(load_file(run / "final" / "model.safetensors"), reference["weights"])
    assert records(run) == reference["records"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers cleared


# ------------------------------------------------------------------ 4. failure part-way through a checkpoint
@pytest.mark.slow
def test_disk_full_mid_checkpoint_exits_1_naming_the_path_and_keeps_the_previous(tmp_path, reference, monkeypatch, capsys):
    recipe = recipe_for(tmp_path, callbacks=(), keep_checkpoints=1)
    path = write_recipe(tmp_path, recipe)
    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):  # the second file torch writes into checkpoint 2 fails
        folder = os.path.dirname(os.fspath(f))
        if folder.endswith(checkpoint.name_for(10)):
            calls.append(f)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", str(path)]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err
    assert f"could not write checkpoint {run / 'checkpoints' / checkpoint.name_for(10)}: No space left on device" in line[0]
    assert f"the previous checkpoint {run / 'checkpoints' / checkpoint.name_for(5)} is intact" in line[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [checkpoint.name_for(5)]
    assert not (run / "metrics.json").exists()
    # checkpoint 5 is intact and loadable: resuming from it reaches the uninterrupted weights
    resume(recipe, str(run / "checkpoints" / checkpoint.name_for(5)))
    assert_same_tensors(load_file(run / "final" / "model.safetensors"), reference["weights"])


# ------------------------------------------------------------------ 5. SIGTERM and Ctrl-C
@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_143_and_resume_reaches_the_same_weights(tmp_path, reference):
    """A real process gets SIGTERM part-way through training."""
    recipe = recipe_for(tmp_path, callbacks=(), log_every_steps=1)
    path = write_recipe(tmp_path, recipe)
    run = tmp_path / "run"
    proc = start_driver(path, slow=0.05)
    wait_for_lines(proc, run / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    found = checkpoint.newest(run)
    step = int(found.name.split("-")[1])
    assert f"interrupted: stopped by SIGTERM after step {step}; checkpoint {found} written. Continue with train.resume=auto" in err
    assert step == json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]  # the step it was on
    assert step not in (PER_EPOCH, 2 * PER_EPOCH) and step % 5  # written because of the signal
    assert not (run / "final").exists() and not (run / "metrics.json").exists()
    resume({**recipe, "train": {**recipe["train"], "log_every_steps": 3}})
    assert_same_tensors(load_file(run / "final" / "model.safetensors"), reference["weights"])


class CtrlC:
    """Presses Ctrl-C (SIGINT to this process) after step 4, twice after step 8 when asked."""

    twice = False

    @hookimpl
    def on_step_end(self, context, metrics):
        if context.state.step == 4 or (CtrlC.twice and context.state.step == 8):
            os.kill(os.getpid(), signal.SIGINT)
            if CtrlC.twice:
                os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_writes_a_checkpoint_and_exits_130_a_second_one_stops_at_once(tmp_path, capsys):
    recipe = recipe_for(tmp_path, callbacks=("ctrl_c",), max_steps=12)
    path = write_recipe(tmp_path, recipe)
    run = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGINT)
    with inline_plugin("callback", "ctrl_c", CtrlC):
        assert main(["train", str(path)]) == 130
        err = capsys.readouterr().err
        assert f"interrupted: stopped by Ctrl-C (SIGINT) after step 4; checkpoint {run / 'checkpoints' / checkpoint.name_for(4)} written" in err
        assert checkpoint.newest(run).name == checkpoint.name_for(4)
        CtrlC.twice = True
        try:
            assert main(["train", str(path), "train.resume=auto"]) == 130
        finally:
            CtrlC.twice = False
        err = capsys.readouterr().err
    assert "stopped at once by a second Ctrl-C" in err
    assert checkpoint.newest(run).name == checkpoint.name_for(5)  # the periodic one; none for step 8
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is given back


# ------------------------------------------------------------------ 6. NaN and infinite losses
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    recipe = recipe_for(tmp_path, callbacks=("poison",), save_every_steps=2, max_steps=12)
    path = write_recipe(tmp_path, recipe)
    Poison.nan_steps = {5}
    try:
        assert main(["train", str(path)]) == 1
    finally:
        Poison.nan_steps = set()
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "error: training loss is nan" in err and "at step 5;" in err
    assert f"the last good checkpoint is {run / 'checkpoints' / checkpoint.name_for(4)}" in err
    assert [step for step, _ in checkpoint.complete(run)] == [2, 4]
    for _, folder in checkpoint.complete(run):
        assert all(torch.isfinite(t).all() for t in load_file(folder / checkpoint.WEIGHTS_FILE).values())
    assert not (run / "final").exists() and not (run / "metrics.json").exists()


def test_non_finite_weights_are_never_written_as_a_checkpoint(tmp_path):
    recipe = recipe_for(tmp_path, callbacks=("poison",), save_every_steps=3, max_steps=12)
    Poison.nan_weights = {6}
    try:
        with pytest.raises(RunFailed, match="the weights are not finite after step 6") as info:
            run_recipe(recipe)
    finally:
        Poison.nan_weights = set()
    run = tmp_path / "run"
    assert f"the previous checkpoint {run / 'checkpoints' / checkpoint.name_for(3)} is intact" in str(info.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [checkpoint.name_for(3)]


def test_skip_policy_skips_and_counts_nan_steps(tmp_path):
    recipe = recipe_for(tmp_path, callbacks=("poison",), on_nan="skip", max_steps=12, log_every_steps=1)
    Poison.nan_steps = {5, 9}
    try:
        summary = run_recipe(recipe)
    finally:
        Poison.nan_steps = set()
    run = tmp_path / "run"
    assert summary["skipped_steps"] == 2 and summary["steps"] == 12
    assert json.loads((run / "metrics.json").read_text())["skipped_steps"] == 2
    train = {r["step"]: r for r in records(run) if r["phase"] == "train"}
    assert sorted(train) == list(range(1, 13))  # every step is logged
    assert [train[s]["skipped_steps"] for s in (4, 5, 8, 9, 12)] == [0, 1, 1, 2, 2]
    assert train[5]["loss"] == "nan" and train[9]["loss"] == "nan"  # not hidden: logged, and counted
    assert all(isinstance(train[s]["loss"], float) for s in train if s not in (5, 9))
    weights = load_file(run / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())  # the NaN gradients were never applied


# ------------------------------------------------------------------ 7. early stopping across a resume
def lora_recipe(folder: Path, model_dir: Path) -> dict:
    recipe = tiny_recipe(
        folder, callbacks=["term", "captured"], early_stopping="patience",
        model={"base": str(model_dir), "config": {}}, lora={"enabled": True, "r": 4, "alpha": 8},
        data={"max_length": 64},
        train={"epochs": 30, "max_steps": 0, "batch_size": 8, "learning_rate": 1e-2, "eval_every_steps": 2,
               "save_every_steps": 2, "keep_checkpoints": 1, "log_every_steps": 2},
    )
    recipe["patience"] = {"patience": 2, "min_delta": 0.02}
    return recipe


def patience_judgements(evals: list[dict], min_delta: float = 0.02) -> list[tuple[int, float, int]]:
    """(step, best so far, evaluations without improvement) after each evaluation, as patience documents it."""
    best, bad, out = None, 0, []
    for e in evals:
        if best is None or e["val_loss"] < best - min_delta:
            best, bad = e["val_loss"], 0
        else:
            bad += 1
        out.append((e["step"], best, bad))
    return out


@pytest.mark.slow
def test_early_stopping_state_survives_resume_and_run_ends_with_best_weights(tmp_path, tiny_model_dir):
    """The built-in patience plugin, its state through a real checkpoint (plugins file) and back."""
    ref = run_recipe(lora_recipe(tmp_path / "ref", tiny_model_dir))
    ref_evals = [r for r in records(tmp_path / "ref" / "run") if r["phase"] == "eval"]
    ref_weights = dict(Captured.weights)
    assert ref["stopped_early"] and ref["best_step"] < ref["steps"]
    judged = patience_judgements(ref_evals)
    assert judged[-1][2] == 2 and judged[-1][0] == ref["steps"]  # it stopped at the second evaluation without improvement
    # interrupt right after the first evaluation that did not improve (the counter is 1)
    first_bad, best_so_far, _ = next(j for j in judged if j[2] == 1)
    recipe = lora_recipe(tmp_path / "int", tiny_model_dir)
    interrupt(recipe, {first_bad})
    run = tmp_path / "int" / "run"
    saved = torch.load(checkpoint.newest(run) / checkpoint.PLUGINS_FILE, weights_only=True)["patience"]
    assert saved == {"best": best_so_far, "bad_evals": 1}
    summary = resume(recipe)
    assert [r for r in records(run) if r["phase"] == "eval"] == ref_evals
    assert (summary["steps"], summary["best_step"]) == (ref["steps"], ref["best_step"])  # same stop: counter and best survived
    best = run / "checkpoints" / checkpoint.name_for(summary["best_step"])
    assert best.exists()  # kept although keep_checkpoints = 1
    assert any("lora_" in name for name in Captured.weights)
    assert_same_tensors(Captured.weights, load_file(best / checkpoint.WEIGHTS_FILE))
    assert_same_tensors(Captured.weights, ref_weights)


# ------------------------------------------------------------------ warnings on resume
def test_resume_warns_about_each_change_and_about_missing_rng_state(tmp_path, capsys):
    recipe = recipe_for(tmp_path, callbacks=(), max_steps=10)
    run_recipe({**recipe, "train": {**recipe["train"], "max_steps": 5}})  # a finished run with a checkpoint at step 5, continued to 10
    run = tmp_path / "run"
    (run / "checkpoints" / checkpoint.name_for(5) / checkpoint.rng_file(0)).unlink()
    capsys.readouterr()
    changed = {**recipe, "train": {**recipe["train"], "batch_size": 4, "seed": 7, "resume": "auto"}}
    changed["data"] = {**recipe["data"], "max_length": 24}
    assert run_recipe(changed)["steps"] == 10  # a finished run can be continued further
    err = capsys.readouterr().err
    assert "resuming with a changed train.batch_size: 8 in the checkpoint, 4 now" in err
    assert "resuming with a changed train.seed: 42 in the checkpoint, 7 now" in err
    assert "resuming with a changed training data (data.train, the tokenizer or data.max_length" in err
    assert "resuming with a changed number of steps (train.epochs or train.max_steps): 5 in the checkpoint, 10 now" in err
    assert "no random number generator state for process 0 (rng_state_0.json)" in err
    assert "gradient_accumulation_steps" not in err and "number of processes" not in err  # only changes are named
