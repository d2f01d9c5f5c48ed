"""Early stopping after a number of evaluations without improvement."""

import math
from dataclasses import dataclass
from typing import Literal

from engine import hookimpl
from engine.context import EarlyStopDecision
from engine.errors import UserError
from engine.schema import opt


class Patience:
    """Stops when a watched eval metric has not improved for `patience` evaluations; the best model is kept."""

    @dataclass
    class Options:
        metric: str = opt("val_loss", "the eval metric to watch (val_loss, perplexity, val_bpc, or one a plugin adds)")
        mode: Literal["min", "max"] = opt("min", "min: lower is better; max: higher is better")
        patience: int = opt(3, "evaluations without improvement before training stops", min=1)
        min_delta: float = opt(0.0, "an improvement must beat the best value by more than this", min=0.0)

    def __init__(self, options: Options):
        self.options = options
        self.best: float | None = None
        self.bad_evals = 0

    def _better(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        d = self.options.min_delta
        return value < self.best - d if self.options.mode == "min" else value > self.best + d

    @hookimpl
    def early_stopping_check(self, metrics, step):
        o = self.options
        if o.metric not in metrics:
            raise UserError(
                f"patience.metric: '{o.metric}' is not among the eval metrics ({', '.join(sorted(metrics))}); choose one of them"
            )
        value = float(metrics[o.metric])
        if self._better(value):
            self.best, self.bad_evals = value, 0
            return EarlyStopDecision(improved=True, stop=False)
        self.bad_evals += 1
        if self.bad_evals >= o.patience:
            return EarlyStopDecision(
                improved=False, stop=True,
                reason=f"{o.metric} has not improved on {self.best:.6g} for {self.bad_evals} evaluations (patience {o.patience})",
            )
        return EarlyStopDecision(improved=False, stop=False)

    @hookimpl
    def plugin_state(self):
        return {"best": self.best, "bad_evals": self.bad_evals}

    @hookimpl
    def load_plugin_state(self, state):
        self.best, self.bad_evals = state["best"], int(state["bad_evals"])
