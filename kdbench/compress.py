"""Compressors: make smaller or faster variants of a distilled student.

Each compressor is a registry entry (a class) with its own pydantic `Params`; a suite names it by key:

    compression:
      - name: pruned+int8
        steps: [{compressor: prune_structured, params: {amount: 0.25}}, {compressor: int8}]
        recover_steps: 100   # distil the pruned student for 100 steps before it is quantized

`compressors.get(name)(params).apply(model, device=...)` changes `model` in place and returns an info dict
(what was done, e.g. `{"sparsity": 0.5}`). `apply_variant` runs a list of steps in order on a copy.

Order matters: prune first, then quantize or cast. Pruning needs plain float weights and refuses quantized ones.

Every compressor ends with a forward pass on a small example batch and checks that the outputs are finite, so a
variant that cannot run on the device fails here with one line, not later inside the profiler.

Saving: `save_variant` writes `save_pretrained` safetensors where it can. torchao's quantized tensor subclasses
are not safetensors-serialisable, so quantized variants are pickled whole with `torch.save` (load them only in the
same environment: the pickle names transformers and torchao classes). Head-pruned models save with `save_variant`
and load with `load_variant`, not with plain `save_pretrained` / `from_pretrained`: see `prune_structured`.

Model families: BERT, RoBERTa, DistilBERT (sequence models), GPT-2 and Llama (causal LMs). Which modules hold the
heads and FFN neurons of each lives in one layout table (`_LAYOUTS`); structured pruning needs an entry there and
names the model type when it has none. GPT-2's projections are transformers' Conv1D (weight (in, out)), which
unstructured pruning handles as it is and int8 first turns into nn.Linear.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

log = logging.getLogger(__name__)

compressors: Registry[type] = Registry("compressor")

# A ratio strictly inside (0, 1): pruning nothing or everything is not a variant.
Ratio = Annotated[float, Field(gt=0.0, lt=1.0)]
# A per-kind override may be 0 (leave that kind alone), never 1.
PartRatio = Annotated[float, Field(ge=0.0, lt=1.0)]


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


def example_inputs(model: torch.nn.Module, device: torch.device | str, batch_size: int = 2, seq_len: int = 8):
    """A small token batch for tracing and smoke forwards: {input_ids, attention_mask}, each (batch_size, seq_len)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise KdbenchError(f"cannot build example inputs for {type(model).__name__}: its config has no vocab_size")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
    name = getattr(model, "main_input_name", "input_ids")
    return {name: ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _first_tensor(out: Any) -> torch.Tensor:
    """The logits of a transformers output (ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _check_forward(model: torch.nn.Module, inputs: dict, who: str, device: torch.device) -> None:
    """Run one forward pass; a crash or a non-finite output means the variant cannot run here."""
    try:
        with torch.inference_mode():
            out = _first_tensor(model(**inputs))
    except Exception as e:  # noqa: BLE001 - any backend failure is reported as one line
        raise KdbenchError(f"{who} not supported on {device}: {type(e).__name__}: {_one_line(e)}") from e
    if not torch.isfinite(out.float()).all():
        raise KdbenchError(f"{who} on {device}: the forward pass gives non-finite outputs (overflow?)")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _is_quantized(p: torch.Tensor) -> bool:
    """True for tensor subclasses such as torchao's Int8Tensor (plain Parameters detach to torch.Tensor)."""
    return type(p.detach()) is not torch.Tensor


def is_quantized_model(model: torch.nn.Module) -> bool:
    """Quantized weights anywhere: torchao tensor subclasses, or torch.ao's packed dynamic Linears."""
    from kdbench.profiler import packed_linears

    return any(_is_quantized(p) for p in model.parameters()) or bool(packed_linears(model))


def _refuse_quantized(model: torch.nn.Module, who: str) -> None:
    for name, p in model.named_parameters():
        if _is_quantized(p):
            raise KdbenchError(
                f"{who}: weight {name} is already quantized ({type(p.detach()).__name__}); "
                f"put pruning before int8 in the variant"
            )
    from kdbench.profiler import packed_linears

    if packed_linears(model):
        raise KdbenchError(f"{who}: the model's Linears are already quantized (torch.ao dynamic int8); "
                           "put pruning before int8 in the variant")


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


# ---------------------------------------------------------------------------------------------------------------
# Model layouts: where the blocks, heads and FFN neurons of each model family live
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """One model family's transformer block: which projections hold a head's or an FFN neuron's channels, and which
    config fields and attention-module attributes count them. Module paths are relative to one block.

    A query head's channels are outputs of every `head_proj` (q, k and v; GPT-2's c_attn packs q, k and v, each
    head-major, so `packed` = 3) and inputs of `out_proj`. Under grouped-query attention (Llama with
    num_key_value_heads < num_attention_heads), k and v belong to kv heads instead (`kv_proj`); kv head g is shared
    by the query heads g * group ... (g + 1) * group - 1, group = heads / kv_heads. An FFN neuron is an output of
    every `ffn_up` (Llama's gate and up) and an input of `ffn_down`.
    """

    layers: str  # path from model.base_model to the ModuleList of blocks
    attn: str  # the attention module, whose attributes below its forward reads
    head_proj: tuple[str, ...]  # outputs grouped by query head
    out_proj: str  # inputs grouped by query head
    ffn_up: tuple[str, ...]  # outputs are the FFN neurons
    ffn_down: str  # inputs are the FFN neurons
    heads_field: str  # config field: number of query heads
    ffn_field: str  # config field: FFN width
    hidden_field: str  # config field: residual width
    head_dim_attr: str  # attention-module attribute: head dim (kept by pruning)
    heads_attr: str | None = None  # attention-module attribute: head count, if forward reads it
    width_attr: str | None = None  # attention-module attribute: heads * head_dim, if forward reads it
    kv_proj: tuple[str, ...] = ()  # outputs grouped by kv head (grouped-query attention)
    kv_heads_field: str | None = None  # config field: number of kv heads (None or unset: one per query head)
    packed: int = 1  # head_proj outputs hold this many head-major blocks (GPT-2's c_attn: q, k, v)


_BERT = _Layout(
    layers="encoder.layer",
    attn="attention.self",
    head_proj=("attention.self.query", "attention.self.key", "attention.self.value"),
    out_proj="attention.output.dense",
    ffn_up=("intermediate.dense",),
    ffn_down="output.dense",
    heads_field="num_attention_heads",
    ffn_field="intermediate_size",
    hidden_field="hidden_size",
    head_dim_attr="attention_head_size",
    heads_attr="num_attention_heads",
    width_attr="all_head_size",
)
_LAYOUTS: dict[str, _Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": _Layout(
        layers="transformer.layer",
        attn="attention",
        head_proj=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        out_proj="attention.out_lin",
        ffn_up=("ffn.lin1",),
        ffn_down="ffn.lin2",
        heads_field="n_heads",
        ffn_field="hidden_dim",
        hidden_field="dim",
        head_dim_attr="attention_head_size",
        heads_attr="n_heads",
    ),
    # Projections are transformers' Conv1D (weight (in, out)), q/k/v packed in c_attn; n_inner None means 4 * hidden.
    "gpt2": _Layout(
        layers="h",
        attn="attn",
        head_proj=("attn.c_attn",),
        packed=3,
        out_proj="attn.c_proj",
        ffn_up=("mlp.c_fc",),
        ffn_down="mlp.c_proj",
        heads_field="n_head",
        ffn_field="n_inner",
        hidden_field="n_embd",
        head_dim_attr="head_dim",
        heads_attr="num_heads",
        width_attr="split_size",
    ),
    # Forward reads head_dim and num_key_value_groups (heads / kv_heads), both kept when whole kv groups go.
    "llama": _Layout(
        layers="layers",
        attn="self_attn",
        head_proj=("self_attn.q_proj",),
        kv_proj=("self_attn.k_proj", "self_attn.v_proj"),
        out_proj="self_attn.o_proj",
        ffn_up=("mlp.gate_proj", "mlp.up_proj"),
        ffn_down="mlp.down_proj",
        heads_field="num_attention_heads",
        kv_heads_field="num_key_value_heads",
        ffn_field="intermediate_size",
        hidden_field="hidden_size",
        head_dim_attr="head_dim",
    ),
}

