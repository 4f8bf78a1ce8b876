"""Compressors and variants: the registry, the Compressor base class, and `apply_variant`, which runs a list of
compression steps on a copy of a model.

`compressors.get(name)(params).apply(model, device=...)` changes `model` in place and returns an info dict (what
was done, e.g. `{"sparsity": 0.5}`). Every compressor ends with a forward pass on a small example batch and checks
that the outputs are finite, so a variant that cannot run on the device fails here with one line, not later inside
the profiler.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import BaseModel

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

compressors: Registry[type] = Registry("compressor")


def example_inputs(model: torch.nn.Module, device: torch.device | str, batch_size: int = 2, seq_len: int = 8):
    """A small token batch for tracing and smoke forwards: {input_ids, attention_mask}, each (batch_size, seq_len)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise KdbenchError(f"cannot build example inputs for {type(model).__name__}: its config has no vocab_size")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
    name = getattr(model, "main_input_name", "input_ids")
    return {name: ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _first_tensor(out: Any) -> torch.Tensor:
    """The logits of a transformers output (ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def check_forward(model: torch.nn.Module, inputs: dict, who: str, device: torch.device) -> None:
    """Run one forward pass; a crash or a non-finite output means the variant cannot run here."""
    try:
        with torch.inference_mode():
            out = _first_tensor(model(**inputs))
    except Exception as e:  # noqa: BLE001 - any backend failure is reported as one line
        raise KdbenchError(f"{who} not supported on {device}: {type(e).__name__}: {one_line(e)}") from e
    if not torch.isfinite(out.float()).all():
        raise KdbenchError(f"{who} on {device}: the forward pass gives non-finite outputs (overflow?)")


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


class Compressor:
    """Base class: `params` are the validated Params; `apply` changes the model in place and returns info."""

    name = "?"
    Params: type[BaseModel]
    trainable = False  # can the compressed model still take optimizer steps (recovery)? Pruned: yes; quantized: no

    def __init__(self, params: BaseModel | dict | None = None):
        if not isinstance(params, BaseModel):
            params = compressors.validate_params(self.name, params)
        self.params = params

    def apply(self, model: torch.nn.Module, *, device: torch.device | str, inputs: dict | None = None) -> dict:
        raise NotImplementedError


def register(name: str):
    def deco(cls):
        cls.name = name
        return compressors.register(name)(cls)

    return deco


def apply_variant(
    model: torch.nn.Module,
    steps: list[tuple[str, dict[str, Any] | None]],
    device: torch.device | str,
    *,
    inputs: dict | None = None,
    copy_model: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Apply compressors in order, e.g. [("prune_structured", {"amount": 0.25}), ("int8", {})].

    All params are validated before any step runs. With `copy_model` (the default) the caller's model is left
    untouched. Returns (model, {"steps": [{"name", "params", **step info}, ...]}).
    """
    dev = as_device(device)
    validated = [(name, compressors.validate_params(name, params)) for name, params in steps]
    # Copies made under a caller's inference_mode would be inference tensors, which pruning cannot trace.
    with torch.inference_mode(False):
        if copy_model:
            model = copy.deepcopy(model)
        model = model.to(dev).eval()
        infos = []
        for name, params in validated:
            info = compressors.get(name)(params).apply(model, device=dev, inputs=inputs)
            infos.append({"name": name, "params": params.model_dump(), **info})
    return model, {"steps": infos}
