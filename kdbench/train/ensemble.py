"""Several teachers as one: a frozen module whose logits carry the teachers' weighted soft targets.

With weights w_i (normalised to sum 1) and the method's temperature T, the ensemble's logits are

    probs:   z = T * log(sum_i w_i * softmax(z_i / T))     so that softmax(z / T) = sum_i w_i * softmax(z_i / T)
    logits:  z = sum_i w_i * z_i                           so that softmax(z / T) = softmax(sum_i w_i z_i / T)

exactly, per logit row. Every method's loss, the kernels and the teacher caches read a teacher's soft targets as
softmax(logits / T): they distil from the ensemble unchanged. Its argmax (a transfer-set row's hard label) is the
ensemble's most likely class. It has no single teacher's hidden states or attention maps: methods that need them
are refused for such pairs (kdbench.suite_checks.check_several_teachers).
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
import torch.nn.functional as F

from kdbench.models import model_inputs

# The output fields that hold logits: most models' `logits`, an extractive QA model's start and end positions.
LOGIT_FIELDS = ("logits", "start_logits", "end_logits")


def average_logits(logits: list[torch.Tensor], weights: list[float], temperature: float,
                   average: Literal["probs", "logits"] = "probs") -> torch.Tensor:
    """Logits (..., V) whose softmax at `temperature` is the weighted average of the teachers' probabilities
    (`probs`), or their weighted average logits (`logits`); `logits` is one (..., V) tensor per teacher. Computed
    in at least fp32."""
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    total = math.fsum(weights)
    w = torch.tensor([x / total for x in weights], dtype=dtype, device=logits[0].device)
    stacked = torch.stack([z.to(dtype) for z in logits])  # (n, ..., V)
    w = w.reshape(-1, *[1] * (stacked.dim() - 1))
    if average == "logits":
        return (w * stacked).sum(0)
    log_probs = F.log_softmax(stacked / temperature, dim=-1) + w.log()
    return temperature * torch.logsumexp(log_probs, dim=0)


class TeacherEnsemble(torch.nn.Module):
    """`TeacherEnsemble([teacher, ...], weights, temperature, average)`: called like a teacher, it runs each one
    on the inputs it accepts and returns the first one's outputs with every logits field replaced by
    `average_logits` of the teachers' (see the module's docstring)."""

    def __init__(self, teachers: list[torch.nn.Module], weights: list[float], temperature: float,
                 average: Literal["probs", "logits"] = "probs"):
        super().__init__()
        self.teachers = torch.nn.ModuleList(teachers)
        self.weights, self.temperature, self.average = list(weights), temperature, average

    @property
    def forward_inputs(self) -> set[str]:
        """What kdbench.models.model_inputs keeps for it: what any of its teachers accepts."""
        return {name for t in self.teachers for name in inspect.signature(t.forward).parameters}

    def get_output_embeddings(self):
        return self.teachers[0].get_output_embeddings()  # the vocabulary's size, which the teachers share

    def forward(self, **inputs):
        outs = [t(**model_inputs(inputs, t)) for t in self.teachers]
        first = outs[0]
        for name in LOGIT_FIELDS:
            if getattr(first, name, None) is None:
                continue
            combined = average_logits([getattr(o, name) for o in outs], self.weights, self.temperature, self.average)
            if isinstance(first, dict):  # a transformers ModelOutput: its item and its attribute are one
                first[name] = combined
            else:
                setattr(first, name, combined)
        return first
