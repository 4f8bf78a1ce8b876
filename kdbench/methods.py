"""Distillation methods: what a student learns from its teacher.

A method is an `Objective`: it says which teacher/student outputs it needs and turns them into a loss. The
losses themselves live in kdbench.kernels (fused Triton on a GPU, the exact PyTorch reference elsewhere): feature
terms are handed to the same `kd_loss` call as the logits (its `student_features=` / `teacher_features=`), so there
is one loss implementation whatever the method.

An objective may own trainable modules (the projections of `hidden`): `setup(student, teacher)` builds them, and
`kdbench.trainer.Distiller` trains them with the student (attached as its submodule `kd_projections` while
training only, so the saved, profiled and compressed student is the plain model).
"""

from __future__ import annotations

import functools
import logging
import math
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

log = logging.getLogger(__name__)
methods: Registry = Registry("method")


class SoftTargets(BaseModel):
    """The logit terms every method shares: loss = alpha * T^2 * D(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1)  # JSD mixing weight


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


class Objective:
    """Base: a loss over model outputs. Subclasses set what the forward passes must return.

    `modules` holds the objective's trainable parts (None: it has none). `setup` builds them for a student/teacher
    pair; the Distiller calls it before every training (a run's first one, and each recovery after pruning), so it
    must keep modules that it already built and that still fit the pair. An objective that needs hidden states or
    attentions is also given the batch's `attention_mask=` (B, L) by keyword, to leave padding out; for an
    encoder-decoder student, also `decoder_attention_mask=` (B, Lt): its valid target positions
    (kdbench.trainer.decoder_token_mask).
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

    @property
    def sparse_teacher(self) -> tuple[str, int] | None:
        """("teacher_top_k", k) or ("teacher_samples", n) when the objective distils from a cached sparse teacher
        (LogitParams), else None."""
        params = getattr(self, "params", None)
        for key in ("teacher_top_k", "teacher_samples"):
            if getattr(params, key, None) is not None:
                return key, getattr(params, key)
        return None

    def prepare_batch(self, model, inputs: dict) -> dict:
        """The batch that `model` (the student) trains on this step (default: `inputs`, as the data gives them;
        on-policy KD has the student write some of them)."""
        return inputs

    def logit_kd(self, student_out, teacher_out, labels, features=None):
        """The logit terms every method shares (`self.params` is a DistillationConfig), plus an optional feature
        term `features` = (student_features, teacher_features, weight), all in one fused kd_loss call."""
        from kdbench.kernels import fused_linear_kd_loss, kd_loss, top_k_kd_loss

        p = self.params
        terms = dict(temperature=p.temperature, alpha=p.alpha, divergence=p.divergence, beta=p.beta)
        top_k = getattr(teacher_out, "top_k", None)  # a cached teacher: (log_probs, token_ids), see LogitParams
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


@methods.register("logit")
class LogitKD(Objective):
    """Logit KD with temperature: soft teacher targets plus hard-label cross-entropy."""

    Params = LogitParams

    def __init__(self, params: DistillationConfig | None = None):
        self.params = params or LogitParams()

    def loss(self, student_out, teacher_out, labels):
        return self.logit_kd(student_out, teacher_out, labels)


class SequenceParams(DistillationConfig):
    alpha: float = Field(0.0, ge=0, le=1)  # 0: pure sequence-level KD, cross-entropy on the teacher's outputs
    num_beams: int = Field(1, ge=1)  # 1: greedy decoding (Kim & Rush use beam search, e.g. 5)
    max_new_tokens: int | None = Field(None, gt=0)  # default: the suite's training.max_seq_length
    keep_references: bool = False  # train on the gold targets too, next to the teacher's
    prompt_length: int | None = Field(None, gt=0)  # causal LM only: tokens of each block the teacher continues
    prompt_loss: bool = False  # causal LM only: train on the prompt's own tokens too, not only the continuation


@methods.register("sequence")
class SequenceKD(LogitKD):
    """Sequence-level KD (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation"), for seq2seq and causal LM
    tasks.

    The teacher decodes once per run (greedy, or beam search with `num_beams`), and the student is trained on
    those outputs instead of the gold text: it learns the teacher's mode rather than a token-level match to every
    target.
    - seq2seq: a target for every training (and transfer) source.
    - causal LM: a continuation of every training block's first `prompt_length` tokens (default: half of
      max_seq_length), up to the block's length, cut after an end-of-sequence token; the student's loss is on
      the continuation only, or on the prompt's gold tokens too with `prompt_loss`.
    `alpha` > 0 adds word-level KD on the teacher's own outputs (their "Seq-KD + Word-KD"); `keep_references`
    also keeps the gold rows.

    YAML:
        methods:
          - {name: seq-kd, method: sequence, params: {num_beams: 4, alpha: 0.5, temperature: 2.0}}
          - {name: lm-seq-kd, method: sequence, params: {prompt_length: 64}}     # a causal LM task
    """

    Params = SequenceParams
    generates_targets = True  # kdbench.runner.distiller relabels the training rows with the teacher's outputs

    def __init__(self, params: SequenceParams | None = None):
        super().__init__(params or SequenceParams())


class OnPolicyParams(DistillationConfig):
    temperature: float = Field(1.0, gt=0)  # of the divergence, as GKD's experiments
    alpha: float = Field(1.0, ge=0, le=1)  # 1: the divergence only (no cross-entropy on the student's own samples)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "jsd"
    lmbda: float = Field(0.5, ge=0, le=1)  # share of training batches the student writes (GKD's lambda)
    sample_temperature: float = Field(1.0, gt=0)  # the student samples its outputs from softmax(logits / this)
    max_new_tokens: int | None = Field(None, gt=0)  # default: the suite's training.max_seq_length
    prompt_length: int | None = Field(None, gt=0)  # causal LM only: tokens of each block the student continues
    prompt_loss: bool = False  # causal LM only: the loss on the prompt's own tokens too, not only the continuation


@methods.register("on_policy")
class OnPolicyKD(LogitKD):
    """On-policy distillation (Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", GKD), for seq2seq and causal LM tasks.

    On a share `lmbda` of the training batches, drawn per step from the run's seed, the student first writes the
    outputs itself (sampling at `sample_temperature`, with no gradient) and then learns the teacher's token
    distributions on its own text: the teacher corrects the mistakes the student actually makes, which training
    on gold or teacher text never shows it. The other batches are token-level KD on the data. The default loss is
    GKD's: the generalized JSD (beta 0.5) at temperature 1, without cross-entropy.
    - seq2seq: the student writes a target for each source of the batch.
    - causal LM: the student continues each block's first `prompt_length` tokens (default: half of
      max_seq_length) up to the block's length; the loss is on the continuation, or on the prompt's (gold)
      tokens too with `prompt_loss`.

    YAML:
        methods:
          - {name: gkd, method: on_policy, params: {lmbda: 0.5, divergence: jsd, beta: 0.5}}
    """

    Params = OnPolicyParams

    def __init__(self, params: OnPolicyParams | None = None):
        super().__init__(params or OnPolicyParams())
        self.write = self.collate = None
        self.draws = random.Random(0)

    def bind(self, write, collate, seed: int) -> None:
        """`write(model, rows, device) -> rows`: `rows` ({input_ids, attention_mask}: the batch's inputs) with the
        targets `model` samples; `collate(rows) -> batch`: the task's collator. The draws restart from `seed`."""
        self.write, self.collate, self.draws = write, collate, random.Random(seed)

    def prepare_batch(self, model, inputs: dict) -> dict:
        if self.draws.random() >= self.params.lmbda:
            return inputs
        if self.write is None:
            raise KdbenchError("method 'on_policy': no decoding bound (kdbench.runner.distiller binds the task's)")
        mask = inputs["attention_mask"].bool()
        rows = [{"input_ids": ids[keep].tolist(), "attention_mask": [1] * int(keep.sum())}
                for ids, keep in zip(inputs["input_ids"], mask)]
        training = model.training
        try:
            written = self.write(model, rows, inputs["input_ids"].device)
        finally:
            model.train(training)  # generation ran in eval mode
        return {k: v.to(inputs["input_ids"].device) for k, v in self.collate(written).items()}


# ---------------------------------------------------------------------------------------------------------------
# Intermediate-layer methods: a layer map from student layers to teacher layers


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)  # DistilBERT maps it to n_layers, T5 to num_layers (its encoder's)


