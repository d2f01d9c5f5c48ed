"""8-bit AdamW (bitsandbytes), its paged variant, and SGD (torch)."""

from dataclasses import dataclass

import torch

from engine import hookimpl
from engine.schema import opt


@dataclass
class _AdamOptions:
    beta1: float = opt(0.9, "first-moment decay", min=0.0, lt=1.0)
    beta2: float = opt(0.999, "second-moment decay", min=0.0, lt=1.0)
    eps: float = opt(1e-8, "denominator epsilon", gt=0.0)
    min_8bit_size: int = opt(4096, "parameters with fewer elements keep 32-bit state (bitsandbytes' default)", min=1)


class AdamW8bit:
    """AdamW with 8-bit blockwise-quantized state from bitsandbytes (about a quarter of AdamW's state memory)."""

    Options = _AdamOptions
    bnb_class = "AdamW8bit"

    def __init__(self, options: _AdamOptions):
        self.options = options

    @hookimpl
    def create_optimizer(self, param_groups, learning_rate, device):
        import bitsandbytes as bnb

        o = self.options
        cls = getattr(bnb.optim, self.bnb_class)
        return cls(param_groups, lr=learning_rate, betas=(o.beta1, o.beta2), eps=o.eps, min_8bit_size=o.min_8bit_size)


class PagedAdamW8bit(AdamW8bit):
    """8-bit AdamW whose state lives in CUDA unified memory, paged to CPU RAM under GPU memory pressure."""

    bnb_class = "PagedAdamW8bit"


class SGD:
    """Stochastic gradient descent from torch, with optional (Nesterov) momentum."""

    @dataclass
    class Options:
        momentum: float = opt(0.9, "momentum factor (0: plain SGD)", min=0.0, lt=1.0)
        nesterov: bool = opt(False, "use Nesterov momentum (needs momentum > 0)")
        dampening: float = opt(0.0, "dampening of the momentum", min=0.0, max=1.0)

    def __init__(self, options: Options):
        self.options = options

    @hookimpl
    def create_optimizer(self, param_groups, learning_rate, device):
        o = self.options
        if o.nesterov and (o.momentum == 0 or o.dampening != 0):
            from engine.errors import UserError

            raise UserError("sgd.nesterov: Nesterov momentum needs sgd.momentum > 0 and sgd.dampening = 0")
        return torch.optim.SGD(param_groups, lr=learning_rate, momentum=o.momentum, nesterov=o.nesterov, dampening=o.dampening)
