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
    """What lifecycle hooks (on_train_start, on_step_end, on_evaluate, on_train_end) receive.

    Read its attributes; change the run only through its methods.

    recipe: the validated recipe (`recipe.train.learning_rate`, `recipe.resolved()` for a plain dict of every key).
    accelerator: Accelerate's Accelerator (`is_main_process`, `num_processes`, `device`, `print`).
    model: the model being trained, as Accelerate prepared it (DDP/FSDP wrapper on several processes;
        `accelerator.unwrap_model(model)` is the transformers or peft model).
    tokenizer: the run's tokenizer.
    optimizer: Accelerate's AcceleratedOptimizer wrapping what create_optimizer returned (its
        `.optimizer` is that object; `param_groups` is shared).
    scheduler: what create_scheduler returned (a torch LRScheduler), stepped once after each optimizer step.
    output_dir: the run folder (a Path). Use run_file(name) for a file of your own in it.
    total_steps: the optimizer steps this run takes in all (train.max_steps, or epochs x steps per epoch).
    state: the counters (TrainState: step, epoch, step_in_epoch, tokens_seen, best_metric, best_step,
        skipped_steps); on a resume they already hold the checkpoint's values in on_train_start.
    resumed: True when this run continues from a checkpoint (train.resume).
    resumed_from_step: the optimizer step of that checkpoint (0 for a fresh run).
    stop_reason: why training ends early ("" while it runs on).
    """

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
    resumed: bool = False
    resumed_from_step: int = 0

    def request_stop(self, reason: str) -> None:
        """End training after the current step (on every process)."""
        self.stop_reason = self.stop_reason or reason

    @property
    def is_main_process(self) -> bool:
        """True on the one process that writes the run folder and calls the sinks (rank 0)."""
        return bool(self.accelerator.is_main_process)

    def run_file(self, name: str) -> Path:
        """The path of a file (or folder) of this plugin's inside the run folder, e.g. run_file("metrics.csv").

        Raises UserError for a name that leads out of the run folder (absolute, ".."). The name is
        remembered, so train.overwrite removes the file with the rest of the run. Call it on the main
        process (where sinks write); the folder itself exists by on_train_start.
        """
        from engine import runfolder

        path = runfolder.inside(self.output_dir, name)
        if self.is_main_process:
            runfolder.record_plugin_file(self.output_dir, name)
        return path


# The metrics each hook receives, by phase: the contract with sinks and callbacks. The generated hook
# reference (docs/writing-plugins.md) lists them; tests/test_plugin_api.py checks that exactly these are sent.
_STEP = {
    "loss": "training loss of this optimizer step: mean over its target tokens (all micro-batches, all processes); "
            "in on_step_end of a plugin class with step_metrics_on_device = True, a 0-dim tensor on the training device "
            "on steps that neither log, evaluate nor checkpoint (reading it, float(x), waits for the GPU)",
    "lr": "learning rate after the scheduler stepped: the rate the next step uses",
    "grad_norm": "total gradient norm before clipping to train.max_grad_norm (0.0 when clipping is off); a device "
                 "tensor where loss is one",
    "tokens_seen": "target tokens trained on so far, all processes together",
    "epoch": "epochs done, fractional (1.5: half-way through the second)",
    "skipped_steps": "steps skipped for a non-finite loss so far (train.on_nan = \"skip\")",
}
METRICS: dict[str, dict[str, str]] = {
    "step": _STEP,
    "train": {
        **_STEP,
        "loss": "mean of the per-step losses since the previous training log (train.log_every_steps)",
        "tokens_per_second": "target tokens per second of training since the previous training log",
    },
    "eval": {
        "val_loss": "mean next-token loss on the validation blocks (token-weighted, all processes)",
        "perplexity": "exp(val_loss)",
        "val_bpc": "bits per character of the validation text",
        "val_tokens": "validation target tokens",
        "epoch": "index of the epoch the evaluation happened in, from 0",
        "step": "optimizer steps taken",
        "tokens_seen": "target tokens trained on so far",
    },
    "summary": {
        "val_loss": "validation loss of the final weights",
        "perplexity": "exp(val_loss)",
        "val_bpc": "bits per character of the validation text, final weights",
        "best_val_loss": "lowest validation loss of any evaluation",
        "best_step": "the step of that evaluation",
        "train_loss": "loss of the last step",
        "steps": "optimizer steps taken",
        "epochs": "epochs done, fractional",
        "tokens_seen": "target tokens trained on",
        "tokens_per_second": "tokens_seen over the time spent in training steps",
        "trainable_params": "parameters trained (the adapter's for LoRA)",
        "total_params": "parameters of the model",
        "stopped_early": "true when early stopping or a plugin ended the run before its last step",
        "stop_reason": "why (a string; empty when it ran to the end)",
        "skipped_steps": "steps skipped for a non-finite loss",
        "wall_seconds": "seconds from the start of the run to the end",
        "processes": "processes that trained",
    },
}
