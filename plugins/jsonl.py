import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from engine import hookimpl
from engine.schema import opt


class JsonLines:
    """Appends one JSON object per training log or evaluation to metrics.jsonl in the run folder."""

    @dataclass
    class Options:
        filename: str = opt("metrics.jsonl", "file name inside the run folder", run_file=True)

    def __init__(self, options: Options):
        self.options = options
        self.path: Path | None = None

    @hookimpl
    def on_train_start(self, context):
        if context.is_main_process:
            self.path = context.run_file(self.options.filename)

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        if self.path is None:
            return
        record = {"phase": phase, "step": step, "time": round(time.time(), 3)}
        record.update({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
