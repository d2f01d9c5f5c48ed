import json
from dataclasses import dataclass
from pathlib import Path

from engine import hookimpl
from engine.schema import opt


def _on_host(rows: list[list]) -> list[list]:
    """Rows of numbers, some of them maybe still device tensors (a loop that does not sync each step): plain floats."""
    import torch

    pending = [(i, j) for i, row in enumerate(rows) for j, v in enumerate(row) if isinstance(v, torch.Tensor)]
    if pending:
        values = torch.stack([rows[i][j].detach().reshape(()).double() for i, j in pending]).cpu().tolist()  # one transfer
        for (i, j), value in zip(pending, values):
            rows[i][j] = value
    return rows


class Curves:
    """Draws curves.png in the run folder at each evaluation and at the end: loss and learning rate against steps and tokens."""

    step_metrics_on_device = True  # keeps each step's loss as the loop has it and reads them all at once when drawing

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
        self.steps: list[list] = []  # [step, tokens_seen, loss, lr] of every optimizer step, kept on the main process

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
    def on_step_end(self, context, metrics):
        if self.path is not None:  # the values as the loop has them; read back to the host only when drawing
            self.steps.append([context.state.step, metrics.get("tokens_seen"), metrics.get("loss"), metrics.get("lr")])

    @hookimpl
    def plugin_state(self):
        return {"steps": _on_host(self.steps)} if self.path is not None else None

    @hookimpl
    def load_plugin_state(self, state):
        if self.path is not None:  # a resumed run: every step before the checkpoint, then this run's
            self.steps = [list(row) for row in state.get("steps", [])] + self.steps

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        if self.path is None:
            return
        self._keep({**metrics, "step": step}, phase)
        if phase in ("eval", "summary"):
            from engine.plots import draw_curves

            steps = [dict(zip(("step", "tokens_seen", "loss", "lr"), row)) for row in _on_host(self.steps)]
            draw_curves(self.train, self.evals, self.path, self.options.width, self.options.height, self.title, steps)
