from dataclasses import dataclass

from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from engine import hookimpl
from engine.schema import opt


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int) -> int:
    """Warmup length: warmup_steps when set, else warmup_ratio of the run (rounded up)."""
    return warmup_steps if warmup_steps > 0 else int(-(-total_steps * warmup_ratio // 1))


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
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, min_lr_rate=o.min_lr_ratio
        )
