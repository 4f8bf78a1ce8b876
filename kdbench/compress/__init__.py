"""Compressors: make smaller or faster variants of a distilled student.

Each compressor is a registry entry (a class) with its own pydantic `Params`; a suite names it by key:

    compression:
      - name: pruned+int8
        steps: [{compressor: prune_structured, params: {amount: 0.25}}, {compressor: int8}]
        recover_steps: 100   # distil the pruned student for 100 steps before it is quantized

    base       the registry, Compressor, example_inputs, apply_variant (steps in order, on a copy)
    layout     where each model family keeps its blocks, heads and FFN neurons
    prune      prune_unstructured, prune_structured, frozen_sparsity
    quantize   int8, fp16, bf16
    io         save_variant, load_variant
"""

from __future__ import annotations

from kdbench.compress.base import Compressor, apply_variant, compressors, example_inputs
from kdbench.compress.io import VARIANT_FILE, load_variant, save_variant
from kdbench.compress.layout import HEAD_DIM_KEY, UNPRUNED_HEADS_KEY
from kdbench.compress.prune import frozen_sparsity
from kdbench.compress.quantize import native_dtype_support

__all__ = [
    "HEAD_DIM_KEY",
    "UNPRUNED_HEADS_KEY",
    "VARIANT_FILE",
    "Compressor",
    "apply_variant",
    "compressors",
    "example_inputs",
    "frozen_sparsity",
    "load_variant",
    "native_dtype_support",
    "save_variant",
]