def hidden_width(model) -> int:
    return int(model.config.hidden_size)  # DistilBERT maps it to dim, T5 to d_model (both its stacks' width)


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def layer_stacks(model) -> dict[str, int]:
    """The model's layer stacks and their layer counts: {"": L} for a one-stack model (BERT, GPT-2, Llama);
    {"encoder": Le, "decoder": Ld} for an encoder-decoder (T5: num_layers and num_decoder_layers, which T5Config
    sets to num_layers when it is not given)."""
    if not is_encoder_decoder(model):
        return {"": num_layers(model)}
    config = model.config
    decoder = next((getattr(config, k) for k in ("num_decoder_layers", "decoder_layers")
                    if getattr(config, k, None) is not None), config.num_hidden_layers)
    return {"encoder": num_layers(model), "decoder": int(decoder)}


def uniform_layer_map(student_layers: int, teacher_layers: int, *, embeddings: bool) -> dict[int, int]:
    """Student layer k (1..Ls) -> teacher layer round(k * Lt / Ls), halves rounded up; plus 0 -> 0 (the embeddings).

    TinyBERT's g(m) = m * N / M, for any ratio: the last student layer always meets the last teacher layer.
    (2, 4) -> {0: 0, 1: 2, 2: 4}; (3, 12) -> {0: 0, 1: 4, 2: 8, 3: 12}.
    """
    ls, lt = student_layers, teacher_layers
    mapped = {k: (2 * k * lt + ls) // (2 * ls) for k in range(1, ls + 1)}  # integer half-up: no banker's rounding
    return {0: 0, **mapped} if embeddings else mapped


def resolve_layer_maps(method: str, layer_map: dict[int, int] | None, student, teacher, *, embeddings: bool,
                       decoder_layer_map: dict[int, int] | None = None) -> dict[str, dict[int, int]]:
    """One layer map per layer stack (see `layer_stacks`), each checked against the real layer counts or the uniform
    default, sorted by student index: {"": map} for a one-stack pair; {"encoder": map, "decoder": map} for an
    encoder-decoder pair, each student stack mapped to the teacher's stack of the same kind.

    `layer_map` applies to every stack (one map for both stacks of a T5 pair); `decoder_layer_map`, for
    encoder-decoders only, replaces it for the decoder. With `embeddings`, indices are hidden-state indices 0..L
    (0: the embeddings output, as in HF `output_hidden_states`); without, transformer layers 1..L.
    """
    pair = {"student": is_encoder_decoder(student), "teacher": is_encoder_decoder(teacher)}
    if pair["student"] != pair["teacher"]:
        two, one = sorted(pair, key=pair.get, reverse=True)
        raise KdbenchError(f"method {method!r}: the {two} is an encoder-decoder and the {one} is not; layer maps "
                           "pair stacks of the same kind, use the logit method")
    if decoder_layer_map is not None and not pair["student"]:
        raise KdbenchError(f"method {method!r}: params.decoder_layer_map is for encoder-decoder pairs (T5); this "
                           "pair has one layer stack, use params.layer_map")
    student_stacks, teacher_stacks = layer_stacks(student), layer_stacks(teacher)
    maps = {}
    for stack, ls in student_stacks.items():
        field, given = "layer_map", layer_map
        if stack == "decoder" and decoder_layer_map is not None:
            field, given = "decoder_layer_map", decoder_layer_map
        maps[stack] = _checked_layer_map(method, field, given, ls, teacher_stacks[stack], stack, embeddings)
    return maps


def _checked_layer_map(method, field, layer_map, ls, lt, stack, embeddings) -> dict[int, int]:
    if layer_map is None:
        return uniform_layer_map(ls, lt, embeddings=embeddings)
    if not layer_map:
        raise KdbenchError(f"method {method!r}: params.{field} is empty; leave it out for the uniform map")
    lo = 0 if embeddings else 1
    what = "hidden-state indices 0..{n}, 0 = embeddings" if embeddings else "layers 1..{n}"
    for side, index, n in [("student", s, ls) for s in layer_map] + [("teacher", t, lt) for t in layer_map.values()]:
        if not lo <= index <= n:
            whose = f"the {side}'s {stack}" if stack else f"the {side}"
            raise KdbenchError(f"method {method!r}: params.{field}: {side} index {index} is out of range "
                               f"({whose} has {n} layer{'s' * (n != 1)}: {what.format(n=n)})")
    return dict(sorted(layer_map.items()))


# The output fields of each stack: a one-stack model's, then an encoder-decoder's (T5's Seq2SeqLMOutput).
_STACK_OUTPUTS = {
    "hidden_states": {"": "hidden_states", "encoder": "encoder_hidden_states", "decoder": "decoder_hidden_states"},
    "attentions": {"": "attentions", "encoder": "encoder_attentions", "decoder": "decoder_attentions"},
}


def stack_output(out, what: str, stack: str):
    """`what` ("hidden_states" or "attentions") of one layer stack of model outputs `out`, or None."""
    return getattr(out, _STACK_OUTPUTS[what][stack], None)


class LayerMapped:
    """What `hidden` and `attention` share: `layer_maps` ({stack: {student index: teacher index}}, built by setup;
    see `resolve_layer_maps`) and the masks of each stack's positions."""

    method = "layer"
    layer_maps: dict[str, dict[int, int]] | None = None

    @property
    def layer_map(self) -> dict[int, int] | None:
        """The layer map of a one-stack pair, or the encoder's of an encoder-decoder pair (None before setup)."""
        return None if self.layer_maps is None else next(iter(self.layer_maps.values()))

    @property
    def decoder_layer_map(self) -> dict[int, int] | None:
        """The decoder's layer map of an encoder-decoder pair (None for a one-stack pair, or before setup)."""
        return None if self.layer_maps is None else self.layer_maps.get("decoder")

    def stacks(self) -> list[str]:
        if self.layer_maps is None:
            raise KdbenchError(f"method {self.method!r}: setup(student, teacher) was not called "
                               "(the Distiller calls it)")
        return list(self.layer_maps)

    @staticmethod
    def stack_masks(attention_mask, decoder_attention_mask) -> dict:
        """The mask of each stack's positions: the encoder's (and a one-stack model's) is the batch's
        attention_mask; the decoder's, the valid target positions (kdbench.trainer.decoder_token_mask)."""
        return {"": attention_mask, "encoder": attention_mask, "decoder": decoder_attention_mask}


def _token_mask(attention_mask, like):
    """(B, L) bool of real tokens; all True without a mask. A multiple-choice mask (B, C, L) is flattened to
    (B * C, L), as the model flattens its inputs."""
    import torch

    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return attention_mask.to(like.device).bool().reshape(like.shape[:2])


class HiddenParams(DistillationConfig):
    """Parameters of `hidden`: logit KD's, plus the feature weight and the layer map(s)."""

    feature_weight: float = Field(1.0, ge=0)
    # student hidden-state index -> teacher's; None: uniform, 0 -> 0. An encoder-decoder pair: both stacks' map.
    layer_map: dict[int, int] | None = None
    decoder_layer_map: dict[int, int] | None = None  # encoder-decoders: the decoder's own map (None: layer_map's)


def projection_key(stack: str, index: int) -> str:
    """The ModuleDict key of the projection of student hidden-state `index` of `stack`: "1", or "decoder_1"."""
    return f"{stack}_{index}" if stack else str(index)


@methods.register("hidden")
class HiddenStateKD(LayerMapped, Objective):
    """Hidden-state matching through learned projections (FitNets, TinyBERT layer map), plus logit KD.

    FitNets (Romero et al., 2015, "FitNets: Hints for Thin Deep Nets") regress a student layer onto a wider teacher
    layer through a learned regressor; TinyBERT (Jiao et al., 2020, "TinyBERT: Distilling BERT for Natural Language
    Understanding") matches every student layer, the embeddings included, to a teacher layer by the uniform map
    g(m) = m * N / M, through a learned W_h. Here, per mapped pair (s -> t) of hidden-state indices:

        f_s = W_s h_s + b_s   (one nn.Linear(student width -> teacher width) per mapped student index, always,
                               also when the widths are equal: the student's basis need not be the teacher's)
        loss = kd_loss(logits, teacher logits, labels, T, alpha, ...)   # logit KD + (1 - alpha) CE
               + feature_weight * mean over real tokens, mapped pairs and teacher width of (f_s - h_t)^2

    Padding tokens (attention_mask == 0) are left out: the features given to kd_loss are the real tokens of every
    pair, stacked: (num_real_tokens * num_pairs, teacher width). The projections are trained with the student and
    dropped after training. Hidden states are the post-LayerNorm block outputs (so the MSE starts near 1 whatever
    the widths); in training the student's carry its dropout.

    Encoder-decoder pairs (T5): each student stack is mapped to the teacher's stack of the same kind (encoder to
    encoder, decoder to decoder), each by the uniform map of its own layer counts, with one projection per mapped
    index per stack (d_model -> teacher d_model). `layer_map` applies to both stacks; `decoder_layer_map` gives the
    decoder its own. Encoder positions count where attention_mask is 1, decoder positions where the target has a
    label (the Distiller's decoder_attention_mask). The real tokens of both stacks are stacked into the one feature
    tensor, so the MSE is one mean over (encoder tokens * encoder pairs + target tokens * decoder pairs) rows. T5
    is pre-LayerNorm: its hidden states are the residual stream (0: the embeddings; L: after the final
    LayerNorm), as transformers returns them, so their scale is the model's own, not 1.

    YAML:
        methods:
          - name: hidden
            method: hidden
            params: {temperature: 4.0, alpha: 0.7, feature_weight: 1.0}   # uniform map (each stack's, for T5)
          - name: hidden-last
            method: hidden
            params: {feature_weight: 1.0, layer_map: {1: 2}}   # student layer 1 -> teacher layer 2 only
          - name: t5-hidden
            method: hidden
            params: {layer_map: {0: 0, 1: 2}, decoder_layer_map: {1: 2}}   # encoder, and decoder (T5 only)
    """

    Params = HiddenParams
    needs_hidden_states = True
    method = "hidden"  # the registry name, for messages (a subclass that reuses the projections sets its own)
    embeddings = True  # the layer map may name hidden-state index 0, the embeddings output

    def __init__(self, params: HiddenParams | None = None):
        self.params = params or HiddenParams()
        self.layer_maps = None
        self.modules = None

    def setup(self, student, teacher) -> None:
        import torch

        self.layer_maps = resolve_layer_maps(self.method, self.params.layer_map, student, teacher,
                                             embeddings=self.embeddings,
                                             decoder_layer_map=getattr(self.params, "decoder_layer_map", None))
        hs, ht = hidden_width(student), hidden_width(teacher)
        keys = [projection_key(stack, s) for stack, pairs in self.layer_maps.items() for s in pairs]
        built = self.modules
        if built is not None and list(built.keys()) == keys and all(
            (p.in_features, p.out_features) == (hs, ht) for p in built.values()
        ):
            return  # recovery after pruning: the trained projections go on (pruning keeps the hidden width)
        weight = next(student.parameters())
        self.modules = torch.nn.ModuleDict({k: torch.nn.Linear(hs, ht) for k in keys}).to(weight.device)

    def features(self, student_hidden, teacher_hidden, attention_mask=None, pairs: dict[int, int] | None = None,
                 stack: str = ""):
        """(student, teacher) features of the real tokens of every mapped pair: (R * P, H_teacher) each.

        student_hidden / teacher_hidden: HF `hidden_states` tuples of (B, L, H) (an encoder-decoder's
        `encoder_hidden_states` or `decoder_hidden_states`, with `stack` "encoder" or "decoder"); attention_mask
        (B, L) or None. `pairs`: part of the stack's layer map (default: all of it), e.g. the one pair of a
        progressive stage.
        """
        import torch

        self.stacks()  # fails unless set up
        keep = _token_mask(attention_mask, student_hidden[0])
        fs, ft = [], []
        for s, t in (self.layer_maps[stack] if pairs is None else pairs).items():
            fs.append(self.modules[projection_key(stack, s)](student_hidden[s][keep]))  # (R, H_s) -> (R, H_t)
            ft.append(teacher_hidden[t][keep])
        return torch.cat(fs), torch.cat(ft)

    def check_hidden_states(self, student_out, teacher_out) -> None:
        for stack in self.layer_maps or [""]:
            for who, out in (("student", student_out), ("teacher", teacher_out)):
                if not stack_output(out, "hidden_states", stack):
                    what = f"{stack} hidden states" if stack else "hidden states"
                    raise KdbenchError(f"method {self.method!r}: the {who} returned no {what} "
                                       "(a cached teacher, or a model without output_hidden_states)")

    def loss(self, student_out, teacher_out, labels, attention_mask=None, decoder_attention_mask=None):
        import torch

        p = self.params
        features = None
        if p.feature_weight != 0:
            stacks = self.stacks()
            self.check_hidden_states(student_out, teacher_out)
            masks = self.stack_masks(attention_mask, decoder_attention_mask)
            parts = [self.features(stack_output(student_out, "hidden_states", stack),
                                   stack_output(teacher_out, "hidden_states", stack), masks[stack], stack=stack)
                     for stack in stacks]
            fs, ft = (parts[0] if len(parts) == 1 else
                      (torch.cat([f for f, _ in parts]), torch.cat([f for _, f in parts])))
            features = (fs, ft, p.feature_weight)
        return self.logit_kd(student_out, teacher_out, labels, features)


class AttentionParams(DistillationConfig):
    """Parameters of `attention`: logit KD's, plus the feature weight, the layer map(s) (layers 1..L) and, for
    encoder-decoders, whether the decoder's cross-attention counts too."""

    feature_weight: float = Field(10.0, ge=0)
    # student layer (1..Ls) -> teacher layer (1..Lt); None: uniform. An encoder-decoder pair: both stacks' map.
    layer_map: dict[int, int] | None = None
    decoder_layer_map: dict[int, int] | None = None  # encoder-decoders: the decoder's own map (None: layer_map's)
    cross_attention: bool = True  # encoder-decoders: also match the mapped decoder layers' cross-attention maps


def attention_entries(student_attn, teacher_attn, pairs: dict[int, int], query_mask=None, key_mask=None, *,
                      causal: bool = False):
    """(student, teacher) head-averaged attention probabilities at the real (query, key) entries of every mapped
    pair of layers, as flat (M,) tensors, pairs in map order.

    student_attn / teacher_attn: tuples of (B, heads, Lq, Lk), layer k at index k - 1; query_mask (B, Lq) and
    key_mask (B, Lk); query_mask None: every query real; key_mask None: the query mask (self-attention). `causal`
    also leaves out the entries whose key comes after the query (a causal decoder's, which are 0 in both models).
    """
    import torch

    like = student_attn[0][:, 0]  # (B, Lq, Lk)
    query = _token_mask(query_mask, like)
    key = query if key_mask is None else _token_mask(key_mask, like.transpose(1, 2))
    entries = query[:, :, None] & key[:, None, :]  # (B, Lq, Lk): query and key both real
    if causal:
        entries = entries & torch.ones(like.shape[1:], dtype=torch.bool, device=like.device).tril()
    fs = [student_attn[s - 1].mean(1)[entries] for s in pairs]
    ft = [teacher_attn[t - 1].mean(1)[entries] for t in pairs.values()]
    return torch.cat(fs), torch.cat(ft)


@methods.register("attention")
class AttentionKD(LayerMapped, Objective):
    """Attention-map transfer (Zagoruyko & Komodakis 2017; TinyBERT attention loss), plus logit KD.

    Zagoruyko & Komodakis (2017, "Paying More Attention to Attention") make the student's attention maps match the
    teacher's; TinyBERT (Jiao et al., 2020) does it for Transformers with an MSE between the attention matrices of
    mapped layers. Here, per mapped pair (s -> t) of transformer layers (1..L, uniform map by default):

        A = attention probabilities of the layer, averaged over heads: (B, L, L)  (head counts differ between the
            models, and structured pruning removes heads)
        loss = kd_loss(logits, teacher logits, labels, T, alpha, ...)
               + feature_weight * mean over the real (query, key) entries of every pair of (A_s - A_t)^2

    Entries whose query or key is padding are left out, so the mean does not depend on how much a batch is padded:
    the features given to kd_loss are the real entries of every pair, stacked, as (M, 1). Probabilities are
    small numbers, so this MSE is too: 0.05 for a fresh student against the quickstart's fine-tuned teacher
    (measured; against a random teacher, whose maps are near uniform, 4e-7). The default feature_weight of 10 puts
    the attention term near the logit term there (0.5 vs 0.6). In training the student's maps carry its attention
    dropout (transformers returns the post-dropout probabilities).

    Encoder-decoder pairs (T5): the encoder's self-attention maps are matched over the encoder's layer map (real
    source query and key), the decoder's self-attention maps over the decoder's layer map (real target query and
    key, and only key <= query: the entries a causal decoder cannot attend are 0 in both models and left out), and,
    with `cross_attention` (the default), the decoder's cross-attention maps over the decoder's layer map too (real
    target query, real source key). Heads are averaged in each, as above. All entries of the three go into the one
    (M, 1) feature tensor, so the MSE is one mean over them. `layer_map` applies to both stacks;
    `decoder_layer_map` gives the decoder (and its cross-attention) its own.

    Attention maps need eager attention (SDPA returns none in transformers 5): while training, the Distiller
    switches both models to "eager" and back afterwards (kdbench.trainer.objective_attached).

    YAML:
        methods:
          - name: attention
            method: attention
            params: {temperature: 4.0, alpha: 0.7, feature_weight: 10.0}   # uniform map (each stack's, for T5)
          - name: attention-last
            method: attention
            params: {layer_map: {1: 2}}   # student layer 1 -> teacher layer 2
          - name: t5-self-attention
            method: attention
            params: {cross_attention: false}   # T5: encoder and decoder self-attention only
    """

    Params = AttentionParams
    needs_attentions = True
    method = "attention"

    def __init__(self, params: AttentionParams | None = None):
        self.params = params or AttentionParams()
        self.layer_maps = None

    def setup(self, student, teacher) -> None:
        self.layer_maps = resolve_layer_maps(self.method, self.params.layer_map, student, teacher, embeddings=False,
                                             decoder_layer_map=self.params.decoder_layer_map)

    def features(self, student_attn, teacher_attn, attention_mask=None):
        """(student, teacher) head-averaged attention probabilities at real (query, key) entries: (M, 1) each.

        student_attn / teacher_attn: HF `attentions` tuples of (B, heads, L, L) of a one-stack model, layer k at
        index k - 1. (An encoder-decoder's: `stack_features`.)
        """
        self.stacks()  # fails unless set up
        fs, ft = attention_entries(student_attn, teacher_attn, self.layer_map, attention_mask)
        return fs[:, None], ft[:, None]

    def outputs(self) -> list[tuple[str, str, str]]:
        """(output field, layer map's stack, mask kind) of every attention output the loss reads."""
        if self.stacks() == [""]:
            return [("attentions", "", "")]
        out = [("encoder_attentions", "encoder", "encoder"), ("decoder_attentions", "decoder", "decoder")]
        return out + ([("cross_attentions", "decoder", "cross")] if self.params.cross_attention else [])

    def stack_features(self, student_out, teacher_out, attention_mask=None, decoder_attention_mask=None):
        """(student, teacher) features of every attention output the loss reads (`outputs`), stacked: (M, 1) each.

        One-stack model: `features`. Encoder-decoder: encoder self-attention, decoder self-attention (causal
        entries only), then cross-attention (queries: real target positions; keys: real source positions)."""
        import torch

        fs, ft = [], []
        for field, stack, kind in self.outputs():
            student_attn, teacher_attn = getattr(student_out, field), getattr(teacher_out, field)
            pairs = self.layer_maps[stack]
            if kind in ("", "encoder"):
                s, t = attention_entries(student_attn, teacher_attn, pairs, attention_mask)
            elif kind == "decoder":
                s, t = attention_entries(student_attn, teacher_attn, pairs, decoder_attention_mask, causal=True)
            else:
                like = student_attn[0][:, 0]
                source = _token_mask(attention_mask, like.transpose(1, 2))  # (B, Ls): all real without a mask
                s, t = attention_entries(student_attn, teacher_attn, pairs, decoder_attention_mask, source)
            fs.append(s)
            ft.append(t)
        return torch.cat(fs)[:, None], torch.cat(ft)[:, None]

    def loss(self, student_out, teacher_out, labels, attention_mask=None, decoder_attention_mask=None):
        p = self.params
        features = None
        if p.feature_weight != 0:
            for field, _, _ in self.outputs():
                for who, out in (("student", student_out), ("teacher", teacher_out)):
                    attn = getattr(out, field, None)
                    if not attn or any(a is None for a in attn):
                        raise KdbenchError(f"method 'attention': the {who} returned no attention maps; it needs "
                                           "attn_implementation='eager' (SDPA returns none)")
            fs, ft = self.stack_features(student_out, teacher_out, attention_mask, decoder_attention_mask)
            features = (fs, ft, p.feature_weight)
        return self.logit_kd(student_out, teacher_out, labels, features)


# ---------------------------------------------------------------------------------------------------------------
# Progressive layer-by-layer transfer: a schedule of stages over the training steps


class ProgressiveParams(SoftTargets):  # no fused_linear: its layer stages read the student's logits
    """Parameters of `progressive`: logit KD's (the final stage), the layer stages' feature weight and layer map, and
    the share of the training steps that the final stage takes."""

    feature_weight: float = Field(1.0, gt=0)
    layer_map: dict[int, int] | None = None  # student layer (1..Ls) -> teacher layer (1..Lt); None: uniform
    decoder_layer_map: dict[int, int] | None = None  # encoder-decoders: the decoder's own map (None: layer_map's)
    final_fraction: float = Field(0.5, gt=0, le=1)  # of the steps, for the final logit stage; the rest: layer stages


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


_BLOCK_NAMES = ("layer", "layers", "h", "block", "blocks")


def transformer_blocks(model, method: str = "progressive"):
    """(name, ModuleList) of the model's transformer blocks, input side first.

    The one (outermost) ModuleList of exactly num_hidden_layers modules; where there are several, the one named
    layer, layers, h, block or blocks: `bert.encoder.layer` (BERT, RoBERTa, ELECTRA), `distilbert.transformer.layer`
    (DistilBERT), `transformer.h` (GPT-2), `model.layers` (Llama, Qwen). An encoder-decoder has two: an error.
    """
    import torch

    n = num_layers(model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    # Outermost lists only: a list inside a block that happens to have n entries (T5's sub-layers) is no candidate.
    found = [(name, m) for name, m in found if not any(name.startswith(f"{other}.") for other, _ in found)]
    named = [(name, m) for name, m in found if name.rsplit(".", 1)[-1] in _BLOCK_NAMES]
    pick = named if len(named) == 1 else found
    if n < 1 or len(pick) != 1:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        seen = f"found {len(pick)}: {', '.join(name for name, _ in pick)}" if pick else "found none"
        raise KdbenchError(f"method {method!r}: cannot find the transformer blocks of the {model_type!r} student "
                           f"(one ModuleList of its {n} layers; {seen})")
    return pick[0]


def stack_blocks(model, method: str = "progressive") -> dict:
    """{stack: ModuleList of its transformer blocks}, input side first: {"": blocks} for a one-stack model (see
    `transformer_blocks`); {"encoder": ..., "decoder": ...} for an encoder-decoder, each the one outermost
    ModuleList of the stack's layer count under the stack's module (T5: encoder.block, decoder.block; BART:
    model.encoder.layers, model.decoder.layers)."""
    import torch

    if not is_encoder_decoder(model):
        return {"": transformer_blocks(model, method)[1]}
    out = {}
    for stack, n in layer_stacks(model).items():
        found = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == n and stack in name.split(".")[:-1]]
        found = [(name, m) for name, m in found if not any(name.startswith(f"{other}.") for other, _ in found)]
        if n < 1 or len(found) != 1:
            model_type = getattr(model.config, "model_type", type(model).__name__)
            seen = f"found {len(found)}: {', '.join(name for name, _ in found)}" if found else "found none"
            raise KdbenchError(f"method {method!r}: cannot find the {stack} blocks of the {model_type!r} student "
                               f"(one ModuleList of its {n} {stack} layers; {seen})")
        out[stack] = found[0][1]
    return out


def stack_parameters(model, exclude=()) -> tuple[list, dict[str, list[list]], list]:
    """The model's parameters as (input side, {stack: [block 1, ..., block L]}, the rest), leaving out those in
    `exclude`.

    Input side: the parameters registered before the first block (the embeddings, ELECTRA's embedding projection,
    T5's shared embeddings); the rest: everything after it that is in no block (pooler, final norms, classifier,
    an encoder's final norm between its blocks and the decoder's). HF models register their modules in the order
    of the forward pass. A tied weight counts once, where it is first registered.
    """
    stacks = stack_blocks(model)
    block_of = {id(p): (stack, i) for stack, blocks in stacks.items() for i, block in enumerate(blocks)
                for p in block.parameters()}
    skip = {id(p) for p in exclude}
    before, per_stack, rest = [], {stack: [[] for _ in blocks] for stack, blocks in stacks.items()}, []
    for p in model.parameters():
        if id(p) in skip:
            continue
        if id(p) in block_of:
            stack, i = block_of[id(p)]
            per_stack[stack][i].append(p)
        else:
            (rest if any(any(b) for b in per_stack.values()) else before).append(p)
    return before, per_stack, rest


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
        # alpha = 0 and no labels: the logit terms are exactly 0, so the loss is this stage's feature MSE alone.
        return kd_loss(student_out.logits.detach(), teacher_out.logits, None, temperature=p.temperature, alpha=0.0,
                       divergence=p.divergence, beta=p.beta, student_features=fs, teacher_features=ft,
                       feature_weight=p.feature_weight)


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


def make_objective(name: str, params: dict) -> Objective:
    cls = methods.get(name)
    return cls(methods.validate_params(name, params))
