"""A language model's output layer, run inside the loss instead of inside the model (methods' `fused_linear`).

`captured(model)` swaps the forward of the model's output layer (`get_output_embeddings()`, an nn.Linear) for
one that records its input, the last hidden states, and returns a zero-stride fp32 placeholder of the logits'
shape that holds no memory. The loss then makes the logits itself, chunk by chunk
(kdbench.kernels.fused_linear_kd_loss), so that no (B, L, V) logits exist.

That is exact only if the model's logits are the output layer's output and nothing else: no soft-capping, no
added bias outside the layer (BART's `final_logits_bias` when it is not zero), no rescaling. `check_logits` runs
the model once normally and compares, and refuses a model where they differ, in one line.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError


@dataclass
class Captured:
    """What the output layer saw in one forward: its input, and the autocast state it ran under."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    autocast: tuple[bool, torch.dtype] | None = None

    def autocast_context(self):
        """The autocast state the output layer ran under, for computing its logits elsewhere."""
        return torch.autocast(self.hidden.device.type, dtype=self.autocast[1], enabled=self.autocast[0])


def output_layer(model, what: str = "model") -> torch.nn.Linear:
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layer, torch.nn.Linear):
        raise KdbenchError(f"fused_linear: {what} ({type(model).__name__}) has no Linear output layer "
                           "(get_output_embeddings()); fused_linear is for language models")
    return layer


@contextlib.contextmanager
def captured(model, *, placeholder: bool = True, what: str = "model"):
    """Inside: the output layer records into the yielded Captured and, with `placeholder`, returns fp32 zeros of
    the logits' shape (expanded from one element) instead of computing them."""
    layer = output_layer(model, what)
    record = Captured(weight=layer.weight, bias=layer.bias)

    def forward(hidden):
        device = hidden.device.type
        enabled = torch.is_autocast_enabled(device)
        record.hidden = hidden
        record.autocast = (enabled, torch.get_autocast_dtype(device))
        if not placeholder:
            return F.linear(hidden, layer.weight, layer.bias)
        # fp32 whatever the autocast: under mixed precision the Trainer (accelerate's convert_outputs_to_fp32)
        # casts a model's bf16/fp16 outputs to fp32, which would make a bf16 placeholder a real (B, L, V) tensor
        return hidden.new_zeros((), dtype=torch.float32).expand(*hidden.shape[:-1], layer.out_features)

    layer.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield record
    finally:
        del layer.forward


_checked: weakref.WeakSet = weakref.WeakSet()


def check_logits(model, inputs: dict, what: str = "model", atol: float = 1e-4) -> None:
    """Once per model: its logits on `inputs` equal its output layer applied to the captured hidden states.
    Refuses, in one line naming `what`, a model that changes its logits after the output layer."""
    if model in _checked:
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # fork_rng: the extra forward draws no dropout masks from the training's random stream
    with torch.random.fork_rng(devices), torch.no_grad(), captured(model, placeholder=False, what=what) as record:
        logits = model(**inputs).logits
    if record.hidden is None:
        raise KdbenchError(f"fused_linear: {what} ({type(model).__name__}) never called its output layer")
    with record.autocast_context():
        mine = F.linear(record.hidden, record.weight, record.bias)
    if logits.shape != mine.shape or not torch.allclose(logits.float(), mine.float(), rtol=1e-3, atol=atol):
        raise KdbenchError(f"fused_linear: {what} ({type(model).__name__}) changes its logits after the output "
                           "layer (soft-capping, an extra bias or a scale); use the method without fused_linear")
    _checked.add(model)
