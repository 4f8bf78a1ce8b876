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
same environment: the pickle names transformers and torchao classes). Head-pruned models load with
`load_variant`, not with a plain `from_pretrained`: see `prune_structured`.
"""

from __future__ import annotations

import contextlib
import copy
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


def _refuse_quantized(model: torch.nn.Module, who: str) -> None:
    for name, p in model.named_parameters():
        if _is_quantized(p):
            raise KdbenchError(
                f"{who}: weight {name} is already quantized ({type(p.detach()).__name__}); "
                f"put pruning before int8 in the variant"
            )


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


@dataclass(frozen=True)
class _Layout:
    """Where the heads and FFN of one transformer block live, and which config fields describe them."""

    layers: str  # path from model.base_model to the ModuleList of blocks
    attn: str  # the module that holds the head count used by forward
    q: str
    k: str
    v: str
    o: str  # attention output projection: its input channels are the heads
    ffn_in: str
    ffn_out: str
    heads_field: str  # config field and attention-module attribute with the head count
    ffn_field: str  # config field with the FFN width
    hidden_field: str  # config field with the residual width
    all_head_attr: str | None  # attention-module attribute = heads * head_dim, if any


_BERT = _Layout(
    layers="encoder.layer",
    attn="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    heads_field="num_attention_heads",
    ffn_field="intermediate_size",
    hidden_field="hidden_size",
    all_head_attr="all_head_size",
)
_LAYOUTS: dict[str, _Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": _Layout(
        layers="transformer.layer",
        attn="attention",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        heads_field="n_heads",
        ffn_field="hidden_dim",
        hidden_field="dim",
        all_head_attr=None,
    ),
}

# Stored in the config of a head-pruned model: its head dim, which stock configs derive as hidden / heads.
HEAD_DIM_KEY = "kdbench_attention_head_size"


def _layout(model: torch.nn.Module, who: str) -> _Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _LAYOUTS:
        raise KdbenchError(
            f"{who}: cannot prune {type(model).__name__}: no head/FFN layout known for model_type "
            f"{model_type!r}; supported: {', '.join(sorted(_LAYOUTS))}"
        )
    return _LAYOUTS[model_type]


def _blocks(model: torch.nn.Module, who: str) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: from the known layout, else the first ModuleList in base_model."""
    base = getattr(model, "base_model", model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _LAYOUTS:
        return base.get_submodule(_LAYOUTS[model_type].layers)
    for m in base.modules():
        if isinstance(m, torch.nn.ModuleList):
            return m
    raise KdbenchError(f"{who}: cannot find the transformer blocks of {type(model).__name__} (no ModuleList)")


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
    """Global magnitude pruning of the encoder's Linear weights (zeros in place; same shapes).

    Which weights: every nn.Linear inside the transformer blocks (attention q/k/v/out and FFN). Not the
    embeddings: a zero in a lookup table saves no compute and removes whole-token information. Not the pooler or
    classifier head: they are small, task-specific, and pruning them hurts quality more than it saves.
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
        linears = [m for m in _blocks(model, self.name).modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise KdbenchError(f"{self.name}: {type(model).__name__} has no Linear layers in its blocks")
        params = [(m, "weight") for m in linears]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=self.params.amount)
        for m, name in params:
            prune.remove(m, name)
        zeros = sum(int((m.weight == 0).sum()) for m in linears)
        total = sum(m.weight.numel() for m in linears)
        all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
        all_total = sum(p.numel() for p in model.parameters())
        _check_forward(model, inputs or example_inputs(model, device), self.name, _device(device))
        return {
            "sparsity": zeros / total,  # over the pruned Linear weights
            "model_sparsity": all_zeros / all_total,  # over every parameter
            "pruned_layers": len(linears),
        }


@_register("prune_structured")
class PruneStructured(Compressor):
    """Remove whole attention heads and FFN neurons (smaller dense model), with torch-pruning.

    Importance: L2 magnitude. A head scores ||W_q[h]||^2 + ||W_k[h]||^2 + ||W_v[h]||^2 + ||W_o[:, h]||^2 (its rows
    in the q/k/v projections and its columns in the output projection); an FFN neuron scores
    ||W_in[j, :]||^2 + ||W_out[:, j]||^2. Data-free and deterministic; Taylor importance would need gradients on
    task data, which a compressor does not see.
    How many: HF configs hold one head count and one FFN width for all layers, so every layer loses the same
    number: round(amount * count), at most count - 1. The lowest-scoring ones go in each layer.
    Surgery: torch-pruning traces the model (DependencyGraph) and removes the chosen channels from every coupled
    layer, so shapes stay consistent. Then the config (heads, FFN width) and the attention modules' head counts are
    updated. The residual width (hidden size) and the head dim are kept.
    Loading back: FFN-only pruning loads with a plain `from_pretrained`. Stock BERT/DistilBERT derive the head dim
    as hidden / heads and transformers 5 dropped `pruned_heads`, so a head-pruned model records its head dim in
    its config (`kdbench_attention_head_size`) and loads with `kdbench.compress.load_variant`.
    Supported: BERT, RoBERTa and DistilBERT sequence models; others raise naming the model class.
    """

    trainable = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        amount: Ratio = 0.25  # fraction of heads and of FFN neurons removed
        head_amount: PartRatio | None = None  # overrides `amount` for heads; 0 keeps every head
        ffn_amount: PartRatio | None = None  # overrides `amount` for FFN neurons; 0 keeps every neuron

    def apply(self, model, *, device, inputs=None):
        import torch_pruning as tp

        who = self.name
        layout = _layout(model, who)
        _refuse_quantized(model, who)
        cfg = model.config
        blocks = _blocks(model, who)
        heads = int(getattr(cfg, layout.heads_field))
        ffn = int(getattr(cfg, layout.ffn_field))
        head_dim = int(blocks[0].get_submodule(layout.attn).attention_head_size)
        p = self.params
        head_amount = p.amount if p.head_amount is None else p.head_amount
        ffn_amount = p.amount if p.ffn_amount is None else p.ffn_amount
        heads_rm = min(heads - 1, round(heads * head_amount))
        ffn_rm = min(ffn - 1, round(ffn * ffn_amount))
        inputs = inputs or example_inputs(model, device)
        params_before = sum(t.numel() for t in model.parameters())
        shapes_before = {n: t.shape for n, t in model.named_parameters()}

        was_training = model.training
        frozen = {n for n, t in model.named_parameters() if not t.requires_grad}
        model.eval()
        try:
            for t in model.parameters():  # tracing needs grad_fn on every weight, frozen ones included
                t.requires_grad_(True)
            # Tracing follows grad_fn, so it needs autograd on, even if the caller is in inference mode.
            with torch.inference_mode(False), torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=inputs, output_transform=_first_tensor
                )
                for block in blocks:
                    if heads_rm:
                        self._prune_heads(tp, dg, block, layout, heads, head_dim, heads_rm)
                    if ffn_rm:
                        self._prune_ffn(tp, dg, block, layout, ffn, ffn_rm)
        except KdbenchError:
            raise
        except Exception as e:  # noqa: BLE001 - tracing or surgery failed: a limitation, reported as one line
            raise KdbenchError(
                f"{who}: torch-pruning cannot prune {type(model).__name__}: {type(e).__name__}: {_one_line(e)}"
            ) from e
        finally:
            model.train(was_training)
            for n, t in model.named_parameters():  # by name: torch-pruning replaces the Parameters it cuts
                t.requires_grad_(n not in frozen)

        # torch-pruning follows the traced graph: make sure it cut only heads and FFN neurons, never the residual
        # width (embeddings, LayerNorms, the hidden side of every projection, the head).
        self._check_only_inner_dims_changed(model, blocks, layout, shapes_before)

        new_heads, new_ffn = heads - heads_rm, ffn - ffn_rm
        setattr(cfg, layout.heads_field, new_heads)
        setattr(cfg, layout.ffn_field, new_ffn)
        if new_heads * head_dim != getattr(cfg, layout.hidden_field):
            setattr(cfg, HEAD_DIM_KEY, head_dim)
        _check_forward(model, inputs, who, _device(device))
        return {
            "heads_removed_per_layer": heads_rm,
            "heads_per_layer": new_heads,
            "ffn_neurons_removed_per_layer": ffn_rm,
            "ffn_width": new_ffn,
            "importance": "l2",
            "params_before": params_before,
            "params_after": sum(t.numel() for t in model.parameters()),
        }

    @staticmethod
    def _check_only_inner_dims_changed(model, blocks, layout, shapes_before):
        hidden = getattr(model.config, layout.hidden_field)
        inner = {id(p) for b in blocks for m in (layout.q, layout.k, layout.v, layout.o, layout.ffn_in, layout.ffn_out)
                 for p in b.get_submodule(m).parameters()}
        bad = [n for n, t in model.named_parameters() if id(t) not in inner and t.shape != shapes_before.get(n)]
        for b in blocks:
            for m, side in ((layout.q, "in"), (layout.k, "in"), (layout.v, "in"), (layout.ffn_in, "in"),
                            (layout.o, "out"), (layout.ffn_out, "out")):
                lin = b.get_submodule(m)
                if (lin.in_features if side == "in" else lin.out_features) != hidden:
                    bad.append(f"{m} ({side}_features)")
        if bad:
            raise KdbenchError(
                f"prune_structured: torch-pruning also changed the hidden width of {type(model).__name__} "
                f"({', '.join(bad[:3])}); this model is not supported"
            )

    @staticmethod
    def _prune_heads(tp, dg, block, layout, heads, head_dim, n):
        q, k, v, o = (block.get_submodule(x) for x in (layout.q, layout.k, layout.v, layout.o))
        width = heads * head_dim

        def per_head(w: torch.Tensor) -> torch.Tensor:  # (heads*head_dim, in) -> (heads,)
            return w.detach().float().pow(2).reshape(heads, -1).sum(1)

        score = per_head(q.weight) + per_head(k.weight) + per_head(v.weight) + per_head(o.weight.t())
        drop = sorted(score.argsort()[:n].tolist())
        idxs = [h * head_dim + j for h in drop for j in range(head_dim)]
        # Under SDPA tracing q, k, v and o form one group; under eager attention q-k and v-o form two.
        # Prune each projection whose channels are still there.
        for lin in (q, k, v):
            if lin.out_features == width:
                dg.get_pruning_group(lin, tp.prune_linear_out_channels, idxs=idxs).prune()
        if o.in_features != width - len(idxs):
            dg.get_pruning_group(o, tp.prune_linear_in_channels, idxs=idxs).prune()
        attn = block.get_submodule(layout.attn)
        setattr(attn, layout.heads_field, heads - n)
        if layout.all_head_attr:
            setattr(attn, layout.all_head_attr, (heads - n) * head_dim)

    @staticmethod
    def _prune_ffn(tp, dg, block, layout, width, n):
        fin, fout = block.get_submodule(layout.ffn_in), block.get_submodule(layout.ffn_out)
        score = fin.weight.detach().float().pow(2).sum(1) + fout.weight.detach().float().pow(2).sum(0)
        drop = sorted(score.argsort()[:n].tolist())
        dg.get_pruning_group(fin, tp.prune_linear_out_channels, idxs=drop).prune()
        if fout.in_features != width - n:
            dg.get_pruning_group(fout, tp.prune_linear_in_channels, idxs=drop).prune()


# ---------------------------------------------------------------------------------------------------------------
# Quantization and casts
# ---------------------------------------------------------------------------------------------------------------


@_register("int8")
class Int8(Compressor):
    """int8 quantization of every nn.Linear with torchao `quantize_` (CPU and CUDA).

    mode "dynamic": Int8DynamicActivationInt8WeightConfig: int8 per-channel weights, activations quantized per
    token at run time (int8 matmul). mode "weight_only": Int8WeightOnlyConfig: int8 per-channel weights,
    dequantized in the matmul (saves memory traffic, not compute).
    On CPUs without VNNI the quantization range is reduced (torchao's `should_reduce_range`) to avoid overflow.
    torchao's global inductor settings are not touched (set_inductor_config=False): kdbench profiles eager mode,
    where int8 saves size and memory but is not always faster than fp32; torchao's speed-ups need torch.compile.
    Embeddings stay in float.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["dynamic", "weight_only"] = "dynamic"

    def apply(self, model, *, device, inputs=None):
        dev = _device(device)
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
        n = sum(isinstance(m, torch.nn.Linear) and not _is_quantized(m.weight) for m in model.modules())
        try:
            quantize_(model, config)
        except Exception as e:  # noqa: BLE001
            raise KdbenchError(f"int8 not supported on {dev}: {type(e).__name__}: {_one_line(e)}") from e
        _drop_instance_reprs(model)
        _check_forward(model, inputs or example_inputs(model, dev), "int8", dev)
        import torchao

        return {"mode": self.params.mode, "quantized_linear": n, "reduce_range": reduce, "torchao": torchao.__version__}


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
        try:
            model.to(self.dtype)
        except Exception as e:  # noqa: BLE001
            raise KdbenchError(f"{self.name} not supported on {dev}: {type(e).__name__}: {_one_line(e)}") from e
        _check_forward(model, inputs or example_inputs(model, dev), self.name, dev)
        return {"dtype": str(self.dtype).removeprefix("torch."), "native": native}


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
    """Keep exactly-zero Linear weights at zero while training (recovery after pruning).

    Masks are registered with torch.nn.utils.prune, so the zeros stay zeros through optimizer steps, and are made
    permanent again on exit.
    """
    from torch.nn.utils import prune

    masked = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and bool((module.weight == 0).any()):
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
    if any(_is_quantized(p) for p in model.parameters()):
        _drop_instance_reprs(model)
        torch.save(model, path / PICKLE_FILE)
        if hasattr(getattr(model, "config", None), "save_pretrained"):
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(path)  # for people and tools that read config.json
        fmt = "torch.save"
    else:
        model.save_pretrained(path)
        fmt = "safetensors"
    (path / VARIANT_FILE).write_text(json.dumps({"format": fmt}))
    return {"format": fmt}


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

    config = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise KdbenchError(f"cannot load {path}: its config.json names no known transformers architecture ({archs})")
    head_dim = getattr(config, HEAD_DIM_KEY, None)
    if head_dim is None:
        return cls.from_pretrained(path)

    # Head-pruned: build with the original head count (hidden / head_dim), shrink the attention projections to
    # the saved shapes, then load the weights.
    layout = _LAYOUTS.get(config.model_type)
    if layout is None:
        raise KdbenchError(f"cannot load {path}: head-pruned model_type {config.model_type!r} is not supported")
    build_cfg = copy.deepcopy(config)
    hidden = getattr(config, layout.hidden_field)
    setattr(build_cfg, layout.heads_field, hidden // head_dim)
    delattr(build_cfg, HEAD_DIM_KEY)
    model = cls(build_cfg)
    heads = getattr(config, layout.heads_field)
    width = heads * head_dim
    for block in _blocks(model, "load"):
        for name in (layout.q, layout.k, layout.v):
            _replace_linear(block, name, hidden, width)
        _replace_linear(block, layout.o, width, hidden)
        attn = block.get_submodule(layout.attn)
        setattr(attn, layout.heads_field, heads)
        if layout.all_head_attr:
            setattr(attn, layout.all_head_attr, width)
    # Submodules share the config object: give it back the pruned head count and the head dim.
    for cfg in {id(c): c for c in [model.config] + [getattr(m, "config", None) for m in model.modules()] if c}.values():
        if getattr(cfg, "model_type", None) == config.model_type:
            setattr(cfg, layout.heads_field, heads)
            setattr(cfg, HEAD_DIM_KEY, head_dim)
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


def _replace_linear(block: torch.nn.Module, name: str, fan_in: int, fan_out: int) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = block.get_submodule(parent) if parent else block
    old = getattr(owner, leaf)
    setattr(owner, leaf, torch.nn.Linear(fan_in, fan_out, bias=old.bias is not None, dtype=old.weight.dtype))


__all__ = [
    "HEAD_DIM_KEY",
    "Compressor",
    "apply_variant",
    "compressors",
    "example_inputs",
    "load_variant",
    "native_dtype_support",
    "save_variant",
]
