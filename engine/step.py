"""The optimizer step: micro-batches in; loss, backward, clip, update; metrics out as device tensors.

This is the unit that is compiled, profiled and tested for host-device syncs; engine/loop.py calls
it once per optimizer step. The loss is token-weighted over every micro-batch of every process:
each micro-batch's summed loss is scaled by world / step_tokens before backward (DDP averages
gradients over processes), so the gradient is that of the mean over all target tokens of the step.
The token count comes from the host-side batch, so nothing here waits for the device.

Non-finite steps without a sync: a NaN or infinite loss (or gradient norm, except under fp16's
GradScaler, whose overflows are routine) sets a flag on the device, and the update is applied with
that flag as the optimizer's `found_inf` - the argument torch's fused optimizers take from
GradScaler, which makes the kernel leave weights, moments and step count untouched. Under
train.on_nan = "stop" the flag is sticky: no later step updates either, and the loop reports the
first bad step when it next reads the metrics (a log, evaluation or checkpoint step). Optimizers
without `found_inf` support (non-fused, 8-bit, most plugins) read the flag on the host each step
instead: correct, with one sync per step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class StepOutput:
    """One optimizer step's metrics, left on the device (reading them is a host sync)."""

    loss: torch.Tensor  # mean token loss over the step, all processes (fp32, 0-dim)
    grad_norm: torch.Tensor | None  # total gradient norm before clipping (None when clipping is off)
    finite: torch.Tensor  # bool, 0-dim: the step was finite and its update applied
    tokens: int  # target tokens of the step, all processes (counted on the host)


class NonFiniteStep(Exception):
    """train.on_nan = "stop" met a NaN or infinite loss; the weights were not updated."""

    def __init__(self, loss: float, grad_norm: float | None):
        super().__init__(f"loss {loss}")
        self.loss, self.grad_norm = loss, grad_norm


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's AcceleratedOptimizer wrapper(s)."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def takes_found_inf(optimizer: Any) -> bool:
    """Whether optimizer.step() honours a `found_inf` flag (torch's fused Adam, AdamW, SGD)."""
    inner = inner_optimizer(optimizer)
    if not getattr(inner, "_step_supports_amp_scaling", False):
        return False
    return all(group.get("fused") for group in inner.param_groups)


def check_options(train: Any, device: Any) -> None:
    """train.cuda_graphs needs train.compile and a CUDA device: refused clearly, before any step."""
    from engine.errors import UserError

    if train.cuda_graphs and not train.compile:
        raise UserError("train.cuda_graphs: records the compiled step as CUDA graphs; set train.compile = true as well")
    if train.cuda_graphs and device.type != "cuda":
        raise UserError(f"train.cuda_graphs: CUDA graphs need a CUDA GPU, and this run is on {device.type}; set train.cuda_graphs = false")


BACKEND = "inductor"  # torch.compile's backend for train.compile (tests use a lighter one)


