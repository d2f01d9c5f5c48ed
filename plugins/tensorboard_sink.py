"""TensorBoard sink: event files in the run folder, written by torch's SummaryWriter (the `tensorboard` extra).

Built on the public plugin API only, like a third-party sink.
"""

import json
from dataclasses import dataclass

from engine import UserError, hookimpl, opt

INSTALL = "pip install 'tunesmith[tensorboard]' (or pip install tensorboard)"


class TensorBoard:
    """Writes training logs, evaluations, samples and the recipe as TensorBoard event files in the run folder."""

    @dataclass
    class Options:
        folder: str = opt("tensorboard", "folder inside the run folder for the event files: tensorboard --logdir RUN/tensorboard")
        flush_seconds: int = opt(30, "write pending events to disk at least this often", min=1)

    def __init__(self, options: Options):
        self.options = options
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports tensorboard)
        except ImportError:
            raise UserError(f"sinks: 'tensorboard' needs the tensorboard package: {INSTALL}") from None

    @hookimpl
    def on_train_start(self, context):
        if not context.is_main_process:
            return
        from torch.utils.tensorboard import SummaryWriter

        folder = context.run_file(self.options.folder)
        # A resumed run writes a new event file; purge_step hides what the old files hold from the
        # checkpoint's step on (a resume from an older checkpoint redoes those steps).
        purge = context.resumed_from_step + 1 if context.resumed else None
        self.writer = SummaryWriter(str(folder), purge_step=purge, flush_secs=self.options.flush_seconds)
        if not context.resumed:
            recipe = json.dumps(context.recipe.resolved(), indent=2, default=str)
            self.writer.add_text("recipe", "    " + recipe.replace("\n", "\n    "), 0)  # indented: a code block

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        if self.writer is None:
            return
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{phase}/{name}", value, step)
        if phase != "train":
            self.writer.flush()

    @hookimpl
    def log_samples(self, samples, step):
        if self.writer is None:
            return
        for i, sample in enumerate(samples):
            self.writer.add_text(f"samples/{i}", f"**{sample['prompt']}**{sample['text']}", step)

    @hookimpl
    def on_train_end(self, context, summary):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
