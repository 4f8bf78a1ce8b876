"""Peak memory measured in a separate process: a fresh `python -c` subprocess, or a fork of kdbench's own warm
fork server (started on first use, kept for this process's life). The child entry points are named by module path
in the code strings below (_CHILD, _FORK_SERVER_CODE)."""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from kdbench.introspect import drop_instance_reprs, is_quantized_tensor, tensor_bytes
from kdbench.profile.rss import maxrss_kb, proc_status_kb, reset_peak_rss


_CHILD = "from kdbench.profile.memory_server import _memory_child; _memory_child()"
# Imported once by the fork server, so that each forked measurement starts warm (missing ones are skipped).
_FORK_SERVER_PRELOAD = ["transformers.modeling_utils", "kdbench.compress", "torchao.quantization"]
# The protocol gets its own copy of stdout; fd 1 goes to stderr so that nothing printed by imports or model code
# can mix with the status lines.
_FORK_SERVER_CODE = (
    "import os; proto = os.fdopen(os.dup(1), 'w'); os.dup2(2, 1); "
    "from kdbench.profile.memory_server import _fork_server; _fork_server(proto)"
)
_server: subprocess.Popen | None = None
_server_ready = False  # the server has said "ready" (its first line) and this process has read it
_server_lock = threading.Lock()


def peak_memory_isolated(model_dir_or_model, make_inputs, batch_size, timeout_s, how: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdbench-mem-") as d:
        d = Path(d)
        if isinstance(model_dir_or_model, torch.nn.Module):
            drop_instance_reprs(model_dir_or_model)  # torchao's per-instance reprs do not pickle
            torch.save(model_dir_or_model, d / "model.pt")
            modules = {type(model_dir_or_model).__module__}
            modules |= {type(p.detach()).__module__ for p in model_dir_or_model.parameters() if is_quantized_tensor(p.detach())}
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


def _measure_child(args: dict) -> dict[str, Any]:
    """Runs in the measurement process: baseline RSS, load, one forward, peak RSS."""
    t0 = time.perf_counter()
    torch.set_num_threads(args["threads"])
    import transformers  # import costs belong to the baseline, not to the model

    # The model's code and torch's thread pool are start-up costs too: pay them before the baseline.
    for name in args.get("modules", []):
        importlib.import_module(name)
    if "dir" in args:
        from kdbench.compress.io import VARIANT_FILE

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
    reset = reset_peak_rss()
    base_kb = proc_status_kb("VmRSS") or maxrss_kb()
    if "pickle" in args:
        model = torch.load(args["pickle"], map_location="cpu", weights_only=False)
    else:
        from kdbench.compress.io import load_variant

        model = load_variant(args["dir"])
    model.eval()
    batch = torch.load(args["inputs"], weights_only=True)
    gc.collect()
    load_peak_kb = proc_status_kb("VmHWM") or maxrss_kb()
    loaded_kb = proc_status_kb("VmRSS") or base_kb
    reset_peak_rss()  # the figure is the model resident + its forward, not the transients of loading it
    with torch.inference_mode():
        model(**batch)
    peak_kb = proc_status_kb("VmHWM") or maxrss_kb()
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

