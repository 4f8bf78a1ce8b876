"""What a model variant costs to run in time: forward latency per batch size, generate() latency per token, the
speedup over a reference timed in alternation, and the wall time of a training loop (Timer).

One `Timing` object says how every measurement here is timed; each result's "method" string says it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kdbench.errors import KdbenchError
from kdbench.profile.device import MakeInputs, device_name, resolve, synchronize, to_device


@dataclass(frozen=True)
class Timing:
    """How latency is timed. Each batch size gets `warmup` untimed calls, then timed calls until `min_repeats` are
    done and either `time_budget_s` is spent or `max_repeats` are done, on `device` (where the model already is)."""

    batch_sizes: tuple[int, ...] = (1, 32)
    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 50
    time_budget_s: float = 2.0
    device: torch.device | str = "cpu"


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
    timing: Timing = Timing(),
    *,
    call: Callable[[torch.nn.Module, dict], Any] = _forward,
    call_name: str = "model(**batch)",
) -> dict[int, dict[str, Any]]:
    """Forward latency per batch size: {bs: {median_ms, p90_ms, mean_ms, min_ms, repeats, samples_per_s, ...}}.
    (`call(model, batch)`, named `call_name` in the method string, times something else than one forward.)

    The model must already be on `timing.device`; inputs are built once per batch size and moved there (not
    timed). Timed under torch.inference_mode with model.eval(): on CUDA with CUDA events around each call (GPU
    time, synchronised per call); on CPU with time.perf_counter. samples_per_s = batch_size / median.
    """
    warmup, min_repeats, max_repeats = timing.warmup, timing.min_repeats, timing.max_repeats
    if min_repeats < 1 or max_repeats < min_repeats:
        raise KdbenchError(f"measure_latency: need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    dev = resolve(timing.device)
    cuda = dev.type == "cuda"
    threads = torch.get_num_threads()
    name = device_name(dev)
    model.eval()
    out: dict[int, dict[str, Any]] = {}
    for bs in timing.batch_sizes:
        batch = to_device(make_inputs(bs), dev)
        times: list[float] = []
        with torch.inference_mode():
            for _ in range(warmup):
                call(model, batch)
            synchronize(dev)
            start = time.perf_counter()
            while len(times) < max_repeats and (
                len(times) < min_repeats or time.perf_counter() - start < timing.time_budget_s
            ):
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


def measure_generation(model: torch.nn.Module, make_inputs: MakeInputs, timing: Timing = Timing(), *,
                       new_tokens: int, pad_token_id: int) -> dict[int, dict[str, Any]]:
    """Latency of generating exactly `new_tokens` tokens greedily after each batch of prompts (`make_inputs`: the
    encoder's inputs of a seq2seq model, the prompt of a causal LM), with the KV cache, per batch size:
    measure_latency's figures plus ms_per_token (median / new_tokens) and tokens_per_s (generated tokens of the
    whole batch per second)."""

    def generate(m, batch):
        return m.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          num_beams=1, pad_token_id=pad_token_id)

    prompt_tokens = {}  # per batch size, read from the batch measure_latency builds (once)

    def inputs(bs):
        batch = make_inputs(bs)
        prompt_tokens[bs] = int(batch["input_ids"].shape[-1])
        return batch

    out = measure_latency(model, inputs, timing, call=generate,
                          call_name=f"model.generate(greedy, exactly {new_tokens} new tokens, KV cache)")
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
    timing: Timing = Timing(),
) -> dict[int, dict[str, Any]]:
    """Speedup of `model` over `reference` (e.g. the teacher): {bs: {speedup, model_ms, reference_ms, rounds, method}}.

    The two are timed in alternation, one call each per round, and the speedup is the median over rounds of
    reference time / model time. A shared machine drifts by tens of percent between measurements taken seconds
    apart (measured on the 2-core CI box: medians of one tiny BERT from 0.9 to 1.7 ms); paired rounds see the same
    drift on both sides, so their ratio repeats within a few percent where two separate medians do not.
    """
    dev = resolve(timing.device)
    cuda = dev.type == "cuda"
    model.eval()
    reference.eval()
    out: dict[int, dict[str, Any]] = {}
    for bs in timing.batch_sizes:
        batch, ref_batch = to_device(make_inputs(bs), dev), to_device(make_reference_inputs(bs), dev)
        ratios, mine, theirs = [], [], []
        with torch.inference_mode():
            for _ in range(timing.warmup):
                reference(**ref_batch)
                model(**batch)
            synchronize(dev)
            start = time.perf_counter()
            while len(ratios) < timing.max_repeats and (
                len(ratios) < timing.min_repeats or time.perf_counter() - start < 2 * timing.time_budget_s
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
        self.dev = resolve(device)
        self.steps = 0
        self.samples = 0
        self.wall_s = 0.0
        self._t0: float | None = None

    def __enter__(self) -> Timer:
        synchronize(self.dev)
        self._t0 = time.perf_counter()
        return self

    def step(self, samples: int = 0) -> None:
        self.steps += 1
        self.samples += samples

    def __exit__(self, *exc) -> None:
        synchronize(self.dev)
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

