"""Around a run: what it prints, curves.png, samples, and the eval / merge / runs commands."""

import json
import math
import os
import struct

import pytest
import torch

from engine.testing import run_recipe, tiny_recipe, write_corpus
from engine import cli
from tests.conftest import direct_val_numbers, run_cli

PROMPTS = ["The harbour", "A small boat"]


def png_size(path):
    """(width, height) from a PNG's signature and IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", f"{path} is cut short"
    return width, height


def engine_cli(capsys, *args):
    """`python -m engine ARGS` in this process (faster than a subprocess): (exit status, stdout, stderr)."""
    capsys.readouterr()
    saved = dict(os.environ)  # main() turns progress bars off in the environment when not on a terminal
    try:
        status = cli.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def cli_recipe(tmp_path, **train):
    return tiny_recipe(
        tmp_path,
        sinks=["console", "jsonl", "curves"],
        curves={"width": 640, "height": 480},
        train={"eval_every_steps": 4, "sample_prompts": PROMPTS, "sample_max_new_tokens": 8, **train},
    )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny full fine-tune trained through the CLI, its output captured (not a terminal)."""
    from engine import tomlfile

    tmp = tmp_path_factory.mktemp("cli-run")
    path = tmp / "recipe.toml"
    path.write_text(tomlfile.dumps(cli_recipe(tmp)))
    result = run_cli(str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", result


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lora-run")
    recipe = tiny_recipe(
        tmp, model={"config": {}, "base": str(tiny_model_dir)}, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
        train={"max_steps": 6, "learning_rate": 2e-2},
    )
    run_recipe(recipe)
    return tmp / "run"


# ------------------------------------------------------------------ training output
def test_output_to_a_file_has_no_progress_bar_garbage(cli_run):
    _, result = cli_run
    everything = result.stdout + result.stderr
    assert "\r" not in everything and "\x1b" not in everything
    assert result.stderr.count("step 8/8") == 1 and "eval @ step 4:" in result.stderr


def test_run_logs_its_setup_before_training(cli_run):
    out, result = cli_run
    metrics = json.loads((out / "metrics.json").read_text())
    head = result.stdout.split("best (step")[0]
    n = metrics["total_params"]
    assert f"parameters: {n:,} trainable of {n:,} (100.00%)" in head
    assert "device: cpu x 1 process, precision fp32" in head
    assert "steps: 8, each of 4 blocks (1 process x batch 4 x accumulation 1) = up to 128 tokens" in head
    assert f"(every key: {out / 'recipe.toml'})" in head
    assert "  train.max_steps = 8\n" in head and "  train.eval_every_steps = 4\n" in head
    assert "  train.seed" not in head  # left at its default
    for slot, name in (("optimizer", "adamw"), ("scheduler", "cosine"), ("sinks", "console"), ("sinks", "curves")):
        assert any(l.split()[:2] == [slot, name] and l.endswith("tunesmith 0.1.0") for l in head.splitlines()), name


def test_run_ends_with_a_summary_table(cli_run):
    out, result = cli_run
    m = json.loads((out / "metrics.json").read_text())
    all_lines = result.stdout.splitlines()
    table = "\n".join(all_lines[next(i for i, l in enumerate(all_lines) if "best (step" in l):])
    lines = {l.split("  ")[0]: l for l in table.splitlines() if l.strip()}
    assert lines["val loss"].split()[-2:] == [f"{m['val_loss']:.4f}", f"{m['best_val_loss']:.4f}"]
    assert lines["perplexity"].split()[1] == f"{m['perplexity']:.3f}"
    assert lines["bits/char"].split()[1] == f"{m['val_bpc']:.4f}"
    assert f"best (step {m['best_step']})" in table
    assert f"{m['tokens_per_second']:,.0f} tokens/s" in table and "wall time 0:" in table
    files = {l.split()[0]: l.split()[-1] for l in table.splitlines()[-5:]}
    assert files == {"run": str(out), "model": str(out / "final"), "metrics": str(out / "metrics.json"),
                     "curves": str(out / "curves.png"), "samples": str(out / "samples.jsonl")}


def test_curves_png_has_the_configured_size(cli_run):
    out, _ = cli_run
    assert png_size(out / "curves.png") == (640, 480)
    assert not (out / "curves.png.tmp").exists()


def test_samples_at_each_evaluation_go_to_file_and_sinks(cli_run):
    out, result = cli_run
    records = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in records] == [(4, p) for p in PROMPTS] + [(8, p) for p in PROMPTS]
    assert all(isinstance(r["text"], str) for r in records) and any(r["text"].strip() for r in records)
    for r in records:  # the console sink got them through log_samples
        assert f"sample @ step {r['step']}: {r['prompt']}{r['text']}".replace("\n", "\\n") in result.stderr


