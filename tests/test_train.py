"""Training end to end: the quickstart, LoRA on a local model, run folders, accumulation equivalence."""

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from engine import hookimpl
from engine.testing import inline_plugin, run_recipe, tiny_recipe, write_corpus
from tests.conftest import REPO, run_cli


def unigram_perplexity(tokenizer, train_docs, val_docs):
    """Perplexity of a unigram model (add-one smoothed) fitted on the training documents."""
    eos = tokenizer.eos_token_id
    counts = Counter(t for ids in tokenizer(train_docs)["input_ids"] for t in ids + [eos])
    total, vocab = sum(counts.values()), len(tokenizer)
    val_ids = [t for ids in tokenizer(val_docs)["input_ids"] for t in ids + [eos]]
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in val_ids) / len(val_ids)
    return math.exp(nll)


@pytest.mark.slow
def test_quickstart_recipe_as_shipped(tmp_path):
    """The README's quickstart: trains from scratch offline, beats a unigram model by far, prints a sample."""
    out = tmp_path / "quickstart"
    result = run_cli("recipes/quickstart.toml", f"train.output_dir={out}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample: In the morning, Anna" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_loss", "perplexity", "val_bpc", "best_val_loss", "best_step", "train_loss", "steps", "epochs",
                "tokens_seen", "tokens_per_second", "trainable_params", "total_params", "stopped_early", "wall_seconds"):
        assert key in metrics, key
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    docs = [d for d in (REPO / "recipes/data/quickstart.txt").read_text().split("\n\n") if d.strip()]
    baseline = unigram_perplexity(tokenizer, docs[: int(len(docs) * 0.9)], docs[int(len(docs) * 0.9):])
    print(f"quickstart: val perplexity {metrics['perplexity']:.2f}, unigram baseline {baseline:.2f}, "
          f"{metrics['val_bpc']:.3f} bits/char, {metrics['wall_seconds']:.0f} s")
    assert metrics["perplexity"] < baseline / 10
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"phase": "train"' in l]
    assert losses[-1] < losses[0] / 2
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = tokenizer("At noon, Tom", return_tensors="pt")
    text = tokenizer.decode(model.generate(**ids, max_new_tokens=12, do_sample=False)[0])
    assert text.startswith("At noon, Tom") and len(text) > len("At noon, Tom") + 10


@pytest.mark.slow
def test_accelerate_launch_one_process_writes_run_folder(tmp_path):
    out = tmp_path / "run"
    # this interpreter's accelerate (a venv's bin/accelerate script may name another interpreter in its shebang)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "-m", "engine", "recipes/quickstart.toml",
         f"train.output_dir={out}", "train.max_steps=6", "train.eval_every_steps=3", "train.sample_prompt=The"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "recipe.toml").exists() and (out / "metrics.json").exists()
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "tokenizer.json").exists()
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"phase": "eval"' in l]
    assert [e["step"] for e in evals] == [3, 6]