class OptimizerStep:
    """Callable: step(batches, step_tokens) -> StepOutput; batches are this process's micro-batches on its device.

    sync_free: True when the step never waits for the device (the optimizer takes found_inf).
    compile: torch.compile the model's forward and the loss as one graph (AOTAutograd derives the
    backward graph from it); the batches must have fixed shapes (engine/feed.py pads them to
    data.max_length), so it compiles once. cuda_graphs: mode="reduce-overhead", which also records
    the compiled graphs as CUDA graphs (launch-bound small batches gain most).
    """

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, accelerator: Any,
                 loss_fn: Callable[[Any, dict], Any], max_grad_norm: float, on_nan: str = "stop",
                 compile: bool = False, cuda_graphs: bool = False):
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.loss_fn, self.max_grad_norm, self.on_nan = loss_fn, max_grad_norm, on_nan
        self.cuda_graphs = cuda_graphs
        if compile:
            self.loss_fn = torch.compile(loss_fn, dynamic=False, backend=BACKEND, mode="reduce-overhead" if cuda_graphs else None)
        self.sync_free = takes_found_inf(optimizer)
        self.halted: torch.Tensor | None = None  # on_nan = "stop": set from the first bad step on

    def forward_backward(self, batches: Sequence[dict[str, torch.Tensor]], step_tokens: int) -> torch.Tensor:
        """Gradients of the step's token-mean loss; returns the summed loss of this process (fp32, device)."""
        accelerator, model = self.accelerator, self.model
        scale = accelerator.num_processes / step_tokens
        total = torch.zeros((), dtype=torch.float32, device=accelerator.device)
        if self.cuda_graphs and len(batches) > 1:
            # A gradient the recorded backward creates lives in the CUDA graphs' memory and is overwritten when
            # the next micro-batch's graphs run, before it is accumulated into (torch/_inductor/cudagraph_trees.py
            # format_dealloc_msg). Accumulate into zeroed .grad buffers made here, outside the graphs.
            for p in model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss_sum = self.loss_fn(model, batch)
                accelerator.backward(loss_sum * scale)
            total = total + loss_sum.detach().float()
        return total

    def __call__(self, batches: Sequence[dict[str, torch.Tensor]], step_tokens: int) -> StepOutput:
        accelerator = self.accelerator
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten now
        local = self.forward_backward(batches, step_tokens)
        loss = (accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local) / step_tokens
        grad_norm = None
        if self.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        bad = ~torch.isfinite(loss)
        if grad_norm is not None and accelerator.scaler is None:
            bad = bad | ~torch.isfinite(grad_norm)
        if self.on_nan == "stop":
            bad = bad if self.halted is None else bad | self.halted
            self.halted = bad
        if self.sync_free:
            self._guarded_update(bad)
        else:
            self._checked_update(bad, loss, grad_norm)
        self.scheduler.step()  # the schedule follows the step counter, skipped steps included
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss, grad_norm, ~bad, step_tokens)

    def _guarded_update(self, bad: torch.Tensor) -> None:
        inner = inner_optimizer(self.optimizer)
        if self.accelerator.scaler is None:
            inner.found_inf = bad.float()
            try:
                self.optimizer.step()
            finally:
                del inner.found_inf
            return
        self._join_scaler_found_inf(bad)
        self.optimizer.step()

    def _join_scaler_found_inf(self, bad: torch.Tensor) -> None:
        """fp16: our flag joins GradScaler's found_inf, which decides whether its step() updates and how update() moves the scale.

        A logical or, not a sum: the fused kernel skips only when found_inf == 1 and then subtracts found_inf
        from the step count, so a NaN loss (whose gradients overflow too) flagged as 2 would be applied
        (aten fused_adam_utils.cuh; torch/optim/adam.py _fused_adam).
        """
        if self.max_grad_norm <= 0:
            self.accelerator.unscale_gradients()  # clip_grad_norm_ did it otherwise; GradScaler.step then won't again
        inner = inner_optimizer(self.optimizer)
        for flag in self.accelerator.scaler._per_optimizer_states[id(inner)]["found_inf_per_device"].values():
            torch.maximum(flag, bad.to(flag.device, flag.dtype), out=flag)

    def _checked_update(self, bad: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        if bool(bad):  # one host read per step: this optimizer cannot skip an update by itself
            if self.on_nan == "stop":
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteStep(float(loss), float(grad_norm) if grad_norm is not None else None)
            if self.accelerator.scaler is not None:
                # fp16: GradScaler must still finish its step (clip_grad_norm_ unscaled already: without its
                # update() the next unscale_ raises); flagged, its step() skips the update and update() backs off
                self._join_scaler_found_inf(bad)
                self.optimizer.step()
            return
        self.optimizer.step()


@dataclass
class StepRecord:
    """One step's metrics as host values."""

    step: int
    loss: float
    grad_norm: float | None
    finite: bool
    lr: float


class Unread:
    """Device metrics of the steps taken since they were last read; read() fetches them all in one sync."""

    def __init__(self) -> None:
        self.items: list[tuple[int, StepOutput, float]] = []

    def add(self, step: int, output: StepOutput, lr: float) -> None:
        self.items.append((step, output, lr))

    def read(self) -> list[StepRecord]:
        if not self.items:
            return []
        rows = []
        for _, out, _ in self.items:
            norm = out.grad_norm if out.grad_norm is not None else torch.full_like(out.loss, float("nan"))
            rows.append(torch.stack([out.loss.double(), norm.to(out.loss.device).double(), out.finite.to(out.loss.device).double()]))
        values = torch.stack(rows).tolist()  # the one host-device sync
        records = [StepRecord(step, loss, norm if out.grad_norm is not None else None, bool(finite), lr)
                   for (step, out, lr), (loss, norm, finite) in zip(self.items, values)]
        self.items = []
        return records
