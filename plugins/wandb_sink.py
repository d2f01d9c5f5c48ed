"""Weights & Biases sink: one wandb run per training run, logged from the main process only."""

import os
from dataclasses import dataclass

from engine import hookimpl
from engine.errors import UserError
from engine.schema import opt

PREFIX = {"train": "train/", "eval": "eval/"}


class Wandb:
    """Logs training metrics under train/, evaluations under eval/ and the resolved recipe as config to wandb."""

    @dataclass
    class Options:
        project: str = opt("tunesmith", "wandb project (WANDB_PROJECT wins when set)")
        entity: str = opt("", "wandb entity (user or team); empty: your default entity or WANDB_ENTITY")
        name: str = opt("", "run name; empty: wandb picks one (or WANDB_NAME)")
        tags: list[str] = opt([], "run tags")

    def __init__(self, options: Options):
        self.options = options
        self.run = None

    @hookimpl
    def on_train_start(self, context):
        if not context.is_main_process:
            return
        import wandb

        o = self.options
        try:
            # wandb itself reads WANDB_MODE, WANDB_DIR, WANDB_API_KEY, WANDB_PROJECT, ... from the environment.
            self.run = wandb.init(
                project=None if os.environ.get("WANDB_PROJECT") else (o.project or None),
                entity=o.entity or None,
                name=o.name or None,
                tags=list(o.tags) or None,
                config=context.recipe.resolved(),
                reinit="create_new",
            )
        except Exception as exc:  # no login, no network: say what to do
            raise UserError(
                f"wandb: could not start a run ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"run `wandb login`, or set WANDB_MODE=offline to log locally (wandb sync uploads it later)"
            ) from None

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        if self.run is None:
            return
        if phase == "summary":
            self.run.summary.update({k: v for k, v in metrics.items() if v is not None})
            return
        prefix = PREFIX.get(phase, f"{phase}/")
        self.run.log({prefix + k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    @hookimpl
    def log_samples(self, samples, step):
        if self.run is None:
            return
        import wandb

        rows = [[s["step"], s["prompt"], s["text"]] for s in samples]
        self.run.log({"eval/samples": wandb.Table(columns=["step", "prompt", "text"], data=rows)}, step=step)

    @hookimpl
    def on_train_end(self, context, summary):
        if self.run is not None:
            self.run.finish()
            self.run = None
