"""Model cards (README.md in final/, best/ and merge's output) and `python -m engine push` (never reaching the network)."""

import json

import pytest
from huggingface_hub import ModelCard

from engine import modelcard, push
from engine.errors import UserError
from engine.testing import run_recipe, tiny_recipe
from tests.conftest import run_cli

NO_HUB = {"HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    recipe = tiny_recipe(folder, sinks=["jsonl", "curves"], early_stopping="patience", patience={"patience": 5})
    recipe["train"].update({"max_steps": 6, "eval_every_steps": 3})
    summary = run_recipe(recipe)
    return folder / "run", summary


def test_final_and_best_get_a_model_card(full_run):
    run, summary = full_run
    for name in ("final", "best"):
        card = ModelCard.load(run / name / "README.md")  # huggingface_hub parses it: valid front matter
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
        assert "tunesmith" in card.data.tags and card.data.base_model is None  # trained from scratch
        assert card.data.to_dict().get("license") is None  # left for the user
        body = card.text
        assert "trained from scratch" in body and "AutoModelForCausalLM.from_pretrained" in body
        assert f"| validation loss (nats per token) | {summary['val_loss']:.4f} |" in body
        assert f"{summary['tokens_seen']:,} tokens seen in {summary['steps']} optimizer steps" in body
        assert "training documents" in body and 'data.max_length = 32' in body
        assert "![training and validation loss, learning rate](curves.png)" in body
        assert (run / name / "curves.png").read_bytes() == (run / "curves.png").read_bytes()
    assert "early stopping" in ModelCard.load(run / "best" / "README.md").text


@pytest.mark.slow
def test_lora_and_merged_cards(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["model"] = {"base": str(tiny_model_dir)}
    recipe["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    recipe["train"]["max_steps"] = 3
    run_recipe(recipe)
    run = tmp_path / "run"
    card = ModelCard.load(run / "final" / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert card.data.base_model is None and str(tiny_model_dir) in card.text  # a local base: named in the body only
    assert "AutoPeftModelForCausalLM.from_pretrained" in card.text
    result = run_cli("merge", str(run), str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    assert "LoRA adapter merged" in merged.text and "AutoModelForCausalLM.from_pretrained" in merged.text


def test_card_names_a_hub_base_model_and_a_dataset(full_run):
    from engine import recipe as recipe_mod

    recipe = recipe_mod.from_dict({"model": {"base": "distilgpt2"}, "data": {"train": "wikitext"}}, "test")
    text = modelcard.card_text(recipe, None, "LoRA adapter", "distilgpt2")
    card = ModelCard(text)
    assert card.data.base_model == "distilgpt2" and card.data.datasets == ["wikitext"] and card.data.library_name == "peft"


def test_push_dry_run_lists_the_folder_it_would_upload(full_run):
    run, _ = full_run
    result = run_cli("push", str(run), "--repo-id", "someone/tiny", "--dry-run", env=NO_HUB)
    assert result.returncode == 0, result.stderr
    assert f"would upload {run / 'final'} to https://huggingface.co/someone/tiny" in result.stdout
    listed = {line.strip() for line in result.stdout.splitlines()[1:]}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "curves.png"} <= listed


def test_push_without_a_token_is_one_clear_line(full_run, tmp_path):
    run, _ = full_run
    result = run_cli("push", str(run), "--repo-id", "someone/tiny", env={**NO_HUB, "HF_HOME": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "no Hugging Face token" in result.stderr
    offline = run_cli("push", str(run), "--repo-id", "someone/tiny", env={"HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr
    bad = run_cli("push", str(run), "--repo-id", "no owner", env=NO_HUB)
    assert bad.returncode == 2 and "--repo-id" in bad.stderr


def test_push_uploads_the_model_folder_with_upload_folder(full_run, monkeypatch, tmp_path):
    """The hub client is replaced: what push hands to create_repo and upload_folder, and its errors."""
    from huggingface_hub import HfApi

    run, _ = full_run
    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or type("C", (), {"commit_url": "https://x/c"})())
    assert push.push(run, "someone/tiny", private=True) == "https://x/c"
    assert calls[0] == ("create", "someone/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(run / "final") and calls[1][1]["repo_id"] == "someone/tiny"

    import httpx

    def unreachable(self, **kw):
        raise httpx.ConnectError("name resolution failed")

    monkeypatch.setattr(HfApi, "upload_folder", unreachable)
    with pytest.raises(UserError, match=r"push: could not reach huggingface.co \(ConnectError"):
        push.push(run, "someone/tiny")
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="a checkpoint holds only weights"):
        push.push(tmp_path / "step-00000004", "someone/tiny")
