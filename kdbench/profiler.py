"""Profiler: what a model variant costs to store and to run.

Every figure comes with how it was measured: functions return dicts whose "method" string says what was timed
or counted, on which device, and with which tool, so a table can print it next to the number.

    count_parameters(model)                       -> (total, nonzero)        see PARAMS_METHOD
    size_on_disk(model)                           -> {bytes, mb, format, method}
    measure_latency(model, make_inputs, ...)      -> {batch_size: {median_ms, p90_ms, repeats, samples_per_s, ...}}
    measure_generation(model, make_inputs, ...)   -> the same for generate(), with ms_per_token and tokens_per_s
    measure_peak_memory(model_or_dir, ...)        -> {peak_mb, method, ...}   (start_memory_server() warms it up)
    measure_energy(model, make_inputs, ...)       -> {joules_per_sample (None when n/a), method}
    Timer                                         wall time, steps and samples/s of a training loop

`make_inputs(batch_size) -> dict of tensors` builds one batch (the model is called as `model(**batch)`).
The task metric is not computed here: the runner does that.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import logging
import os
import platform
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from kdbench.errors import KdbenchError

log = logging.getLogger(__name__)

MakeInputs = Callable[[int], dict[str, torch.Tensor]]

PARAMS_METHOD = (
    "model.parameters() (tied weights once); quantized tensor subclasses count their logical elements (the float "
    "shape they stand for) and their nonzeros after dequantize(), and so do the packed weights of torch.ao "
    "dynamically quantized Linears; buffers are not parameters"
)


def _device(device: torch.device | str) -> torch.device:
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _to(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(device: torch.device | str) -> str:
    """A readable name: the GPU's name, or the CPU model with the thread count torch uses."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


# ---------------------------------------------------------------------------------------------------------------
# Static figures: parameters and size
# ---------------------------------------------------------------------------------------------------------------


def _is_subclass(t: torch.Tensor) -> bool:
    return type(t) is not torch.Tensor


def packed_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """PyTorch's own dynamically quantized Linears (torch.ao, the int8 compressor's torch_dynamic backend): their
    int8 weights are packed for the CPU kernels, held by the module but not as parameters."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [m for m in model.modules() if isinstance(m, DynamicLinear)]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, nonzero) parameter elements; see PARAMS_METHOD for what is counted."""
    total = nonzero = 0
    for m in packed_linears(model):  # their weights are no parameters: count the packed ones
        for t in (m.weight().dequantize(), m.bias()):
            if t is not None:
                total += t.numel()
                nonzero += int(torch.count_nonzero(t))
    for p in model.parameters():
        t = p.detach()
        total += t.numel()  # logical elements, also for torchao subclasses
        if _is_subclass(t):
            try:
                t = t.dequantize()
            except Exception:  # noqa: BLE001 - a subclass without dequantize: count it as dense
                nonzero += t.numel()
                continue
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers in memory (inner tensors of quantized subclasses; tied weights once)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if _is_subclass(t) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for n in names:
                inner = getattr(t, n)
                if isinstance(inner, torch.Tensor):
                    add(inner)
            return
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t.detach())
    for m in packed_linears(model):  # int8 weights (1 byte each) and float biases, packed outside the parameters
        total += m.weight().numel() + sum(b.numel() * b.element_size() for b in [m.bias()] if b is not None)
    return total


def size_on_disk(model: torch.nn.Module) -> dict[str, Any]:
    """Bytes of the saved weights: {bytes, mb, format, method}.

    safetensors (`safetensors.torch.save_model`: shared tensors once, header included) for plain tensors;
    torchao's quantized subclasses cannot be written to safetensors, so those models are measured as
    `torch.save(model.state_dict())` (zip + pickle; a few hundred bytes of overhead per tensor), and `format` says so.
    """
    quantized = any(_is_subclass(p.detach()) for p in model.parameters()) or bool(packed_linears(model))
    with tempfile.TemporaryDirectory(prefix="kdbench-size-") as d:
        fmt = "torch.save" if quantized else "safetensors"
        path = Path(d) / ("model.pt" if quantized else "model.safetensors")
        if quantized:
            torch.save(model.state_dict(), path)
        else:
            from safetensors.torch import save_model

            save_model(model, str(path))
        n = path.stat().st_size
    how = "safetensors.torch.save_model file size" if fmt == "safetensors" else (
        "torch.save(state_dict) file size (quantized weights are not safetensors-serialisable)"
    )
    return {"bytes": n, "mb": n / 2**20, "format": fmt, "method": how}


