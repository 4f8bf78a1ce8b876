"""The feature terms other than MSE: cosine on hidden states (DistilBERT) and KL between attention maps (MiniLM).

Their formulas are written here once; `hidden`, `progressive` (feature_loss: cosine) and `attention`
(attention_loss: kl) cite them. MSE, the default of both, stays in kdbench.kernels.kd_loss's feature term.

cosine (Sanh et al., 2019, "DistilBERT, a distilled version of BERT"; its cosine embedding loss between the
student's and the teacher's hidden states):

    L_cos = mean over rows r of (1 - <f_s[r], h_t[r]> / (|f_s[r]| |h_t[r]|))

    rows: the real tokens (attention_mask 1; a decoder's valid target positions) of every mapped pair of layers,
    stacked, as `HiddenStateKD.features` gives them (f_s is the student's state through its learned projection).
    A zero vector has cosine 0 (torch's eps = 1e-8 on the norms).

kl (Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
Transformers"; its self-attention distribution transfer, KL(teacher || student) per query):

    A = attention probabilities of a layer, averaged over heads: (B, Lq, Lk)
    L_kl = mean over mapped pairs and real queries q of
           sum over real keys k of A_t[q, k] (log A_t[q, k] - log A_s[q, k])

    A query is real where its mask is 1; a key where its mask is 1 (and, for a causal decoder, k <= q). MiniLM
    compares the heads one by one (teacher and student with the same head count); kdbench compares the head
    averages, as its MSE does, so that the head counts may differ and structured pruning may remove heads. The
    head average of distributions is a distribution, so the KL is >= 0 and 0 exactly when the averages agree.
"""

from __future__ import annotations

from kdbench.methods.layers import token_mask


def _at_least_fp32(x):
    import torch

    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 in fp32, fp64 stays fp64


def cosine_feature_loss(student_features, teacher_features):
    """L_cos (above) of (R, H) student and teacher features; the teacher's carry no gradient. A scalar."""
    import torch.nn.functional as F

    fs, ft = _at_least_fp32(student_features), _at_least_fp32(teacher_features).detach()
    return (1.0 - F.cosine_similarity(fs, ft, dim=-1)).mean()


def attention_rows(student_attn, teacher_attn, pairs: dict[int, int], query_mask=None, key_mask=None, *,
                   causal: bool = False):
    """(student rows, teacher rows, real keys): the head-averaged attention rows of the real queries of every mapped
    pair of layers, (R, Lk) each, and which of their keys are real, (R, Lk) bool.

    student_attn / teacher_attn: tuples of (B, heads, Lq, Lk), layer k at index k - 1; masks as in
    kdbench.methods.attention.attention_entries (key_mask None: the query mask)."""
    import torch

    like = student_attn[0][:, 0]  # (B, Lq, Lk)
    query = token_mask(query_mask, like)
    key = query if key_mask is None else token_mask(key_mask, like.transpose(1, 2))
    keys = key[:, None, :].expand(like.shape)  # (B, Lq, Lk)
    if causal:
        keys = keys & torch.ones(like.shape[1:], dtype=torch.bool, device=like.device).tril()
    s = torch.cat([student_attn[i - 1].mean(1)[query] for i in pairs])
    t = torch.cat([teacher_attn[j - 1].mean(1)[query] for j in pairs.values()])
    return s, t, torch.cat([keys[query]] * len(pairs))


def attention_kl_loss(rows: list[tuple]):
    """L_kl (above) over `rows`, a list of `attention_rows` results (one per attention output the loss reads),
    averaged over all their rows together. A scalar."""
    import torch

    s = _at_least_fp32(torch.cat([r[0] for r in rows]))
    t = _at_least_fp32(torch.cat([r[1] for r in rows])).detach()
    keys = torch.cat([r[2] for r in rows])
    tiny = torch.finfo(s.dtype).tiny  # a student probability that underflowed to 0: a large, finite term
    terms = torch.xlogy(t, t) - t * torch.log(s.clamp_min(tiny))
    return torch.where(keys, terms, torch.zeros_like(terms)).sum(-1).mean()
