"""Models and tokenizers: inline tiny configs, local folders and hub names, all through the Auto classes.

A model reference in a suite is either a string (a local folder if one exists at that path, else a hub name)
or an inline config: `model_type` plus config fields. Tiny configs share a WordPiece tokenizer trained on the
task's training split, so teacher and student always agree on the vocabulary.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

log = logging.getLogger(__name__)

# Model families that an inline config may name, with the config class that builds them. The model class comes
# from the task's head (kdbench.heads): AutoModelForSequenceClassification, AutoModelForCausalLM, ...
model_types: Registry = Registry("model type")
for _name, _cls in (("bert", "BertConfig"), ("distilbert", "DistilBertConfig"), ("roberta", "RobertaConfig"),
                    ("gpt2", "GPT2Config"), ("llama", "LlamaConfig"), ("t5", "T5Config")):
    model_types.register(_name)(_cls)


def model_inputs(batch: dict, *models) -> dict:
    """Keep only the keys every model's forward accepts (DistilBERT takes no token_type_ids)."""
    accepted = None
    for m in models:
        m = getattr(m, "module", getattr(m, "_orig_mod", m))  # DDP and torch.compile wrappers hide the signature
        # a wrapper of several models (kdbench.train.ensemble) names what its forward passes on
        params = getattr(m, "forward_inputs", None) or set(inspect.signature(m.forward).parameters)
        accepted = params if accepted is None else accepted & params
    return {k: v for k, v in batch.items() if k in accepted}


def _config_class(model_type: str):
    import transformers

    return getattr(transformers, model_types.get(model_type))


def check_model_ref(ref, where: str) -> None:
    """Fail early on an unknown model type, an unknown config field, or a local path that does not exist."""
    if isinstance(ref, str):
        looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1
        if looks_local and not Path(ref).expanduser().exists():
            raise KdbenchError(f"{where}: model path not found: {ref}")
        return
    fields = dict(ref.model_extra or {})
    try:
        cls = _config_class(ref.model_type)
    except KdbenchError as e:
        raise KdbenchError(f"{where}: {e}") from None
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    if getattr(cls(), "is_encoder_decoder", False):
        known.add("decoder_start_token_id")  # read by seq2seq models, but no field of T5Config in transformers 5
    unknown = sorted(set(fields) - known)
    if unknown:
        raise KdbenchError(f"{where}: unknown {ref.model_type} config field {unknown[0]!r}")


_LAYER_FIELDS, _WIDTH_FIELDS = ("num_hidden_layers", "n_layers", "n_layer", "num_layers"), ("hidden_size", "dim",
                                                                                             "n_embd", "d_model")


def describe(ref) -> str:
    """A model reference in a few characters: a hub name or path as it is, an inline config as `bert 2L/64H`."""
    if isinstance(ref, str):
        return ref
    return _shape(ref.model_type, ref.model_extra or {})


def describe_model(model) -> str:
    """A built model as `bert 1L/64H`, from its config: what a student made of its teacher's layers really is."""
    config = model.config.to_dict()
    return _shape(config.get("model_type", type(model).__name__), config)


def _shape(model_type: str, fields: dict) -> str:
    layers = next((fields[k] for k in _LAYER_FIELDS if k in fields), "?")
    width = next((fields[k] for k in _WIDTH_FIELDS if k in fields), "?")
    return f"{model_type} {layers}L/{width}H"


def is_pretrained(ref) -> bool:
    return isinstance(ref, str)


def _from_pretrained(loader, ref: str, **kwargs):
    path = Path(ref).expanduser()
    try:
        return loader.from_pretrained(str(path) if path.exists() else ref, **kwargs)
    except (OSError, ValueError) as e:  # a local folder without weights is an OSError, a bad config.json a ValueError
        if path.exists():
            raise KdbenchError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
        if isinstance(e, ValueError):
            raise
        raise KdbenchError(
            f"model {ref!r} is not a local folder and cannot be fetched from the hub "
            "(needs a network, or give a local path)"
        ) from None


def load_config(ref: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, ref)


def decoder_start_token_id(ref, tokenizer) -> int:
    """The token an encoder-decoder model starts its decoder with: its config's `decoder_start_token_id` (a
    pretrained model's, or one an inline config names), else the tokenizer's pad token (T5's convention, which
    build_model gives inline configs)."""
    if is_pretrained(ref):
        start = getattr(load_config(ref), "decoder_start_token_id", None)
    else:
        start = (ref.model_extra or {}).get("decoder_start_token_id")
    if start is not None:
        return int(start)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, ref)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # GPT-2 and Llama tokenizers have none; padded positions are masked anyway
    return tok


