"""`progressive`: MobileBERT's layer-by-layer transfer, a schedule of stages over the training steps, then logit KD."""

from __future__ import annotations

import functools
import logging
import math
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from kdbench.methods.base import SoftTargets, methods
from kdbench.methods.hidden import HiddenStateKD
from kdbench.methods.layers import stack_output

log = logging.getLogger(__name__)


class ProgressiveParams(SoftTargets):  # no fused_linear: its layer stages read the student's logits
    """Parameters of `progressive`: logit KD's (the final stage), the layer stages' feature weight and layer map, and
    the share of the training steps that the final stage takes."""

    feature_weight: float = Field(1.0, gt=0)
    layer_map: dict[int, int] | None = None  # student layer (1..Ls) -> teacher layer (1..Lt); None: uniform
    decoder_layer_map: dict[int, int] | None = None  # encoder-decoders: the decoder's own map (None: layer_map's)
    final_fraction: float = Field(0.5, gt=0, le=1)  # of the steps, for the final logit stage; the rest: layer stages
    # the layer stages' term: mse (kd_loss's feature MSE), or cosine (1 - cos per real token; methods.feature_losses)
    feature_loss: Literal["mse", "cosine"] = "mse"
    weight_terms: ClassVar[tuple[str, ...]] = ("ce", "soft", "hidden")  # hidden: the layer stages' weight

    @model_validator(mode="after")
    def _stages_weighed(self):
        if self.weights is not None and not self.weights.hidden:
            raise ValueError("weights.hidden: progressive's layer stages are its hidden term alone; give it a "
                             "weight above 0")
        return self


def progressive_schedule(max_steps: int, layer_stages: int, final_fraction: float) -> list[int]:
    """Steps per stage, [layer stage 1, ..., layer stage K, final stage], summing to max_steps.

    The final stage takes round(final_fraction * max_steps) steps (halves up), at least 1; the rest are split evenly
    over the K layer stages, the earlier ones taking one step more when they do not divide. When fewer steps remain
    than there are layer stages (a short run, such as a recovery after pruning), every step goes to the final
    stage: the run is plain logit KD rather than a ladder that stops half-way up the student.
    (10, 2, 0.5) -> [3, 2, 5]; (4, 2, 0.5) -> [1, 1, 2]; (3, 2, 0.5) -> [0, 0, 3].
    """
    if max_steps <= 0:
        return [0] * (layer_stages + 1)
    final = min(max_steps, max(1, math.floor(final_fraction * max_steps + 0.5)))
    rest = max_steps - final
    if rest < layer_stages:
        return [0] * layer_stages + [max_steps]
    each, extra = divmod(rest, layer_stages)
    return [each + (k < extra) for k in range(layer_stages)] + [final]


def progressive_stage(step: int, plan: list[int]) -> int | None:
    """The layer stage (1..K) that 0-based training step `step` belongs to under `plan`, or None: the final stage."""
    end = 0
    for k, steps in enumerate(plan[:-1], start=1):
        end += steps
        if step < end:
            return k
    return None


