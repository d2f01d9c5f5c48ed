"""Your own text, offline: recipes/own_text.toml trains from scratch on your files; a finished run is
the base model of the next one (recipes/own_text_more.toml, recipes/own_text_lora.toml)."""

import json
import shutil

import pytest

from engine import model as model_mod
from engine.errors import UserError
from tests.conftest import REPO, run_cli

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# small enough for a test; the recipe's model (4 layers x 256 wide) and schedule as shipped
SMALL = ["data.max_length=64", "train.batch_size=4", "model.tokenizer_vocab_size=512", "train.log_every_steps=1"]


def write_my_text(folder):
    text = (REPO / "recipes" / "data" / "quickstart.txt").read_text(encoding="utf-8")
    (folder / "my_text").mkdir(parents=True)
    (folder / "my_text" / "diary.txt").write_text(text[:30000], encoding="utf-8")
    (folder / "my_text" / "letters.txt").write_text(text[-20000:], encoding="utf-8")


@pytest.mark.parametrize("name", ["own_text", "own_text_more", "own_text_lora"])
def test_own_text_recipes_are_valid(name):
    result = run_cli("check", f"recipes/{name}.toml")
    assert result.returncode == 0, result.stderr
    assert f"recipes/{name}.toml: OK" in result.stdout


def _fake_run(tmp_path, source, final="final"):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(f'[train]\nfinal_dir = "{final}"\n')
    if source is not None:
        shutil.copytree(source, run / final)
    return run


def test_model_base_may_be_a_finished_run_folder(tiny_model_dir, tmp_path):
    run = _fake_run(tmp_path, tiny_model_dir, final="last")
    assert model_mod.resolve_base(str(run)) == str(run / "last")
    assert model_mod.resolve_base(str(tiny_model_dir)) == str(tiny_model_dir)  # a model folder as it is
    assert model_mod.resolve_base("distilgpt2") == "distilgpt2"  # a hub id as it is


def test_model_base_a_lora_run_says_merge_first(tiny_model_dir, tmp_path):
    run = _fake_run(tmp_path, tiny_model_dir)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "final" / "config.json").unlink()
    with pytest.raises(UserError, match=r"model.base: .* is a LoRA run.*python -m engine merge"):
        model_mod.resolve_base(str(run))


def test_model_base_an_unfinished_run_is_a_clear_error(tmp_path):
    run = _fake_run(tmp_path, None)
    with pytest.raises(UserError, match=r"model.base: .*no final/ model yet"):
        model_mod.resolve_base(str(run))


def test_hub_error_names_offline_and_local_folder_ways():
    text = model_mod._hub_help("distilgpt2")
    assert "HF_HUB_OFFLINE=1" in text and "hf download distilgpt2 --local-dir" in text


@pytest.mark.slow
def test_own_text_trains_offline_then_continues_from_the_finished_run(tmp_path):
    write_my_text(tmp_path)
    first = run_cli(str(REPO / "recipes/own_text.toml"), *SMALL, "train.max_steps=8", cwd=tmp_path, env=OFFLINE)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "own_text"
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert losses[-1] < losses[0] - 0.5  # it learns the user's text
    assert "my_text/*.txt" in (run / "recipe.toml").read_text()

    # continue: the finished run is the base; a negligible learning rate leaves its weights as they were
    more = run_cli(str(REPO / "recipes/own_text_more.toml"), *SMALL, "train.max_steps=1", "train.learning_rate=1e-12",
                   cwd=tmp_path, env=OFFLINE)
    assert more.returncode == 0, more.stderr[-3000:]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "own_text_more" / "final").state_dict()
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0)
    same = AutoTokenizer.from_pretrained(run / "final"), AutoTokenizer.from_pretrained(tmp_path / "runs" / "own_text_more" / "final")
    assert same[0].get_vocab() == same[1].get_vocab()
    first_loss = json.loads((tmp_path / "runs" / "own_text_more" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first_loss < losses[0] - 0.5  # it starts where the first run ended, not from random weights
