import json
from dataclasses import dataclass
from pathlib import Path

from engine import hookimpl
from engine.schema import opt


class Curves:
    """Draws curves.png in the run folder at each evaluation and at the end: loss and learning rate against steps and tokens."""

    @dataclass
    class Options:
        filename: str = opt("curves.png", "file name inside the run folder", run_file=True)
        width: int = opt(1200, "picture width in pixels", min=200)
        height: int = opt(800, "picture height in pixels", min=200)

    def __init__(self, options: Options):
        self.options = options
        self.path: Path | None = None
        self.title = ""
        self.train: list[dict] = []
        self.evals: list[dict] = []

    @hookimpl
    def on_train_start(self, context):
        if not context.is_main_process:
            return
        out = Path(context.output_dir)
        self.path, self.title = context.run_file(self.options.filename), str(out)
        history = out / "metrics.jsonl"  # a resumed run: the curves so far
        if history.exists() and context.state.step:
            for line in history.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record.get("step", 0) <= context.state.step:
                    self._keep(record, record.get("phase"))

    def _keep(self, metrics, phase):
        if phase == "train":
            self.train.append(dict(metrics))
        elif phase == "eval":
            self.evals.append(dict(metrics))

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        if self.path is None:
            return
        self._keep({**metrics, "step": step}, phase)
        if phase in ("eval", "summary"):
            from engine.plots import draw_curves

            draw_curves(self.train, self.evals, self.path, self.options.width, self.options.height, self.title)