# Stored in the config of a head-pruned model: its head dim (BERT, DistilBERT and GPT-2 derive it as hidden / heads)
# and the head-count fields it had before any head was pruned ({field: count}), which load_variant builds it with.
HEAD_DIM_KEY = "kdbench_attention_head_size"
UNPRUNED_HEADS_KEY = "kdbench_heads_before_pruning"


def _model_type(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _layout(model: torch.nn.Module, who: str) -> _Layout:
    model_type = _model_type(model)
    if model_type not in _LAYOUTS:
        raise KdbenchError(
            f"{who}: cannot prune {type(model).__name__}: no head/FFN layout known for model_type "
            f"{model_type!r}; supported: {', '.join(sorted(_LAYOUTS))}"
        )
    return _LAYOUTS[model_type]


def _blocks(model: torch.nn.Module, who: str) -> tuple[str, torch.nn.ModuleList]:
    """(path, ModuleList) of the model's transformer blocks: from its layout, else the first ModuleList."""
    base = getattr(model, "base_model", model)
    prefix = model.base_model_prefix if base is not model else ""
    if _model_type(model) in _LAYOUTS:
        path = _LAYOUTS[_model_type(model)].layers
        return ".".join(filter(None, [prefix, path])), base.get_submodule(path)
    for path, m in base.named_modules():
        if isinstance(m, torch.nn.ModuleList):
            return ".".join(filter(None, [prefix, path])), m
    raise KdbenchError(f"{who}: cannot find the transformer blocks of {type(model).__name__} (no ModuleList)")


def _head_counts(cfg, layout: _Layout) -> tuple[int, int]:
    """(query heads, kv heads) from the config."""
    heads = int(getattr(cfg, layout.heads_field))
    kv = getattr(cfg, layout.kv_heads_field, None) if layout.kv_heads_field else None
    return heads, int(kv or heads)


def _head_fields(cfg, layout: _Layout, heads: int, kv_heads: int) -> dict[str, int]:
    """The config fields that hold these head counts: {heads_field: heads[, kv_heads_field: kv_heads]}."""
    fields = {layout.heads_field: heads}
    if layout.kv_heads_field and getattr(cfg, layout.kv_heads_field, None) is not None:
        fields[layout.kv_heads_field] = kv_heads
    return fields


# ---------------------------------------------------------------------------------------------------------------
# Projections: nn.Linear (weight (out, in)) and transformers' Conv1D (GPT-2; weight (in, out))
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _projection_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _is_conv1d(m: torch.nn.Module) -> bool:
    return isinstance(m, _projection_types()[1])


def _projections(model: torch.nn.Module, who: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every Linear or Conv1D inside the transformer blocks: the weights pruning works on."""
    path, blocks = _blocks(model, who)
    return [(f"{path}.{n}", m) for n, m in blocks.named_modules() if isinstance(m, _projection_types())]


def _weight_out_in(m: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as (out, in), detached, float32."""
    w = m.weight.detach().float()
    return w.t() if _is_conv1d(m) else w


def _keep_channels(m: torch.nn.Module, idx: torch.Tensor, side: Literal["out", "in"]) -> None:
    """Keep only channels `idx` (sorted, 1-D) on one side of a Linear or Conv1D, in place (the bias follows the
    outputs). New Parameters keep requires_grad."""
    dim = (0 if side == "out" else 1) ^ int(_is_conv1d(m))
    idx = idx.to(m.weight.device)
    with torch.no_grad():
        m.weight = torch.nn.Parameter(m.weight.index_select(dim, idx), requires_grad=m.weight.requires_grad)
        if side == "out" and m.bias is not None:
            m.bias = torch.nn.Parameter(m.bias.index_select(0, idx), requires_grad=m.bias.requires_grad)
    n = len(idx)
    if _is_conv1d(m):
        m.nf, m.nx = (n, m.nx) if side == "out" else (m.nf, n)
    else:
        m.out_features, m.in_features = (n, m.in_features) if side == "out" else (m.out_features, n)


def _conv1d_to_linear(model: torch.nn.Module) -> int:
    """Replace every Conv1D by the equal nn.Linear (weight transposed), in place; returns how many."""
    n = 0
    for name, m in list(model.named_modules()):
        if not _is_conv1d(m):
            continue
        lin = torch.nn.Linear(m.nx, m.nf, device="meta")  # no init: the weights are assigned next
        with torch.no_grad():
            lin.weight = torch.nn.Parameter(m.weight.t().contiguous(), requires_grad=m.weight.requires_grad)
            lin.bias = torch.nn.Parameter(m.bias.clone(), requires_grad=m.bias.requires_grad)
        lin.train(m.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, lin)
        n += 1
    return n


class Compressor:
    """Base class: `params` are the validated Params; `apply` changes the model in place and returns info."""

    name = "?"
    Params: type[BaseModel]
    trainable = False  # can the compressed model still take optimizer steps (recovery)? Pruned: yes; quantized: no

    def __init__(self, params: BaseModel | dict | None = None):
        if not isinstance(params, BaseModel):
            params = compressors.validate_params(self.name, params)
        self.params = params

    def apply(self, model: torch.nn.Module, *, device: torch.device | str, inputs: dict | None = None) -> dict:
        raise NotImplementedError


def _register(name: str):
    def deco(cls):
        cls.name = name
        return compressors.register(name)(cls)

    return deco


# ---------------------------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------------------------


@_register("prune_unstructured")
class PruneUnstructured(Compressor):
    """Global magnitude pruning of the blocks' projection weights (zeros in place; same shapes).

    Which weights: every projection inside the transformer blocks: nn.Linear (BERT and DistilBERT q/k/v/out and
    FFN; Llama q/k/v/o and gate/up/down) and transformers' Conv1D (GPT-2 c_attn, attn.c_proj, c_fc, mlp.c_proj).
    Not the embeddings: a zero in a lookup table saves no compute and removes whole-token information. Not the
    pooler, classifier or LM head: the first two are small and task-specific; an LM head is the vocabulary
    (GPT-2 ties it to the token embeddings, so pruning it would prune the embeddings too). Pruning them hurts
    quality more than it saves. Models without a known layout: the projections in the first ModuleList of the
    base model (the info's "blocks" names it).
    How: one global L1 ranking over all those weights (torch.nn.utils.prune.global_unstructured), so layers with
    small weights lose more; then prune.remove makes the zeros permanent (no masks left in the model).
    The model keeps its shapes and its dense kernels: this saves nothing on disk or in latency by itself; it is
    the baseline that structured pruning and sparse kernels are compared with.
    """

    trainable = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        amount: Ratio = 0.5  # fraction of the selected weights set to zero

    def apply(self, model, *, device, inputs=None):
        from torch.nn.utils import prune

        _refuse_quantized(model, self.name)
        layers = [m for _, m in _projections(model, self.name)]
        if not layers:
            raise KdbenchError(f"{self.name}: {type(model).__name__} has no Linear or Conv1D layers in its blocks")
        params = [(m, "weight") for m in layers]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=self.params.amount)
        for m, name in params:
            prune.remove(m, name)
        zeros = sum(int((m.weight == 0).sum()) for m in layers)
        total = sum(m.weight.numel() for m in layers)
        all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
        all_total = sum(p.numel() for p in model.parameters())
        _check_forward(model, inputs or example_inputs(model, device), self.name, _device(device))
        return {
            "sparsity": zeros / total,  # over the pruned weights
            "model_sparsity": all_zeros / all_total,  # over every parameter
            "pruned_layers": len(layers),
            "blocks": _blocks(model, self.name)[0],
        }


@_register("prune_structured")
class PruneStructured(Compressor):
    """Remove whole attention heads and FFN neurons (smaller dense model).

    Importance: L2 magnitude. A head scores ||W_q[h]||^2 + ||W_k[h]||^2 + ||W_v[h]||^2 + ||W_o[:, h]||^2 (its rows
    in the q/k/v projections and its columns in the output projection); an FFN neuron scores
    ||W_in[j, :]||^2 + ||W_out[:, j]||^2 (Llama: gate, up and down). Data-free and deterministic; Taylor importance
    would need gradients on task data, which a compressor does not see.
    Grouped-query attention (Llama with num_key_value_heads < num_attention_heads): the unit is a kv group, one kv
    head and the heads / kv_heads query heads that share it, scored as the sum of its members. Whole groups go, so
    every kept query head keeps its own kv head and the group size (num_key_value_groups) is unchanged; heads
    are then removed in multiples of the group size (the info's "heads_per_kv_group"). Plain multi-head attention
    is the case of groups of one.
    How many: HF configs hold one head count and one FFN width for all layers, so every layer loses the same
    number: round(amount * count) of the units, at most count - 1. The lowest-scoring ones go in each layer.
    Surgery: each model family's layout names every projection that holds a head's or a neuron's channels (GPT-2:
    q, k and v packed in c_attn); those lose the chosen output rows or input columns, so shapes stay consistent.
    Then the config (heads, kv heads, FFN width) and the attention modules' head counts are updated. The
    residual width (hidden size) and the head dim are kept. No graph tracing: torch-pruning's DependencyGraph,
    used here before, never returned on Llama's attention (rotary embeddings) and does not know Conv1D.
    Loading back: FFN-only pruning loads with a plain `from_pretrained`. A head-pruned model does not: BERT,
    DistilBERT and GPT-2 derive the head dim as hidden / heads (transformers 5 dropped `pruned_heads`), and Llama's
    config refuses a head count that does not divide the hidden size. So it records its head dim and its head
    counts from before pruning in its config (`kdbench_attention_head_size`, `kdbench_heads_before_pruning`), is
    saved with `save_variant` and loads with `load_variant`.
    Supported: BERT, RoBERTa, DistilBERT, GPT-2 and Llama, with any task head on top (sequence classification,
    causal LM); others raise naming the model type.
    """

    trainable = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        amount: Ratio = 0.25  # fraction of heads (kv groups) and of FFN neurons removed
        head_amount: PartRatio | None = None  # overrides `amount` for heads; 0 keeps every head
        ffn_amount: PartRatio | None = None  # overrides `amount` for FFN neurons; 0 keeps every neuron

    def apply(self, model, *, device, inputs=None):
        who = self.name
        layout = _layout(model, who)
        _refuse_quantized(model, who)
        cfg = model.config
        _, blocks = _blocks(model, who)
        heads, kv_heads = _head_counts(cfg, layout)
        group = heads // kv_heads
        head_dim = int(getattr(blocks[0].get_submodule(layout.attn), layout.head_dim_attr))
        ffn = _weight_out_in(blocks[0].get_submodule(layout.ffn_down)).shape[1]
        p = self.params
        head_amount = p.amount if p.head_amount is None else p.head_amount
        ffn_amount = p.amount if p.ffn_amount is None else p.ffn_amount
        groups_rm = min(kv_heads - 1, round(kv_heads * head_amount))
        ffn_rm = min(ffn - 1, round(ffn * ffn_amount))
        if head_amount and not groups_rm:
            log.warning("%s: no head removed from %s: round(%d kv groups x %g) leaves none to remove, at most %d",
                        who, type(model).__name__, kv_heads, head_amount, kv_heads - 1)
        params_before = sum(t.numel() for t in model.parameters())

        try:
            # New Parameters made under a caller's inference_mode would be inference tensors: untrainable.
            with torch.inference_mode(False):
                for block in blocks:
                    if groups_rm:
                        _prune_heads(block, layout, heads, kv_heads, head_dim, groups_rm)
                    if ffn_rm:
                        _prune_ffn(block, layout, ffn_rm)
        except Exception as e:  # noqa: BLE001 - the layout does not match this model: one line, not a traceback
            raise KdbenchError(
                f"{who}: cannot prune {type(model).__name__} with the {cfg.model_type!r} layout: "
                f"{type(e).__name__}: {_one_line(e)}"
            ) from e

        new_heads, new_kv, new_ffn = heads - groups_rm * group, kv_heads - groups_rm, ffn - ffn_rm
        if groups_rm:
            if getattr(cfg, UNPRUNED_HEADS_KEY, None) is None:  # a second pruning keeps the first original
                setattr(cfg, UNPRUNED_HEADS_KEY, _head_fields(cfg, layout, heads, kv_heads))
            setattr(cfg, HEAD_DIM_KEY, head_dim)
            for field, value in _head_fields(cfg, layout, new_heads, new_kv).items():
                setattr(cfg, field, value)
        setattr(cfg, layout.ffn_field, new_ffn)
        _check_forward(model, inputs or example_inputs(model, device), who, _device(device))
        return {
            "heads_removed_per_layer": heads - new_heads,
            "heads_per_layer": new_heads,
            "kv_heads_per_layer": new_kv,
            "heads_per_kv_group": group,
            "ffn_neurons_removed_per_layer": ffn_rm,
            "ffn_width": new_ffn,
            "importance": "l2",
            "params_before": params_before,
            "params_after": sum(t.numel() for t in model.parameters()),
        }


def _channels(units: list[int], size: int, count: int, packed: int = 1) -> torch.Tensor:
    """Channel indices of `units` (heads) of `size` channels each, in a projection of `packed` blocks of `count`."""
    return torch.tensor([b * count * size + u * size + j for b in range(packed) for u in units for j in range(size)])


def _prune_heads(block, layout: _Layout, heads: int, kv_heads: int, head_dim: int, n_groups: int) -> None:
    """Remove the `n_groups` lowest-scoring kv groups (each: one kv head, heads / kv_heads query heads) of a block."""
    group = heads // kv_heads
    get = block.get_submodule

    def per_unit(w: torch.Tensor, units: int, packed: int = 1) -> torch.Tensor:  # (out, in) -> (units,)
        return w.pow(2).reshape(packed, units, -1).sum((0, 2))

    q_score = sum(per_unit(_weight_out_in(get(n)), heads, layout.packed) for n in layout.head_proj)
    q_score = q_score + per_unit(_weight_out_in(get(layout.out_proj)).t(), heads)
    score = q_score.reshape(kv_heads, group).sum(1)
    for n in layout.kv_proj:
        score = score + per_unit(_weight_out_in(get(n)), kv_heads)
    drop = set(score.argsort()[:n_groups].tolist())
    keep_groups = [g for g in range(kv_heads) if g not in drop]
    keep_heads = [g * group + i for g in keep_groups for i in range(group)]

    for n in layout.head_proj:
        _keep_channels(get(n), _channels(keep_heads, head_dim, heads, layout.packed), "out")
    for n in layout.kv_proj:
        _keep_channels(get(n), _channels(keep_groups, head_dim, kv_heads), "out")
    _keep_channels(get(layout.out_proj), _channels(keep_heads, head_dim, heads), "in")
    attn = get(layout.attn)
    if layout.heads_attr:
        setattr(attn, layout.heads_attr, len(keep_heads))
    if layout.width_attr:
        setattr(attn, layout.width_attr, len(keep_heads) * head_dim)


def _prune_ffn(block, layout: _Layout, n: int) -> None:
    """Remove the `n` lowest-scoring FFN neurons of a block."""
    ups, down = [block.get_submodule(u) for u in layout.ffn_up], block.get_submodule(layout.ffn_down)
    score = sum(_weight_out_in(u).pow(2).sum(1) for u in ups) + _weight_out_in(down).pow(2).sum(0)
    keep = score.argsort()[n:].sort().values
    for u in ups:
        _keep_channels(u, keep, "out")
    _keep_channels(down, keep, "in")


# ---------------------------------------------------------------------------------------------------------------
# Quantization and casts
# ---------------------------------------------------------------------------------------------------------------


@_register("int8")
class Int8(Compressor):
    """int8 quantization of every nn.Linear with torchao `quantize_` (CPU and CUDA), or PyTorch's own dynamic int8.

    mode "dynamic": Int8DynamicActivationInt8WeightConfig: int8 per-channel weights, activations quantized per
    token at run time (int8 matmul). mode "weight_only": Int8WeightOnlyConfig: int8 per-channel weights,
    dequantized in the matmul (saves memory traffic, not compute).
    On CPUs without VNNI the quantization range is reduced (torchao's `should_reduce_range`) to avoid overflow.
    torchao's global inductor settings are not touched (set_inductor_config=False): kdbench profiles eager mode,
    where int8 saves size and memory but is not always faster than fp32; torchao's speed-ups need torch.compile.
    torchao quantizes nn.Linear only, so transformers' Conv1D projections (GPT-2) are first replaced by the equal
    nn.Linear (weight transposed; info "conv1d_to_linear" counts them); the variant keeps those Linears.
    Embeddings stay in float, and so does a Linear that shares its weight with an embedding (GPT-2's lm_head, tied
    to the token embeddings): quantizing it would untie it, keeping the float table and adding an int8 copy. The
    info lists such Linears under "float_linear"; "quantized_linear" counts the Linears really quantized.

    backend "torch_dynamic" (CPU only, mode "dynamic"): PyTorch's own torch.ao.quantization.quantize_dynamic, whose
    fbgemm/x86 kernels make int8 faster than fp32 on a CPU in eager mode, where torchao's int8 is many times slower
    (measured on this project's CPU box: a 4-layer BERT at batch 32 took 159 ms against fp32's 202 ms, and 3.9 s
    with torchao). torch.ao.quantization is deprecated in PyTorch in favour of torchao; it is the measured fast
    path on CPUs today. Its Linears hold packed int8 weights instead of parameters (kdbench.profiler counts them).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["dynamic", "weight_only"] = "dynamic"
        # auto: torch_dynamic on a CPU (mode dynamic), torchao elsewhere. The default, because torchao's eager int8
        # is many times slower than fp32 on a CPU (see above)
        backend: Literal["torchao", "torch_dynamic", "auto"] = "auto"

    def apply(self, model, *, device, inputs=None):
        dev = _device(device)
        backend = self.params.backend
        if backend == "auto":
            backend = "torch_dynamic" if dev.type == "cpu" and self.params.mode == "dynamic" else "torchao"
        if backend == "torch_dynamic":
            return self._apply_torch_dynamic(model, dev, inputs)
        if dev.type not in ("cpu", "cuda"):
            raise KdbenchError(f"int8 not supported on {dev}: torchao int8 kernels run on cpu and cuda only")
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
            from torchao.utils import should_reduce_range
        except ImportError as e:
            raise KdbenchError(f"int8 not supported on {dev}: torchao is not installed ({e})") from e
        if self.params.mode == "dynamic":
            reduce = bool(should_reduce_range(dev))
            config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False, reduce_range=reduce)
        else:
            reduce = False
            config = Int8WeightOnlyConfig(set_inductor_config=False)
        converted = _conv1d_to_linear(model)
        tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}

        def quantize_this(m: torch.nn.Module, _fqn: str) -> bool:
            return (
                type(m) is torch.nn.Linear  # not NonDynamicallyQuantizableLinear, as torchao's own filter
                and id(m.weight) not in tied
                and not _is_quantized(m.weight)
            )

        try:
            quantize_(model, config, filter_fn=quantize_this)
        except Exception as e:  # noqa: BLE001
            raise KdbenchError(f"int8 not supported on {dev}: {type(e).__name__}: {_one_line(e)}") from e
        _drop_instance_reprs(model)
        _check_forward(model, inputs or example_inputs(model, dev), "int8", dev)
        import torchao

        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        return {
            "mode": self.params.mode,
            "quantized_linear": sum(_is_quantized(m.weight) for _, m in linears),
            "float_linear": [n for n, m in linears if not _is_quantized(m.weight)],
            "conv1d_to_linear": converted,
            "reduce_range": reduce,
            "backend": "torchao",
            "torchao": torchao.__version__,
        }

    def _apply_torch_dynamic(self, model, dev, inputs):
        if dev.type != "cpu":
            raise KdbenchError(f"int8 backend torch_dynamic not supported on {dev}: its kernels run on the CPU; use "
                               "backend torchao")
        if self.params.mode != "dynamic":
            raise KdbenchError("int8 backend torch_dynamic quantizes activations at run time: it has mode dynamic "
                               "only, not weight_only")
        import warnings

        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        converted = _conv1d_to_linear(model)
        tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        chosen = {name: default_dynamic_qconfig for name, m in model.named_modules()
                  if type(m) is torch.nn.Linear and id(m.weight) not in tied}
        floats = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and name not in chosen]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices, once per Linear
                quantize_dynamic(model, chosen, dtype=torch.qint8, inplace=True)
        except Exception as e:  # noqa: BLE001
            raise KdbenchError(f"int8 not supported on {dev}: {type(e).__name__}: {_one_line(e)}") from e
        _check_forward(model, inputs or example_inputs(model, dev), "int8", dev)
        from kdbench.profiler import packed_linears

        return {
            "mode": "dynamic",
            "quantized_linear": len(packed_linears(model)),
            "float_linear": floats,
            "conv1d_to_linear": converted,
            "backend": "torch_dynamic",
            "engine": torch.backends.quantized.engine,
        }

def _drop_instance_reprs(model: torch.nn.Module) -> None:
    # quantize_ sets a per-instance `extra_repr` (a bound functools.partial) that pickle cannot save; the class's
    # own extra_repr is fine for printing.
    for m in model.modules():
        m.__dict__.pop("extra_repr", None)


def native_dtype_support(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `device` has native matmul kernels for `dtype` (not emulated through fp32 conversions)."""
    dev = _device(device)
    if dev.type == "cuda":
        if dtype == torch.bfloat16:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return True
    if dev.type == "cpu":
        check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
        try:
            return bool(getattr(torch.ops.mkldnn, check)())
        except (AttributeError, RuntimeError):
            return False
    return True


class _Cast(Compressor):
    dtype: torch.dtype

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # Run even where the device has no native kernels for the dtype (converted through fp32, slower).
        allow_emulated: bool = False

    def apply(self, model, *, device, inputs=None):
        dev = _device(device)
        native = native_dtype_support(self.dtype, dev)
        if not native and not self.params.allow_emulated:
            raise KdbenchError(
                f"{self.name} not supported on {dev}: no native {self.name} matmul on this device "
                f"(cpu capability {torch.backends.cpu.get_cpu_capability()}), so it would run emulated and slower "
                f"than fp32; set params.allow_emulated: true to measure it anyway"
            )
        if not native:
            log.warning("%s on %s runs emulated: expect it to be slower than fp32", self.name, dev)
        # Buffers the model derives itself and does not save (Llama's rotary inv_freq) stay as they are, as
        # from_pretrained(dtype=...) leaves them: rounded to bf16, rotary phases drift by radians at long positions.
        derived = [(m, n, b) for m in model.modules() for n, b in m._buffers.items()
                   if n in m._non_persistent_buffers_set and b is not None and b.is_floating_point()]
        try:
            model.to(self.dtype)
        except Exception as e:  # noqa: BLE001
            raise KdbenchError(f"{self.name} not supported on {dev}: {type(e).__name__}: {_one_line(e)}") from e
        for m, n, b in derived:
            setattr(m, n, b)
        _check_forward(model, inputs or example_inputs(model, dev), self.name, dev)
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "native": native,
            "float32_buffers": [n for n, b in model.named_buffers() if b.dtype == torch.float32],
        }


