"""The original design's troubleshooting advice, as behaviour.

- Out of GPU memory: the error names the recipe keys that lower memory use, with their values.
- A training loss that has not moved once warmup is over: a warning in the log that says what to check.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from engine.errors import RunFailed


def oom_advice(recipe: Any) -> str:
    t, d = recipe.train, recipe.data
    steps = [
        f"lower train.batch_size (now {t.batch_size}) and raise train.gradient_accumulation_steps "
        f"(now {t.gradient_accumulation_steps}) to keep the same blocks per step",
        f"lower data.max_length (now {d.max_length})",
    ]
    if not t.gradient_checkpointing:
        steps.append("set train.gradient_checkpointing = true")
    optimizer = recipe.plugin("optimizer")
    if optimizer is None or optimizer.name not in ("adamw8bit", "paged_adamw8bit"):
        steps.append('use optimizer = "adamw8bit" (8-bit optimizer state)')
    if not recipe.lora.enabled:
        steps.append("train a LoRA adapter (lora.enabled = true)")
    return "out of GPU memory; to fit, " + "; ".join(steps)


@contextlib.contextmanager
def explain_out_of_memory(recipe: Any) -> Iterator[None]:
    """Turn torch.OutOfMemoryError into a RunFailed (exit 1) naming the recipe keys to change."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise RunFailed(f"{oom_advice(recipe)} ({first})") from None


class LossWatch:
    """Flags, once, a training loss that has not moved some steps after the learning-rate warmup.

    Warmup is over at the first step whose learning rate is not above the previous step's. `window`
    steps later, the mean loss of those steps is compared with the loss of the first step: a relative
    change below `tolerance` is flagged.
    """

    def __init__(self, total_steps: int, tolerance: float = 0.01):
        self.window = max(3, total_steps // 20)
        self.tolerance = tolerance
        self.first_loss: float | None = None
        self.prev_lr: float | None = None
        self.warm_at: int | None = None
        self.recent: list[float] = []
        self.done = False

    def update(self, step: int, loss: float, lr: float, learning_rate: float) -> str | None:
        """Feed one optimizer step; returns a warning line the first time the loss is found stuck."""
        if self.done:
            return None
        if self.first_loss is None:
            self.first_loss = loss
        if self.warm_at is None and self.prev_lr is not None and lr <= self.prev_lr:
            self.warm_at = step
        self.prev_lr = lr
        if self.warm_at is None:
            return None
        self.recent = (self.recent + [loss])[-self.window :]
        if step < self.warm_at + self.window:
            return None
        self.done = True
        mean = sum(self.recent) / len(self.recent)
        if abs(self.first_loss - mean) > self.tolerance * abs(self.first_loss):
            return None
        return (
            f"warning: the training loss has not moved ({self.first_loss:.4f} at step 1, {mean:.4f} on average over "
            f"steps {step - len(self.recent) + 1}-{step}, after warmup ended at step {self.warm_at}). Check the learning "
            f"rate (train.learning_rate = {learning_rate:g}: too low does nothing; also the scheduler's warmup) and the "
            f"data (data.train: real text, not empty, repeated or mostly padding; data.max_length)"
        )
