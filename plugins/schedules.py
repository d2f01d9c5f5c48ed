"""Linear decay, constant, and cosine with hard restarts; each with a linear warmup from 0.

The schedules are transformers' own (transformers.optimization); these plugins only choose one and
turn warmup_ratio / warmup_steps into a number of steps, as the cosine plugin does.
"""

from dataclasses import dataclass

from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from engine import hookimpl
from engine.plugins.cosine import WarmupOptions as _Warmup
from engine.plugins.cosine import warmup_steps_for
from engine.schema import opt


class Linear:
    """Linear warmup from 0, then linear decay from the peak learning rate to 0 at the last step."""

    Options = _Warmup

    def __init__(self, options: _Warmup):
        self.options = options

    @hookimpl
    def create_scheduler(self, optimizer, total_steps):
        warmup = warmup_steps_for(total_steps, self.options.warmup_ratio, self.options.warmup_steps)
        return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class Constant:
    """Linear warmup from 0, then the peak learning rate until the end."""

    Options = _Warmup

    def __init__(self, options: _Warmup):
        self.options = options

    @hookimpl
    def create_scheduler(self, optimizer, total_steps):
        warmup = warmup_steps_for(total_steps, self.options.warmup_ratio, self.options.warmup_steps)
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)


class CosineRestarts:
    """Linear warmup from 0, then cycles of cosine decay to 0, each restarting at the peak learning rate."""

    @dataclass
    class Options(_Warmup):
        cycles: int = opt(2, "number of cosine cycles after warmup", min=1)

    def __init__(self, options: Options):
        self.options = options

    @hookimpl
    def create_scheduler(self, optimizer, total_steps):
        o = self.options
        warmup = warmup_steps_for(total_steps, o.warmup_ratio, o.warmup_steps)
        return get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, num_cycles=o.cycles
        )
