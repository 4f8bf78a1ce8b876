"""A pair's models, checked without training: each inline config is built and its model constructed on the meta
device (no memory, no weights), the attention heads divide the width, and the vocabularies fit the pair's tokenizer
and each other. A config transformers refuses would otherwise fail as a bug after the teacher has trained.

Pretrained models are checked only where that is cheap: a local folder's tokenizer is read; a hub name is left to
the run (it needs a network).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kdbench.errors import KdbenchError

# (width, heads) field pairs, in the names the config classes use; the first pair a config has is checked.
_WIDTH_HEADS = (("hidden_size", "num_attention_heads"), ("n_embd", "n_head"), ("dim", "n_heads"))


def build_config(ref, where: str):
    """The transformers config of an inline model `ref`, with every field it names; a refusal names `where`."""
    import transformers

    from kdbench.models import model_types

    cls = getattr(transformers, model_types.get(ref.model_type))
    try:
        return cls(**dict(ref.model_extra or {}))
    except Exception as e:  # config classes refuse bad values with ValueError, TypeError or their own types
        raise KdbenchError(f"{where}: {ref.model_type} config refused: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return " ".join(lines[:2]) if lines else type(e).__name__


def check_shape(config, where: str) -> None:
    """Attention heads divide the width (unless the config sets its own head size), key/value heads divide the
    heads, and every size is positive."""
    for width_key, heads_key in _WIDTH_HEADS:
        width, heads = getattr(config, width_key, None), getattr(config, heads_key, None)
        if isinstance(width, int) and isinstance(heads, int):
            if width <= 0 or heads <= 0:
                raise KdbenchError(f"{where}: {width_key} ({width}) and {heads_key} ({heads}) must be > 0")
            explicit_head_dim = getattr(config, "head_dim", None) not in (None, width // heads)
            if width % heads and not explicit_head_dim:
                raise KdbenchError(f"{where}: {width_key} {width} is not divisible by {heads_key} {heads}")
            kv = getattr(config, "num_key_value_heads", None)
            if isinstance(kv, int) and (kv <= 0 or heads % kv):
                raise KdbenchError(f"{where}: {heads_key} {heads} is not divisible by num_key_value_heads {kv}")
            break


def check_builds(config, where: str) -> None:
    """Construct the model on the meta device: whatever its constructor refuses is refused here, at no cost."""
    import torch
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            AutoModel.from_config(config)
    except Exception as e:
        raise KdbenchError(f"{where}: cannot build this {config.model_type} model: {_first_line(e)}") from None


def check_inline(ref, where: str) -> None:
    """Build, check and construct an inline config (its vocabulary is checked by check_vocabularies)."""
    config = build_config(ref, where)
    check_shape(config, where)
    check_builds(config, where)


def explicit_vocab(ref) -> int | None:
    return None if isinstance(ref, str) else (ref.model_extra or {}).get("vocab_size")


def tokenizer_size(teacher_ref, student_ref, texts: list[str] | None, where: str) -> int | None:
    """The size of the pair's tokenizer, made as the run makes it (kdbench.models.pair_tokenizer, which also checks
    that two pretrained models share one vocabulary and that an inline partner's vocab_size matches it), in a
    temporary folder so the run's cache is untouched. None where that is not cheap: a hub model's tokenizer needs
    a network, and a pair of inline models needs the training texts (`texts` None)."""
    from kdbench import models

    teachers = teacher_ref if isinstance(teacher_ref, list) else [teacher_ref]  # a pair's several teachers
    refs = [r for r in (*teachers, student_ref) if isinstance(r, str)]
    if any(not Path(r).expanduser().is_dir() for r in refs) or (not refs and texts is None):
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="kdbench-preflight-") as tmp:
            return len(models.pair_tokenizer(teacher_ref, student_ref, texts or [], Path(tmp), "preflight"))
    except KdbenchError as e:
        raise KdbenchError(f"{where}: {e}") from None


def check_vocabularies(teacher_ref, student_ref, tokenizer_size: int | None, where: str) -> None:
    """Teacher and student score the same vocabulary: their explicit vocab sizes agree with each other, and none
    is smaller than the tokenizer (its ids would index past the embedding). `teacher_ref` may be a list: a pair's
    several teachers, which must all agree."""
    teachers = teacher_ref if isinstance(teacher_ref, list) else [teacher_ref]
    roles = [("teacher" if len(teachers) == 1 else f"teachers.{i}", ref) for i, ref in enumerate(teachers)]
    sizes = {role: explicit_vocab(ref) for role, ref in (*roles, ("student", student_ref))}
    for role, size in sizes.items():
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise KdbenchError(f"{where}.{role}: vocab_size must be a positive integer, got {size!r}")
        if size is not None and tokenizer_size is not None and size < tokenizer_size:
            raise KdbenchError(f"{where}.{role}: vocab_size {size} is smaller than the pair's tokenizer "
                               f"({tokenizer_size} tokens); remove vocab_size to use the tokenizer's")
    effective = {role: size if size is not None else tokenizer_size for role, size in sizes.items()}
    known = [(role, size) for role, size in effective.items() if size is not None]
    for (role, size), (other, other_size) in zip(known, known[1:]):
        if size != other_size:
            raise KdbenchError(f"{where}: {role} vocab_size {size} and {other} vocab_size {other_size} differ; logit "
                               "distillation needs one vocabulary")


# The config fields that fix a classifier's label set; a task's teachers must agree on those that they name.
LABEL_FIELDS = ("num_labels", "id2label", "label2id")


def check_label_sets(teachers: list[tuple[str, object]], where: str) -> None:
    """Several teachers (`(role, model ref)`) score the same labels: the label fields that their inline configs
    or local folders' config.json name agree (a hub config needs a network: left to the run)."""
    named = [(role, labels) for role, ref in teachers if (labels := _label_fields(ref))]
    for (role, labels), (other, other_labels) in zip(named, named[1:]):
        for key in sorted(set(labels) & set(other_labels)):
            if labels[key] != other_labels[key]:
                raise KdbenchError(f"{where}: {role} and {other} have different label sets ({key} {labels[key]!r} vs "
                                   f"{other_labels[key]!r}); their soft targets must score the same labels")


def _label_fields(ref) -> dict:
    """The label fields a model reference names: an inline config's own, or a local folder's config.json labels
    unless they are transformers' defaults (LABEL_0, ...), which name nothing."""
    import json

    if isinstance(ref, str):
        path = Path(ref).expanduser() / "config.json"
        labels = json.loads(path.read_text()).get("id2label") if path.is_file() else None
        if not labels or all(v == f"LABEL_{k}" for k, v in labels.items()):
            return {}
        fields = {"id2label": labels}
    else:
        fields = dict(ref.model_extra or {})
    found = {key: fields[key] for key in LABEL_FIELDS if key in fields}
    if "id2label" in found:  # JSON keys are strings; an inline config may give ints
        found["id2label"] = {str(k): v for k, v in found["id2label"].items()}
        found.setdefault("num_labels", len(found["id2label"]))
    return found
