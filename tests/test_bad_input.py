"""Bad input: each case exits 2 with one clear line naming the file or key (no traceback), and nothing
already written is lost. Most cases run the CLI's main() in this process against the output folder of
an interrupted run being resumed, whose files must come out byte for byte unchanged."""

import hashlib
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from engine import checkpoint, hookimpl, tomlfile
from engine import model as model_mod
from engine.cli import main
from engine.errors import Interrupted
from engine.testing import inline_plugin, run_recipe, tiny_recipe, write_corpus
from tests.conftest import run_cli


class StopAt3:
    """Interrupts the run after step 3 with SIGTERM, as a preempted machine would."""

    @hookimpl
    def on_step_end(self, context, metrics):
        if context.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """A folder with an interrupted run (checkpoint at step 3) and the recipe to resume it."""
    folder = tmp_path_factory.mktemp("unfinished")
    recipe = tiny_recipe(folder, train={"max_steps": 10, "batch_size": 8})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with inline_plugin("callback", "stop_at_3", StopAt3), pytest.raises(Interrupted):
            run_recipe({**recipe, "callbacks": ["stop_at_3"]})
    finally:
        torch.set_num_threads(threads)
    recipe["train"]["resume"] = "auto"
    return folder, recipe


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(tmp_path: Path, recipe: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "recipe.toml"
    path.write_text(tomlfile.dumps(recipe), encoding="utf-8")
    code = main(["train", str(path)])
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a tokenizer or model is loaded: data problems are found before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(model_mod, "load_tokenizer", refuse)
    monkeypatch.setattr(model_mod, "load_model", refuse)


def with_data(recipe: dict, **data) -> dict:
    return {**recipe, "data": {**recipe["data"], **data}}


# ------------------------------------------------------------------ data
def test_missing_data_file(tmp_path, unfinished, no_model, capsys):
    run_folder, recipe = unfinished
    before = snapshot(run_folder / "run")
    code, err = run_main(tmp_path, with_data(recipe, train=str(tmp_path / "nope.txt")), capsys)
    assert_one_error(code, err, "data.train: file", "nope.txt' not found")
    assert snapshot(run_folder / "run") == before


def test_empty_glob(tmp_path, unfinished, no_model, capsys):
    run_folder, recipe = unfinished
    before = snapshot(run_folder / "run")
    code, err = run_main(tmp_path, with_data(recipe, train=str(tmp_path / "texts" / "*.txt")), capsys)
    assert_one_error(code, err, "data.train: no files match", "texts/*.txt")
    assert snapshot(run_folder / "run") == before


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""),
    ("blank.txt", "\n\n   \n\t\n\n"),
    ("newlines.txt", "\n\n\n"),
    ("nulls.jsonl", '{"text": null}\n{"text": "   "}\n{"text": ""}\n'),
], ids=["empty-file", "only-whitespace", "only-newlines", "every-row-filtered"])
def test_data_with_no_documents_is_refused_before_the_model_loads(tmp_path, unfinished, no_model, capsys, name, content):
    run_folder, recipe = unfinished
    before = snapshot(run_folder / "run")
    (tmp_path / name).write_text(content, encoding="utf-8")
    code, err = run_main(tmp_path, with_data(recipe, train=str(tmp_path / name)), capsys)
    assert_one_error(code, err, f"data.train: '{tmp_path / name}' holds no text")
    assert snapshot(run_folder / "run") == before


def test_bytes_that_are_not_utf8_name_file_and_line_or_are_replaced(tmp_path, unfinished, no_model, capsys):
    run_folder, recipe = unfinished
    before = snapshot(run_folder / "run")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("First paragraph.\n\nSecond one,\nwith caf\xe9 in it.\n".encode("latin-1"))
    code, err = run_main(tmp_path, with_data(recipe, train=str(bad)), capsys)
    assert_one_error(code, err, f"data.train: {bad}: line 4 is not UTF-8", 'data.encoding_errors = "replace"')
    assert snapshot(run_folder / "run") == before
    from engine import data as data_mod
    from engine.recipe import DataSection

    docs, _ = data_mod.load_documents(str(bad), "data.train", DataSection(train=str(bad), encoding_errors="replace"))
    assert [d.strip() for d in docs] == ["First paragraph.", "Second one,\nwith caf\ufffd in it."]


