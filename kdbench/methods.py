"""Distillation methods: what a student learns from its teacher.

A method is an `Objective`: it says which teacher/student outputs it needs and turns them into a loss. The
losses themselves live in kdbench.kernels (fused Triton on a GPU, the exact PyTorch reference elsewhere).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kdbench.registry import Registry

methods: Registry = Registry("method")


class DistillationConfig(BaseModel):
    """Logit distillation (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").

    loss = alpha * T^2 * D(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

    YAML:
        methods:
          - {name: kd, method: logit, params: {temperature: 4.0, alpha: 0.7}}
    """

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1)  # JSD mixing weight


class Objective:
    """Base: a loss over model outputs. Subclasses set what the forward passes must return."""

    needs_hidden_states = False
    needs_attentions = False

    def loss(self, student_out, teacher_out, labels):  # pragma: no cover - interface
        raise NotImplementedError


@methods.register("logit")
class LogitKD(Objective):
    """Logit KD with temperature: soft teacher targets plus hard-label cross-entropy."""

    Params = DistillationConfig

    def __init__(self, params: DistillationConfig | None = None):
        self.params = params or DistillationConfig()

    def loss(self, student_out, teacher_out, labels):
        from kdbench.kernels import kd_loss

        p = self.params
        return kd_loss(
            student_out.logits, teacher_out.logits, labels,
            temperature=p.temperature, alpha=p.alpha, divergence=p.divergence, beta=p.beta,
        )


def make_objective(name: str, params: dict) -> Objective:
    cls = methods.get(name)
    return cls(methods.validate_params(name, params))
