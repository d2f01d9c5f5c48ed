"""The optimizer step (engine/step.py): exact token-weighted updates, non-finite steps skipped without a host
sync, and a guard that fails the moment anything in the step reads a value back from the device."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from engine import model as model_mod
from engine import step as step_mod
from engine.loss import token_loss_sum

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class SyncInStep(AssertionError):
    pass


_allowed = threading.local()


@contextlib.contextmanager
def reads_allowed():
    _allowed.depth = getattr(_allowed, "depth", 0) + 1
    try:
        yield
    finally:
        _allowed.depth -= 1


@contextlib.contextmanager
def no_device_reads():
    """Every way of reading a tensor's value on the host raises in the main thread (on CPU nothing would sync,
    so this stands in for torch.cuda.set_sync_debug_mode("error"), which the gpu-marked test uses). The batch
    feeder's thread works on host tensors and may read them; code inside reads_allowed() may too."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def refuse(name):
        def method(self, *args, **kwargs):
            if threading.current_thread() is threading.main_thread() and not getattr(_allowed, "depth", 0):
                raise SyncInStep(f"Tensor.{name}() inside the step: a host-device sync")
            return saved[name](self, *args, **kwargs)
        return method

    for name in READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def tiny_setup(fused=True, on_nan="skip", max_grad_norm=1.0, vocab=96):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GPT2Config, GPT2LMHeadModel

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=vocab, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model_mod.skip_padding_check(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = step_mod.OptimizerStep(model, optimizer, scheduler, accelerator, lambda m, b: token_loss_sum(m, b, False)[0],
                                  max_grad_norm, on_nan)
    return model, step


def batches(n=2, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})  # no padding: no mask (as engine.feed leaves it)
    return out


def tokens_of(bs):
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in bs)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def poisoned(model):
    """A forward hook that makes the logits NaN."""
    def hook(module, args, kwargs, output):
        output.logits = output.logits * float("nan")
        return output
    return model.register_forward_hook(hook, with_kwargs=True)


def test_the_step_reads_nothing_back_from_the_device_and_the_loss_falls():
    model, step = tiny_setup()
    assert step.sync_free
    data, n = batches(), tokens_of(batches())  # counted on the host, before the step
    outputs = []
    with no_device_reads():
        for _ in range(6):
            outputs.append(step(data, n))
    losses = [float(o.loss) for o in outputs]
    assert losses[-1] < losses[0] - 0.1
    assert all(bool(o.finite) for o in outputs)


