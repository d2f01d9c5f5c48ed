import torch

from engine import hookimpl
from engine.schema import opt
from dataclasses import dataclass


class AdamW:
    """AdamW from torch (its fused kernel on CUDA and CPU)."""

    @dataclass
    class Options:
        beta1: float = opt(0.9, "first-moment decay", min=0.0, lt=1.0)
        beta2: float = opt(0.999, "second-moment decay", min=0.0, lt=1.0)
        eps: float = opt(1e-8, "denominator epsilon", gt=0.0)
        fused: bool = opt(True, "use torch's fused kernel (CUDA and CPU; one kernel for all parameters instead of a loop over them)")

    def __init__(self, options: Options):
        self.options = options

    @hookimpl
    def create_optimizer(self, param_groups, learning_rate, device):
        o = self.options
        fused = o.fused and device.type in ("cuda", "cpu")
        return torch.optim.AdamW(param_groups, lr=learning_rate, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)
