"""What the training loop shares with plugins: the run's state and a way to ask for a stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """Counters that a checkpoint saves and a resume restores."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs started (0-based index of the current one)
    step_in_epoch: int = 0  # optimizer steps taken inside the current epoch
    tokens_seen: int = 0  # target tokens trained on, all processes together
    best_metric: float | None = None
    best_step: int = 0
    skipped_steps: int = 0


@dataclass
class EarlyStopDecision:
    """What an early-stopping plugin says about one evaluation."""

    improved: bool
    stop: bool
    reason: str = ""


@dataclass
class TrainContext:
    """Handed to lifecycle hooks. Attributes are read-only by convention except through methods."""

    recipe: Any
    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    output_dir: Path
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    stop_reason: str = ""

    def request_stop(self, reason: str) -> None:
        """End training after the current step (on every process)."""
        self.stop_reason = self.stop_reason or reason

    @property
    def is_main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)
