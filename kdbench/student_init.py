"""A student made from its teacher's layers (DistilBERT's initialisation: every other layer of BERT).

`from_teacher(teacher, layers=[0, 2, 4])` copies the teacher's embeddings, the chosen transformer blocks in order,
its final norm and its head into a smaller model of the same class; `build_student` is what the runner calls for a
pair whose student is `{from_teacher: {...}}`. Blocks are found as the intermediate-layer methods find them
(kdbench.introspect.stack_blocks). A leaf over models.
"""

from __future__ import annotations

import copy
import logging

from kdbench import models
from kdbench.errors import KdbenchError

log = logging.getLogger(__name__)

WHERE = "student.from_teacher"

# The config fields that hold each stack's layer count, by family; the first one the config has is the one.
_COUNT_FIELDS = {
    "": ("n_layer", "n_layers", "num_hidden_layers"),  # GPT-2, DistilBERT, the rest (BERT, Llama, ...)
    "encoder": ("encoder_layers", "num_layers"),  # BART, T5
    "decoder": ("decoder_layers", "num_decoder_layers"),
}


def _indices(given, every, n: int, what: str) -> list[int]:
    """The block indices to keep out of `n`: `given` (a list) or 0, every, 2*every, ... (DistilBERT's choice)."""
    if given is not None:
        given = list(given)
        if not given:
            raise KdbenchError(f"{WHERE}: {what} is empty; name at least one of the teacher's {n} layers")
        bad = [i for i in given if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
        if bad:
            raise KdbenchError(f"{WHERE}: {what} index {bad[0]!r} is out of range; the teacher has {n} layers "
                               f"(0 to {n - 1})")
        if any(b <= a for a, b in zip(given, given[1:])):
            raise KdbenchError(f"{WHERE}: {what} {given} must be increasing, without repeats (blocks keep their order)")
        return given
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise KdbenchError(f"{WHERE}: every must be a whole number of at least 1, not {every!r}")
    return list(range(0, n, every))


def selection(teacher, *, layers=None, every=None, encoder_layers=None, decoder_layers=None) -> dict[str, list[int]]:
    """{stack: kept block indices} for the teacher's stacks ("" for a one-stack model; "encoder" and "decoder"),
    refusing a bad selection in one line. An encoder-decoder takes `encoder_layers` and `decoder_layers`, and
    `every` for a stack not listed (a stack given neither keeps all its layers); a one-stack model takes `layers`
    or `every`."""
    from kdbench.introspect import is_encoder_decoder, layer_stacks

    stacks = layer_stacks(teacher)
    if is_encoder_decoder(teacher):
        if layers is not None:
            raise KdbenchError(f"{WHERE}: an encoder-decoder teacher takes encoder_layers and decoder_layers, "
                               "not layers")
        given = {"encoder": encoder_layers, "decoder": decoder_layers}
        if all(v is None for v in given.values()) and every is None:
            raise KdbenchError(f"{WHERE}: give encoder_layers, decoder_layers or every")
        return {s: (_indices(given[s], every, n, f"{s}_layers") if given[s] is not None or every is not None
                    else list(range(n))) for s, n in stacks.items()}
    if encoder_layers is not None or decoder_layers is not None:
        raise KdbenchError(f"{WHERE}: encoder_layers and decoder_layers are for encoder-decoder teachers; "
                           "this one has one stack: give layers or every")
    if (layers is None) == (every is None):
        raise KdbenchError(f"{WHERE}: give exactly one of layers and every")
    return {"": _indices(layers, every, stacks[""], "layers")}


def check_selection(teacher_ref, spec) -> None:
    """Refuse a bad `from_teacher` selection while the suite loads, where the teacher's config can be read
    offline (an inline config, a local folder); a hub teacher's is checked when the student is built."""
    from pathlib import Path
    from types import SimpleNamespace

    if models.is_pretrained(teacher_ref):
        if not Path(teacher_ref).expanduser().exists():
            return
        config = models.load_config(teacher_ref)
    else:
        config = models._config_class(teacher_ref.model_type)(**(teacher_ref.model_extra or {}))
    selection(SimpleNamespace(config=config), **spec.model_dump(exclude_none=True))


def _owner(model, module):
    """(parent module, attribute name) under which `module` sits in `model`."""
    for name, m in model.named_modules():
        if m is module:
            parent, _, attr = name.rpartition(".")
            return model.get_submodule(parent), attr
    raise AssertionError("a block list found in the model is not one of its modules")


def _set_count(config, stack: str, k: int) -> None:
    field = next(f for f in _COUNT_FIELDS[stack] if f in config.to_dict())
    setattr(config, field, k)


def _renumber(block, index: int) -> None:
    # Attention modules hold their layer's index (the key/value cache slot; GPT-2's optional 1/layer scaling):
    # a kept block gets the index it has in the student, as a student built from its config would.
    for m in block.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            m.layer_idx = index


def _move_relative_bias(blocks, first_teacher_block) -> None:
    """T5 keeps its relative position bias in the first block's self-attention only: the student's first block
    gets the teacher's, and a kept block that had it (the teacher's first, kept further down) loses it."""
    source = first_teacher_block.layer[0].SelfAttention.relative_attention_bias
    for i, block in enumerate(blocks):
        attn = block.layer[0].SelfAttention
        if i == 0 and not attn.has_relative_attention_bias:
            attn.relative_attention_bias = copy.deepcopy(source)
        if i > 0 and attn.has_relative_attention_bias:
            del attn.relative_attention_bias
        attn.has_relative_attention_bias = i == 0


def from_teacher(teacher, *, layers=None, every=None, encoder_layers=None, decoder_layers=None):
    """A copy of `teacher` (a transformers model, left unchanged) that keeps only the chosen blocks, in order:
    same class, same embeddings, final norm and head, its config's layer counts (and per-layer lists such as
    `layer_types`) cut to match, so that it saves and loads back through the Auto classes."""
    import torch  # imported on use, as kdbench.introspect's torch: the CLI starts without it

    from kdbench.introspect import stack_blocks

    try:
        stack_blocks(teacher, "from_teacher")
    except KdbenchError:
        model_type = getattr(teacher.config, "model_type", None) or type(teacher).__name__
        raise KdbenchError(f"{WHERE}: kdbench cannot find the transformer blocks of the {model_type!r} teacher "
                           "(one ModuleList per layer stack), so it cannot copy its layers") from None
    keep = selection(teacher, layers=layers, every=every, encoder_layers=encoder_layers,
                     decoder_layers=decoder_layers)

    student = copy.deepcopy(teacher)
    teacher_blocks = stack_blocks(teacher, "from_teacher")
    for stack, blocks in stack_blocks(student, "from_teacher").items():
        parent, attr = _owner(student, blocks)
        kept = torch.nn.ModuleList(blocks[i] for i in keep[stack])
        setattr(parent, attr, kept)
        for j, block in enumerate(kept):
            _renumber(block, j)
        if hasattr(kept[0], "layer") and hasattr(kept[0].layer[0], "SelfAttention"):  # T5
            _move_relative_bias(kept, teacher_blocks[stack][0])
        if stack == "":
            _cut_per_layer_lists(student.config, keep[stack], len(teacher_blocks[stack]))
        _set_count(student.config, stack, len(kept))
        sub = getattr(parent, "config", None)
        if sub is not None and sub is not student.config and "num_layers" in sub.to_dict():
            sub.num_layers = len(kept)  # T5's stacks hold a copy of the config with their own layer count
    _check_like_fresh(student)
    return student


def _cut_per_layer_lists(config, kept: list[int], n: int) -> None:
    # transformers 5 configs may hold one entry per layer (Llama-style `layer_types`: full or sliding attention).
    for key in ("layer_types",):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(config, key, [value[i] for i in kept])


def _check_like_fresh(student) -> None:
    """The student must have the parameters and buffers a model built from its own config has, else it would not
    load back from a save: a family whose blocks hold state kdbench does not rewrite is refused, not half-copied."""
    import torch

    with torch.device("meta"):
        fresh = type(student)(copy.deepcopy(student.config))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise KdbenchError(f"{WHERE}: cannot copy the layers of the {student.config.model_type!r} teacher "
                           f"(its blocks hold per-layer state: {diff[0]})")


def build_student(pair, *, head, num_labels: int, vocab_size: int, seed: int, first_stage=None):
    """The pair's student, before training: built from its own model reference, or, for `from_teacher`, cut from
    the teacher as loaded (pretrained weights; before any fine-tuning) or built (an inline config, seeded); for
    `from_run`, the first stage's distilled student saved in the folder `first_stage`, given `head`'s model class:
    its encoder loads, and a head it lacks (a classifier on a masked LM) starts from the seed."""
    if first_stage is not None:
        import torch
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)  # the weights the saved model lacks are initialised from the run's seed
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists the new head and the first stage's unused one
        try:
            return models.build_model(str(first_stage), head=head, num_labels=num_labels, vocab_size=vocab_size,
                                      seed=seed)
        finally:
            hf_logging.set_verbosity(verbosity)
    if pair.student.from_run is not None:
        raise KdbenchError(f"pairs.{pair.name}.student.from_run: its first stage's folder is needed to build it")
    spec = pair.student.from_teacher
    if spec is None:
        return models.build_model(pair.student.model, head=head, num_labels=num_labels, vocab_size=vocab_size,
                                  seed=seed)
    if not models.is_pretrained(pair.teacher.model):
        log.warning("pairs.%s.student.from_teacher: the teacher is an inline config, so its layers are random and "
                    "the student inherits nothing from it", pair.name)
    teacher = models.build_model(pair.teacher.model, head=head, num_labels=num_labels, vocab_size=vocab_size,
                                 seed=seed)
    return from_teacher(teacher, **spec.model_dump(exclude_none=True))
