"""Measuring one model variant (quality, size, latency, memory, energy, decoding), and compressing a student into
the suite's variants, each measured the same way.
"""

from __future__ import annotations

import copy
import logging

from kdbench import distributed
from kdbench.errors import KdbenchError
from kdbench.models import model_inputs
from kdbench.run.context import Context
from kdbench.plan import RunSpec

log = logging.getLogger(__name__)


def example_batch(spec: RunSpec, ctx: Context, batch_size: int) -> dict:
    """A padded batch of real eval inputs at the profiling sequence length (cycled if the split is small)."""
    rows = ctx.encoded(spec, "eval")
    seq = spec.profiling.seq_length or spec.training.max_seq_length
    picked = [rows[i % len(rows)] for i in range(batch_size)]
    batch = ctx.collator(spec)([{k: v for k, v in r.items() if k != "labels"} for r in picked])
    batch = {k: v for k, v in batch.items() if v is not None}  # seq2seq-style collators leave labels=None
    if batch["input_ids"].shape[-1] < seq:  # pad up to the profiling length so latency means what it says
        tok = ctx.tokenizer(spec)
        lead = batch["input_ids"].shape[:-1]  # (B,), or (B, choices) for multiple choice: pad every sequence
        batch = tok.pad({k: v.reshape(-1, v.shape[-1]).tolist() for k, v in batch.items()}, padding="max_length",
                        max_length=seq, return_tensors="pt")
        batch = {k: v.reshape(*lead, -1) for k, v in batch.items()}
    return {k: v[..., :seq] for k, v in batch.items()}


def measure_latency(model, spec: RunSpec, ctx: Context, teacher=None) -> tuple[dict, dict]:
    """(latency per batch size, speedup over `teacher` per batch size), timed with the suite's settings."""
    from kdbench import profile

    if ctx.device == "cpu" and spec.profiling.memory:
        profile.wait_memory_server()  # never time a model while the server's start-up holds a core
    inputs_for = lambda m: lambda bs: model_inputs(example_batch(spec, ctx, bs), m)  # noqa: E731
    timing = timing_for(spec, ctx)
    latency = profile.measure_latency(model, inputs_for(model), timing)
    if teacher is None:
        return latency, {}
    return latency, profile.measure_speedup(model, teacher, inputs_for(model), inputs_for(teacher), timing)


def timing_for(spec: RunSpec, ctx: Context):
    """The suite's profiling settings as the profiler's Timing."""
    from kdbench.profile import Timing

    p = spec.profiling
    return Timing(batch_sizes=tuple(p.batch_sizes), warmup=p.warmup, min_repeats=p.min_repeats,
                  max_repeats=p.max_repeats, time_budget_s=p.time_budget_s, device=ctx.device)


