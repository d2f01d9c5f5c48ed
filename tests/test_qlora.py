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

from tests.conftest import REPO, run_cli


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


def test_out_of_memory_advice_suggests_a_4bit_base_for_an_adapter_run():
    from engine.advice import oom_advice

    plain = recipe_mod.from_dict({"data": {"train": "x.txt"}, "model": {"base": "some/folder"}}, "r.toml")
    assert 'model.quantization = "4bit"' in oom_advice(plain)
    quantized = recipe_mod.from_dict({"data": {"train": "x.txt"}, "model": {"quantization": "4bit"}}, "r.toml")
    assert "model.quantization" not in oom_advice(quantized)


def test_a_quantized_base_under_fsdp_is_refused(monkeypatch):
    from types import SimpleNamespace

    from engine import quant

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = SimpleNamespace(quantization="4bit", quant_type="nf4", double_quant=True, device_map="")
    with pytest.raises(UserError, match="cannot be combined with FSDP"):
        quant.load_options(cfg, torch.float32)


def test_full_fine_tuning_of_a_quantized_base_exits_2_from_the_cli(tmp_path):
    from engine.testing import write_recipe

    recipe = qlora_recipe(tmp_path, tmp_path / "no-model-needed")  # refused before any model loads
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
def shipped_recipe(folder: Path, base: Path, *extra: str):
    """recipes/qlora.toml as shipped, on the tiny model and a small corpus, 6 steps (checkpoints at 3 and 6)."""
    corpus = write_corpus(folder / "corpus.txt", n_documents=80)
    overrides = [
        f"model.base={json.dumps(str(base))}", f"data.train={json.dumps(str(corpus))}", "data.max_length=32",
        f"train.output_dir={json.dumps(str(folder / 'run'))}", "train.max_steps=6", "train.gradient_accumulation_steps=1",
        "train.learning_rate=1e-2", "train.precision=\"fp32\"", "train.log_every_steps=1", "train.save_every_steps=3",
        "train.keep_checkpoints=3", "sinks=[\"jsonl\"]", "lora.r=4", "lora.alpha=8", *extra,
    ]
    return recipe_mod.load(REPO / "recipes" / "qlora.toml", overrides), overrides


def train_and_resume(folder: Path, base: Path, *extra: str) -> Path:
    """Train; then resume from the step-3 checkpoint and check the adapter and the logged losses are the same."""
    from engine import loop

    recipe, overrides = shipped_recipe(folder, base, *extra)
    loop.train(recipe)
    run = folder / "run"
    trained = losses(run)
    assert len(trained) == 6 and trained[-1] < trained[0]
    saved = load_file(run / "final" / "adapter_model.safetensors")
    # only the adapter (and biases with lora.bias): the base is re-quantized on load
    assert saved and all("lora_" in name or name.endswith(".bias") for name in saved)
    step3 = json.dumps(str(run / "checkpoints" / checkpoint.name_for(3)))
    loop.train(recipe_mod.load(REPO / "recipes" / "qlora.toml", [*overrides, f"train.resume={step3}"]))
    again = load_file(run / "final" / "adapter_model.safetensors")
    assert saved.keys() == again.keys()
    for name in saved:
        assert torch.equal(saved[name], again[name]), name  # atol 0
    assert losses(run) == trained
    return run


