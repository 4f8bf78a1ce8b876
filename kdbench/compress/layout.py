"""Where the transformer blocks, attention heads and FFN neurons of each model family live (one table,
`LAYOUTS`), and the projections (nn.Linear, or transformers' Conv1D in GPT-2) that pruning cuts.

Model families: BERT, RoBERTa, DistilBERT, GPT-2 and Llama. Structured pruning needs an entry here and names the
model type when it has none. GPT-2's projections are Conv1D (weight (in, out)), which unstructured pruning handles
as it is and int8 first turns into nn.Linear.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from kdbench.errors import KdbenchError


@dataclass(frozen=True)
class Layout:
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


_BERT = Layout(
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
LAYOUTS: dict[str, Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": Layout(
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
    "gpt2": Layout(
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
    "llama": Layout(
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


def model_type_of(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def layout_of(model: torch.nn.Module, who: str) -> Layout:
    model_type = model_type_of(model)
    if model_type not in LAYOUTS:
        raise KdbenchError(
            f"{who}: cannot prune {type(model).__name__}: no head/FFN layout known for model_type "
            f"{model_type!r}; supported: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]


def blocks_of(model: torch.nn.Module, who: str) -> tuple[str, torch.nn.ModuleList]:
    """(path, ModuleList) of the model's transformer blocks: from its layout, else the first ModuleList."""
    base = getattr(model, "base_model", model)
    prefix = model.base_model_prefix if base is not model else ""
    if model_type_of(model) in LAYOUTS:
        path = LAYOUTS[model_type_of(model)].layers
        return ".".join(filter(None, [prefix, path])), base.get_submodule(path)
    for path, m in base.named_modules():
        if isinstance(m, torch.nn.ModuleList):
            return ".".join(filter(None, [prefix, path])), m
    raise KdbenchError(f"{who}: cannot find the transformer blocks of {type(model).__name__} (no ModuleList)")


def head_counts(cfg, layout: Layout) -> tuple[int, int]:
    """(query heads, kv heads) from the config."""
    heads = int(getattr(cfg, layout.heads_field))
    kv = getattr(cfg, layout.kv_heads_field, None) if layout.kv_heads_field else None
    return heads, int(kv or heads)


def head_fields(cfg, layout: Layout, heads: int, kv_heads: int) -> dict[str, int]:
    """The config fields that hold these head counts: {heads_field: heads[, kv_heads_field: kv_heads]}."""
    fields = {layout.heads_field: heads}
    if layout.kv_heads_field and getattr(cfg, layout.kv_heads_field, None) is not None:
        fields[layout.kv_heads_field] = kv_heads
    return fields


# ---------------------------------------------------------------------------------------------------------------
# Projections: nn.Linear (weight (out, in)) and transformers' Conv1D (GPT-2; weight (in, out))
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def projection_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def is_conv1d(m: torch.nn.Module) -> bool:
    return isinstance(m, projection_types()[1])


def projections(model: torch.nn.Module, who: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every Linear or Conv1D inside the transformer blocks: the weights pruning works on."""
    path, blocks = blocks_of(model, who)
    return [(f"{path}.{n}", m) for n, m in blocks.named_modules() if isinstance(m, projection_types())]


def weight_out_in(m: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as (out, in), detached, float32."""
    w = m.weight.detach().float()
    return w.t() if is_conv1d(m) else w


def keep_channels(m: torch.nn.Module, idx: torch.Tensor, side: Literal["out", "in"]) -> None:
    """Keep only channels `idx` (sorted, 1-D) on one side of a Linear or Conv1D, in place (the bias follows the
    outputs). New Parameters keep requires_grad."""
    dim = (0 if side == "out" else 1) ^ int(is_conv1d(m))
    idx = idx.to(m.weight.device)
    with torch.no_grad():
        m.weight = torch.nn.Parameter(m.weight.index_select(dim, idx), requires_grad=m.weight.requires_grad)
        if side == "out" and m.bias is not None:
            m.bias = torch.nn.Parameter(m.bias.index_select(0, idx), requires_grad=m.bias.requires_grad)
    n = len(idx)
    if is_conv1d(m):
        m.nf, m.nx = (n, m.nx) if side == "out" else (m.nf, n)
    else:
        m.out_features, m.in_features = (n, m.in_features) if side == "out" else (m.out_features, n)


def conv1d_to_linear(model: torch.nn.Module) -> int:
    """Replace every Conv1D by the equal nn.Linear (weight transposed), in place; returns how many."""
    n = 0
    for name, m in list(model.named_modules()):
        if not is_conv1d(m):
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