def train_tokenizer(texts: list[str], vocab_size: int, save_dir: Path):
    """A WordPiece tokenizer for `texts` (cached in `save_dir`), wrapped for transformers.

    The vocabulary is every character (alone and as a `##` continuation) plus the most frequent words, ties broken
    alphabetically, so any word still tokenizes and the same texts always give the same ids. tokenizers' own
    WordPieceTrainer breaks ties between equally frequent merges in hash-map order, which changes from process to
    process: the same data gave different vocabularies, hence different metrics for the same seed (measured).
    """
    from transformers import PreTrainedTokenizerFast

    if (save_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(save_dir))
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    chars = sorted({c for word in counts for c in word})
    alphabet = chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab = special + alphabet + words[: max(vocab_size - len(special) - len(alphabet), 0)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    from kdbench import distributed

    if distributed.is_main():  # data parallel: every rank trains this same tokenizer; rank 0 alone caches it
        save_atomically(save_dir, lambda tmp: fast.save_pretrained(str(tmp)))
    return fast


def save_atomically(folder: Path, write) -> None:
    """Make `folder` with `write(tmp)`, which fills a temporary folder beside it, then a rename, so that no reader
    (a resumed suite, another process of a data-parallel launch) sees half a save; if another process saved it
    first, its copy stays."""
    import os
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not folder.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pair_tokenizer(teacher_ref, student_ref, train_texts: list[str], cache_dir: Path, cache_key: str,
                   vocab_size: int = 2000):
    """The one tokenizer a pair shares. Pretrained models bring theirs; all must have the same vocabulary.
    `teacher_ref` may be a list: a pair's several teachers, which share it too."""
    teachers = teacher_ref if isinstance(teacher_ref, list) else [teacher_ref]
    roles = [("teacher" if len(teachers) == 1 else f"teachers[{i}]", ref) for i, ref in enumerate(teachers)]
    roles.append(("student", student_ref))
    pretrained = {role: ref for role, ref in roles if is_pretrained(ref)}
    if not pretrained:
        return train_tokenizer(train_texts, vocab_size, cache_dir / "tokenizers" / cache_key)
    toks = {role: load_tokenizer(ref) for role, ref in pretrained.items()}
    (first, tok), *others = toks.items()
    for role, other in others:
        if tok.get_vocab() != other.get_vocab():
            raise KdbenchError(
                f"{first} {pretrained[first]!r} and {role} {pretrained[role]!r} have different vocabularies "
                f"({len(tok)} vs {len(other)} tokens); logit distillation needs a shared tokenizer"
            )
    for role, ref in roles:
        size = None if is_pretrained(ref) else (ref.model_extra or {}).get("vocab_size")
        if size is not None and size != len(tok):
            raise KdbenchError(f"{role} vocab_size {size} differs from the pair's tokenizer ({len(tok)} tokens)")
    return tok


# What `head=None` builds: the classification head's model, named here so that models import no head.
CLASSIFIER_KIND, CLASSIFIER_CLASS = "classification", "AutoModelForSequenceClassification"


def _auto_class(head):
    import transformers

    return getattr(transformers, head.auto_class if head is not None else CLASSIFIER_CLASS)


def build_model(ref, *, head=None, num_labels: int, vocab_size: int, seed: int, attention_maps: bool = False):
    """The model a task's head needs (kdbench.heads): fresh from an inline config, or pretrained (a classifier gets
    a new head of `num_labels`; a causal LM keeps its own). `head=None` is a classifier."""
    import torch

    auto = _auto_class(head)
    extra: dict[str, Any] = {"attn_implementation": "eager"} if attention_maps else {}
    kind = head.kind if head is not None else CLASSIFIER_KIND
    labelled = {"num_labels": num_labels} if kind == CLASSIFIER_KIND else {}
    if is_pretrained(ref):
        if labelled:
            extra["ignore_mismatched_sizes"] = True
        return _from_pretrained(auto, ref, **labelled, **extra)
    fields = dict(ref.model_extra or {})
    fields.setdefault("vocab_size", vocab_size)
    config = _config_class(ref.model_type)(**labelled, **fields)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id  # T5's convention; tiny configs lack it (transformers 5)
    torch.manual_seed(seed)  # initial weights depend on the run seed only
    return auto.from_config(config, **extra)


def load_saved(path: Path, head=None):
    return _auto_class(head).from_pretrained(str(path))
