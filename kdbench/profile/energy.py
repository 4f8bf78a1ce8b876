"""Energy per sample of a forward pass, from the GPU's NVML energy counter (None where there is no meter)."""

from __future__ import annotations

import time
from typing import Any

import torch

from kdbench.profile.device import MakeInputs, nvml_handle, resolve, to_device


def measure_energy(
    model: torch.nn.Module,
    make_inputs: MakeInputs,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    min_time_s: float = 2.0,
    min_repeats: int = 10,
) -> dict[str, Any]:
    """Energy per sample of the forward: {joules_per_sample, avg_power_w, method}; None (never 0) when n/a.

    On an NVIDIA GPU: difference of NVML's nvmlDeviceGetTotalEnergyConsumption (mJ since driver load, Volta+)
    around back-to-back forwards for at least `min_time_s` (the counter updates every few tens of ms, so short
    runs would round to nothing). It is the whole board's energy, idle power included, over the run.
    Elsewhere (CPU, or a GPU without the counter) there is no trustworthy per-process meter: None.
    """
    dev = resolve(device)
    if dev.type != "cuda":
        return {"joules_per_sample": None, "avg_power_w": None, "method": f"n/a: no energy counter for {dev.type}"}
    try:
        pynvml, handle = nvml_handle(dev)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as e:  # noqa: BLE001 - NVML missing or counter not supported
        return {"joules_per_sample": None, "avg_power_w": None, "method": f"n/a: NVML energy counter: {e}"}
    batch = to_device(make_inputs(batch_size), dev)
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(**batch)
        torch.cuda.synchronize(dev)
        e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        t0 = time.perf_counter()
        n = 0
        while n < min_repeats or time.perf_counter() - t0 < min_time_s:
            model(**batch)
            n += 1
            if n % 8 == 0:
                torch.cuda.synchronize(dev)
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    joules = (e1 - e0) / 1e3
    if joules <= 0:
        return {"joules_per_sample": None, "avg_power_w": None,
                "method": f"n/a: NVML energy counter did not advance in {seconds:.2f} s"}
    return {
        "joules_per_sample": joules / (n * batch_size),
        "avg_power_w": joules / seconds,
        "method": (
            f"NVML total-energy counter difference over {n} forwards at batch {batch_size} ({seconds:.2f} s), "
            f"whole board, divided by samples"
        ),
    }
