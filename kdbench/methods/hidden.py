"""`hidden`: hidden-state matching through learned projections (FitNets, TinyBERT), plus logit KD."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.methods.base import DistillationConfig, Objective, methods
from kdbench.methods.layers import LayerMapped, resolve_layer_maps, stack_output, token_mask


class HiddenParams(DistillationConfig):
    """Parameters of `hidden`: logit KD's, plus the feature weight and the layer map(s)."""

    feature_weight: float = Field(1.0, ge=0)
    # student hidden-state index -> teacher's; None: uniform, 0 -> 0. An encoder-decoder pair: both stacks' map.
    layer_map: dict[int, int] | None = None
    decoder_layer_map: dict[int, int] | None = None  # encoder-decoders: the decoder's own map (None: layer_map's)
    # mse: kd_loss's feature MSE (below); cosine: 1 - cos per real token and pair (DistilBERT; methods.feature_losses)
    feature_loss: Literal["mse", "cosine"] = "mse"
    weight_terms: ClassVar[tuple[str, ...]] = ("ce", "soft", "hidden")


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
    pair, stacked: (num_real_tokens * num_pairs, teacher width). `feature_loss: cosine` replaces the MSE by the mean
    over those rows of 1 - cos(f_s, h_t) (DistilBERT's cosine loss; formula in kdbench.methods.feature_losses). The
    projections are trained with the student and dropped after training. Hidden states are the post-LayerNorm
    block outputs (so the MSE starts near 1 whatever the widths); in training the student's carry its dropout.

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

        from kdbench.introspect import hidden_width

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
        keep = token_mask(attention_mask, student_hidden[0])
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
        weight = self.term_weight("hidden")
        if weight != 0:
            stacks = self.stacks()
            self.check_hidden_states(student_out, teacher_out)
            masks = self.stack_masks(attention_mask, decoder_attention_mask)
            parts = [self.features(stack_output(student_out, "hidden_states", stack),
                                   stack_output(teacher_out, "hidden_states", stack), masks[stack], stack=stack)
                     for stack in stacks]
            fs, ft = (parts[0] if len(parts) == 1 else
                      (torch.cat([f for f, _ in parts]), torch.cat([f for _, f in parts])))
            if p.feature_loss == "cosine":
                from kdbench.methods.feature_losses import cosine_feature_loss

                return self.logit_kd(student_out, teacher_out, labels) + weight * cosine_feature_loss(fs, ft)
            features = (fs, ft, weight)
        return self.logit_kd(student_out, teacher_out, labels, features)
