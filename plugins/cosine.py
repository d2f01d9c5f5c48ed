"""The cosine schedule, and what every scheduler plugin shares: warmup options and LambdaLR curves.

The curves are transformers' formulas (transformers.optimization), written out here as plain
functions of the step because importing transformers.optimization also imports peft and
bitsandbytes through transformers.trainer_utils: about 2 s of every start on a 2-core machine,
for libraries a run without LoRA or 8-bit optimizers never uses.
tests/test_builtin_plugins.py checks every curve against transformers' own, step by step.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch.optim.lr_scheduler import LambdaLR

from engine import hookimpl
from engine.schema import opt


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int) -> int:
    """Warmup length: warmup_steps when set, else warmup_ratio of the run (rounded up)."""
    return warmup_steps if warmup_steps > 0 else int(-(-total_steps * warmup_ratio // 1))


def _progress(step: int, warmup: int, total: int) -> float:
    return float(step - warmup) / float(max(1, total - warmup))


def cosine_factor(step: int, *, warmup: int, total: int, min_lr_ratio: float = 0.0) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, total)))
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)


def linear_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def constant_factor(step: int, *, warmup: int) -> float:
    return float(step) / float(max(1.0, warmup)) if step < warmup else 1.0


def cosine_restarts_factor(step: int, *, warmup: int, total: int, cycles: int) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = _progress(step, warmup, total)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))


def schedule(optimizer, factor: Callable[..., float], **shape) -> LambdaLR:
    """A LambdaLR whose multiplier of the peak learning rate at step s is factor(s, **shape)."""
    return LambdaLR(optimizer, partial(factor, **shape))


@dataclass
class WarmupOptions:
    """The warmup options every scheduler plugin shares."""

    warmup_ratio: float = opt(0.1, "share of the steps spent warming up linearly from 0", min=0.0, lt=1.0)
    warmup_steps: int = opt(0, "warmup length in steps; wins over warmup_ratio when > 0", min=0)


class Cosine:
    """Linear warmup from 0, then cosine decay from the peak learning rate to a floor."""

    @dataclass
    class Options(WarmupOptions):
        min_lr_ratio: float = opt(0.0, "floor of the decay as a share of the peak learning rate", min=0.0, max=1.0)

    def __init__(self, options: Options):
        self.options = options

    @hookimpl
    def create_scheduler(self, optimizer, total_steps):
        o = self.options
        warmup = warmup_steps_for(total_steps, o.warmup_ratio, o.warmup_steps)
        return schedule(optimizer, cosine_factor, warmup=warmup, total=total_steps, min_lr_ratio=o.min_lr_ratio)
