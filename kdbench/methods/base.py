"""What every distillation method shares: the logit terms' parameters, the Objective interface and the registry.

A method is an `Objective`: it says which teacher/student outputs it needs and turns them into a loss, and it
tells the runner what it needs before training through a few properties (`sparse_teacher`, `teacher_decoding`,
`student_decoding`, `teacher_logits_suffice`, `teacher_temperature`), so the runner has no branch per method. The
losses live in kdbench.kernels: feature terms ride in the same `kd_loss` call as the logits, so there is one loss
implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdbench.registry import Registry

methods: Registry = Registry("method")


class TermWeights(BaseModel):
    """Explicit weights of a method's loss terms (a term not named weighs 0):

        loss = ce * CE(s, y) + soft * T^2 * D(softmax(t/T) || softmax(s/T)) + hidden * H + attention * A

    H is the hidden-state term of `hidden`/`progressive` (feature_loss: MSE or cosine), A the attention term of
    `attention` (attention_loss: MSE or KL). DistilBERT's triple loss (Sanh et al., 2019) is
    `method: hidden, params: {feature_loss: cosine, layer_map: {L_s: L_t}, weights: {soft: 5, ce: 2, hidden: 1}}`
    on a masked-LM task."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    ce: float | None = Field(None, ge=0)
    soft: float | None = Field(None, ge=0)
    hidden: float | None = Field(None, ge=0)
    attention: float | None = Field(None, ge=0)


