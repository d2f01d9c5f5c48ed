"""SIGTERM (preemption) and Ctrl-C during training: finish the step, write a checkpoint, then exit.

The handlers only note the signal; the loop asks `pending()` at each optimizer-step boundary, which
agrees across processes (one process signalled stops them all at the same step). The exit status is
128 + the signal number: 143 for SIGTERM, 130 for Ctrl-C. A second Ctrl-C stops at once, without a
checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Watch:
    """Context manager; call arm() when training starts. Handlers are restored on exit."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Watch":
        return self

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.received = max(self.received, signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
