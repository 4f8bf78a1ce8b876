"""One `kdbench run` at a time per results folder: a second run of the same folder waits for the first (or, with
--no-wait, refuses), then reads the results the first one wrote, so no run is done twice.

The lock is an OS file lock (filelock), released by the kernel when its process dies: a killed run never leaves
a stale lock. A small note beside it says which process holds it, for the waiting run's message.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from kdbench.errors import KdbenchError

LOCK_FILE, OWNER_FILE = ".kdbench.lock", ".kdbench.lock.owner"


def _owner(folder: Path) -> str:
    try:
        return (folder / OWNER_FILE).read_text(encoding="utf-8").strip() or "another kdbench run"
    except (OSError, UnicodeDecodeError):
        return "another kdbench run"


@contextmanager
def results_lock(folder: Path, *, wait: bool = True, on_wait: Callable[[str], None] | None = None,
                 poll_s: float = 0.5) -> Iterator[None]:
    """Hold the lock of results folder `folder` (made if needed) for the block. If another process holds it:
    with `wait`, call `on_wait(message)` once and block until it is free; without, raise a KdbenchError."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = _owner(folder)
            if not wait:
                raise KdbenchError(f"results folder {folder} is in use by {holder}; wait for it to finish, or drop "
                                   "--no-wait to wait for it") from None
            if on_wait is not None:
                on_wait(f"results folder {folder} is in use by {holder}; waiting for it to finish (Ctrl-C to stop)")
            lock.acquire(poll_interval=poll_s)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (folder / OWNER_FILE).write_text(f"kdbench run pid {os.getpid()} on {socket.gethostname()} since {started}\n",
                                         encoding="utf-8")
    except OSError as e:
        raise KdbenchError(f"results folder {folder}: cannot take its lock: {e.strerror or e}") from None
    try:
        yield
    finally:
        lock.release()