def test_documents_longer_than_max_length_are_split_and_counted(tmp_path, capsys):
    long_text = " ".join(["the harbour town walked to the sea in the morning"] * 8)
    corpus = write_corpus(tmp_path / "corpus.txt", n_documents=80)
    corpus.write_text(corpus.read_text() + f"\n{long_text}.\n\n{long_text} again.\n", encoding="utf-8")
    recipe = tiny_recipe(tmp_path, data={"train": str(corpus), "val": str(corpus), "max_length": 32}, train={"max_steps": 2})
    run_recipe(recipe)
    out = capsys.readouterr().out
    from transformers import AutoTokenizer

    from engine import data as data_mod
    from engine.recipe import DataSection

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    docs, _ = data_mod.load_documents(str(corpus), "data.train", DataSection(train=str(corpus)))
    lengths = [len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    n_long = sum(n > 32 for n in lengths)
    assert n_long >= 2  # the two long documents at least
    assert f"data.train: {n_long} of {len(docs)} documents are longer than data.max_length (32 tokens) and were split" in out


# ------------------------------------------------------------------ recipes
@pytest.mark.parametrize("text, fragments", [
    ("[train]\nepochs = = 3\n", ["not valid TOML at line 2, column"]),
    ('[data]\ntrain = "a.txt"\n[train]\nbatch_size = 0\n', ["train.batch_size: must be at least 1, got 0"]),
    ('[data]\ntrain = "a.txt"\nval_split = 0.0\n', ["data.val_split: must be greater than 0.0, got 0.0"]),
    ('[data]\ntrain = "a.txt"\nval_split = 1.0\n', ["data.val_split: must be less than 1.0, got 1.0"]),
], ids=["invalid-toml", "batch-size-0", "val-split-0", "val-split-1"])
def test_recipe_problems(tmp_path, capsys, text, fragments):
    path = tmp_path / "r.toml"
    path.write_text(text, encoding="utf-8")
    code = main(["train", str(path)])
    assert_one_error(code, capsys.readouterr().err, str(path), *fragments)


def test_extends_loop(tmp_path, capsys):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n', encoding="utf-8")
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n', encoding="utf-8")
    code = main(["train", str(tmp_path / "a.toml")])
    assert_one_error(code, capsys.readouterr().err, "extends loops back to itself", "a.toml", "b.toml")


# ------------------------------------------------------------------ model
def test_model_base_neither_local_nor_reachable(tmp_path):
    """A real process, offline: one line that says how to point at a local folder, no traceback."""
    corpus = write_corpus(tmp_path / "c.txt")
    result = run_cli(
        "train", "recipes/lora.toml", "model.base=no-such-org/no-such-model", f"data.train={corpus}",
        f"train.output_dir={tmp_path / 'run'}", env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    line = assert_one_error(result.returncode, result.stderr, "model.base: 'no-such-org/no-such-model' is not a local folder")
    assert "point model.base at a local folder" in line
    assert not (tmp_path / "run").exists()


def test_local_model_folder_without_tokenizer(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "vocab*", "merges*"))
    recipe = tiny_recipe(tmp_path, model={"base": str(folder), "config": {}})
    code, err = run_main(tmp_path, recipe, capsys)
    assert_one_error(code, err, f"model.base: folder '{folder}' has no tokenizer")
    assert not (tmp_path / "run").exists()


def test_max_length_longer_than_the_model_context(tmp_path, unfinished, capsys):
    run_folder, recipe = unfinished
    before = snapshot(run_folder / "run")
    code, err = run_main(tmp_path, with_data(recipe, max_length=128), capsys)
    assert_one_error(code, err, "data.max_length: 128 is longer than the model's context (64)")
    assert snapshot(run_folder / "run") == before


def test_validation_set_that_ends_up_empty(tmp_path, unfinished, no_model, capsys):
    run_folder, recipe = unfinished
    before = snapshot(run_folder / "run")
    code, err = run_main(tmp_path, with_data(recipe, val_split=0.001), capsys)
    assert_one_error(code, err, "data.val_split: 0.001 of 120 documents leaves an empty validation set")
    (tmp_path / "val.txt").write_text("\n\n", encoding="utf-8")
    code, err = run_main(tmp_path, with_data(recipe, val=str(tmp_path / "val.txt")), capsys)
    assert_one_error(code, err, f"data.val: '{tmp_path / 'val.txt'}' holds no text")
    assert snapshot(run_folder / "run") == before


# ------------------------------------------------------------------ the output folder
def test_unfinished_run_is_refused_unless_resumed_or_overwritten(tmp_path, unfinished, capsys):
    run_folder, recipe = unfinished
    before = snapshot(run_folder / "run")
    fresh = {**recipe, "train": {**recipe["train"], "resume": ""}}
    code, err = run_main(tmp_path, fresh, capsys)
    assert_one_error(
        code, err, f"train.output_dir: '{run_folder / 'run'}' holds an unfinished run with checkpoints (newest: step-00000003)",
        "train.resume=auto", "train.overwrite=true",
    )
    both = {**recipe, "train": {**recipe["train"], "overwrite": True}}
    code, err = run_main(tmp_path, both, capsys)
    assert_one_error(code, err, "train.resume and train.overwrite: both are set")
    wrong = {**recipe, "train": {**recipe["train"], "resume": str(run_folder / "run")}}
    code, err = run_main(tmp_path, wrong, capsys)
    assert_one_error(code, err, f"train.resume: '{run_folder / 'run'}' is not a complete checkpoint folder")
    assert snapshot(run_folder / "run") == before


def test_finished_run_is_refused_and_kept(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2})
    run_recipe(recipe)
    before = snapshot(tmp_path / "run")
    code, err = run_main(tmp_path, recipe, capsys)
    assert_one_error(code, err, "holds a finished run (metrics.json)", "train.overwrite=true", "train.resume=auto")
    assert snapshot(tmp_path / "run") == before