def measure_decoding(model, spec: RunSpec, ctx: Context) -> dict:
    """Greedy generate() of `profiling.generate_tokens` new tokens per batch size (profile.measure_generation),
    after the profiling batch's inputs: a seq2seq model's source, a causal LM's prompt, which is cut from the left
    so that prompt plus new tokens fit the model's positions."""
    import dataclasses

    from kdbench import profile

    p = spec.profiling
    new = p.generate_tokens
    positions = getattr(model.config, "max_position_embeddings", None)  # GPT-2 maps n_positions to it
    keep = None
    if not model.config.is_encoder_decoder and positions is not None:
        keep = positions - new
        if keep < 1:
            raise KdbenchError(f"profiling.generate_tokens: {new} new tokens do not fit the model's {positions} "
                               "positions")

    def prompt(bs):
        batch = example_batch(spec, ctx, bs)
        return {k: v[..., -keep:] if keep else v for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    timing = dataclasses.replace(timing_for(spec, ctx), warmup=min(p.warmup, 1))
    return profile.measure_generation(model, prompt, timing, new_tokens=new,
                                      pad_token_id=ctx.tokenizer(spec).pad_token_id)


def profile_variant(name: str, kind: str, model, spec: RunSpec, ctx: Context, *, teacher_metric: float | None,
                    teacher=None, info: dict | None = None, training: dict | None = None) -> dict:
    """Quality, size, latency, memory and energy of one model variant, measured the same way for all.

    The speedup over `teacher` is timed in alternation with it (profile.measure_speedup); the teacher's own row
    has `teacher=None` and a speedup of 1 by definition. Data parallel: measured on rank 0 alone (the others wait
    and get its dict, or its error).
    """
    return distributed.on_main(lambda: measure_variant(name, kind, model, spec, ctx, teacher_metric=teacher_metric,
                                                       teacher=teacher, info=info, training=training))


def measure_variant(name: str, kind: str, model, spec: RunSpec, ctx: Context, *, teacher_metric: float | None,
                    teacher=None, info: dict | None = None, training: dict | None = None) -> dict:
    """profile_variant's measurements, in this process."""
    from kdbench import introspect, models, profile

    log.info("%s: measuring %s", spec.run_id, name)
    head = ctx.head(spec)
    metric, extra = head.measure(model, ctx.encoded(spec, "eval"), ctx.collator(spec), ctx.device)
    total, nonzero = introspect.count_parameters(model)
    latency, paired = measure_latency(model, spec, ctx, teacher)
    speedup = {bs: r["speedup"] for bs, r in paired.items()} if teacher is not None else {
        bs: 1.0 for bs in latency}
    largest = max(spec.profiling.batch_sizes)
    memory = None
    if spec.profiling.memory:
        memory = profile.measure_peak_memory(
            model, lambda bs: model_inputs(example_batch(spec, ctx, bs), model), batch_size=largest, device=ctx.device
        )
    energy = profile.measure_energy(
        model, lambda bs: model_inputs(example_batch(spec, ctx, bs), model), batch_size=largest, device=ctx.device
    )
    generation = measure_decoding(model, spec, ctx) if spec.profiling.generate_tokens and head.generates else None
    return {
        "name": name,
        "kind": kind,
        "metric_name": head.metric_name,
        "higher_is_better": head.higher_is_better,
        "metric": metric,
        "retention": head.retention(metric, teacher_metric),
        "extra_metrics": extra,
        "architecture": models.describe_model(model),
        "params": total,
        "nonzero_params": nonzero,
        "size": profile.size_on_disk(model),
        "latency": latency,
        "speedup_vs_teacher": speedup,
        "speedup": paired,  # the paired measurement behind each speedup, with its method
        "memory": memory,
        "energy": energy,
        "generation": generation,
        "compression": info or {},
        "training": training,
    }


def compressed_variants(student, spec: RunSpec, ctx: Context, teacher_metric: float, distill):
    """(profiled variants, failures) of the suite's compression specs applied to a distilled `student`."""
    teacher, _ = ctx.teacher(spec)
    variants, failed = [], []
    # Each compressor checks its variant with one forward pass: on a real eval batch, shaped as the task's head
    # needs ((B, C, L) for multiple choice), not on random (B, L) tokens.
    check = {k: v.to(ctx.device) for k, v in model_inputs(example_batch(spec, ctx, 2), student).items()}
    for comp in spec.compression:
        try:
            model, info, recovery = compress_variant(student, comp, ctx, distill, inputs=check)
            variants.append(profile_variant(comp.name, "compressed", model, spec, ctx, teacher_metric=teacher_metric,
                                            teacher=teacher, info=info, training=recovery))
        except KdbenchError as e:  # one variant the model or device cannot take; the others still count
            log.error("%s: compression %s failed: %s", spec.run_id, comp.name, e)
            failed.append({"name": comp.name, "error": str(e)})
    return variants, failed


def compress_variant(student, comp, ctx: Context, distill, inputs: dict | None = None):
    """Apply a compression spec to a copy of `student`.

    With `recover_steps`, the student is distilled from the teacher for that many steps after the last step that
    leaves it trainable (pruning) and before the first that does not (quantization, casts).
    """
    from kdbench import compress

    steps = [(s.compressor, s.params) for s in comp.steps]
    split = next((i for i, (name, _) in enumerate(steps) if not compress.compressors.get(name).trainable), len(steps))
    model, info = compress.apply_variant(student, steps[:split], device=ctx.device, inputs=inputs) if split else (
        copy.deepcopy(student), {"steps": []})
    recovery = None
    if comp.recover_steps:
        with compress.frozen_sparsity(model):  # pruned weights stay zero while the survivors adapt
            recovery = distill(model, f"recover {comp.name}", max_steps=comp.recover_steps).as_dict()
        info["recovered_before_step"] = split
    if split < len(steps):
        model, rest = compress.apply_variant(model, steps[split:], device=ctx.device, inputs=inputs,
                                             copy_model=False)
        info["steps"] += rest["steps"]
    return model, info, recovery