@pytest.mark.slow
def test_lora_recipe_on_local_model_loads_with_peft(tiny_model_dir, tmp_path):
    corpus = write_corpus(tmp_path / "text.txt", n_documents=200)
    out = tmp_path / "lora-run"
    result = run_cli(
        "recipes/lora.toml", f"model.base={tiny_model_dir}", f"data.train={corpus}", f"train.output_dir={out}",
        "data.max_length=64", "train.epochs=2", "train.learning_rate=5e-3", "train.log_every_steps=1", "train.precision=fp32",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = out / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] < metrics["total_params"] / 5  # only the adapter trains
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"phase": "train"' in l]
    assert sum(losses[-3:]) < sum(losses[:3])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("The harbour", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    # the adapter changed the model: LoRA B matrices start at zero and must have moved
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.slow
def test_finished_run_is_not_overwritten_unless_asked(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run_recipe(recipe)
    out = tmp_path / "run"
    before = (out / "metrics.json").read_bytes()
    from engine import tomlfile

    path = tmp_path / "r.toml"
    path.write_text(tomlfile.dumps(recipe))
    result = run_cli(str(path))
    assert result.returncode == 2
    assert "holds a finished run" in result.stderr and "train.overwrite=true" in result.stderr
    assert (out / "metrics.json").read_bytes() == before
    result = run_cli(str(path), "train.overwrite=true", "train.max_steps=4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def _step_losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"phase": "train"' in l]


@pytest.mark.slow
def test_token_weighted_loss_batch_times_accumulation_equivalence(tmp_path):
    """8 x 1, 4 x 2 and 2 x 4 give the same per-step losses and weights, on documents of uneven length."""
    results = {}
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        recipe = tiny_recipe(
            tmp_path / f"{batch}x{accum}",
            data={"packing": False, "max_length": 48},
            train={"batch_size": batch, "gradient_accumulation_steps": accum, "max_steps": 5, "learning_rate": 1e-2, "seed": 3},
        )
        recipe["model"]["config"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        run_recipe(recipe)
        out = tmp_path / f"{batch}x{accum}" / "run"
        from safetensors.torch import load_file

        results[(batch, accum)] = (_step_losses(out), load_file(out / "final" / "model.safetensors"))
    ref_losses, ref_weights = results[(8, 1)]
    for key, (losses, weights) in results.items():
        assert losses == pytest.approx(ref_losses, abs=1e-5), key
        for name, w in ref_weights.items():
            torch.testing.assert_close(weights[name], w, atol=1e-5, rtol=0, msg=f"{key} {name}")


class FirstStep:
    """Keeps the initial weights, the micro-batches of step 1 as the model saw them, and step 1's logged loss."""

    initial: dict = {}
    batches: list = []
    loss: float = 0.0

    @hookimpl
    def on_train_start(self, context):
        model = context.accelerator.unwrap_model(context.model)
        FirstStep.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        FirstStep.batches = []

        def record(module, args, kwargs):
            if module.training and context.state.step == 0:
                ids = kwargs["input_ids"].detach().clone()  # the engine drops an all-ones attention mask (engine/feed.py)
                mask = kwargs.get("attention_mask")
                FirstStep.batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask.detach().clone()})

        model.register_forward_pre_hook(record, with_kwargs=True)

    @hookimpl
    def on_step_end(self, context, metrics):
        if context.state.step == 1:
            FirstStep.loss = metrics["loss"]


def test_step_loss_is_token_weighted_not_a_mean_of_micro_batch_means(tmp_path):
    """Step 1 of a 4 x 2 run on documents of uneven length: the engine's loss is the token-weighted mean over
    both micro-batches, and the mean of the two micro-batch means differs by far more than the 1e-5 the
    accumulation test above allows (so that test would catch the bug)."""
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe(tmp_path, callbacks=["first_step"], data={"packing": False, "max_length": 48},
                         train={"batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 1, "seed": 3})
    recipe["model"]["config"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with inline_plugin("callback", "first_step", FirstStep):
        run_recipe(recipe)
    assert len(FirstStep.batches) == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    model.load_state_dict(FirstStep.initial)
    model.eval()
    nats, tokens, means = 0.0, 0, []
    with torch.no_grad():
        for batch in FirstStep.batches:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            loss = model(**batch, labels=labels).loss.item()
            nats, tokens = nats + loss * n, tokens + n
            means.append(loss)
    assert len({int(b["attention_mask"].sum()) for b in FirstStep.batches}) == 2  # uneven micro-batches
    assert FirstStep.loss == pytest.approx(nats / tokens, abs=1e-5)
    assert abs(sum(means) / len(means) - nats / tokens) > 1e-4


@pytest.mark.slow
def test_generate_command_continues_a_prompt(tmp_path):
    """The command a user types, as a subprocess: the text is transformers' sample at the same seed."""
    from transformers import set_seed

    from engine.model import load_trained

    run_recipe(tiny_recipe(tmp_path))
    result = run_cli("generate", str(tmp_path / "run"), "--prompt", "The harbour", "--seed", "1", "sampling.max_new_tokens=10")
    assert result.returncode == 0, result.stderr[-2000:]
    model, tokenizer = load_trained(tmp_path / "run" / "final")
    enc = tokenizer("The harbour", return_tensors="pt")
    set_seed(1)
    ids = model.generate(**enc, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1,
                         no_repeat_ngram_size=2, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert continuation.strip() and result.stdout.rstrip("\n") == "The harbour" + continuation


def test_runs_in_one_process_each_get_their_own_precision(tmp_path, capsys):
    """Accelerate keeps precision in a process-wide singleton; a second run in one process (Python API,
    notebooks) with another precision must train with it, not be refused or silently reuse the first."""
    fp32 = run_recipe(tiny_recipe(tmp_path / "fp32", train={"precision": "fp32", "max_steps": 2}))
    bf16 = run_recipe(tiny_recipe(tmp_path / "bf16", train={"precision": "bf16", "max_steps": 2}))
    out = capsys.readouterr().out
    assert "precision fp32" in out and "precision bf16" in out
    assert fp32["steps"] == bf16["steps"] == 2
    assert bf16["train_loss"] != fp32["train_loss"]  # bf16 autocast rounds differently: it really ran in bf16


def test_max_grad_norm_clips_the_update_and_0_turns_clipping_off(tmp_path):
    """README: train.max_grad_norm clips the gradient norm; 0 turns clipping off. One plain SGD step (lr 0.1,
    no momentum, no weight decay) moves the weights by exactly lr x the (clipped) gradient norm."""
    from safetensors.torch import load_file

    moved = {}
    for clip in (1e-3, 0.0, 1e6):
        recipe = tiny_recipe(tmp_path / str(clip), callbacks=["first_step"], optimizer="sgd", sgd={"momentum": 0.0},
                             scheduler="constant", constant={"warmup_ratio": 0.0},
                             train={"max_steps": 1, "learning_rate": 0.1, "weight_decay": 0.0, "max_grad_norm": clip})
        recipe["model"]["config"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        with inline_plugin("callback", "first_step", FirstStep):
            run_recipe(recipe)
        final = load_file(tmp_path / str(clip) / "run" / "final" / "model.safetensors")
        moved[clip] = torch.sqrt(sum(((final[k] - FirstStep.initial[k]) ** 2).sum() for k in final)).item()
    assert moved[1e-3] == pytest.approx(0.1 * 1e-3, rel=1e-3)  # clipped to norm 1e-3
    assert moved[0.0] > 100 * moved[1e-3]  # 0: not clipped
    assert moved[0.0] == pytest.approx(moved[1e6], rel=1e-6)  # the same as a limit that never bites


def test_weight_decay_goes_to_matrices_only_biases_and_norms_excluded():
    """engine.model.param_groups on a tiny GPT-2: the exact split, checked by parameter name."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.model import param_groups

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=64))
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)  # frozen: in no group
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    name_of = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(name_of[id(p)] for p in groups[0]["params"])
    not_decayed = sorted(name_of[id(p)] for p in groups[1]["params"])
    matrices = [f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert decayed == sorted(f"transformer.{n}" for n in ["wte.weight", "wpe.weight", *matrices] if n != "h.1.mlp.c_fc.weight")
    vectors = [f"h.{i}.{m}" for i in range(2) for m in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                                                       "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")]
    assert not_decayed == sorted(f"transformer.{n}" for n in [*vectors, "ln_f.weight", "ln_f.bias"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == sum(p.requires_grad for p in model.parameters())
    assert not any(p is model.lm_head.weight for p in groups[1]["params"])  # tied to wte: decayed once, as wte
