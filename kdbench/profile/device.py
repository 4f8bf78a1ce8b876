"""Where a profiled model runs: device resolution, moving a batch there, synchronising, the device's readable
name, and its NVML handle (GPU energy and memory)."""

from __future__ import annotations

import platform
from typing import Callable

import torch

# `make_inputs(batch_size) -> dict of tensors` builds one batch (the model is called as `model(**batch)`).
MakeInputs = Callable[[int], dict[str, torch.Tensor]]


def resolve(device: torch.device | str) -> torch.device:
    """`device` as a torch.device; a bare "cuda" gets the current device's index."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(device: torch.device | str) -> str:
    """A readable name: the GPU's name, or the CPU model with the thread count torch uses."""
    dev = resolve(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def nvml_handle(dev: torch.device):
    import pynvml

    pynvml.nvmlInit()
    try:
        index = torch.cuda._get_nvml_device_index(dev)
    except Exception:  # noqa: BLE001 - private helper; fall back to the CUDA index
        index = dev.index or 0
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
