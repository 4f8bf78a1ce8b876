"""Peak memory of loading a model variant and running one forward: on a GPU from CUDA's allocator, on a CPU from
the peak RSS of a separate process (kdbench.profile.memory_server), or cheaply in this process."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from kdbench.errors import KdbenchError
from kdbench.introspect import tensor_bytes
from kdbench.profile.device import MakeInputs, nvml_handle, resolve, to_device
from kdbench.profile.memory_server import peak_memory_isolated
from kdbench.profile.rss import proc_status_kb, reset_peak_rss

log = logging.getLogger(__name__)


def measure_peak_memory(
    model_dir_or_model: torch.nn.Module | str | Path,
    make_inputs: MakeInputs,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    method: str = "auto",
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Peak memory of loading the model and running one forward at `batch_size`: {peak_mb, method, ...}.

    method "auto" picks "cuda" on a GPU and "forkserver" on the CPU.
    - "cuda": in this process. peak_mb = weights (bytes of parameters and buffers) + the rise of
      torch.cuda.max_memory_allocated over the allocation before the forward (after reset_peak_memory_stats).
      Also nvml_used_mb: memory used on the whole device as NVML sees it (CUDA context, cache, other processes).
    - "subprocess": a fresh Python process (`python -c`) imports torch, transformers and the model's code, runs a
      warm-up matmul (starts torch's thread pool), notes its RSS, loads the model and the batch from disk, resets
      its peak RSS (VmHWM), runs the forward, and reports that peak minus the RSS before loading: the model's own
      cost (resident weights, activations, allocator slack, first-call kernel set-up), not the interpreter's nor
      the transients of loading (reported apart as load_peak_mb; resident_mb is the RSS the loaded model adds).
      Not ru_maxrss: after exec it carries the parent's peak (measured: a child of a 500 MB parent reported
      522 MB before loading anything). Costs the child's imports: 11-16 s per call on the 2-core CI box.
    - "forkserver": the same measurement in a process forked from kdbench's own fork server, a `python -c`
      process that imported torch and transformers once (started on first use, about as slow as "subprocess";
      then about 1.5 s per call for a small model). Not multiprocessing's forkserver: that re-imports the
      caller's __main__ script in every child.
    - "inprocess": cheap CPU approximation: weights bytes + the rise of this process's VmHWM (reset just before)
      during the forward. Underestimates when the allocator reuses memory freed earlier (often: reads 0 for
      small models).
    A model object (not a directory) is pickled whole (torch.save) for the child, so its class must be importable.
    `model_dir_or_model`: a model, or a directory written by kdbench.compress.io.save_variant / save_pretrained.
    """
    dev = resolve(device)
    if method == "auto":
        method = "cuda" if dev.type == "cuda" else "forkserver"
    if method == "cuda":
        if dev.type != "cuda":
            raise KdbenchError(f"measure_peak_memory: method 'cuda' needs a cuda device, got {dev}")
        return _peak_memory_cuda(_as_model(model_dir_or_model, dev), make_inputs, batch_size, dev)
    if dev.type != "cpu":
        raise KdbenchError(f"measure_peak_memory: method {method!r} measures the CPU, but device is {dev}")
    if method == "inprocess":
        return _peak_memory_inprocess(_as_model(model_dir_or_model, dev), make_inputs, batch_size)
    if method in ("subprocess", "forkserver"):
        return peak_memory_isolated(model_dir_or_model, make_inputs, batch_size, timeout_s, method)
    raise KdbenchError(
        f"measure_peak_memory: unknown method {method!r}; available: auto, cuda, forkserver, inprocess, subprocess"
    )


def _as_model(model_dir_or_model, dev: torch.device) -> torch.nn.Module:
    if isinstance(model_dir_or_model, torch.nn.Module):
        return model_dir_or_model
    from kdbench.compress.io import load_variant

    return load_variant(model_dir_or_model, device=dev)


def _peak_memory_cuda(model, make_inputs, batch_size, dev) -> dict[str, Any]:
    batch = to_device(make_inputs(batch_size), dev)
    model.eval()
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    with torch.inference_mode():
        model(**batch)
    torch.cuda.synchronize(dev)
    rise = torch.cuda.max_memory_allocated(dev) - before
    weights = tensor_bytes(model)
    nvml_used = None
    try:
        pynvml, handle = nvml_handle(dev)
        nvml_used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    except Exception as e:  # noqa: BLE001 - NVML is optional
        log.debug("NVML memory info unavailable: %s", e)
    return {
        "peak_mb": (weights + rise) / 2**20,
        "weights_mb": weights / 2**20,
        "activations_mb": rise / 2**20,
        "nvml_used_mb": nvml_used,
        "method": (
            f"cuda: parameter+buffer bytes + rise of torch.cuda.max_memory_allocated during one forward at batch "
            f"{batch_size}; nvml_used_mb is whole-device memory used (NVML)"
        ),
    }


def _peak_memory_inprocess(model, make_inputs, batch_size) -> dict[str, Any]:
    batch = make_inputs(batch_size)
    model.eval()
    gc.collect()
    reset = reset_peak_rss()
    before = proc_status_kb("VmRSS")
    if before is None:
        raise KdbenchError("measure_peak_memory: method 'inprocess' needs Linux /proc/self/status")
    with torch.inference_mode():
        model(**batch)
    rise_kb = max(0, (proc_status_kb("VmHWM") or before) - before)
    weights = tensor_bytes(model)
    return {
        "peak_mb": weights / 2**20 + rise_kb / 1024,
        "weights_mb": weights / 2**20,
        "activations_mb": rise_kb / 1024,
        "method": (
            f"inprocess: parameter+buffer bytes + rise of this process's VmHWM during one forward at batch "
            f"{batch_size}{'' if reset else ' (VmHWM could not be reset: may read 0)'}; misses memory the allocator "
            f"reuses"
        ),
    }
