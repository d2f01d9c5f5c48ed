"""Checks that only mean something on a CUDA GPU (pytest -m gpu). Each skips without CUDA; CPU stand-ins of
the same promises live in test_step.py, test_speed.py, test_loss_choice.py and test_feed.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine.testing import inline_plugin, run_recipe, tiny_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WIDER = {"config": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64,
                    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}


def losses(run_dir):
    import json

    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("phase") == "train"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_tracks_the_fp32_losses(tmp_path, precision):
    train = {"max_steps": 20, "batch_size": 8, "learning_rate": 1e-3, "log_every_steps": 1}
    run_recipe(tiny_recipe(tmp_path / "fp32", model=WIDER, train={**train, "precision": "fp32"}))
    run_recipe(tiny_recipe(tmp_path / precision, model=WIDER, train={**train, "precision": precision}))
    full, half = losses(tmp_path / "fp32" / "run"), losses(tmp_path / precision / "run")
    assert len(full) == len(half) == 20
    assert half[-1] < half[0] - 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(full, half)) < 0.05 * max(full)  # and follows fp32 step by step


def test_auto_batch_size_probes_real_out_of_memory(tmp_path, capsys):
    """A memory cap makes the largest micro-batches really run out of CUDA memory; the run picks a smaller one."""
    from engine.testing import write_corpus

    corpus = write_corpus(tmp_path / "big.txt", n_documents=3000)
    cap = 3 * 2**30 / torch.cuda.get_device_properties(0).total_memory  # 3 GiB for this process
    model = {"config": {"model_type": "gpt2", "n_layer": 4, "n_head": 8, "n_embd": 1024, "n_positions": 512}}
    torch.cuda.set_per_process_memory_fraction(cap)
    try:
        summary = run_recipe(tiny_recipe(tmp_path, model=model, data={"train": str(corpus), "max_length": 512},
                                         train={"batch_size": 64, "gradient_accumulation_steps": 1, "auto_batch_size": True,
                                                "max_steps": 2, "precision": "bf16", "chunked_loss": "plain"}))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    out = capsys.readouterr().out
    micro = int(out.split("auto batch size: micro-batch ")[1].split()[0])
    assert 1 <= micro < 64 and summary["steps"] == 2  # 64 did not fit in 3 GiB; training went on with less


def test_compiled_step_never_recompiles_on_cuda(tmp_path):
    from torch._dynamo.utils import counters

    from engine.hookspecs import hookimpl

    torch._dynamo.reset()
    counters.clear()
    seen = []

    class Count:
        step_metrics_on_device = True

        @hookimpl
        def on_step_end(self, context, metrics):
            seen.append(counters["stats"]["unique_graphs"])

    recipe = tiny_recipe(tmp_path, model=WIDER, callbacks=["count"], data={"train": str(tmp_path / "corpus.txt"),
                                                                           "max_length": 64, "packing": False},
                         train={"compile": True, "max_steps": 6, "batch_size": 4, "precision": "bf16"})
    with inline_plugin("callback", "count", Count):
        run_recipe(recipe)
    assert seen[0] >= 1 and all(n == seen[0] for n in seen)
    torch._dynamo.reset()


@pytest.mark.parametrize("loss", ["plain", "fused"])
def test_the_training_loop_never_syncs_between_log_steps_on_cuda(tmp_path, monkeypatch, loss):
    """torch.cuda.set_sync_debug_mode("error") from the first step on; reads are allowed only where the
    engine documents them (the metrics read-out, evaluation, checkpoints, saving). "fused" (the default where
    liger-kernel is installed): liger-kernel 0.8's fused linear cross-entropy itself reads the target count
    back (target_mask.sum().item()) in forward and compares the incoming gradient with 1 (torch.equal) in
    backward, two syncs per micro-batch inside the library (documented in docs/speed-memory.md); those two
    functions are the only reads allowed beyond the engine's own."""
    from engine import checkpoint, loop, step
    from engine.hookspecs import hookimpl

    def allowed(owner, name):
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        monkeypatch.setattr(owner, name, wrapped)

    for owner, name in ((step.Unread, "read"), (loop, "evaluate"), (loop, "save_model"), (checkpoint, "write")):
        allowed(owner, name)
    if loss == "fused":
        pytest.importorskip("liger_kernel")
        from liger_kernel.ops import fused_linear_cross_entropy as liger_flce

        allowed(liger_flce, "fused_linear_cross_entropy_forward")
        allowed(liger_flce, "fused_linear_cross_entropy_backward")
    from engine import data as data_mod

    pack = data_mod.pack  # no short block: a padded batch carries a mask, which transformers reads back
    monkeypatch.setattr(data_mod, "pack", lambda seqs, n, stride=None: [b for b in pack(seqs, n, stride) if len(b) == n])

    class Strict:
        step_metrics_on_device = True

        @hookimpl
        def on_train_start(self, context):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

        @hookimpl
        def on_train_end(self, context, summary):
            torch.cuda.set_sync_debug_mode(0)

    recipe = tiny_recipe(tmp_path, model=WIDER, callbacks=["strict"],
                         train={"max_steps": 8, "log_every_steps": 4, "precision": "bf16", "chunked_loss": loss})
    try:
        with inline_plugin("callback", "strict", Strict):
            summary = run_recipe(recipe)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["steps"] == 8


def test_cuda_graphs_accumulate_the_gradients_of_every_micro_batch():
    """train.cuda_graphs with 2 micro-batches per step: the same weights and metrics as the eager step, step after
    step, the metrics read only after all steps (the loop keeps them unread until a log step).
    A .grad made by the recorded backward is overwritten by the next micro-batch's replay (torch raises
    "accessing gradient tensor output of CUDAGraphs that has been overwritten", or the step silently keeps
    one micro-batch's gradient); the step accumulates into .grad buffers made outside the graphs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine import model as model_mod
    from engine import step as step_mod
    from engine.loss import token_loss_sum

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2):
        ids = torch.randint(0, 256, (2, 32), generator=g)
        data.append({"input_ids": ids.cuda(), "labels": ids.clone().cuda()})
    tokens = 2 * 2 * 31
    weights, outputs, metrics = {}, {}, {}
    for graphs in (False, True):
        torch._dynamo.reset()
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=256,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        model_mod.skip_padding_check(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, fused=True)  # linear in the gradient
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        step = step_mod.OptimizerStep(model, optimizer, scheduler, accelerator, lambda m, b: token_loss_sum(m, b, "plain")[0],
                                      1.0, "stop", compile=graphs, cuda_graphs=graphs)
        weights[graphs], outputs[graphs] = [], []
        for _ in range(4):  # warm-up, recording, then replays
            outputs[graphs].append(step(data, tokens))  # kept unread across steps, as the loop keeps them
            weights[graphs].append({n: p.detach().clone() for n, p in model.named_parameters()})
        # read only now, after later replays: the metrics must not live in the graphs' reused memory
        metrics[graphs] = [(float(o.loss), float(o.grad_norm), bool(o.finite)) for o in outputs[graphs]]
    torch._dynamo.reset()
    for eager, graphed in zip(weights[False], weights[True]):
        for name, value in eager.items():
            torch.testing.assert_close(graphed[name], value, rtol=1e-3, atol=1e-4)
    for (loss, norm, finite), (g_loss, g_norm, g_finite) in zip(metrics[False], metrics[True]):
        assert finite and g_finite and g_loss == pytest.approx(loss, rel=1e-4) and g_norm == pytest.approx(norm, rel=1e-3)
    assert len({loss for loss, _, _ in metrics[True]}) == 4  # one value per step, not one overwritten buffer
