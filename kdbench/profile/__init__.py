"""Profiling: what a model variant costs to store and to run.

Every figure comes with how it was measured: functions return dicts whose "method" string says what was timed
or counted, on which device, and with which tool, so a table can print it next to the number. The task metric is
not computed here: the runner does that; parameter counts and tensor bytes are kdbench.introspect's.

    size            size_on_disk(model) -> {bytes, mb, format, method}
    latency         Timing; measure_latency, measure_generation, measure_speedup; Timer (a training loop's wall time)
    memory          measure_peak_memory(model_or_dir, ...) -> {peak_mb, method, ...}
    memory_server   the separate processes that measure CPU peak memory (start_memory_server warms one up)
    energy          measure_energy(model, ...) -> {joules_per_sample (None when n/a), method}
    device, rss     device handling, and this process's resident memory
"""

from __future__ import annotations

from kdbench.profile.device import device_name
from kdbench.profile.energy import measure_energy
from kdbench.profile.latency import Timer, Timing, measure_generation, measure_latency, measure_speedup
from kdbench.profile.memory import measure_peak_memory
from kdbench.profile.memory_server import start_memory_server, wait_memory_server
from kdbench.profile.size import size_on_disk

__all__ = [
    "Timer",
    "Timing",
    "device_name",
    "measure_energy",
    "measure_generation",
    "measure_latency",
    "measure_peak_memory",
    "measure_speedup",
    "size_on_disk",
    "start_memory_server",
    "wait_memory_server",
]