def eval_generate_merge(run: Path, data: str, out: Path, capsys) -> tuple[float, float]:
    """eval and generate load the base quantized as trained; merge dequantizes it and saves a plain model.

    Returns the eval loss of the adapter on its (quantized) base and of the merged model."""
    from transformers import AutoModelForCausalLM

    from engine.cli import main

    capsys.readouterr()
    assert main(["eval", str(run), "--data", data, "--json"]) == 0
    adapter_loss = json.loads(capsys.readouterr().out)["loss"]
    assert adapter_loss < 6.2  # trained: the random base is at chance (ln 512 = 6.24)

    assert main(["generate", str(run), "--prompt", "The", "decoding=greedy", "greedy.max_new_tokens=20"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The") and len(text) > 5

    assert main(["merge", str(run), str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)  # transformers alone: no quantization, no peft
    assert not getattr(plain.config, "quantization_config", None)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    capsys.readouterr()
    assert main(["eval", str(out), "--data", data, "--json", "--max-length", "32"]) == 0
    merged_loss = json.loads(capsys.readouterr().out)["loss"]
    return adapter_loss, merged_loss


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("qlora")
    return train_and_resume(folder, tiny_model_dir), str(folder / "corpus.txt")


@pytest.mark.slow
def test_shipped_qlora_recipe_trains_and_resumes_exactly(qlora_run):
    run, _ = qlora_run
    recorded = recipe_mod.from_dict(__import__("engine").tomlfile.loads((run / "recipe.toml").read_text()), "r")
    assert recorded.model.quantization == "4bit" and recorded.lora.target_modules == "all-linear"
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == {"c_attn", "c_proj", "c_fc"}  # all linear but the head


@pytest.mark.slow
def test_shipped_qlora_recipe_evaluates_generates_and_merges(qlora_run, tmp_path, capsys):
    run, data = qlora_run
    adapter_loss, merged_loss = eval_generate_merge(run, data, tmp_path / "merged", capsys)
    # the dequantized 4-bit base plus the adapter computes what the adapter on the quantized base did
    assert merged_loss == pytest.approx(adapter_loss, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ("lora.use_dora=true", "optimizer=\"adamw8bit\""),  # DoRA on the 4-bit base, 8-bit AdamW
        ("lora.use_rslora=true", "lora.init=\"gaussian\"", "lora.bias=\"lora_only\"", "model.quantization=\"none\""),
    ],
    ids=["dora-4bit", "rslora-plain"],
)
def test_adapter_variants_train_resume_evaluate_and_merge(tmp_path, tiny_model_dir, capsys, extra):
    run = train_and_resume(tmp_path, tiny_model_dir, *extra)
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert config["use_dora"] == ("lora.use_dora=true" in extra)
    assert config["use_rslora"] == ("lora.use_rslora=true" in extra)
    adapter_loss, merged_loss = eval_generate_merge(run, str(tmp_path / "corpus.txt"), tmp_path / "merged", capsys)
    # DoRA on a 4-bit base: its magnitude rescales the base output, which bitsandbytes' 4-bit kernel computes
    # slightly differently from a matmul with the dequantized weights (measured 6.09806 vs 6.09592)
    assert merged_loss == pytest.approx(adapter_loss, abs=5e-3 if "lora.use_dora=true" in extra else 1e-4)


# ------------------------------------------------------------------ benchmark 3, QLoRA part
@pytest.mark.slow
def test_benchmark_3_qlora_part_measures_bytes_per_weight_adapters_and_activations():
    from engine.benchmarks import qlora_memory

    r = qlora_memory.run(act_seq=64, tiny=True)
    w = r["weight_bytes_per_param"]
    assert w["4bit"] == pytest.approx(0.5 + 4 / 64, abs=1e-4)  # the formulas printed beside the numbers
    # plus a per-matrix code table of 256 fp32 values (1 KiB over the 8 Mi weights of the sample)
    assert w["4bit+dq"] == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + (256 + 16) * 4 / (2048 * 4096), abs=1e-6)
    assert w["8bit"] == pytest.approx(1 + 4 / 4096, abs=1e-6)
    assert r["optimizer_bytes_per_param"]["adamw"] == 8.0 and r["optimizer_bytes_per_param"]["adamw8bit"] < 2.2
    tiny = r["shapes"]["tiny Llama"]
    c = tiny["counts"]
    # LoRA r 16 on the 7 linear layers of each of 2 layers: r x (in + out) each
    h, i, kv = 64, 176, 2 * 16
    assert c["adapter"] == 2 * 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    assert tiny["dora_adapter"] == c["adapter"] + 2 * (h + kv + kv + h + i + i + h)  # one magnitude per output feature
    acts = r["activations_per_token"]
    assert acts["LoRA"]["kept_per_layer"] == h * 4  # the fp32 residual stream at each checkpointed layer's input
    assert acts["DoRA"]["layer_full"] > acts["LoRA"]["layer_full"] > acts["LoRA"]["kept_per_layer"]


@pytest.mark.slow
def test_an_8bit_base_trains_and_evaluates_quantized(tmp_path, tiny_model_dir, capsys):
    from engine.cli import main

    recipe = qlora_recipe(tmp_path, tiny_model_dir)
    recipe["model"] = {"base": str(tiny_model_dir), "quantization": "8bit"}
    recipe["train"].update(max_steps=4, save_every_steps=0)
    summary = run_recipe(recipe)
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", recipe["data"]["train"], "--json"]) == 0
    # eval loads the base in 8 bits again (engine.quant.settings_of_run) and finds the trained adapter's loss
    assert json.loads(capsys.readouterr().out)["loss"] < 6.24 and summary["val_loss"] < 6.24


@pytest.mark.slow
def test_modules_to_save_trains_the_embeddings_beside_a_4bit_base(tmp_path, tiny_model_dir, capsys):
    from engine.cli import main

    recipe = qlora_recipe(tmp_path, tiny_model_dir, modules_to_save=["wte"])
    recipe["train"].update(max_steps=4, save_every_steps=0)
    run_recipe(recipe)
    saved = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    embeddings = [name for name in saved if "wte" in name]
    assert embeddings, sorted(saved)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).transformer.wte.weight
    assert not torch.equal(saved[embeddings[0]], original)  # trained, and saved with the adapter
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").transformer.wte.weight
    assert torch.equal(merged, saved[embeddings[0]])


# ------------------------------------------------------------------ device_map and several processes
@pytest.mark.slow
def test_device_map_auto_with_a_4bit_base_trains(tmp_path, tiny_model_dir):
    recipe = qlora_recipe(tmp_path, tiny_model_dir)
    recipe["model"]["device_map"] = "auto"
    recipe["train"].update(max_steps=4, save_every_steps=0)
    summary = run_recipe(recipe)
    assert summary["steps"] == 4 and losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_train_a_4bit_base_together(tmp_path, tiny_model_dir):
    """DDP (2 CPU processes, gloo): each process quantizes its own copy of the base; the adapters stay equal."""
    from engine.testing import launch, write_recipe

    recipe = qlora_recipe(tmp_path, tiny_model_dir)
    recipe["train"].update(max_steps=4, save_every_steps=0, batch_size=2)
    result = launch(write_recipe(recipe, tmp_path / "r.toml"), processes=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    trained = losses(tmp_path / "run")
    assert len(trained) == 4 and trained[-1] < trained[0]
    assert load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("major, expected", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch, major, expected):
    """train.precision = "auto" on CUDA: bf16 from compute capability 8 (A100, H100), else fp16. A V100 or T4 can
    make bf16 tensors (emulated), so torch.cuda.is_bf16_supported() says True there by default; training in
    emulated bf16 is far slower than fp16. Simulated: CUDA present, a device of the given capability on which
    a bf16 tensor can be made."""
    from types import SimpleNamespace

    from engine import quant

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert quant.precision_of("auto") == expected
    assert quant.precision_of("fp16") == "fp16" and quant.precision_of("fp32") == "no"