@_register("fp16")
class Fp16(_Cast):
    """Cast weights and compute to float16 for inference.

    On CUDA, native. On CPU, float16 matmuls run natively only with AVX512-FP16/AMX-FP16 (oneDNN's
    `_is_mkldnn_fp16_supported`); elsewhere they are converted through fp32: measured on the 2-core AVX2 CI box,
    a 2048x384x1536 Linear took 250 ms in fp16 vs 56 ms in fp32. So without native support this raises unless
    `allow_emulated: true`. The forward check also catches fp16 overflow (non-finite outputs).
    """

    dtype = torch.float16


@_register("bf16")
class Bf16(_Cast):
    """Cast weights and compute to bfloat16 for inference.

    On CUDA, native from Ampere (sm80) on. On CPU, native with AVX512-BF16/AMX (oneDNN's
    `_is_mkldnn_bf16_supported`); elsewhere emulated and slower than fp32 (418 ms vs 56 ms for the Linear above on
    the AVX2 box), so without native support this raises unless `allow_emulated: true`.
    """

    dtype = torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------------


def apply_variant(
    model: torch.nn.Module,
    steps: list[tuple[str, dict[str, Any] | None]],
    device: torch.device | str,
    *,
    inputs: dict | None = None,
    copy_model: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Apply compressors in order, e.g. [("prune_structured", {"amount": 0.25}), ("int8", {})].

    All params are validated before any step runs. With `copy_model` (the default) the caller's model is left
    untouched. Returns (model, {"steps": [{"name", "params", **step info}, ...]}).
    """
    dev = _device(device)
    validated = [(name, compressors.validate_params(name, params)) for name, params in steps]
    # Copies made under a caller's inference_mode would be inference tensors, which pruning cannot trace.
    with torch.inference_mode(False):
        if copy_model:
            model = copy.deepcopy(model)
        model = model.to(dev).eval()
        infos = []
        for name, params in validated:
            info = compressors.get(name)(params).apply(model, device=dev, inputs=inputs)
            infos.append({"name": name, "params": params.model_dump(), **info})
    return model, {"steps": infos}


@contextlib.contextmanager
def frozen_sparsity(model: torch.nn.Module):
    """Keep exactly-zero weights of the blocks' projections (those prune_unstructured prunes) at zero while training
    (recovery after pruning).

    Masks are registered with torch.nn.utils.prune, so the zeros stay zeros through optimizer steps, and are made
    permanent again on exit.
    """
    from torch.nn.utils import prune

    masked = []
    for _, module in _projections(model, "frozen_sparsity"):
        if bool((module.weight == 0).any()):
            prune.custom_from_mask(module, "weight", mask=module.weight != 0)
            masked.append(module)
    try:
        yield model
    finally:
        for module in masked:
            prune.remove(module, "weight")

# ---------------------------------------------------------------------------------------------------------------
# Saving and loading variants
# ---------------------------------------------------------------------------------------------------------------

VARIANT_FILE = "kdbench_variant.json"  # {"format": "safetensors" | "torch.save"}
PICKLE_FILE = "model.pt"


def save_variant(model: torch.nn.Module, path: str | Path) -> dict:
    """Save a (compressed) model to directory `path`: `save_pretrained` safetensors, or a whole-model pickle
    (`torch.save`) when its weights are tensor subclasses that safetensors cannot hold. Returns {"format"}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if is_quantized_model(model):
        _drop_instance_reprs(model)
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
    layout = _LAYOUTS.get(raw.get("model_type"))
    if layout is None:
        raise KdbenchError(f"cannot load {path}: head-pruned model_type {raw.get('model_type')!r} is not supported")
    model = cls(cls.config_class.from_dict({**raw, **raw[UNPRUNED_HEADS_KEY]}))
    heads, kv_heads = _head_counts(model.config, layout)
    pruned = {field: raw[field] for field in raw[UNPRUNED_HEADS_KEY]}
    new_kv = pruned.get(layout.kv_heads_field, pruned[layout.heads_field] * kv_heads // heads)
    with torch.no_grad():
        for block in _blocks(model, "load")[1]:
            _prune_heads(block, layout, heads, kv_heads, raw[HEAD_DIM_KEY], kv_heads - new_kv)
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

__all__ = [
    "HEAD_DIM_KEY",
    "UNPRUNED_HEADS_KEY",
    "Compressor",
    "apply_variant",
    "compressors",
    "example_inputs",
    "load_variant",
    "native_dtype_support",
    "save_variant",
]
