"""What a model variant costs on disk (parameter counts and in-memory bytes are kdbench.introspect's)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from kdbench.introspect import is_quantized_model


def size_on_disk(model: torch.nn.Module) -> dict[str, Any]:
    """Bytes of the saved weights: {bytes, mb, format, method}.

    safetensors (`safetensors.torch.save_model`: shared tensors once, header included) for plain tensors;
    torchao's quantized subclasses cannot be written to safetensors, so those models are measured as
    `torch.save(model.state_dict())` (zip + pickle; a few hundred bytes of overhead per tensor), and `format` says so.
    """
    quantized = is_quantized_model(model)
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
