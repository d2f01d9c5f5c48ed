"""Third-party noise the engine has already dealt with: kept off the screen, kept in the run's warnings.log.

Loading peft or bitsandbytes prints lines that concern the libraries, not the user: each is listed in
NOISE with why it is harmless here. `install()` (the command line calls it first) diverts exactly
these messages, from their own channel (a `warnings.warn` category or a library logger), into a list;
`keep_in(path)` (the training loop, once the run folder exists) writes that list and every later one
to the run's `warnings.log`. Everything not listed is shown as before. TUNESMITH_SHOW_LIBRARY_WARNINGS=1
shows them all.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOG_FILE = "warnings.log"


@dataclass(frozen=True)
class Noise:
    library: str
    channel: str  # "warnings" (warnings.warn with `category`) or "logging" (a record of logger `source`)
    source: str  # the warning category's name, or the logger's name
    pattern: str  # regular expression the message starts with
    why: str  # why the engine can leave it to the library


NOISE: tuple[Noise, ...] = (
    Noise("bitsandbytes", "logging", "bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
          "bitsandbytes looks for an optional CPU 4-bit kernel (the `kernels` package) at import and falls back "
          "to its own; the engine trains no 4-bit model on CPU"),
    Noise("peft", "warnings", "UserWarning", r"fan_in_fan_out is set to False but the target module is `Conv1D`",
          "GPT-2's attention and MLP layers are Conv1D; peft sets fan_in_fan_out = True for them itself"),
    Noise("transformers", "warnings", "FutureWarning", r"`is_gradient_checkpointing` is deprecated",
          "peft reads transformers' old property name when it wraps a model; nothing a recipe can change"),
)

_state: dict[str, Any] = {"installed": False, "captured": [], "file": None, "target": None}


def matches(channel: str, source: str, message: str) -> Noise | None:
    for noise in NOISE:
        if noise.channel == channel and noise.source == source and re.match(noise.pattern, message):
            return noise
    return None


def _keep(text: str) -> None:
    _state["captured"].append(text)
    _write([text])


def _write(texts: list[str]) -> None:
    """Append to the run's log file, opening it at the first message (a run with none gets no file)."""
    target = _state["target"]
    if target is None or not texts:
        return
    if _state["file"] is None:
        path, append = target
        _state["file"] = Path(path).open("a" if append else "w", encoding="utf-8")
    out: IO[str] = _state["file"]
    out.write("".join(t + "\n" for t in texts))
    out.flush()


class _LoggerFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        noise = matches("logging", record.name, message)
        if noise is None:
            return True
        _keep(f"{noise.library} ({record.name}, {record.levelname}): {message}")
        return False


def install() -> None:
    """Divert the listed messages from the screen (idempotent). Call before the libraries are imported."""
    if _state["installed"] or os.environ.get("TUNESMITH_SHOW_LIBRARY_WARNINGS") == "1":
        return
    _state["installed"] = True
    for name in {n.source for n in NOISE if n.channel == "logging"}:
        logging.getLogger(name).addFilter(_LoggerFilter())
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        noise = matches("warnings", category.__name__, str(message))
        if noise is None:
            return shown(message, category, filename, lineno, file, line)
        _keep(f"{noise.library} ({filename}:{lineno}, {category.__name__}): {message}")

    warnings.showwarning = showwarning


def keep_in(path: Path, append: bool = False) -> None:
    """From now on, write the diverted messages to `path` (those diverted so far first). append: a resumed run.

    The file is created at the first message; a fresh run (append False) replaces an older one's."""
    old: IO[str] | None = _state["file"]
    if old is not None:
        old.close()
    _state["file"], _state["target"] = None, None
    if not _state["installed"]:
        return
    if not append and Path(path).exists():
        Path(path).unlink()
    _state["target"] = (Path(path), append)
    _write(_state["captured"])


def captured() -> list[str]:
    return list(_state["captured"])