def test_sampling_does_not_change_training(cli_run, tmp_path):
    out, _ = cli_run
    recipe = cli_recipe(tmp_path, sample_prompts=[])
    recipe["sinks"] = ["jsonl"]
    del recipe["curves"]
    run_recipe(recipe)
    def losses(run):
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert losses(tmp_path / "run") == pytest.approx(losses(out), abs=1e-6)
    assert not (tmp_path / "run" / "samples.jsonl").exists()


# ------------------------------------------------------------------ eval
def direct_numbers(model, tokenizer, text, max_length):
    """Loss, tokens and bits/char straight from transformers: one document, EOS after it, windows of
    max_length that overlap by one token (each token but the first predicted once)."""
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, max_length - 1):
            window = torch.tensor([ids[start : start + max_length]])
            if window.shape[1] < 2:
                continue
            n = window.shape[1] - 1
            nats += model(window, labels=window).loss.item() * n
            tokens += n
    return nats / tokens, tokens, nats / (len(text) + 1) / math.log(2)


def test_in_run_evaluation_numbers_equal_an_independent_computation(tmp_path):
    """A run's last evaluation (metrics.json, final weights) against transformers' own loss over the
    validation documents, windows overlapping by one token: val_loss, perplexity = exp(val_loss), val_bpc."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import data as data_mod
    from engine import recipe as recipe_mod

    recipe = tiny_recipe(tmp_path, data={"packing": "concat"}, train={"max_steps": 4})
    run_recipe(recipe)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    val_docs = data_mod.split_documents(recipe_mod.from_dict(recipe, "(test)")).val  # which documents: the run's split
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    nats, tokens, characters = direct_val_numbers(model, tokenizer, val_docs, 32)
    assert metrics["val_loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert metrics["val_bpc"] == pytest.approx(nats / characters / math.log(2), rel=1e-5)


def eval_json(capsys, *args):
    status, out, err = engine_cli(capsys, "eval", *args, "--json")
    assert status == 0, err[-3000:]
    return json.loads(out)


def test_eval_matches_transformers_on_a_model_folder(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "In the morning, Anna walked to the harbour and looked at the boats on the quiet sea."
    (tmp_path / "one.txt").write_text(text)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for max_length in (128, 8):
        loss, tokens, bpc = direct_numbers(model, tokenizer, text, max_length)
        args = (str(tiny_model_dir), "--data", str(tmp_path / "one.txt"), "--max-length", str(max_length))
        if max_length == 128:  # once as a user runs it
            result = run_cli("eval", *args, "--json")
            assert result.returncode == 0, result.stderr[-3000:]
            assert "\r" not in result.stderr and "Loading weights" not in result.stderr  # no progress bar in a pipe
            got = json.loads(result.stdout)
        else:
            got = eval_json(capsys, *args)
        assert got["tokens"] == tokens and got["characters"] == len(text) + 1
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert got["bits_per_character"] == pytest.approx(bpc, rel=1e-5)
    assert got["blocks"] > 1 and got["kind"] == "model"


def test_eval_on_run_folders_full_and_lora(cli_run, lora_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The baker gave warm bread to the old fisher."
    (tmp_path / "t.txt").write_text(text)
    out, _ = cli_run
    full = eval_json(capsys, str(out), "--data", str(tmp_path / "t.txt"))  # a run folder: its final/
    assert full["model"] == str(out / "final") and full["max_length"] == 32  # the run's data.max_length
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    loss, tokens, _ = direct_numbers(model, AutoTokenizer.from_pretrained(out / "final"), text, 32)
    assert full["loss"] == pytest.approx(loss, rel=1e-5) and full["tokens"] == tokens

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, lora_run / "final").eval()
    loss, tokens, _ = direct_numbers(adapted, AutoTokenizer.from_pretrained(lora_run / "final"), text, 32)
    status, table, err = engine_cli(capsys, "eval", str(lora_run / "final"), "--data", str(tmp_path / "t.txt"))
    assert status == 0, err[-3000:]
    rows = dict(l.split(None, 1) for l in table.splitlines())
    assert rows["model"] == f"{lora_run / 'final'} (LoRA adapter)"
    assert float(rows["loss"].split()[0]) == pytest.approx(loss, abs=1e-4)
    assert rows["tokens"] == f"{tokens:,} predicted"


def test_eval_refuses_a_folder_without_a_model(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("Some text.\n")
    status, _, err = engine_cli(capsys, "eval", str(tmp_path), "--data", str(tmp_path / "t.txt"))
    assert status == 2
    assert err == f"error: {tmp_path}: holds neither a model (config.json) nor a LoRA adapter (adapter_config.json) nor a run's final/\n"


# ------------------------------------------------------------------ merge
def test_merge_gives_the_same_logits_as_base_plus_adapter(lora_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = tmp_path / "merged"
    status, out, err = engine_cli(capsys, "merge", str(lora_run), str(merged_dir))
    assert status == 0, err[-3000:]
    assert out.startswith(f"merged {lora_run / 'final'} into its base model: {merged_dir}")
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(["The harbour town at evening, the wind and the sea"], return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted_logits = PeftModel.from_pretrained(base, lora_run / "final").eval()(ids).logits
        merged_logits = merged(ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)


def test_merge_refuses_full_runs_and_non_empty_folders(cli_run, lora_run, tmp_path, capsys):
    out, _ = cli_run
    status, _, err = engine_cli(capsys, "merge", str(out), str(tmp_path / "m"))
    assert status == 2 and err.startswith(f"error: {out / 'final'}: is a full fine-tune, not a LoRA adapter")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    status, _, err = engine_cli(capsys, "merge", str(lora_run), str(tmp_path / "busy"))
    assert status == 2 and err.startswith(f"error: {tmp_path / 'busy'}: exists and is not an empty folder")
    assert not (tmp_path / "m").exists() and sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["x.txt"]



@pytest.mark.slow  # two merges, ~14 s on a shared CPU
def test_merge_an_adapter_folder_given_directly_into_a_standalone_fp32_model(lora_run, tiny_model_dir, tmp_path, capsys):
    """merge ADAPTER OUT with an adapter folder outside any run, on a base saved in bf16: the merged model is
    fp32 by default (every tensor), equals base (upcast) + adapter; --dtype bf16 keeps bf16."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base16 = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base16)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base16)
    assert {t.dtype for t in load_file(base16 / "model.safetensors").values()} == {torch.bfloat16}
    adapter = tmp_path / "my-adapter"  # not a run's final/: no recipe.toml above it
    shutil.copytree(lora_run / "final", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base16)
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    status, out, err = engine_cli(capsys, "merge", str(adapter), str(tmp_path / "merged"))
    assert status == 0, err[-3000:]
    assert out.startswith(f"merged {adapter} into its base model: {tmp_path / 'merged'}")
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32} and not any("lora" in n for n in tensors)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")(["The harbour town at evening"], return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base16, dtype=torch.float32).eval()
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)

    status, _, err = engine_cli(capsys, "merge", str(adapter), str(tmp_path / "merged16"), "--dtype", "bf16")
    assert status == 0, err[-3000:]
    assert {t.dtype for t in load_file(tmp_path / "merged16" / "model.safetensors").values()} == {torch.bfloat16}


