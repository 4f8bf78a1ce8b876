"""`logit`: soft teacher targets plus hard-label cross-entropy, from the teacher's logits or a cached sparse teacher."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdbench.methods.base import DistillationConfig, Objective, SparseTeacher, methods


class LogitParams(DistillationConfig):
    """`logit`'s parameters: DistillationConfig's, and `teacher_top_k`.

    teacher_top_k (causal and seq2seq LM tasks): run the teacher once per task and pair, keep each position's k
    most likely tokens with their probabilities at T and the mass of the rest, and distil every epoch, seed and
    method of that k and T from that cache (kdbench.kernels.top_k_kd_loss: the divergence over the k tokens and
    one bucket for the rest, or with `teacher_top_k_tail: uniform` that mass spread evenly over the other tokens;
    exact when k >= V). The teacher's forward pass then runs once, not every step.

    YAML:
        methods:
          - {name: kd-top32, method: logit, params: {temperature: 2.0, alpha: 0.9, teacher_top_k: 32}}
    """

    teacher_top_k: int | None = Field(None, ge=1)
    # the rest of the vocabulary: one bucket holding its mass, or that mass spread evenly (top_k_kd_loss's `tail`)
    teacher_top_k_tail: Literal["bucket", "uniform"] = "bucket"
    # or n tokens drawn per position from the teacher at T, each kept with its share of the draws (random-sampling
    # KD, kdbench.kernels.teacher_samples): cached the same way, an unbiased forward-KL gradient
    teacher_samples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_way_to_skip_teacher_logits(self):
        chosen = [key for key in ("teacher_top_k", "teacher_samples", "fused_linear") if getattr(self, key)]
        if len(chosen) > 1:
            raise ValueError(f"{chosen[0]} and {chosen[1]} cannot be combined: fused_linear runs the teacher's "
                             "output layer every step, teacher_top_k and teacher_samples cache the teacher once")
        if self.teacher_samples and self.divergence != "forward_kl":
            raise ValueError(f"teacher_samples estimates forward KL's gradient without bias; divergence "
                             f"{self.divergence!r} is not estimated that way")
        return self


@methods.register("logit")
class LogitKD(Objective):
    """Logit KD with temperature: soft teacher targets plus hard-label cross-entropy."""

    Params = LogitParams

    def __init__(self, params: DistillationConfig | None = None):
        self.params = params or LogitParams()

    @property
    def sparse_teacher(self) -> SparseTeacher | None:
        # subclasses' and plain DistillationConfig params have neither field: they run the teacher
        for kind in ("teacher_top_k", "teacher_samples"):
            size = getattr(self.params, kind, None)
            if size is not None:
                return SparseTeacher(kind, size, self.params.temperature)
        return None

    def loss(self, student_out, teacher_out, labels):
        return self.logit_kd(student_out, teacher_out, labels)
