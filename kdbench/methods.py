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

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kdbench.errors import KdbenchError
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
    """Base: a loss over model outputs. Subclasses set what the forward passes must return.

    `modules` holds the objective's trainable parts (None: it has none). `setup` builds them for a student/teacher
    pair; the Distiller calls it before every training (a run's first one, and each recovery after pruning), so it
    must keep modules that it already built and that still fit the pair. An objective that needs hidden states or
    attentions is also given the batch's `attention_mask=` (B, L) by keyword, to leave padding out.
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

    def logit_kd(self, student_out, teacher_out, labels, features=None):
        """The logit terms every method shares (`self.params` is a DistillationConfig), plus an optional feature
        term `features` = (student_features, teacher_features, weight), all in one fused kd_loss call."""
        from kdbench.kernels import kd_loss

        p = self.params
        extra = {}
        if features is not None:
            fs, ft, weight = features
            extra = dict(student_features=fs, teacher_features=ft, feature_weight=weight)
        return kd_loss(
            student_out.logits, teacher_out.logits, labels,
            temperature=p.temperature, alpha=p.alpha, divergence=p.divergence, beta=p.beta, **extra,
        )


@methods.register("logit")
class LogitKD(Objective):
    """Logit KD with temperature: soft teacher targets plus hard-label cross-entropy."""

    Params = DistillationConfig

    def __init__(self, params: DistillationConfig | None = None):
        self.params = params or DistillationConfig()

    def loss(self, student_out, teacher_out, labels):
        return self.logit_kd(student_out, teacher_out, labels)


# ---------------------------------------------------------------------------------------------------------------
# Intermediate-layer methods: a layer map from student layers to teacher layers


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)  # DistilBERT maps it to n_layers


def hidden_width(model) -> int:
    return int(model.config.hidden_size)  # DistilBERT maps it to dim


def uniform_layer_map(student_layers: int, teacher_layers: int, *, embeddings: bool) -> dict[int, int]:
    """Student layer k (1..Ls) -> teacher layer round(k * Lt / Ls), halves rounded up; plus 0 -> 0 (the embeddings).

    TinyBERT's g(m) = m * N / M, for any ratio: the last student layer always meets the last teacher layer.
    (2, 4) -> {0: 0, 1: 2, 2: 4}; (3, 12) -> {0: 0, 1: 4, 2: 8, 3: 12}.
    """
    ls, lt = student_layers, teacher_layers
    mapped = {k: (2 * k * lt + ls) // (2 * ls) for k in range(1, ls + 1)}  # integer half-up: no banker's rounding
    return {0: 0, **mapped} if embeddings else mapped


def resolve_layer_map(method: str, layer_map: dict[int, int] | None, student, teacher, *,
                      embeddings: bool) -> dict[int, int]:
    """The user's layer map checked against the real layer counts, or the uniform default; sorted by student index.

    With `embeddings`, indices are hidden-state indices 0..L (0: the embeddings output, as in HF
    `output_hidden_states`); without, transformer layers 1..L.
    """
    ls, lt = num_layers(student), num_layers(teacher)
    if layer_map is None:
        return uniform_layer_map(ls, lt, embeddings=embeddings)
    if not layer_map:
        raise KdbenchError(f"method {method!r}: params.layer_map is empty; leave it out for the uniform map")
    lo = 0 if embeddings else 1
    what = "hidden-state indices 0..{n}, 0 = embeddings" if embeddings else "layers 1..{n}"
    for side, index, n in [("student", s, ls) for s in layer_map] + [("teacher", t, lt) for t in layer_map.values()]:
        if not lo <= index <= n:
            raise KdbenchError(f"method {method!r}: params.layer_map: {side} index {index} is out of range "
                               f"(the {side} has {n} layer{'s' * (n != 1)}: {what.format(n=n)})")
    return dict(sorted(layer_map.items()))


def _token_mask(attention_mask, like):
    """(B, L) bool of real tokens; all True without a mask."""
    import torch

    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return attention_mask.to(like.device).bool()


class HiddenParams(DistillationConfig):
    """Parameters of `hidden`: logit KD's, plus the feature weight and the layer map."""

    feature_weight: float = Field(1.0, ge=0)
    layer_map: dict[int, int] | None = None  # student hidden-state index -> teacher's; None: uniform, 0 -> 0


