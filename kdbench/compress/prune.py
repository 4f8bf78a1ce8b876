"""Pruning compressors: unstructured (global magnitude, zeros in place) and structured (whole attention heads
and FFN neurons removed), and `frozen_sparsity`, which keeps pruned weights at zero while the student recovers.

Order matters in a variant: prune first, then quantize or cast. Pruning needs plain float weights and refuses
quantized ones.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdbench.compress.base import Compressor, as_device, check_forward, example_inputs, one_line, register
from kdbench.compress.layout import (
    HEAD_DIM_KEY, UNPRUNED_HEADS_KEY, Layout, blocks_of, head_counts, head_fields, keep_channels, layout_of,
    projections, weight_out_in,
)
from kdbench.errors import KdbenchError
from kdbench.introspect import is_quantized_tensor, packed_linears

log = logging.getLogger(__name__)

# A ratio strictly inside (0, 1): pruning nothing or everything is not a variant.
Ratio = Annotated[float, Field(gt=0.0, lt=1.0)]
# A per-kind override may be 0 (leave that kind alone), never 1.
PartRatio = Annotated[float, Field(ge=0.0, lt=1.0)]


def refuse_quantized(model: torch.nn.Module, who: str) -> None:
    for name, p in model.named_parameters():
        if is_quantized_tensor(p):
            raise KdbenchError(
                f"{who}: weight {name} is already quantized ({type(p.detach()).__name__}); "
                f"put pruning before int8 in the variant"
            )
    if packed_linears(model):
        raise KdbenchError(f"{who}: the model's Linears are already quantized (torch.ao dynamic int8); "
                           "put pruning before int8 in the variant")


@register("prune_unstructured")
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

        refuse_quantized(model, self.name)
        layers = [m for _, m in projections(model, self.name)]
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
        check_forward(model, inputs or example_inputs(model, device), self.name, as_device(device))
        return {
            "sparsity": zeros / total,  # over the pruned weights
            "model_sparsity": all_zeros / all_total,  # over every parameter
            "pruned_layers": len(layers),
            "blocks": blocks_of(model, self.name)[0],
        }


@register("prune_structured")
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
        layout = layout_of(model, who)
        refuse_quantized(model, who)
        cfg = model.config
        _, blocks = blocks_of(model, who)
        heads, kv_heads = head_counts(cfg, layout)
        group = heads // kv_heads
        head_dim = int(getattr(blocks[0].get_submodule(layout.attn), layout.head_dim_attr))
        ffn = weight_out_in(blocks[0].get_submodule(layout.ffn_down)).shape[1]
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
                        prune_heads(block, layout, heads, kv_heads, head_dim, groups_rm)
                    if ffn_rm:
                        _prune_ffn(block, layout, ffn_rm)
        except Exception as e:  # noqa: BLE001 - the layout does not match this model: one line, not a traceback
            raise KdbenchError(
                f"{who}: cannot prune {type(model).__name__} with the {cfg.model_type!r} layout: "
                f"{type(e).__name__}: {one_line(e)}"
            ) from e

        new_heads, new_kv, new_ffn = heads - groups_rm * group, kv_heads - groups_rm, ffn - ffn_rm
        if groups_rm:
            if getattr(cfg, UNPRUNED_HEADS_KEY, None) is None:  # a second pruning keeps the first original
                setattr(cfg, UNPRUNED_HEADS_KEY, head_fields(cfg, layout, heads, kv_heads))
            setattr(cfg, HEAD_DIM_KEY, head_dim)
            for field, value in head_fields(cfg, layout, new_heads, new_kv).items():
                setattr(cfg, field, value)
        setattr(cfg, layout.ffn_field, new_ffn)
        check_forward(model, inputs or example_inputs(model, device), who, as_device(device))
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


def prune_heads(block, layout: Layout, heads: int, kv_heads: int, head_dim: int, n_groups: int) -> None:
    """Remove the `n_groups` lowest-scoring kv groups (each: one kv head, heads / kv_heads query heads) of a block."""
    group = heads // kv_heads
    get = block.get_submodule

    def per_unit(w: torch.Tensor, units: int, packed: int = 1) -> torch.Tensor:  # (out, in) -> (units,)
        return w.pow(2).reshape(packed, units, -1).sum((0, 2))

    q_score = sum(per_unit(weight_out_in(get(n)), heads, layout.packed) for n in layout.head_proj)
    q_score = q_score + per_unit(weight_out_in(get(layout.out_proj)).t(), heads)
    score = q_score.reshape(kv_heads, group).sum(1)
    for n in layout.kv_proj:
        score = score + per_unit(weight_out_in(get(n)), kv_heads)
    drop = set(score.argsort()[:n_groups].tolist())
    keep_groups = [g for g in range(kv_heads) if g not in drop]
    keep_heads = [g * group + i for g in keep_groups for i in range(group)]

    for n in layout.head_proj:
        keep_channels(get(n), _channels(keep_heads, head_dim, heads, layout.packed), "out")
    for n in layout.kv_proj:
        keep_channels(get(n), _channels(keep_groups, head_dim, kv_heads), "out")
    keep_channels(get(layout.out_proj), _channels(keep_heads, head_dim, heads), "in")
    attn = get(layout.attn)
    if layout.heads_attr:
        setattr(attn, layout.heads_attr, len(keep_heads))
    if layout.width_attr:
        setattr(attn, layout.width_attr, len(keep_heads) * head_dim)


def _prune_ffn(block, layout: Layout, n: int) -> None:
    """Remove the `n` lowest-scoring FFN neurons of a block."""
    ups, down = [block.get_submodule(u) for u in layout.ffn_up], block.get_submodule(layout.ffn_down)
    score = sum(weight_out_in(u).pow(2).sum(1) for u in ups) + weight_out_in(down).pow(2).sum(0)
    keep = score.argsort()[n:].sort().values
    for u in ups:
        keep_channels(u, keep, "out")
    keep_channels(down, keep, "in")


@contextlib.contextmanager
def frozen_sparsity(model: torch.nn.Module):
    """Keep exactly-zero weights of the blocks' projections (those prune_unstructured prunes) at zero while training
    (recovery after pruning).

    Masks are registered with torch.nn.utils.prune, so the zeros stay zeros through optimizer steps, and are made
    permanent again on exit.
    """
    from torch.nn.utils import prune

    masked = []
    for _, module in projections(model, "frozen_sparsity"):
        if bool((module.weight == 0).any()):
            prune.custom_from_mask(module, "weight", mask=module.weight != 0)
            masked.append(module)
    try:
        yield model
    finally:
        for module in masked:
            prune.remove(module, "weight")
