"""Linear decay, constant, and cosine with hard restarts; each with a linear warmup from 0.

The curves are transformers' formulas, kept in plugins/cosine.py (see there why they are not imported
from transformers.optimization); these plugins choose one and turn warmup_ratio / warmup_steps into
a number of steps, as the cosine plugin does.
"""

from dataclasses import dataclass

from engine import hookimpl
from engine.plugins.cosine import WarmupOptions as _Warmup
from engine.plugins.cosine import constant_factor, cosine_restarts_factor, linear_factor, schedule, warmup_steps_for
from engine.schema import opt


class Linear:
    """Linear warmup from 0, then linear decay from the peak learning rate to 0 at the last step."""

    Options = _Warmup

    def __init__(self, options: _Warmup):
        self.options = options

    @hookimpl
    def create_scheduler(self, optimizer, total_steps):
        warmup = warmup_steps_for(total_steps, self.options.warmup_ratio, self.options.warmup_steps)
        return schedule(optimizer, linear_factor, warmup=warmup, total=total_steps)


class Constant:
    """Linear warmup from 0, then the peak learning rate until the end."""

    Options = _Warmup

    def __init__(self, options: _Warmup):
        self.options = options

    @hookimpl
    def create_scheduler(self, optimizer, total_steps):
        warmup = warmup_steps_for(total_steps, self.options.warmup_ratio, self.options.warmup_steps)
        return schedule(optimizer, constant_factor, warmup=warmup)


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
        return schedule(optimizer, cosine_restarts_factor, warmup=warmup, total=total_steps, cycles=o.cycles)