@methods.register("hidden")
class HiddenStateKD(Objective):
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

    YAML:
        methods:
          - name: hidden
            method: hidden
            params: {temperature: 4.0, alpha: 0.7, feature_weight: 1.0}   # uniform map
          - name: hidden-last
            method: hidden
            params: {feature_weight: 1.0, layer_map: {1: 2}}   # student layer 1 -> teacher layer 2 only
    """

    Params = HiddenParams
    needs_hidden_states = True

    def __init__(self, params: HiddenParams | None = None):
        self.params = params or HiddenParams()
        self.layer_map: dict[int, int] | None = None
        self.modules = None

    def setup(self, student, teacher) -> None:
        import torch

        self.layer_map = resolve_layer_map("hidden", self.params.layer_map, student, teacher, embeddings=True)
        hs, ht = hidden_width(student), hidden_width(teacher)
        keys = [str(s) for s in self.layer_map]
        built = self.modules
        if built is not None and list(built.keys()) == keys and all(
            (p.in_features, p.out_features) == (hs, ht) for p in built.values()
        ):
            return  # recovery after pruning: the trained projections go on (pruning keeps the hidden width)
        weight = next(student.parameters())
        self.modules = torch.nn.ModuleDict({k: torch.nn.Linear(hs, ht) for k in keys}).to(weight.device)

    def features(self, student_hidden, teacher_hidden, attention_mask=None):
        """(student, teacher) features of the real tokens of every mapped pair: (R * P, H_teacher) each.

        student_hidden / teacher_hidden: HF `hidden_states` tuples of (B, L, H); attention_mask (B, L) or None.
        """
        import torch

        if self.modules is None:
            raise KdbenchError("method 'hidden': setup(student, teacher) was not called (the Distiller calls it)")
        keep = _token_mask(attention_mask, student_hidden[0])
        fs, ft = [], []
        for s, t in self.layer_map.items():
            fs.append(self.modules[str(s)](student_hidden[s][keep]))  # (R, H_s) -> (R, H_t)
            ft.append(teacher_hidden[t][keep])
        return torch.cat(fs), torch.cat(ft)

    def loss(self, student_out, teacher_out, labels, attention_mask=None):
        p = self.params
        features = None
        if p.feature_weight != 0:
            for who, out in (("student", student_out), ("teacher", teacher_out)):
                if not getattr(out, "hidden_states", None):
                    raise KdbenchError(f"method 'hidden': the {who} returned no hidden states "
                                       "(a cached teacher, or a model without output_hidden_states)")
            fs, ft = self.features(student_out.hidden_states, teacher_out.hidden_states, attention_mask)
            features = (fs, ft, p.feature_weight)
        return self.logit_kd(student_out, teacher_out, labels, features)


class AttentionParams(DistillationConfig):
    """Parameters of `attention`: logit KD's, plus the feature weight and the layer map (layers 1..L)."""

    feature_weight: float = Field(10.0, ge=0)
    layer_map: dict[int, int] | None = None  # student layer (1..Ls) -> teacher layer (1..Lt); None: uniform


@methods.register("attention")
class AttentionKD(Objective):
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

    Attention maps need eager attention (SDPA returns none in transformers 5): while training, the Distiller
    switches both models to "eager" and back afterwards (kdbench.trainer.objective_attached).

    YAML:
        methods:
          - name: attention
            method: attention
            params: {temperature: 4.0, alpha: 0.7, feature_weight: 10.0}   # uniform map
          - name: attention-last
            method: attention
            params: {layer_map: {1: 2}}   # student layer 1 -> teacher layer 2
    """

    Params = AttentionParams
    needs_attentions = True

    def __init__(self, params: AttentionParams | None = None):
        self.params = params or AttentionParams()
        self.layer_map: dict[int, int] | None = None

    def setup(self, student, teacher) -> None:
        self.layer_map = resolve_layer_map("attention", self.params.layer_map, student, teacher, embeddings=False)

    def features(self, student_attn, teacher_attn, attention_mask=None):
        """(student, teacher) head-averaged attention probabilities at real (query, key) entries: (M, 1) each.

        student_attn / teacher_attn: HF `attentions` tuples of (B, heads, L, L), layer k at index k - 1.
        """
        import torch

        if self.layer_map is None:
            raise KdbenchError("method 'attention': setup(student, teacher) was not called (the Distiller calls it)")
        keep = _token_mask(attention_mask, student_attn[0][:, 0])
        pair = keep[:, :, None] & keep[:, None, :]  # (B, L, L): query and key both real
        fs = [student_attn[s - 1].mean(1)[pair] for s in self.layer_map]
        ft = [teacher_attn[t - 1].mean(1)[pair] for t in self.layer_map.values()]
        return torch.cat(fs)[:, None], torch.cat(ft)[:, None]

    def loss(self, student_out, teacher_out, labels, attention_mask=None):
        p = self.params
        features = None
        if p.feature_weight != 0:
            for who, out in (("student", student_out), ("teacher", teacher_out)):
                attn = getattr(out, "attentions", None)
                if not attn or any(a is None for a in attn):
                    raise KdbenchError(f"method 'attention': the {who} returned no attention maps; it needs "
                                       "attn_implementation='eager' (SDPA returns none)")
            fs, ft = self.features(student_out.attentions, teacher_out.attentions, attention_mask)
            features = (fs, ft, p.feature_weight)
        return self.logit_kd(student_out, teacher_out, labels, features)


def make_objective(name: str, params: dict) -> Objective:
    cls = methods.get(name)
    return cls(methods.validate_params(name, params))
