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
    elif not recipe.model.config and getattr(recipe.model, "quantization", "none") == "none":
        steps.append('load the base in 4 bits (model.quantization = "4bit": QLoRA, docs/qlora.md)')
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
    steps later (and no earlier than step 2 x window), the mean loss of the last `window` steps is
    compared with the mean of the first `window` steps: a relative change below `tolerance` is flagged.
    Means over several steps keep batch-to-batch noise out of the comparison.
    """

    def __init__(self, total_steps: int, tolerance: float = 0.01):
        self.window = max(3, total_steps // 20)
        self.tolerance = tolerance
        self.first: list[float] = []
        self.recent: list[float] = []
        self.prev_lr: float | None = None
        self.warm_at: int | None = None
        self.done = False

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON), so that a resumed run warns exactly when an uninterrupted one would."""
        return {"first": list(self.first), "recent": list(self.recent), "prev_lr": self.prev_lr, "warm_at": self.warm_at, "done": self.done}

    def load_state(self, state: Any) -> None:
        """Take back state() from a checkpoint; a checkpoint without it (or a malformed one) leaves the watch fresh."""
        if not isinstance(state, dict):
            return
        try:
            first, recent = [float(x) for x in state["first"]], [float(x) for x in state["recent"]]
            prev_lr = None if state["prev_lr"] is None else float(state["prev_lr"])
            warm_at = None if state["warm_at"] is None else int(state["warm_at"])
            done = bool(state["done"])
        except (KeyError, TypeError, ValueError):
            return
        self.first, self.recent, self.prev_lr, self.warm_at, self.done = first, recent, prev_lr, warm_at, done

    def update(self, step: int, loss: float, lr: float, learning_rate: float) -> str | None:
        """Feed one optimizer step; returns a warning line the first time the loss is found stuck."""
        if self.done:
            return None
        if len(self.first) < self.window:
            self.first.append(loss)
        self.recent = (self.recent + [loss])[-self.window :]
        if self.warm_at is None and self.prev_lr is not None and lr <= self.prev_lr:
            self.warm_at = step
        self.prev_lr = lr
        if self.warm_at is None or step < max(self.warm_at + self.window, 2 * self.window):
            return None
        self.done = True
        start, now = sum(self.first) / len(self.first), sum(self.recent) / len(self.recent)
        if abs(start - now) > self.tolerance * abs(start):
            return None
        return (
            f"warning: the training loss has not moved ({start:.4f} on average over steps 1-{len(self.first)}, "
            f"{now:.4f} over steps {step - len(self.recent) + 1}-{step}, after warmup ended at step {self.warm_at}). "
            f"Check the learning rate (train.learning_rate = {learning_rate:g}: too low does nothing; also the "
            f"scheduler's warmup) and the data (data.train: real text, not empty, repeated or mostly padding; data.max_length)"
        )


def too_many_steps(total_steps: int, per_epoch: int, blocks: int, max_steps: int) -> str | None:
    """A warning when the run would pass over its training data more than 100 times (a typo in train.max_steps?)."""
    if per_epoch <= 0 or total_steps <= 100 * per_epoch:
        return None
    key = f"train.max_steps = {max_steps}" if max_steps > 0 else f"train.epochs = {total_steps // per_epoch}"
    return (
        f"warning: {key} is {total_steps} steps, {total_steps / per_epoch:.0f} passes over the training data "
        f"({blocks} blocks, {per_epoch} steps per epoch); the model will memorize it. Lower the steps or add data"
    )
