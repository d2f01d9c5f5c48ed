"""`python -m engine eval RUN/checkpoints/step-N` evaluates the checkpoint's weights (and generate samples them)."""

import json
import shutil

import pytest

from engine import evaluation
from engine.testing import run_recipe, tiny_recipe
from tests.conftest import run_cli


def _train(folder, recipe=None):
    recipe = recipe or tiny_recipe(folder)
    recipe["train"].update({"max_steps": 8, "save_every_steps": 4, "keep_checkpoints": 3})
    run_recipe(recipe)
    return folder / "run", recipe["data"]["train"]


def _loss(folder, data):
    return evaluation.evaluate_text(str(folder), data, 32)["loss"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("full"))


def test_eval_of_a_checkpoint_is_the_eval_of_its_weights(full_run):
    run, data = full_run
    final = _loss(run / "final", data)
    assert _loss(run / "checkpoints" / "step-00000008", data) == pytest.approx(final, rel=1e-6)  # the last step's weights are final/'s
    assert abs(_loss(run / "checkpoints" / "step-00000004", data) - final) > 1e-3  # an earlier step's weights are its own


def test_eval_of_a_checkpoint_of_an_unfinished_run(full_run, tmp_path):
    """No final/: the model is rebuilt from recipe.toml (model.config, the tokenizer trained on the data) as training built it."""
    run, data = full_run
    final = _loss(run / "final", data)
    copy = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(copy / "final")
    (copy / "metrics.json").unlink()
    assert _loss(copy / "checkpoints" / "step-00000008", data) == pytest.approx(final, rel=1e-6)


@pytest.mark.slow
def test_eval_and_generate_commands_take_a_checkpoint(full_run, tmp_path):
    run, data = full_run
    middle = run / "checkpoints" / "step-00000004"
    result = run_cli("eval", str(middle), "--data", data, "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["kind"] == "checkpoint, model" and shown["loss"] == pytest.approx(_loss(middle, data), rel=1e-6)
    sample = run_cli("generate", str(run), "--model", str(middle), "--prompt", "The", "--seed", "1", "sampling.max_new_tokens=5")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("The") and len(sample.stdout.strip()) > 3
    moved = shutil.copytree(middle, tmp_path / "loose")
    result = run_cli("eval", str(moved), "--data", data)
    assert result.returncode == 2 and "outside its run folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_of_a_lora_checkpoint(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["model"] = {"base": str(tiny_model_dir)}
    recipe["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    recipe["train"]["learning_rate"] = 3e-2
    run, data = _train(tmp_path, recipe)
    final = _loss(run / "final", data)
    assert _loss(run / "checkpoints" / "step-00000008", data) == pytest.approx(final, rel=1e-6)
    assert abs(_loss(run / "checkpoints" / "step-00000004", data) - final) > 1e-4
    assert evaluation.evaluate_text(str(run / "checkpoints" / "step-00000004"), data, 32)["kind"] == "checkpoint, LoRA adapter"
    shutil.rmtree(run / "final")  # unfinished: the base model and LoRA from recipe.toml
    assert _loss(run / "checkpoints" / "step-00000008", data) == pytest.approx(final, rel=1e-6)


@pytest.mark.slow  # a command-line eval, ~15 s on a shared CPU
def test_eval_batch_size_does_not_change_the_numbers_of_a_multi_document_folder(tmp_path, tiny_model_dir):
    """`eval --batch-size N` on a folder of documents of different lengths (short last blocks, padding in a
    batch): the same loss, tokens and bits per character for every batch size, from the command line too."""
    import random

    from engine.testing import WORDS

    rng = random.Random(5)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, n_docs in enumerate([1, 3, 6]):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + "." for _ in range(n_docs)]
        (folder / f"part{i}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    results = [evaluation.evaluate_text(str(tiny_model_dir), str(folder), max_length=32, batch_size=b) for b in (1, 3, 16)]
    assert results[0]["documents"] == 10 and results[0]["blocks"] > 3
    for other in results[1:]:
        assert other["tokens"] == results[0]["tokens"] and other["blocks"] == results[0]["blocks"]
        assert other["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
        assert other["bits_per_character"] == pytest.approx(results[0]["bits_per_character"], rel=1e-5)
    done = run_cli("eval", str(tiny_model_dir), "--data", str(folder), "--max-length", "32", "--batch-size", "5", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