def test_the_guard_catches_a_sync_added_to_the_step():
    model, step = tiny_setup()
    real = step.loss_fn
    step.loss_fn = lambda m, b: real(m, b) * (1.0 if real(m, b).item() else 1.0)  # a sync someone might add
    data, n = batches(), tokens_of(batches())
    with no_device_reads(), pytest.raises(SyncInStep, match="item"):
        step(data, n)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_the_step_takes_the_gradient_of_the_token_mean_over_its_micro_batches(cuda_graphs):
    """Two micro-batches of 2 give the gradient of one batch of 4: the mean over all target tokens of the step.
    cuda_graphs: the same through the zeroed .grad buffers made for CUDA graphs (test_gpu.py checks the graphs)."""
    model_a, step_a = tiny_setup()
    step_a.cuda_graphs = cuda_graphs
    data = batches(2)
    step_a.forward_backward(data, tokens_of(data))
    model_b, step_b = tiny_setup()
    whole = [{k: torch.cat([b[k] for b in data]) for k in data[0]}]
    step_b.forward_backward(whole, tokens_of(whole))
    grads_b = {n: p.grad for n, p in model_b.named_parameters()}
    for name, p in model_a.named_parameters():
        torch.testing.assert_close(p.grad, grads_b[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("on_nan", ["skip", "stop"])
def test_a_non_finite_step_changes_nothing_without_a_sync(on_nan):
    model, step = tiny_setup(on_nan=on_nan)
    data, n = batches(), tokens_of(batches())
    step(data, n)
    before = snapshot(model)
    state_before = {k: v.clone() if torch.is_tensor(v) else v
                    for k, v in step_mod.inner_optimizer(step.optimizer).state[next(model.parameters())].items()}
    handle = poisoned(model)
    with no_device_reads():
        bad = step(data, n)
    handle.remove()
    assert not bool(bad.finite) and torch.isnan(bad.loss)
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name
    state_after = step_mod.inner_optimizer(step.optimizer).state[next(model.parameters())]
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key  # moments and step count untouched
    with no_device_reads():
        good = step(data, n)
    moved = any(not torch.equal(v, before[n]) for n, v in snapshot(model).items())
    if on_nan == "skip":
        assert bool(good.finite) and moved  # training goes on
    else:
        assert not bool(good.finite) and not moved  # sticky: nothing updates until the loop stops the run


def test_an_optimizer_without_found_inf_reads_the_flag_on_the_host():
    model, step = tiny_setup(fused=False, on_nan="stop")
    assert not step.sync_free
    data = batches()
    handle = poisoned(model)
    with pytest.raises(step_mod.NonFiniteStep):
        step(data, tokens_of(data))
    handle.remove()


def allow_reads_in(monkeypatch, owner, name):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        with reads_allowed():
            return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


class GuardFromFirstStep:
    """From on_train_start to on_train_end, any host read in the main thread raises."""

    guard: contextlib.ExitStack | None = None
    steps: list = []
    step_metrics_on_device = True  # else the engine reads the step's loss every step to hand over floats

    def on_train_start(self, context):
        GuardFromFirstStep.guard = contextlib.ExitStack()
        GuardFromFirstStep.guard.enter_context(no_device_reads())

    def on_step_end(self, context, metrics):
        GuardFromFirstStep.steps.append((context.state.step, type(metrics["loss"]).__name__))

    def on_train_end(self, context, summary):
        GuardFromFirstStep.guard.close()


def test_the_training_loop_reads_the_device_only_at_log_evaluation_and_checkpoint_steps(tmp_path, monkeypatch):
    """A whole run under the guard: the steps between log steps read nothing; the reads happen in the
    metrics read-out (step.Unread.read), evaluation, checkpoints and the final save."""
    from engine import checkpoint, loop, step
    from engine.hookspecs import hookimpl
    from engine.testing import inline_plugin, run_recipe, tiny_recipe

    from engine import data as data_mod

    for owner, name in ((step.Unread, "read"), (loop, "evaluate"), (loop, "save_model"), (checkpoint, "write")):
        allow_reads_in(monkeypatch, owner, name)
    # A batch with padding carries an attention mask, and transformers reads that back to choose its causal
    # fast path (with packing: the one short block of an epoch). Keep the short block out of this run.
    pack = data_mod.pack
    monkeypatch.setattr(data_mod, "pack", lambda seqs, n, stride=None: [b for b in pack(seqs, n, stride) if len(b) == n])
    plugin = type("Guard", (), {k: hookimpl(v) for k, v in vars(GuardFromFirstStep).items() if k.startswith("on_")})
    plugin.step_metrics_on_device = True
    recipe = tiny_recipe(tmp_path, callbacks=["guard"])
    recipe["train"].update(max_steps=8, log_every_steps=4, save_every_steps=4, epochs=1)
    GuardFromFirstStep.steps = []
    try:
        with inline_plugin("callback", "guard", plugin):
            summary = run_recipe(recipe)
    finally:
        if GuardFromFirstStep.guard is not None:
            GuardFromFirstStep.guard.close()
    assert summary["steps"] == 8 and summary["train_loss"] == summary["train_loss"]  # finite
    # between log steps the hook gets the loss as a device tensor (reading it is the plugin's choice)
    assert [kind for _, kind in GuardFromFirstStep.steps] == ["Tensor", "Tensor", "Tensor", "float"] * 2


def cuda_setup(precision, max_grad_norm, on_nan):
    """A real CUDA step: Accelerate's mixed precision (bf16 or fp16 with its GradScaler), fused AdamW's CUDA kernel,
    a 2-layer GPT-2; returns (accelerator, model, optimizer, step, two micro-batches on the GPU, their target count)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GPT2Config, GPT2LMHeadModel

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=precision)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=256))
    model_mod.skip_padding_check(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = step_mod.OptimizerStep(model, optimizer, scheduler, accelerator, lambda m, b: token_loss_sum(m, b, False)[0],
                                  max_grad_norm, on_nan)
    data = [{k: v.to("cuda") for k, v in b.items()} for b in batches(2, vocab=256)]
    return accelerator, model, optimizer, step, data, tokens_of(batches(2, vocab=256))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_sync_in_the_step_on_cuda():
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call during the step."""
    accelerator, model, optimizer, step, data, n = cuda_setup("bf16", 1.0, "stop")
    step(data, n)  # warm-up: lazy state, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = step(data, n)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(out.finite)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_skips_a_nan_step_on_cuda_without_a_sync(max_grad_norm):
    """Accelerate's real fp16 (CUDA GradScaler, fused AdamW's CUDA kernel): a NaN step leaves weights, moments
    and step count untouched (the kernel skips only on found_inf == 1), the scale backs off, nothing syncs."""
    accelerator, model, optimizer, step, data, n = cuda_setup("fp16", max_grad_norm, "skip")
    step(data, n)
    torch.cuda.synchronize()
    inner = step_mod.inner_optimizer(optimizer)
    before = snapshot(model)
    state_before = {k: v.clone() for k, v in inner.state[next(model.parameters())].items()}
    scale = accelerator.scaler.get_scale()
    handle = poisoned(model)
    torch.cuda.set_sync_debug_mode("error")
    try:
        bad = step(data, n)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    handle.remove()
    assert not bool(bad.finite)
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name
    for key, value in inner.state[next(model.parameters())].items():
        assert torch.equal(value, state_before[key]), key
    assert accelerator.scaler.get_scale() == scale / 2


def test_a_plugin_that_reads_on_step_end_gets_floats_every_step(tmp_path):
    """The hook's contract without step_metrics_on_device: floats, read from the device every step."""
    from engine.hookspecs import hookimpl
    from engine.testing import inline_plugin, run_recipe, tiny_recipe

    kinds = []

    class Reader:
        @hookimpl
        def on_step_end(self, context, metrics):
            kinds.append((type(metrics["loss"]).__name__, type(metrics["grad_norm"]).__name__))

    recipe = tiny_recipe(tmp_path, callbacks=["reader"])
    recipe["train"].update(max_steps=4, log_every_steps=4)
    with inline_plugin("callback", "reader", Reader):
        run_recipe(recipe)
    assert kinds == [("float", "float")] * 4


def fp16_setup(monkeypatch, max_grad_norm, on_nan="skip", fp16=True, sgd=False, fused=True):
    """Accelerate's fp16 on CUDA, stood in for on CPU: a GradScaler("cpu") in place of the CUDA one, and the
    accelerator marked fp16 + native AMP so that clip_grad_norm_ / unscale_gradients really unscale
    (Accelerator.unscale_gradients does nothing unless native_amp and mixed_precision == "fp16").
    fp16=False: the same model and optimizer without a scaler (the reference)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GPT2Config, GPT2LMHeadModel

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True)
    if fp16:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # what Accelerate builds for fp16 on CUDA
        accelerator.native_amp = True
        monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")
        monkeypatch.setattr(accelerator, "autocast", contextlib.nullcontext)  # fp32 math: the scaler path is under test
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=96, bos_token_id=0,
                                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if sgd:  # an update linear in the gradient: shows a gradient unscaled twice (Adam would hide it)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, fused=fused or None)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = step_mod.OptimizerStep(model, optimizer, scheduler, accelerator, lambda m, b: token_loss_sum(m, b, False)[0],
                                  max_grad_norm, on_nan)
    return accelerator, model, step


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_with_grad_scaler_skips_a_non_finite_step_without_a_sync(monkeypatch, max_grad_norm):
    """fp16's GradScaler: the step's non-finite flag joins the scaler's found_inf (after the gradients are
    unscaled, by clipping or, without clipping, by the step itself), the fused kernel skips the update and
    leaves moments and step count alone, the scale backs off, and training goes on. A NaN loss also makes
    the gradients NaN, so the scaler's own flag is set too: the two must combine to 1, never 2 (the fused
    kernel skips only on found_inf == 1, and subtracts found_inf from the step count)."""
    accelerator, model, step = fp16_setup(monkeypatch, max_grad_norm)
    data, n = batches(), tokens_of(batches())
    with no_device_reads():
        first = step(data, n)
    before = snapshot(model)
    inner = step_mod.inner_optimizer(step.optimizer)
    state_before = {k: v.clone() for k, v in inner.state[next(model.parameters())].items()}
    handle = poisoned(model)
    with no_device_reads():
        bad = step(data, n)
    handle.remove()
    assert not bool(bad.finite)
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name
    for key, value in inner.state[next(model.parameters())].items():
        assert torch.equal(value, state_before[key]), key  # moments and step count untouched
    assert accelerator.scaler.get_scale() == 8.0  # backed off, as after an overflow
    with no_device_reads():
        good = step(data, n)
    assert bool(good.finite) and float(good.loss) < float(first.loss)
    assert float(inner.state[next(model.parameters())]["step"]) == 2  # the skipped step not counted


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_with_an_optimizer_without_found_inf_skips_a_non_finite_step_and_goes_on(monkeypatch, max_grad_norm):
    """fp16 with an optimizer that reads the flag on the host (8-bit AdamW, adamw.fused = false): a skipped step
    still goes through GradScaler, which skips the update and lowers its scale. Leaving it out left the scaler
    mid-step (unscaled by clipping, never updated), so the next step's unscale_ raised "unscale_() has already
    been called on this optimizer since the last update()"."""
    accelerator, model, step = fp16_setup(monkeypatch, max_grad_norm, fused=False)
    assert not step.sync_free
    data, n = batches(), tokens_of(batches())
    first = step(data, n)
    before = snapshot(model)
    handle = poisoned(model)
    bad = step(data, n)
    handle.remove()
    assert not bool(bad.finite) and all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    good = step(data, n)
    assert accelerator.scaler.get_scale() == 8.0  # backed off, as after an overflow
    assert bool(good.finite) and float(good.loss) < float(first.loss)


