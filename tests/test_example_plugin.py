"""The example plugin package of docs/writing-plugins.md (tests/example_plugin), installed with pip and used as a user would.

The package is installed with `pip install --no-deps --target` into a temporary folder that
subprocesses get on PYTHONPATH, so the test environment itself is left as it was.
"""

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest

from engine.testing import tiny_recipe, write_recipe
from tests.conftest import REPO, run_cli

EXAMPLE = REPO / "tests" / "example_plugin"


@pytest.fixture(scope="module")
def example_env(tmp_path_factory):
    """PYTHONPATH holding the example package as pip installed it (dist-info with its entry points)."""
    source = tmp_path_factory.mktemp("src") / "tunesmith-example"
    shutil.copytree(EXAMPLE, source)  # pip may write build files next to the sources: not into the repo
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)]
    try:
        import setuptools  # noqa: F401  present: build without fetching it again

        command.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert list(target.glob("tunesmith_example-0.1.0.dist-info/entry_points.txt"))
    return {"PYTHONPATH": str(target)}


def test_docs_show_the_example_package_file_for_file():
    """The package uses nothing docs/writing-plugins.md does not show: its files are the page's blocks."""
    readme = (REPO / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    blocks = dict(re.findall(r"<!-- example-plugin: (\S+) -->\n```\w+\n(.*?)\n```", readme, re.S))
    files = {p.name: p.read_text(encoding="utf-8").rstrip("\n") for p in EXAMPLE.iterdir() if p.is_file()}
    assert blocks == files


@pytest.mark.slow
def test_plugins_command_lists_the_installed_example_beside_builtins(example_env):
    result = run_cli("plugins", env=example_env)
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:4]) for line in result.stdout.splitlines()}
    assert ("augmentation", "mask_words", "tunesmith-example", "0.1.0") in rows
    assert ("sink", "csv_metrics", "tunesmith-example", "0.1.0") in rows
    assert ("decoding", "greedy_ban", "tunesmith-example", "0.1.0") in rows
    assert ("optimizer", "adamw", "tunesmith", "0.1.0") in rows
    assert "Replaces a share of the words of a training document with a mask word." in result.stdout


@pytest.mark.slow
def test_recipe_selects_the_example_plugins_and_each_takes_effect(tmp_path, example_env):
    recipe = tiny_recipe(
        tmp_path,
        augmentations=["mask_words"], sinks=["jsonl", "csv_metrics"], decoding="greedy_ban",
        mask_words={"rate": 0.3}, csv_metrics={"columns": ["loss", "val_loss"]},
        greedy_ban={"banned_words": ["."], "max_new_tokens": 12},
        train={"max_steps": 30, "eval_every_steps": 15, "log_every_steps": 5},
        model={"tokenizer_vocab_size": 400},
        # the model these 30 steps train must write a "." unbanned (checked below); with concatenated blocks it does
        data={"packing": "concat"},
    )
    result = run_cli(str(write_recipe(recipe, tmp_path / "r.toml")), env=example_env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"

    # the sink: one CSV row per training log and evaluation, the same numbers as metrics.jsonl
    rows = list(csv.reader((run / "metrics.csv").open()))
    assert rows[0] == ["phase", "step", "loss", "val_loss"]
    jsonl = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [[r["phase"], str(r["step"]), str(r.get("loss", "")), str(r.get("val_loss", ""))]
                for r in jsonl if r["phase"] in ("train", "eval")]
    assert rows[1:] == expected and len(expected) == 6 + 2

    # the augmentation: masked copies were trained on, so the run's tokenizer learned the mask word
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.tokenize(" MASK") == ["ĠMASK"]
    assert "MASK" not in (tmp_path / "corpus.txt").read_text()

    # the decoding strategy: `generate` uses it; greedy, so the seed does not matter; "." never comes
    outputs = [run_cli("generate", str(run), "--prompt", "The boat", "--seed", seed, env=example_env) for seed in ("1", "2")]
    assert outputs[0].returncode == 0, outputs[0].stderr[-2000:]
    assert outputs[0].stdout == outputs[1].stdout
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    ids = tokenizer("The boat", return_tensors="pt")
    banned = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (".", " .")]
    same = model.generate(**ids, do_sample=False, max_new_tokens=12, bad_words_ids=banned)
    plain = model.generate(**ids, do_sample=False, max_new_tokens=12)
    assert outputs[0].stdout.rstrip("\n") == tokenizer.decode(same[0], skip_special_tokens=True)
    assert "." not in outputs[0].stdout[len("The boat"):]
    assert "." in tokenizer.decode(plain[0, ids["input_ids"].shape[1]:])  # without the ban it would appear


@pytest.mark.slow
def test_invalid_option_of_the_example_names_plugin_and_package(tmp_path, example_env):
    path = write_recipe(tiny_recipe(tmp_path, augmentations=["mask_words"]), tmp_path / "r.toml")
    result = run_cli("check", str(path), "mask_words.rate=2", "mask_words.mask=3", env=example_env)
    assert result.returncode == 2
    assert ("command line: mask_words.rate: must be at most 1.0, got 2.0 (an option of plugin 'mask_words' "
            "from package tunesmith-example)") in result.stderr
    assert "mask_words.mask: expected a string, got 3 (an option of plugin 'mask_words' from package tunesmith-example)" in result.stderr