class SoftTargets(BaseModel):
    """The logit terms every method shares: loss = alpha * T^2 * D(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE,
    or, with `weights`, each term with its own weight (TermWeights)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # the loss needs finite settings
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1)  # JSD mixing weight
    # explicit weights of the loss terms, in place of alpha (and feature_weight); None: alpha's mix, as always
    weights: TermWeights | None = None
    weight_terms: ClassVar[tuple[str, ...]] = ("ce", "soft")  # the terms this method's loss has

    @model_validator(mode="after")
    def _weights_of_own_terms(self):
        if self.weights is None:
            return self
        named = [t for t in ("ce", "soft", "hidden", "attention") if getattr(self.weights, t) is not None]
        foreign = [t for t in named if t not in self.weight_terms]
        if foreign:
            raise ValueError(f"weights.{foreign[0]}: this method has no {foreign[0]} term; its terms: "
                             + ", ".join(self.weight_terms))
        if not any(getattr(self.weights, t) for t in named):
            raise ValueError("weights: give at least one term a weight above 0")
        replaced = [k for k in ("alpha", "feature_weight") if k in self.model_fields_set]
        if replaced:
            raise ValueError(f"weights replaces {replaced[0]}: give one or the other")
        return self

    @model_validator(mode="after")
    def _jsd_beta_inside(self):
        # kd_loss's own rule (kdbench.kernels), checked when the suite loads rather than at the first step
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must lie in (0, 1) for divergence 'jsd', got {self.beta:g} (beta 0 is divergence "
                             "forward_kl, beta 1 is reverse_kl)")
        return self


class DistillationConfig(SoftTargets):
    """Logit distillation (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").

    loss = alpha * T^2 * D(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

    YAML:
        methods:
          - {name: kd, method: logit, params: {temperature: 4.0, alpha: 0.7}}
    """

    # Language models: run the output layers inside the loss, chunk by chunk (kdbench.kernels.fused_linear_kd_loss),
    # so that neither model's (B, L, V) logits are ever held. Same loss; both layers run under the student's
    # autocast state.
    fused_linear: bool = False


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher cached once per task and pair as a few tokens per position instead of its vocabulary logits."""

    kind: Literal["teacher_top_k", "teacher_samples"]  # its k most likely tokens, or n tokens drawn from it
    size: int  # k, or n
    temperature: float  # the temperature of the probabilities kept with the tokens


@dataclass(frozen=True)
class Decoding:
    """Targets a model writes for a method: the settings of the task head's `decoded_targets`."""

    what: str  # the kind of KD, for messages: "sequence-level KD"
    max_new_tokens: int | None = None  # None: the suite's training.max_seq_length
    num_beams: int = 1
    prompt_length: int | None = None  # causal LM only: tokens of each block that the model continues
    prompt_loss: bool = False  # causal LM only: the prompt's own tokens are labels too
    sample_temperature: float | None = None  # None: greedy or beam search; else sampling at this temperature


class Objective:
    """Base: a loss over model outputs. Subclasses set what the forward passes must return.

    `modules` holds the objective's trainable parts (None: it has none). `setup` builds them for a student/teacher
    pair; the Distiller calls it before every training (a run's first one, and each recovery after pruning), so it
    must keep modules that it already built and that still fit the pair. An objective that needs hidden states or
    attentions is also given the batch's `attention_mask=` (B, L) by keyword, to leave padding out; for an
    encoder-decoder student, also `decoder_attention_mask=` (B, Lt): its valid target positions
    (kdbench.train.distiller.decoder_token_mask).
    """

    needs_hidden_states = False
    needs_attentions = False
    modules = None  # torch.nn.Module | None

    def setup(self, student, teacher) -> None:
        """Check the objective against this student/teacher pair and build its trainable modules (default: none)."""

    def callbacks(self) -> list:
        """TrainerCallbacks the Distiller adds while this objective trains (default: none). An objective whose loss
        changes over training (a schedule of stages) follows the steps through them."""
        return []

    def loss(self, student_out, teacher_out, labels):  # pragma: no cover - interface
        raise NotImplementedError

    def prepare_batch(self, model, inputs: dict) -> dict:
        """The batch that `model` (the student) trains on this step (default: `inputs`, as the data gives them;
        on-policy KD has the student write some of them)."""
        return inputs

    # What the runner asks before training -------------------------------------------------------------------

    @property
    def fused_linear(self) -> bool:
        """Whether the models' output layers run inside the loss (DistillationConfig.fused_linear)."""
        return bool(getattr(getattr(self, "params", None), "fused_linear", False))

    @property
    def teacher_temperature(self) -> float:
        """The temperature T at which the loss reads the teacher's soft targets, softmax(logits / T): several
        teachers are averaged at it (kdbench.train.ensemble)."""
        return self.params.temperature

    @property
    def teacher_logits_suffice(self) -> bool:
        """Whether the loss reads nothing of the teacher but its logits at the data's inputs, so that they may be
        computed once and reused every epoch, seed and method."""
        return not (self.needs_hidden_states or self.needs_attentions)

    @property
    def sparse_teacher(self) -> SparseTeacher | None:
        """The cached sparse teacher that the objective distils from instead of running the teacher (default:
        none)."""
        return None

    @property
    def teacher_decoding(self) -> Decoding | None:
        """How the teacher decodes targets for the training rows, once per task and pair (default: it does not;
        see `training_rows`)."""
        return None

    def training_rows(self, rows: list[dict], teacher_decoded: list[dict] | None) -> list[dict]:
        """What the student trains on: `rows` (the labelled split plus the transfer set), or `teacher_decoded`, the
        same rows with the targets the teacher wrote when `teacher_decoding` asked for them."""
        return rows if teacher_decoded is None else teacher_decoded

    @property
    def student_decoding(self) -> Decoding | None:
        """How the student writes some of its own training batches (default: it does not); the runner then gives
        `bind` the task's way of doing it."""
        return None

    def bind(self, write, collate, seed: int) -> None:
        """`write(model, rows, device) -> rows`: `rows` with the targets `model` writes under `student_decoding`;
        `collate(rows) -> batch`: the task's collator; `seed`: the run's (default: nothing to bind)."""

    # The loss terms every method shares -------------------------------------------------------------------

    def term_weight(self, term: str) -> float:
        """The weight of the feature term `term` ("hidden", "attention"): its `weights` entry (0 when not named),
        else the method's feature_weight."""
        weights = getattr(self.params, "weights", None)
        return self.params.feature_weight if weights is None else (getattr(weights, term) or 0.0)

    def logit_kd(self, student_out, teacher_out, labels, features=None):
        """The logit terms every method shares (`self.params` is a DistillationConfig), plus an optional feature
        term `features` = (student_features, teacher_features, weight), all in one fused kd_loss call; with
        `weights`, soft targets and CE are two calls (alpha 1 and alpha 0), each with its weight."""
        p = self.params
        weights = getattr(p, "weights", None)
        if weights is None:
            return self._logit_terms(student_out, teacher_out, labels, p.alpha, features)
        loss = 0.0
        for alpha, weight in ((1.0, weights.soft), (0.0, weights.ce)):
            if weight:
                loss = loss + weight * self._logit_terms(student_out, teacher_out, labels, alpha)
        if features is not None:
            import torch
            import torch.nn.functional as F

            fs, ft, weight = features
            dtype = torch.promote_types(fs.dtype, torch.float32)
            loss = loss + weight * F.mse_loss(fs.to(dtype), ft.to(dtype).detach())
        return loss

    def _logit_terms(self, student_out, teacher_out, labels, alpha: float, features=None):
        from kdbench.kernels import fused_linear_kd_loss, kd_loss, top_k_kd_loss

        p = self.params
        terms = dict(temperature=p.temperature, alpha=alpha, divergence=p.divergence, beta=p.beta)
        top_k = getattr(teacher_out, "top_k", None)  # a cached teacher: (log_probs, token_ids), see SparseTeacher
        if top_k is not None:
            return top_k_kd_loss(student_out.logits, *top_k, labels, tail=getattr(p, "teacher_top_k_tail", "bucket"),
                                 **terms)
        layer = getattr(student_out, "output_layer", None)  # fused_linear: kdbench.output_layer.Captured rows
        if layer is not None:
            teacher_layer = teacher_out.output_layer
            with layer.autocast_context():
                loss = fused_linear_kd_loss(layer.hidden, layer.weight, teacher_layer.hidden, teacher_layer.weight,
                                            labels, student_bias=layer.bias, teacher_bias=teacher_layer.bias, **terms)
            if features is not None:  # kd_loss's feature term, which has no logits to ride along with here
                import torch.nn.functional as F

                fs, ft, weight = features
                loss = loss + weight * F.mse_loss(fs.float(), ft.float().detach())
            return loss
        extra = {}
        if features is not None:
            fs, ft, weight = features
            extra = {"student_features": fs, "teacher_features": ft, "feature_weight": weight}
        return kd_loss(student_out.logits, teacher_out.logits, labels, **terms, **extra)


def make_objective(name: str, params: dict) -> Objective:
    """The registered method `name` with `params` validated against its own schema."""
    cls = methods.get(name)
    return cls(methods.validate_params(name, params))