@pytest.mark.parametrize("max_grad_norm", [1e6, 0.0])
def test_fp16_unscales_the_gradients_exactly_once(monkeypatch, max_grad_norm):
    """At scale 16 the fp16 path's update (plain SGD: linear in the gradient) matches the one without a scaler,
    with clipping (the scaler unscales in clip_grad_norm_) and without (the step unscales before the update);
    unscaled twice it would be 16 times smaller, never unscaled 16 times larger. (fp16 autocast on the
    forward pass makes the two differ by rounding, hence the tolerance.)"""
    updates, norms = {}, {}
    for fp16 in (True, False):
        _, model, step = fp16_setup(monkeypatch, max_grad_norm, fp16=fp16, sgd=True)
        before = snapshot(model)
        out = step(batches(), tokens_of(batches()))
        updates[fp16] = torch.cat([(value - before[name]).flatten() for name, value in snapshot(model).items()])
        norms[fp16] = out.grad_norm
    assert 0.98 < float(updates[True].norm() / updates[False].norm()) < 1.02
    assert float(torch.nn.functional.cosine_similarity(updates[True], updates[False], dim=0)) > 0.999
    if max_grad_norm:
        assert 0.98 < float(norms[True] / norms[False]) < 1.02


def test_a_nan_found_at_the_next_read_stops_naming_its_step_and_writes_no_checkpoint_after_it(tmp_path, capsys):
    """train.on_nan = "stop" without a read every step: step 5 goes NaN, nothing updates from then on, and the run
    stops at step 6 (a checkpoint step, which reads the metrics first) naming step 5 and the checkpoint of step 4."""
    from safetensors.torch import load_file

    from engine import checkpoint
    from engine.cli import main
    from engine.hookspecs import hookimpl
    from engine.testing import inline_plugin, tiny_recipe, write_recipe

    class LatePoison:
        step_metrics_on_device = True  # so the engine reads only at log, evaluation and checkpoint steps

        @hookimpl
        def on_train_start(self, context):
            def poison(module, args, kwargs, output):
                if module.training and context.state.step + 1 == 5:
                    output.logits = output.logits * float("nan")
                return output
            context.model.register_forward_hook(poison, with_kwargs=True)

    recipe = tiny_recipe(tmp_path, callbacks=["late_poison"])
    recipe["train"].update(max_steps=12, log_every_steps=100, save_every_steps=2)
    path = tmp_path / "recipe.toml"
    write_recipe(recipe, path)
    with inline_plugin("callback", "late_poison", LatePoison):
        assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "training loss is nan" in err and "at step 5;" in err and "not updated from then on" in err
    assert f"the last good checkpoint is {run / 'checkpoints' / checkpoint.name_for(4)}" in err
    assert [step for step, _ in checkpoint.complete(run)] == [2, 4]
    weights = load_file(run / "checkpoints" / checkpoint.name_for(4) / checkpoint.WEIGHTS_FILE)
    assert all(torch.isfinite(t).all() for t in weights.values())
