"""`attention`: attention-map transfer (Zagoruyko & Komodakis; TinyBERT's attention loss), plus logit KD."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.methods.base import DistillationConfig, Objective, methods
from kdbench.methods.layers import LayerMapped, resolve_layer_maps, token_mask


class AttentionParams(DistillationConfig):
    """Parameters of `attention`: logit KD's, plus the feature weight, the layer map(s) (layers 1..L) and, for
    encoder-decoders, whether the decoder's cross-attention counts too."""

    feature_weight: float = Field(10.0, ge=0)
    # student layer (1..Ls) -> teacher layer (1..Lt); None: uniform. An encoder-decoder pair: both stacks' map.
    layer_map: dict[int, int] | None = None
    decoder_layer_map: dict[int, int] | None = None  # encoder-decoders: the decoder's own map (None: layer_map's)
    cross_attention: bool = True  # encoder-decoders: also match the mapped decoder layers' cross-attention maps
    # mse: of the attention probabilities (below); kl: KL(teacher || student) per real query row (MiniLM;
    # kdbench.methods.feature_losses)
    attention_loss: Literal["mse", "kl"] = "mse"
    weight_terms: ClassVar[tuple[str, ...]] = ("ce", "soft", "attention")


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
    query = token_mask(query_mask, like)
    key = query if key_mask is None else token_mask(key_mask, like.transpose(1, 2))
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
    the attention term near the logit term there (0.5 vs 0.6). `attention_loss: kl` replaces the MSE by MiniLM's
    KL(A_t || A_s) per real query row over its real keys, averaged over the rows of every pair and output
    (formula in kdbench.methods.feature_losses). In training the student's maps carry its attention
    dropout (transformers returns the post-dropout probabilities).

    Encoder-decoder pairs (T5): the encoder's self-attention maps are matched over the encoder's layer map (real
    source query and key), the decoder's self-attention maps over the decoder's layer map (real target query and
    key, and only key <= query: the entries a causal decoder cannot attend are 0 in both models and left out), and,
    with `cross_attention` (the default), the decoder's cross-attention maps over the decoder's layer map too (real
    target query, real source key). Heads are averaged in each, as above. All entries of the three go into the one
    (M, 1) feature tensor, so the MSE is one mean over them. `layer_map` applies to both stacks;
    `decoder_layer_map` gives the decoder (and its cross-attention) its own.

    Attention maps need eager attention (SDPA returns none in transformers 5): while training, the Distiller
    switches both models to "eager" and back afterwards (kdbench.train.distiller.objective_attached).

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
                source = token_mask(attention_mask, like.transpose(1, 2))  # (B, Ls): all real without a mask
                s, t = attention_entries(student_attn, teacher_attn, pairs, decoder_attention_mask, source)
            fs.append(s)
            ft.append(t)
        return torch.cat(fs)[:, None], torch.cat(ft)[:, None]

    def stack_rows(self, student_out, teacher_out, attention_mask=None, decoder_attention_mask=None) -> list:
        """The real query rows of every attention output the loss reads (`outputs`), with the same masks as
        `stack_features`: a list of kdbench.methods.feature_losses.attention_rows results."""
        from kdbench.methods.feature_losses import attention_rows

        rows = []
        for field, stack, kind in self.outputs():
            student_attn, teacher_attn = getattr(student_out, field), getattr(teacher_out, field)
            pairs = self.layer_maps[stack]
            if kind in ("", "encoder"):
                rows.append(attention_rows(student_attn, teacher_attn, pairs, attention_mask))
            elif kind == "decoder":
                rows.append(attention_rows(student_attn, teacher_attn, pairs, decoder_attention_mask, causal=True))
            else:
                source = token_mask(attention_mask, student_attn[0][:, 0].transpose(1, 2))
                rows.append(attention_rows(student_attn, teacher_attn, pairs, decoder_attention_mask, source))
        return rows

    def loss(self, student_out, teacher_out, labels, attention_mask=None, decoder_attention_mask=None):
        p = self.params
        features = None
        weight = self.term_weight("attention")
        if weight != 0:
            for field, _, _ in self.outputs():
                for who, out in (("student", student_out), ("teacher", teacher_out)):
                    attn = getattr(out, field, None)
                    if not attn or any(a is None for a in attn):
                        raise KdbenchError(f"method 'attention': the {who} returned no attention maps; it needs "
                                           "attn_implementation='eager' (SDPA returns none)")
            if p.attention_loss == "kl":
                from kdbench.methods.feature_losses import attention_kl_loss

                rows = self.stack_rows(student_out, teacher_out, attention_mask, decoder_attention_mask)
                return self.logit_kd(student_out, teacher_out, labels) + weight * attention_kl_loss(rows)
            fs, ft = self.stack_features(student_out, teacher_out, attention_mask, decoder_attention_mask)
            features = (fs, ft, weight)
        return self.logit_kd(student_out, teacher_out, labels, features)
