"""A newcomer's first hour, as the README tells it: own text, offline -> train -> eval -> generate -> LoRA on
top -> merge -> eval the merged model, with no traceback and no third-party noise on screen."""

import json
import re

import pytest

from tests.conftest import REPO, run_cli
from tests.test_own_text import OFFLINE, SMALL, write_my_text

NOISE = re.compile(r"Traceback|Warning|warnings\.warn|Failed to load|deprecated", re.I)


def _quiet(result):
    screen = result.stdout + result.stderr
    assert result.returncode == 0, screen[-3000:]
    assert not NOISE.search(screen), NOISE.search(screen).group(0) + " in:\n" + screen[-3000:]
    return result


def test_the_readme_walks_this_path():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for command in ("python -m engine recipes/own_text.toml", "python -m engine eval runs/own_text --data",
                    "python -m engine generate runs/own_text --prompt", "python -m engine recipes/own_text_lora.toml",
                    "python -m engine merge runs/own_text_lora runs/own_text_merged", "HF_HUB_OFFLINE"):
        assert command in readme, command


@pytest.mark.slow
def test_first_hour_offline(tmp_path):
    write_my_text(tmp_path)
    recipes = REPO / "recipes"

    def cli(*args):
        return _quiet(run_cli(*args, cwd=tmp_path, env=OFFLINE))

    cli(str(recipes / "own_text.toml"), *SMALL, "train.max_steps=6")
    run = tmp_path / "runs" / "own_text"
    assert (run / "final" / "README.md").exists() and (run / "curves.png").exists()
    evaluated = json.loads(cli("eval", "runs/own_text", "--data", "my_text/diary.txt", "--json").stdout)
    assert evaluated["tokens"] > 1000 and evaluated["loss"] > 0
    sample = cli("generate", "runs/own_text", "--prompt", "Dear diary,", "--seed", "0", "sampling.max_new_tokens=8")
    assert sample.stdout.startswith("Dear diary,")
    cli(str(recipes / "own_text_lora.toml"), "data.max_length=64", "train.batch_size=4", "train.max_steps=4")
    assert (tmp_path / "runs" / "own_text_lora" / "final" / "adapter_config.json").exists()
    cli("merge", "runs/own_text_lora", "runs/own_text_merged")
    merged = json.loads(cli("eval", "runs/own_text_merged", "--data", "my_text/diary.txt", "--json", "--max-length", "64").stdout)
    adapter = json.loads(cli("eval", "runs/own_text_lora", "--data", "my_text/diary.txt", "--json", "--max-length", "64").stdout)
    assert merged["loss"] == pytest.approx(adapter["loss"], rel=1e-4)  # the merged model is the adapter's model
    assert "merged" in (tmp_path / "runs" / "own_text_merged" / "README.md").read_text()