@methods.register("progressive")
class ProgressiveKD(HiddenStateKD):
    """Progressive layer-by-layer transfer (MobileBERT), then logit KD of the whole student.

    MobileBERT (Sun et al., 2020, "MobileBERT: a Compact Task-Agnostic BERT for Resource-Limited Devices", section
    "progressive knowledge transfer") trains the student's layers one after the other, each against its teacher
    layer, with the layers below it frozen. Here the training steps run through K + 1 stages (see
    `progressive_schedule`), for the mapped student layers s_1 < ... < s_K (uniform map by default: every layer):

        layer stage k = 1..K:  trainable: student layers s_(k-1)+1 .. s_k (s_0 = 0; one layer under the default map),
                               the embeddings in stage 1 only, and the projection W_k; everything else is frozen
            loss = kd_loss(logits, teacher logits, labels=None, alpha=0,   # the logit terms are exactly 0
                           features=(W_k h_s_k + b_k, h_t_k), feature_weight)
                 = feature_weight * mean over real tokens and teacher width of (W_k h_s_k + b_k - h_t_k)^2
        final stage:           every parameter trainable
            loss = kd_loss(logits, teacher logits, labels, T, alpha, ...)  # logit KD, exactly the `logit` loss

    The projections, hidden states and padding are `hidden`'s (nn.Linear per mapped layer, post-LayerNorm block
    outputs, real tokens only). The student's logits are detached in the layer stages, so the backward pass stays
    below layer s_k. Layers above s_K, the pooler and the classifier train in the final stage only. The stages share
    the Trainer's one learning-rate schedule (warmup, then linear decay over all steps), so the final stage runs at
    the lower half of it under the default final_fraction of 0.5.

    Freezing: a TrainerCallback (`callbacks()`) sets the stage at each step and switches requires_grad on the
    student's parameters; the Trainer's AdamW skips parameters without a gradient (no update, no weight decay, no
    momentum). Every parameter is trainable at the start of training (the optimizer is built from the trainable
    ones) and again at its end (compression and recovery train the student further). The blocks are found by
    `stack_blocks` (BERT, RoBERTa, DistilBERT, ELECTRA, GPT-2, Llama-style, T5); other models fail at setup.

    Encoder-decoder pairs (T5): the stages walk the encoder's mapped layers, then the decoder's (`layer_map` for
    both stacks, `decoder_layer_map` for the decoder's own, as in `hidden`). A decoder stage matches decoder hidden
    states on the target positions and trains decoder blocks only: the encoder below it is frozen, and so are the
    shared embeddings, which train with the first encoder stage. The encoder's final norm, the decoder's and the LM
    head train in the final stage.
    A recovery after pruning runs the same schedule over its own steps; under K + 1 steps it is logit KD alone.

    YAML:
        methods:
          - name: progressive
            method: progressive
            params: {temperature: 4.0, alpha: 0.7, final_fraction: 0.5}   # uniform map, half the steps for logit KD
          - name: progressive-last
            method: progressive
            params: {layer_map: {2: 4}, final_fraction: 0.3}   # one layer stage: student layers 1-2 -> teacher 4
    """

    Params = ProgressiveParams
    method = "progressive"
    embeddings = False  # stages are transformer layers 1..L; the embeddings train with the first

    def __init__(self, params: ProgressiveParams | None = None):
        super().__init__(params or ProgressiveParams())
        self.stage: int | None = None  # the layer stage in progress (1..K), or None: the final logit stage

    def setup(self, student, teacher) -> None:
        from kdbench.introspect import stack_blocks

        super().setup(student, teacher)
        stack_blocks(student, self.method)  # fail here, before training, on a model whose blocks are unknown
        self.stage = None

    @property
    def stage_pairs(self) -> list[tuple[str, int, int]]:
        """(stack, student layer, teacher layer) of each layer stage: the mapped layers of each stack in turn, an
        encoder's before its decoder's."""
        return [(stack, s, t) for stack, pairs in (self.layer_maps or {}).items() for s, t in pairs.items()]

    def schedule(self, max_steps: int) -> list[int]:
        """Steps per stage for a run of `max_steps`: K layer stages, then the final one."""
        return progressive_schedule(max_steps, len(self.stage_pairs), self.params.final_fraction)

    def stage_parameters(self, model) -> list[list]:
        """The student's trainable parameters in each stage: K layer stages, then the final one (all of them).
        The objective's own modules (the projections, attached to the student while training) are left out."""
        from kdbench.introspect import stack_parameters

        exclude = list(self.modules.parameters()) if self.modules is not None else []
        before, per_stack, rest = stack_parameters(model, exclude)
        stages = []
        for stack, pairs in self.layer_maps.items():
            below = 0
            for s in pairs:
                blocks = [p for block in per_stack[stack][below:s] for p in block]
                stages.append((before if not stages else []) + blocks)
                below = s
        every_block = [p for per_block in per_stack.values() for block in per_block for p in block]
        return stages + [before + every_block + rest]

    def callbacks(self) -> list:
        return [_progressive_callback_class()(self)]

    def loss(self, student_out, teacher_out, labels, attention_mask=None, decoder_attention_mask=None):
        if self.stage is None:
            return self.logit_kd(student_out, teacher_out, labels)
        from kdbench.kernels import kd_loss

        p = self.params
        self.check_hidden_states(student_out, teacher_out)
        stack, s, t = self.stage_pairs[self.stage - 1]
        fs, ft = self.features(stack_output(student_out, "hidden_states", stack),
                               stack_output(teacher_out, "hidden_states", stack),
                               self.stack_masks(attention_mask, decoder_attention_mask)[stack], pairs={s: t},
                               stack=stack)
        if p.feature_loss == "cosine":
            from kdbench.methods.feature_losses import cosine_feature_loss

            return self.term_weight("hidden") * cosine_feature_loss(fs, ft)
        # alpha = 0 and no labels: the logit terms are exactly 0, so the loss is this stage's feature MSE alone.
        return kd_loss(student_out.logits.detach(), teacher_out.logits, None, temperature=p.temperature, alpha=0.0,
                       divergence=p.divergence, beta=p.beta, student_features=fs, teacher_features=ft,
                       feature_weight=self.term_weight("hidden"))


@functools.cache
def _progressive_callback_class():
    """Built on first use, so that importing kdbench.methods does not import transformers."""
    from transformers import TrainerCallback

    class ProgressiveStages(TrainerCallback):
        """Walks a ProgressiveKD through its stages: sets `objective.stage` and the student's requires_grad."""

        def __init__(self, objective: ProgressiveKD):
            self.objective = objective
            self.plan: list[int] = []
            self.stages: list[list] = []
            self.current = "unset"

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.plan = self.objective.schedule(state.max_steps)
            self.stages = self.objective.stage_parameters(model)
            self.current = "unset"
            log.debug("progressive: steps per stage %s (layer stages, then the final one)", self.plan)

        def on_step_begin(self, args, state, control, **kwargs):
            stage = progressive_stage(state.global_step, self.plan)
            if stage == self.current:
                return
            self.current = self.objective.stage = stage
            active = {id(p) for p in self.stages[-1 if stage is None else stage - 1]}
            for p in self.stages[-1]:
                p.requires_grad_(id(p) in active)
            log.debug("progressive: step %d starts stage %s", state.global_step + 1, stage or "final")

        def on_train_end(self, args, state, control, model=None, **kwargs):
            for p in model.parameters():
                p.requires_grad_(True)
            self.objective.stage = None
            self.current = "unset"

    return ProgressiveStages