# ---------------------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------------------


def _percentile(xs: list[float], q: float) -> float:
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q))


def _forward(model: torch.nn.Module, batch: dict):
    return model(**batch)


def _time_call(model: torch.nn.Module, batch: dict, cuda: bool, call=_forward) -> float:
    """Milliseconds of one `call(model, batch)` (a forward by default): CUDA events (GPU time, synchronised) on a
    GPU, perf_counter on a CPU."""
    if cuda:
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        call(model, batch)
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1)
    t0 = time.perf_counter()
    call(model, batch)
    return (time.perf_counter() - t0) * 1e3


def measure_latency(
    model: torch.nn.Module,
    make_inputs: MakeInputs,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    warmup: int = 3,
    min_repeats: int = 5,
    max_repeats: int = 50,
    time_budget_s: float = 2.0,
    device: torch.device | str = "cpu",
    call: Callable[[torch.nn.Module, dict], Any] = _forward,
    call_name: str = "model(**batch)",
) -> dict[int, dict[str, Any]]:
    """Forward latency per batch size: {bs: {median_ms, p90_ms, mean_ms, min_ms, repeats, samples_per_s, ...}}.
    (`call(model, batch)`, named `call_name` in the method string, times something else than one forward.)

    The model must already be on `device`; inputs are built once per batch size and moved there (not timed).
    Each batch size gets `warmup` untimed calls, then timed calls until `min_repeats` are done and either
    `time_budget_s` is spent or `max_repeats` are done. Timed under torch.inference_mode with model.eval():
    on CUDA with CUDA events around each call (GPU time, synchronised per call); on CPU with time.perf_counter.
    samples_per_s = batch_size / median.
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise KdbenchError(f"measure_latency: need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    dev = _device(device)
    cuda = dev.type == "cuda"
    threads = torch.get_num_threads()
    name = device_name(dev)
    model.eval()
    out: dict[int, dict[str, Any]] = {}
    for bs in batch_sizes:
        batch = _to(make_inputs(bs), dev)
        times: list[float] = []
        with torch.inference_mode():
            for _ in range(warmup):
                call(model, batch)
            _sync(dev)
            start = time.perf_counter()
            while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < time_budget_s):
                times.append(_time_call(model, batch, cuda, call))
        median = _percentile(times, 0.5)
        out[bs] = {
            "median_ms": median,
            "p90_ms": _percentile(times, 0.9),
            "mean_ms": sum(times) / len(times),
            "min_ms": min(times),
            "repeats": len(times),
            "samples_per_s": bs * 1e3 / median,
            "num_threads": threads,
            "device": name,
            "method": (
                f"{'CUDA events' if cuda else 'time.perf_counter'} around {call_name} under inference_mode, "
                f"batch {bs}, {warmup} warmup calls, {len(times)} timed calls, {threads} CPU threads"
            ),
        }
    return out


def measure_generation(model: torch.nn.Module, make_inputs: MakeInputs, *, new_tokens: int, pad_token_id: int,
                       **settings) -> dict[int, dict[str, Any]]:
    """Latency of generating exactly `new_tokens` tokens greedily after each batch of prompts (`make_inputs`: the
    encoder's inputs of a seq2seq model, the prompt of a causal LM), with the KV cache, per batch size:
    measure_latency's figures plus ms_per_token (median / new_tokens) and tokens_per_s (generated tokens of the
    whole batch per second). `settings` are measure_latency's."""

    def generate(m, batch):
        return m.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          num_beams=1, pad_token_id=pad_token_id)

    prompt_tokens = {}  # per batch size, read from the batch measure_latency builds (once)

    def inputs(bs):
        batch = make_inputs(bs)
        prompt_tokens[bs] = int(batch["input_ids"].shape[-1])
        return batch

    out = measure_latency(model, inputs, call=generate,
                          call_name=f"model.generate(greedy, exactly {new_tokens} new tokens, KV cache)", **settings)
    for bs, r in out.items():
        r["prompt_tokens"] = prompt_tokens[bs]
        r["new_tokens"] = new_tokens
        r["ms_per_token"] = r["median_ms"] / new_tokens
        r["tokens_per_s"] = bs * new_tokens * 1e3 / r["median_ms"]
    return out


