"""Ctrl-C (SIGINT) and SIGTERM during a run: stop, say what is kept, exit 130 or 143, no traceback.

Inside `stop_on_signals()` either signal raises `Interrupted`, a BaseException, so that no `except Exception` on
the way (the runner records a failed run's error that way) mistakes it for a failure of the current run; the
finished results are already on disk, each written atomically.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


class Interrupted(BaseException):
    """The process got SIGINT or SIGTERM; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


def _raise(signum, frame):
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted inside the block; the previous handlers come back after it."""
    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
