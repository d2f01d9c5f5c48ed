"""The optimizer step: micro-batches in; loss, backward, clip, update; metrics out as device tensors.

This is the unit that is compiled, profiled and tested for host-device syncs; engine/loop.py calls
it once per optimizer step. The loss is token-weighted over every micro-batch of every process:
each micro-batch's summed loss is scaled by world / step_tokens before backward (DDP averages
gradients over processes), so the gradient is that of the mean over all target tokens of the step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class StepOutput:
    """One optimizer step's metrics, left on the device (reading them is a host sync)."""

    loss: torch.Tensor  # mean token loss over the step, all processes (fp64, 0-dim)
    grad_norm: torch.Tensor | None  # total gradient norm before clipping (None when clipping is off)
    finite: torch.Tensor  # bool, 0-dim: the loss (and gradient norm) were finite and the update was applied
    tokens: int  # target tokens of the step, all processes (counted on the host)


class NonFiniteStep(Exception):
    """train.on_nan = "stop" met a NaN or infinite loss; the weights were not updated."""

    def __init__(self, loss: float, grad_norm: float | None):
        super().__init__(f"loss {loss}")
        self.loss, self.grad_norm = loss, grad_norm


class OptimizerStep:
    """Callable: step(batches, step_tokens) -> StepOutput; batches are this process's micro-batches on its device."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, accelerator: Any,
                 loss_fn: Callable[[Any, dict], tuple[torch.Tensor, Any]], max_grad_norm: float, on_nan: str = "stop"):
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.loss_fn, self.max_grad_norm, self.on_nan = loss_fn, max_grad_norm, on_nan

    def __call__(self, batches: Sequence[dict[str, torch.Tensor]], step_tokens: int) -> StepOutput:
        accelerator, model = self.accelerator, self.model
        world = accelerator.num_processes
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss_sum, _ = self.loss_fn(model, batch)
                accelerator.backward(loss_sum * world / step_tokens)
            step_loss += loss_sum.detach().double()
        loss = accelerator.reduce(step_loss, "sum") / step_tokens
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm) if self.max_grad_norm > 0 else None
        loss_value = loss.item()
        finite = math.isfinite(loss_value) and (
            grad_norm is None or accelerator.scaler is not None or math.isfinite(float(grad_norm)))
        if not finite and self.on_nan == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(loss_value, float(grad_norm) if grad_norm is not None else None)
        if finite:
            self.optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss, grad_norm, torch.tensor(finite), step_tokens)
