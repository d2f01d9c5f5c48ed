import sys
import time
from dataclasses import dataclass

from engine import hookimpl
from engine.schema import opt


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Console:
    """Progress bar on a terminal (step, loss, lr, tokens/s, ETA); plain lines in a log file."""

    @dataclass
    class Options:
        bar_width: int = opt(24, "characters in the progress bar", min=0)
        stream: str = opt("stderr", "where to write: stderr or stdout")

    def __init__(self, options: Options):
        self.options = options
        self.total = 0
        self.start = 0.0
        self.first_step = 0
        self.active = False
        self.out = sys.stderr

    @hookimpl
    def on_train_start(self, context):
        self.active = context.is_main_process
        self.total = context.total_steps
        self.start = time.perf_counter()
        self.first_step = context.state.step
        self.out = sys.stdout if self.options.stream == "stdout" else sys.stderr

    def _line(self, text: str, transient: bool = False) -> None:
        tty = self.out.isatty()
        if tty and transient:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(("\r\x1b[2K" if tty else "") + text + "\n")
        self.out.flush()

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        if not self.active:
            return
        if phase == "train":
            done = step - self.first_step
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (self.total - step) if done else 0.0
            width = self.options.bar_width
            filled = int(width * step / max(1, self.total))
            bar = f"[{'#' * filled}{'.' * (width - filled)}] " if width else ""
            text = (
                f"{bar}step {step}/{self.total}  loss {metrics.get('loss', float('nan')):.4f}  "
                f"lr {metrics.get('lr', 0.0):.2e}  {metrics.get('tokens_per_second', 0.0):,.0f} tok/s  "
                f"ETA {_duration(eta)}"
            )
            self._line(text, transient=step < self.total)
        elif phase == "eval":
            parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
            self._line(f"eval @ step {step}: " + "  ".join(parts))

    @hookimpl
    def log_samples(self, samples, step):
        if not self.active:
            return
        for sample in samples:
            text = (sample["prompt"] + sample["text"]).replace("\r", "").replace("\n", "\\n")
            self._line(f"sample @ step {step}: {text}")