def measure_speedup(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    make_inputs: MakeInputs,
    make_reference_inputs: MakeInputs,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    warmup: int = 3,
    min_repeats: int = 5,
    max_repeats: int = 50,
    time_budget_s: float = 2.0,
    device: torch.device | str = "cpu",
) -> dict[int, dict[str, Any]]:
    """Speedup of `model` over `reference` (e.g. the teacher): {bs: {speedup, model_ms, reference_ms, rounds, method}}.

    The two are timed in alternation, one call each per round, and the speedup is the median over rounds of
    reference time / model time. A shared machine drifts by tens of percent between measurements taken seconds
    apart (measured on the 2-core CI box: medians of one tiny BERT from 0.9 to 1.7 ms); paired rounds see the same
    drift on both sides, so their ratio repeats within a few percent where two separate medians do not.
    """
    dev = _device(device)
    cuda = dev.type == "cuda"
    model.eval()
    reference.eval()
    out: dict[int, dict[str, Any]] = {}
    for bs in batch_sizes:
        batch, ref_batch = _to(make_inputs(bs), dev), _to(make_reference_inputs(bs), dev)
        ratios, mine, theirs = [], [], []
        with torch.inference_mode():
            for _ in range(warmup):
                reference(**ref_batch)
                model(**batch)
            _sync(dev)
            start = time.perf_counter()
            while len(ratios) < max_repeats and (
                len(ratios) < min_repeats or time.perf_counter() - start < 2 * time_budget_s
            ):
                theirs.append(_time_call(reference, ref_batch, cuda))
                mine.append(_time_call(model, batch, cuda))
                ratios.append(theirs[-1] / mine[-1])
        out[bs] = {
            "speedup": _percentile(ratios, 0.5),
            "model_ms": _percentile(mine, 0.5),
            "reference_ms": _percentile(theirs, 0.5),
            "rounds": len(ratios),
            "method": (
                f"median over {len(ratios)} rounds of reference time / model time, the two timed in alternation "
                f"({'CUDA events' if cuda else 'time.perf_counter'}, inference_mode, batch {bs})"
            ),
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    """A field such as VmRSS or VmHWM from /proc/self/status, in kB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _nvml_handle(dev: torch.device):
    import pynvml

    pynvml.nvmlInit()
    try:
        index = torch.cuda._get_nvml_device_index(dev)
    except Exception:  # noqa: BLE001 - private helper; fall back to the CUDA index
        index = dev.index or 0
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


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
    `model_dir_or_model`: a model, or a directory written by kdbench.compress.save_variant / save_pretrained.
    """
    dev = _device(device)
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
        return _peak_memory_isolated(model_dir_or_model, make_inputs, batch_size, timeout_s, method)
    raise KdbenchError(
        f"measure_peak_memory: unknown method {method!r}; available: auto, cuda, forkserver, inprocess, subprocess"
    )


def _as_model(model_dir_or_model, dev: torch.device) -> torch.nn.Module:
    if isinstance(model_dir_or_model, torch.nn.Module):
        return model_dir_or_model
    from kdbench.compress import load_variant

    return load_variant(model_dir_or_model, device=dev)


def _peak_memory_cuda(model, make_inputs, batch_size, dev) -> dict[str, Any]:
    batch = _to(make_inputs(batch_size), dev)
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
        pynvml, handle = _nvml_handle(dev)
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
    reset = _reset_peak_rss()
    before = _proc_status_kb("VmRSS")
    if before is None:
        raise KdbenchError("measure_peak_memory: method 'inprocess' needs Linux /proc/self/status")
    with torch.inference_mode():
        model(**batch)
    rise_kb = max(0, (_proc_status_kb("VmHWM") or before) - before)
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


_CHILD = "from kdbench.profiler import _memory_child; _memory_child()"
# Imported once by the fork server, so that each forked measurement starts warm (missing ones are skipped).
_FORK_SERVER_PRELOAD = ["transformers.modeling_utils", "kdbench.compress", "torchao.quantization"]
# The protocol gets its own copy of stdout; fd 1 goes to stderr so that nothing printed by imports or model code
# can mix with the status lines.
_FORK_SERVER_CODE = (
    "import os; proto = os.fdopen(os.dup(1), 'w'); os.dup2(2, 1); "
    "from kdbench.profiler import _fork_server; _fork_server(proto)"
)
_server: subprocess.Popen | None = None
_server_ready = False  # the server has said "ready" (its first line) and this process has read it
_server_lock = threading.Lock()


def _peak_memory_isolated(model_dir_or_model, make_inputs, batch_size, timeout_s, how: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdbench-mem-") as d:
        d = Path(d)
        if isinstance(model_dir_or_model, torch.nn.Module):
            from kdbench.compress import _drop_instance_reprs

            _drop_instance_reprs(model_dir_or_model)  # torchao's per-instance reprs do not pickle
            torch.save(model_dir_or_model, d / "model.pt")
            modules = {type(model_dir_or_model).__module__}
            modules |= {type(p.detach()).__module__ for p in model_dir_or_model.parameters() if _is_subclass(p.detach())}
            model_ref = {"pickle": str(d / "model.pt"), "modules": sorted(modules)}
        else:
            model_ref = {"dir": str(Path(model_dir_or_model).resolve())}
        torch.save(make_inputs(batch_size), d / "inputs.pt")
        args = {**model_ref, "inputs": str(d / "inputs.pt"), "threads": torch.get_num_threads()}
        result = _run_subprocess(args, timeout_s) if how == "subprocess" else _run_forkserver(args, timeout_s)
    result["wall_s"] = time.perf_counter() - t0
    start = "a fresh process (python -c)" if how == "subprocess" else "a process forked from kdbench's warm fork server"
    result["method"] = (
        f"{how}: peak RSS (VmHWM{'' if result.pop('hwm_reset') else ', not reset: may include import peak'}) of "
        f"{start} during one forward at batch {batch_size} with the model loaded, minus its RSS before loading "
        f"(after importing torch, transformers, the model's code and a warm-up matmul: {result['baseline_mb']:.0f} MB)"
    )
    return result


def _run_subprocess(args: dict, timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, timeout=timeout_s, env=env
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"memory measurement subprocess failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_forkserver(args: dict, timeout_s: float) -> dict[str, Any]:
    """Ask kdbench's fork server (started on first use, kept for this process's life) to measure in a fork."""
    with _server_lock:
        server = _start_server()
        _await_ready(server, timeout_s)
        with tempfile.NamedTemporaryFile(prefix="kdbench-mem-", suffix=".json", delete=False) as f:
            result_path = f.name
        try:
            try:
                server.stdin.write(json.dumps({**args, "result": result_path}) + "\n")
                server.stdin.flush()
            except BrokenPipeError:
                raise RuntimeError(f"memory measurement fork server exited (code {server.poll()})") from None
            ready, _, _ = select.select([server.stdout], [], [], timeout_s)
            status = server.stdout.readline().strip() if ready else ""
            if not status:
                _stop_server(server)
                raise RuntimeError(
                    f"memory measurement fork server gave no answer within {timeout_s:.0f} s (stopped; "
                    f"it restarts on the next call)"
                )
            text = Path(result_path).read_text()
        finally:
            Path(result_path).unlink(missing_ok=True)
    result = json.loads(text) if text else {"error": f"measurement process ended with {status}, no result"}
    if "error" in result:
        raise RuntimeError(f"memory measurement process failed ({status}):\n{result['error']}")
    return result


def start_memory_server() -> None:
    """Start the CPU memory fork server now, in the background (it takes seconds to import torch and
    transformers); call it early, e.g. before training, so the first measure_peak_memory does not wait."""
    with _server_lock:
        _start_server()


def wait_memory_server(timeout_s: float = 120.0) -> None:
    """Block until the fork server has finished its imports. Its start-up takes a core for seconds, so latency
    measured meanwhile would be inflated; the runner waits for it before timing anything."""
    with _server_lock:
        _await_ready(_start_server(), timeout_s)


def _await_ready(server: subprocess.Popen, timeout_s: float) -> None:
    global _server_ready
    if _server_ready:
        return
    ready, _, _ = select.select([server.stdout], [], [], timeout_s)
    line = server.stdout.readline().strip() if ready else ""
    if line != "ready":
        _stop_server(server)
        raise RuntimeError(f"memory measurement fork server did not start (said {line!r} within {timeout_s:.0f} s)")
    _server_ready = True


def _start_server() -> subprocess.Popen:
    global _server, _server_ready
    if _server is None or _server.poll() is not None:
        _server_ready = False
        _server = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER_CODE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, start_new_session=True,
        )
        atexit.register(_stop_server, _server)
    return _server


def _stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        try:
            os.killpg(server.pid, signal.SIGKILL)  # the server and a measurement it may be waiting on
        except (ProcessLookupError, PermissionError):
            server.kill()
        server.wait()


def _fork_server(out) -> None:
    """Fork server main loop: one JSON request per stdin line; one fork per request; one status line back.

    It only imports (no torch ops run here), so no thread pool exists when it forks; each fork starts its own.
    `out` is the protocol stream: one status line per request.
    """
    for name in _FORK_SERVER_PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional (torchao) or broken: the fork imports what it needs
            pass
    out.write("ready\n")  # the parent waits for this before timing anything (see wait_memory_server)
    out.flush()
    for line in sys.stdin:
        args = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the measurement process
            code = 0
            try:
                result = _measure_child(args)
            except BaseException:  # noqa: BLE001 - report anything to the parent, which raises
                import traceback

                result, code = {"error": traceback.format_exc(limit=8)}, 1
            try:
                Path(args["result"]).write_text(json.dumps(result))
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            msg = f"signal {os.WTERMSIG(status)}" + (" (killed: out of memory?)" if os.WTERMSIG(status) == 9 else "")
        else:
            msg = f"exit {os.WEXITSTATUS(status)}"
        out.write(msg + "\n")
        out.flush()


def _memory_child() -> None:
    """Entry point of the `python -c` measurement subprocess: prints one JSON line."""
    print(json.dumps(_measure_child(json.loads(sys.argv[1]))))


def _maxrss_kb() -> int:
    # Off Linux only; on Linux ru_maxrss after exec carries the parent's peak. Bytes on macOS, kB elsewhere.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)


def _measure_child(args: dict) -> dict[str, Any]:
    """Runs in the measurement process: baseline RSS, load, one forward, peak RSS."""
    t0 = time.perf_counter()
    torch.set_num_threads(args["threads"])
    import transformers  # import costs belong to the baseline, not to the model

    # The model's code and torch's thread pool are start-up costs too: pay them before the baseline.
    for name in args.get("modules", []):
        importlib.import_module(name)
    if "dir" in args:
        from kdbench.compress import VARIANT_FILE

        config = Path(args["dir"]) / "config.json"
        archs = json.loads(config.read_text()).get("architectures") or [] if config.exists() else []
        for arch in archs:
            getattr(transformers, arch, None)
        variant = Path(args["dir"]) / VARIANT_FILE
        if variant.exists() and json.loads(variant.read_text()).get("format") == "torch.save":
            importlib.import_module("torchao.quantization")  # the pickle holds torchao tensors
    with torch.inference_mode():
        x = torch.randn(64, 64)
        torch.nn.functional.layer_norm(torch.softmax(x @ x, -1), (64,))
    del x
    import_s = time.perf_counter() - t0
    gc.collect()
    reset = _reset_peak_rss()
    base_kb = _proc_status_kb("VmRSS") or _maxrss_kb()
    if "pickle" in args:
        model = torch.load(args["pickle"], map_location="cpu", weights_only=False)
    else:
        from kdbench.compress import load_variant

        model = load_variant(args["dir"])
    model.eval()
    batch = torch.load(args["inputs"], weights_only=True)
    gc.collect()
    load_peak_kb = _proc_status_kb("VmHWM") or _maxrss_kb()
    loaded_kb = _proc_status_kb("VmRSS") or base_kb
    _reset_peak_rss()  # the figure is the model resident + its forward, not the transients of loading it
    with torch.inference_mode():
        model(**batch)
    peak_kb = _proc_status_kb("VmHWM") or _maxrss_kb()
    return {
        "peak_mb": (peak_kb - base_kb) / 1024,
        "resident_mb": (loaded_kb - base_kb) / 1024,
        "load_peak_mb": (load_peak_kb - base_kb) / 1024,
        "weights_mb": tensor_bytes(model) / 2**20,
        "baseline_mb": base_kb / 1024,
        "child_import_s": import_s,
        "child_total_s": time.perf_counter() - t0,
        "hwm_reset": reset,
    }


# ---------------------------------------------------------------------------------------------------------------
# Energy
# ---------------------------------------------------------------------------------------------------------------


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
    dev = _device(device)
    if dev.type != "cuda":
        return {"joules_per_sample": None, "avg_power_w": None, "method": f"n/a: no energy counter for {dev.type}"}
    try:
        pynvml, handle = _nvml_handle(dev)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as e:  # noqa: BLE001 - NVML missing or counter not supported
        return {"joules_per_sample": None, "avg_power_w": None, "method": f"n/a: NVML energy counter: {e}"}
    batch = _to(make_inputs(batch_size), dev)
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


# ---------------------------------------------------------------------------------------------------------------
# Training cost
# ---------------------------------------------------------------------------------------------------------------


class Timer:
    """Wall time of a loop, with steps and samples/s.

        with Timer(device) as t:
            for batch in loader:
                ...
                t.step(len(batch["input_ids"]))
        t.summary()  # {"wall_s", "steps", "samples", "samples_per_s", "method"}

    On CUDA it synchronises at start and stop so queued kernels are counted.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.dev = _device(device)
        self.steps = 0
        self.samples = 0
        self.wall_s = 0.0
        self._t0: float | None = None

    def __enter__(self) -> Timer:
        _sync(self.dev)
        self._t0 = time.perf_counter()
        return self

    def step(self, samples: int = 0) -> None:
        self.steps += 1
        self.samples += samples

    def __exit__(self, *exc) -> None:
        _sync(self.dev)
        self.wall_s += time.perf_counter() - (self._t0 or time.perf_counter())
        self._t0 = None

    def summary(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "steps": self.steps,
            "samples": self.samples,
            "samples_per_s": self.samples / self.wall_s if self.wall_s > 0 else None,
            "method": f"time.perf_counter around the loop{' (CUDA synchronised)' if self.dev.type == 'cuda' else ''}",
        }


__all__ = [
    "PARAMS_METHOD",
    "Timer",
    "count_parameters",
    "device_name",
    "measure_energy",
    "measure_latency",
    "measure_peak_memory",
    "size_on_disk",
    "start_memory_server",
    "tensor_bytes",
]