# ------------------------------------------------------------------ runs
def test_runs_compares_metrics_and_differing_keys_and_plots(cli_run, lora_run, tmp_path, capsys):
    out, _ = cli_run
    status, stdout, err = engine_cli(capsys, "runs", str(out), str(lora_run), "--plot", str(tmp_path / "cmp.png"))
    assert status == 0, err[-3000:]
    lines = stdout.splitlines()
    assert lines[0].split() == [str(out), str(lora_run)]
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (out, lora_run))
    row = {l.split("  ")[0]: l.split() for l in lines}
    assert row["val loss"][-2:] == [f"{a['val_loss']:.4f}", f"{b['val_loss']:.4f}"]
    assert row["trainable params"][-2:] == [f"{a['trainable_params']:,}", f"{b['trainable_params']:,}"]
    assert row["train.learning_rate"][-2:] == ["0.003", "0.02"] and row["lora.enabled"][-2:] == ["false", "true"]
    assert "recipe keys that differ" in stdout
    assert "train.output_dir" not in stdout and "train.batch_size" not in stdout  # same in both
    assert png_size(tmp_path / "cmp.png") == (1000, 600)


def test_runs_refuses_an_unfinished_run(tmp_path, capsys):
    status, _, err = engine_cli(capsys, "runs", str(tmp_path))
    assert status == 2 and err == f"error: {tmp_path}: not a finished run (no metrics.json)\n"
