"""QLoRA and the adapter options: a base quantized by bitsandbytes (NF4 runs on CPU too), DoRA, rsLoRA,
all-linear targets; exact resume, eval, generate and merge with a quantized base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint
from engine import recipe as recipe_mod
from engine.errors import UserError
from engine.testing import run_recipe, write_corpus

from conftest import REPO, run_cli


def qlora_recipe(tmp_path: Path, base: Path, **lora) -> dict:
    corpus = write_corpus(tmp_path / "corpus.txt", n_documents=80)
    return {
        "sinks": ["jsonl"],
        "model": {"base": str(base), "quantization": "4bit", "quant_type": "nf4", "double_quant": True},
        "data": {"train": str(corpus), "max_length": 32},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 4, "learning_rate": 1e-2,
                  "precision": "fp32", "log_every_steps": 1, "save_every_steps": 3, "keep_checkpoints": 3},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", **lora},
    }


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("phase") == "train"]


# ------------------------------------------------------------------ validation, before any model loads
def test_impossible_combinations_are_reported_together(tmp_path):
    data = {
        "data": {"train": "x.txt"},
        "model": {"config": {"model_type": "gpt2"}, "quantization": "4bit"},
        "lora": {"enabled": False},
    }
    with pytest.raises(UserError) as info:
        recipe_mod.from_dict(data, "r.toml")
    text = "\n".join(info.value.lines)
    assert "r.toml: model.quantization: \"4bit\" freezes the base in 4 bits" in text
    assert "full fine-tuning (lora.enabled = false)" in text
    assert "a model built from model.config starts from random weights" in text

    data = {
        "data": {"train": "x.txt"},
        "model": {"quantization": "8bit", "quant_type": "fp4", "double_quant": False},
        "lora": {"init": "orthogonal", "r": 5, "target_modules": "all"},
    }
    with pytest.raises(UserError) as info:
        recipe_mod.from_dict(data, "r.toml")
    lines = info.value.lines
    assert any(line.startswith("r.toml: lora.target_modules: expected a list of strings or one of 'all-linear'") for line in lines)
    data["lora"]["target_modules"] = "all-linear"
    with pytest.raises(UserError) as info:
        recipe_mod.from_dict(data, "r.toml")
    lines = info.value.lines
    assert len(lines) == 3, lines
    assert lines[0].startswith('r.toml: model.quant_type: "fp4" is a 4-bit data type')
    assert lines[1].startswith("r.toml: model.double_quant: applies only with model.quantization = \"4bit\"")
    assert lines[2] == 'r.toml: lora.init: "orthogonal" needs an even lora.r, got 5'


def test_full_fine_tuning_of_a_quantized_base_exits_2_from_the_cli(tmp_path, tiny_model_dir):
    from engine.testing import write_recipe

    recipe = qlora_recipe(tmp_path, tiny_model_dir)
    recipe["lora"] = {"enabled": False}
    path = write_recipe(recipe, tmp_path / "full.toml")
    result = run_cli("train", str(path), timeout=120)
    assert result.returncode == 2
    assert "model.quantization: \"4bit\" freezes the base in 4 bits" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_modules_to_save_naming_a_quantized_layer_is_refused(tmp_path, tiny_model_dir):
    recipe = qlora_recipe(tmp_path, tiny_model_dir, modules_to_save=["c_fc"])
    with pytest.raises(UserError, match="lora.modules_to_save: .* names a quantized layer"):
        run_recipe(recipe)


# ------------------------------------------------------------------ train, resume, eval, generate, merge
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir):
    """One 4-bit run of 6 steps (checkpoints at 3 and 6); returns its folder."""
    folder = tmp_path_factory.mktemp("qlora")
    recipe = qlora_recipe(folder, tiny_model_dir)
    run_recipe(recipe)
    return folder / "run", recipe


@pytest.mark.slow
def test_qlora_trains_and_resumes_exactly(qlora_run):
    run, recipe = qlora_run
    trained = losses(run)
    assert len(trained) == 6 and trained[-1] < trained[0]
    saved = load_file(run / "final" / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # only the adapter: the base is re-quantized on load
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == {"c_attn", "c_proj", "c_fc"}  # all linear but the head
    # continue from the step-3 checkpoint: the base quantized again, the adapter and optimizer restored
    resumed = {**recipe, "train": {**recipe["train"], "resume": str(run / "checkpoints" / checkpoint.name_for(3))}}
    run_recipe(resumed)
    again = load_file(run / "final" / "adapter_model.safetensors")
    assert saved.keys() == again.keys()
    for name in saved:
        assert torch.equal(saved[name], again[name]), name
    assert losses(run) == trained


@pytest.mark.slow
def test_qlora_eval_generate_and_merge(qlora_run, tmp_path, capsys):
    """eval and generate load the base quantized as trained; merge dequantizes it and saves a plain model."""
    from transformers import AutoModelForCausalLM

    from engine.cli import main

    run, recipe = qlora_run
    data = recipe["data"]["train"]
    assert main(["eval", str(run), "--data", data, "--json"]) == 0
    adapter_loss = json.loads(capsys.readouterr().out)["loss"]
    assert adapter_loss < 6.2  # trained: the random base is at chance (ln 512 = 6.24)

    assert main(["generate", str(run), "--prompt", "The", "decoding=greedy", "greedy.max_new_tokens=20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The") and len(out) > 5

    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged)  # transformers alone: no quantization, no peft
    assert not getattr(plain.config, "quantization_config", None)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    capsys.readouterr()
    assert main(["eval", str(merged), "--data", data, "--json", "--max-length", "32"]) == 0
    merged_loss = json.loads(capsys.readouterr().out)["loss"]
    # the dequantized 4-bit base plus the adapter computes what the adapter on the quantized base did
    assert merged_loss == pytest.approx(adapter_loss, abs=1e-4)
    print(f"eval loss: adapter on the 4-bit base {adapter_loss:.6f}, merged fp32 model {merged_loss:.6f}")
