"""Saving and loading compressed variants.

`save_variant` writes `save_pretrained` safetensors where it can. torchao's quantized tensor subclasses are not
safetensors-serialisable, so quantized variants are pickled whole with `torch.save` (load them only in the same
environment: the pickle names transformers and torchao classes). Head-pruned models save with `save_variant` and
load with `load_variant`, not with plain `save_pretrained` / `from_pretrained` (see PruneStructured).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from kdbench.compress.layout import HEAD_DIM_KEY, LAYOUTS, UNPRUNED_HEADS_KEY, blocks_of, head_counts
from kdbench.compress.prune import prune_heads
from kdbench.errors import KdbenchError
from kdbench.introspect import drop_instance_reprs, is_quantized_model

VARIANT_FILE = "kdbench_variant.json"  # {"format": "safetensors" | "torch.save"}
PICKLE_FILE = "model.pt"


def save_variant(model: torch.nn.Module, path: str | Path) -> dict:
    """Save a (compressed) model to directory `path`: `save_pretrained` safetensors, or a whole-model pickle
    (`torch.save`) when its weights are tensor subclasses that safetensors cannot hold. Returns {"format"}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if is_quantized_model(model):
        drop_instance_reprs(model)
        torch.save(model, path / PICKLE_FILE)
        if hasattr(config, "save_pretrained"):
            config.architectures = [type(model).__name__]
            with _unpruned_heads(config):
                config.save_pretrained(path)  # for people and tools that read config.json
        fmt = "torch.save"
    else:
        with _unpruned_heads(config):
            model.save_pretrained(path)
        fmt = "safetensors"
    if getattr(config, UNPRUNED_HEADS_KEY, None):
        config.to_json_file(path / "config.json", use_diff=True)  # the real, pruned head counts
    (path / VARIANT_FILE).write_text(json.dumps({"format": fmt}))
    return {"format": fmt}


@contextlib.contextmanager
def _unpruned_heads(config):
    """Inside, a head-pruned config holds its head counts from before pruning. `save_pretrained` validates the
    config, and Llama's validator demands hidden % heads == 0, which head pruning breaks on purpose; save_variant
    then writes the real counts with `to_json_file`, which does not validate."""
    before = getattr(config, UNPRUNED_HEADS_KEY, None) or {}
    pruned = {field: getattr(config, field) for field in before}
    for field, value in before.items():
        setattr(config, field, value)
    try:
        yield
    finally:
        for field, value in pruned.items():
            setattr(config, field, value)


def load_variant(path: str | Path, *, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load what `save_variant` (or `save_pretrained`) wrote, head-pruned models included, in eval mode."""
    path = Path(path)
    meta = json.loads((path / VARIANT_FILE).read_text()) if (path / VARIANT_FILE).exists() else {}
    if meta.get("format") == "torch.save":
        # Our own artifact, written by save_variant: a whole-module pickle is the only format torchao's
        # subclasses round-trip through.
        model = torch.load(path / PICKLE_FILE, map_location=device, weights_only=False)
        return model.eval()
    return _load_pretrained(path).to(device).eval()


def _load_pretrained(path: Path) -> torch.nn.Module:
    import transformers
    from safetensors.torch import load_file

    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    archs = raw.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise KdbenchError(f"cannot load {path}: its config.json names no known transformers architecture ({archs})")
    if not raw.get(UNPRUNED_HEADS_KEY):
        return cls.from_pretrained(path)

    # Head-pruned. The stock config class misreads the pruned head count (BERT, GPT-2: head dim = hidden / heads)
    # or refuses it (Llama: hidden % heads), so: build the model with its head counts from before pruning, cut the
    # same number of heads from every block (which ones does not matter: the weights are loaded next), give the
    # config the pruned counts, then load the weights.
    layout = LAYOUTS.get(raw.get("model_type"))
    if layout is None:
        raise KdbenchError(f"cannot load {path}: head-pruned model_type {raw.get('model_type')!r} is not supported")
    model = cls(cls.config_class.from_dict({**raw, **raw[UNPRUNED_HEADS_KEY]}))
    heads, kv_heads = head_counts(model.config, layout)
    pruned = {field: raw[field] for field in raw[UNPRUNED_HEADS_KEY]}
    new_kv = pruned.get(layout.kv_heads_field, pruned[layout.heads_field] * kv_heads // heads)
    with torch.no_grad():
        for block in blocks_of(model, "load")[1]:
            prune_heads(block, layout, heads, kv_heads, raw[HEAD_DIM_KEY], kv_heads - new_kv)
    # Submodules may hold their own config object: give each the pruned head counts.
    for cfg in {id(c): c for c in [model.config] + [getattr(m, "config", None) for m in model.modules()] if c}.values():
        if getattr(cfg, "model_type", None) == raw["model_type"]:
            for field, value in pruned.items():
                setattr(cfg, field, value)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise KdbenchError(f"cannot load {path}: no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise KdbenchError(f"cannot load {path}: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
