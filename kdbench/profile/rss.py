"""This process's resident memory as Linux reports it: current and peak RSS, and resetting the peak."""

from __future__ import annotations

import resource
import sys


def proc_status_kb(field: str) -> int | None:
    """A field such as VmRSS or VmHWM from /proc/self/status, in kB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_kb() -> int:
    # Off Linux only; on Linux ru_maxrss after exec carries the parent's peak. Bytes on macOS, kB elsewhere.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
