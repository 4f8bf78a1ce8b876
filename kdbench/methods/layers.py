"""Layer maps for the intermediate-layer methods: which student layer learns from which teacher layer, per stack.

A one-stack model (BERT, GPT-2, Llama) has one map; an encoder-decoder (T5) one per stack, each student stack
mapped to the teacher's stack of the same kind. Also the model-output fields of each stack and the token masks.
"""

from __future__ import annotations

from kdbench.errors import KdbenchError


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
    from kdbench.introspect import is_encoder_decoder, layer_stacks  # torch: loaded when a model is there

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
        attention_mask; the decoder's, the valid target positions (kdbench.train.distiller.decoder_token_mask)."""
        return {"": attention_mask, "encoder": attention_mask, "decoder": decoder_attention_mask}


def token_mask(attention_mask, like):
    """(B, L) bool of real tokens; all True without a mask. A multiple-choice mask (B, C, L) is flattened to
    (B * C, L), as the model flattens its inputs."""
    import torch

    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return attention_mask.to(like.device).bool().reshape(like.shape[:2])
