"""Run-folder safety and early, clear failures that are not single fault rows (tests/test_faults.py holds those):
the run marker and overwrite, resume with nothing (or something partial) to resume from, file names
plugins write, table overrides, finite numbers, too many steps, the loss watch across a resume, a
relative model.base used from another folder, the `check` command on an unwritable folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from engine import advice, checkpoint, hookimpl, runfolder, tomlfile
from engine import recipe as recipe_mod
from engine.cli import main
from engine.errors import UserError
from engine.testing import inline_plugin, run_recipe, tiny_recipe


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write(recipe: dict, path: Path) -> Path:
    path.write_text(tomlfile.dumps(recipe), encoding="utf-8")
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ 2. the run marker and overwrite
def test_overwrite_replaces_a_run_the_engine_wrote_and_keeps_other_files(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2})
    run_recipe(recipe)
    run = tmp_path / "run"
    assert (run / runfolder.MARKER).is_file()
    (run / "my-notes.txt").write_text("mine")
    summary = run_recipe({**recipe, "train": {**recipe["train"], "overwrite": True, "max_steps": 3}})
    assert summary["steps"] == 3 and (run / "final").is_dir()
    assert (run / "my-notes.txt").read_text() == "mine"  # not a run file: never deleted


def test_a_fresh_run_refuses_a_folder_with_the_users_own_final_folder(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2})
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "keep.txt").write_text("mine")
    assert main(["train", str(write(recipe, tmp_path / "r.toml"))]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "holds final/ that tunesmith did not write" in line
    assert (tmp_path / "run" / "final" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "run" / runfolder.MARKER).exists()


# ------------------------------------------------------------------ 3. nothing (or something partial) to resume from
def test_resume_auto_with_no_checkpoint_says_it_starts_from_step_0(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2, "resume": "auto"})
    assert run_recipe(recipe)["steps"] == 2
    err = capsys.readouterr().err
    assert f"warning: train.resume=auto: '{tmp_path / 'run'}' has no checkpoint to resume from; starting from step 0" in err


def test_a_partial_newest_checkpoint_is_named_and_the_older_one_used(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, train={"max_steps": 4, "save_every_steps": 2})
    run_recipe(recipe)
    run = tmp_path / "run"
    newest = run / "checkpoints" / checkpoint.name_for(4)
    (newest / checkpoint.STATE_FILE).unlink()  # as if cut short
    (run / "metrics.json").unlink()
    capsys.readouterr()
    run_recipe({**recipe, "train": {**recipe["train"], "resume": "auto"}})
    captured = capsys.readouterr()
    assert f"warning: train.resume: checkpoint {newest} is incomplete (no trainer_state.json" in captured.err
    assert f"resuming from the older {checkpoint.name_for(2)}" in captured.err
    assert f"resuming from {run / 'checkpoints' / checkpoint.name_for(2)} at step 2" in captured.out


# ------------------------------------------------------------------ 4. nothing a resume reads is unpickled with code
def test_checkpoint_files_are_json_and_weights_only_tensors(tmp_path):
    run_recipe(tiny_recipe(tmp_path, train={"max_steps": 2, "save_every_steps": 2}))
    folder = checkpoint.newest(tmp_path / "run")
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".pkl")], names
    for name in ("scheduler.json", "rng_state_0.json", checkpoint.STATE_FILE):
        json.loads((folder / name).read_text())
    torch.load(folder / "optimizer.bin", weights_only=True)
    torch.load(folder / "plugins.pt", weights_only=True)
    assert json.loads((folder / checkpoint.STATE_FILE).read_text())["format"] == checkpoint.FORMAT


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np

    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    checkpoint.set_rng_state(state)
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


# ------------------------------------------------------------------ 5. file names plugins write
def test_inside_keeps_plugin_files_in_the_run_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert runfolder.inside(out, "curves.png") == out / "curves.png"
    assert runfolder.inside(out, "plots/loss.png") == out / "plots" / "loss.png"
    for bad in ("../x.png", "/etc/passwd", "a/../../x", "", "."):
        with pytest.raises(UserError, match="^mysink.filename: .*(inside the run folder)"):
            runfolder.inside(out, bad, "mysink.filename")
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(UserError, match="a plugin's files go inside the run folder"):
        runfolder.inside(out, "link/x.png")


# ------------------------------------------------------------------ 8, 11, 12. recipes
def test_a_table_override_merges_into_the_recipes_table(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[data]\ntrain = "x.txt"\n[train]\noutput_dir = "runs/mine"\nepochs = 3\n')
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[train]\nbatch_size = 2\n')
    recipe = recipe_mod.load(child, ["train={epochs=2}"])
    assert (recipe.train.output_dir, recipe.train.epochs, recipe.train.batch_size) == ("runs/mine", 2, 2)
    with pytest.raises(UserError) as info:
        recipe_mod.load(child, ['train={epochs="two"}'])
    assert info.value.lines == ["command line: train.epochs: expected an integer, got 'two'"]


@pytest.mark.parametrize("override", ["train.learning_rate=inf", "train.weight_decay=nan", "lora.dropout=-inf"])
def test_numbers_must_be_finite(tmp_path, override):
    path = tmp_path / "r.toml"
    path.write_text('[data]\ntrain = "x.txt"\n')
    with pytest.raises(UserError) as info:
        recipe_mod.load(path, [override])
    key = override.split("=")[0]
    assert info.value.lines == [f"command line: {key}: must be a finite number, got {override.split('=')[1]}"]


def test_recipe_or_extends_that_is_a_folder(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {tmp_path}: is a folder, not a recipe file; give the path of a .toml file"]
    (tmp_path / "parent").mkdir()
    (tmp_path / "r.toml").write_text('extends = "parent"\n')
    assert main(["check", str(tmp_path / "r.toml")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"extends: {tmp_path / 'parent'} is a folder, not a recipe file" in line


# ------------------------------------------------------------------ 7. check finds unwritable folders too
def test_check_refuses_an_output_dir_that_is_a_file_and_a_cache_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path = write({"data": {"train": "x.txt"}}, tmp_path / "r.toml")
    assert main(["check", str(path), f"train.output_dir={tmp_path / 'afile'}"]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: train.output_dir: '{tmp_path / 'afile'}' is a file, not a run folder; choose a folder"]
    assert main(["check", str(path), f"data.cache_dir={tmp_path / 'afile' / 'cache'}"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: data.cache_dir:") and "is a file, not a folder" in line and "data.cache = false" in line


# ------------------------------------------------------------------ 13. far more steps than the data
class StopAfterOne:
    @hookimpl
    def on_step_end(self, context, metrics):
        context.request_stop("test")


def test_steps_beyond_100_epochs_are_named(tmp_path, capsys):
    assert advice.too_many_steps(100, 1, 8, 100) is None
    recipe = tiny_recipe(tmp_path, callbacks=["stop_one"], train={"max_steps": 10_000_000})
    with inline_plugin("callback", "stop_one", StopAfterOne):
        run_recipe(recipe)
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if l.startswith("warning: train.max_steps = 10000000")]
    assert "passes over the training data" in line and "steps per epoch" in line


# ------------------------------------------------------------------ 16. the loss watch resumes its state
def test_loss_watch_state_survives_a_checkpoint():
    total = 100
    losses = [5.0 - 0.2 * i for i in range(15)] + [2.0] * 40  # falls, then (after warmup) stays put
    lrs = [min(1.0, (i + 1) / 10) for i in range(len(losses))]  # warmup over at step 11
    whole = advice.LossWatch(total)
    notes = [whole.update(i + 1, loss, lr, 1.0) for i, (loss, lr) in enumerate(zip(losses, lrs))]
    assert not any(notes)  # it fell over the run: nothing to say
    first = advice.LossWatch(total)
    cut = 16  # after the uninterrupted watch made its one comparison
    for i in range(cut):
        first.update(i + 1, losses[i], lrs[i], 1.0)
    saved = json.loads(json.dumps(first.state()))
    resumed, fresh = advice.LossWatch(total), advice.LossWatch(total)
    resumed.load_state(saved)
    after = list(zip(range(cut + 1, len(losses) + 1), losses[cut:], lrs[cut:]))
    assert not any(resumed.update(s, loss, lr, 1.0) for s, loss, lr in after)
    assert any(fresh.update(s, loss, lr, 1.0) for s, loss, lr in after)  # what a resume without the state said


def test_checkpoints_hold_the_loss_watch(tmp_path):
    run_recipe(tiny_recipe(tmp_path, train={"max_steps": 2, "save_every_steps": 2}))
    record = json.loads((checkpoint.newest(tmp_path / "run") / checkpoint.STATE_FILE).read_text())
    assert len(record["progress"]["loss_watch"]["first"]) == 2 and math.isfinite(record["progress"]["loss_watch"]["first"][0])


# ------------------------------------------------------------------ 15. a relative model.base, used from elsewhere
def test_lora_run_on_a_relative_base_generates_and_evaluates_from_another_folder(tmp_path, tiny_model_dir, monkeypatch, capsys):
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    recipe = tiny_recipe(project, model={"base": "models/tiny", "config": {}}, lora={"enabled": True, "r": 4, "alpha": 8},
                         train={"max_steps": 2, "output_dir": "runs/lora"})
    path = write(recipe, project / "lora.toml")
    monkeypatch.chdir(project)
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    run = project / "runs" / "lora"
    stored = runfolder.read_recipe(run)["model"]["base"]
    assert stored == str(project / "models" / "tiny")
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == stored
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "The", "decoding=greedy", "greedy.max_new_tokens=5"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("The")
    assert main(["eval", str(run), "--data", str(project / "corpus.txt"), "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["loss"]) and result["kind"] == "LoRA adapter"


def test_resume_leaves_a_log_of_your_own_in_the_run_folder(tmp_path):
    """A log the user started in the run folder after the checkpoint (`... | tee run/train.log`) is not deleted."""
    recipe = tiny_recipe(tmp_path, train={"max_steps": 4, "save_every_steps": 2})
    run_recipe(recipe)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / checkpoint.name_for(4))
    (run / "train.log").write_text("my own log\n")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    run_recipe({**recipe, "train": {**recipe["train"], "resume": "auto"}})
    assert (run / "train.log").read_text() == "my own log\n"
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [json.loads(l)["step"] for l in lines]
