"""Quantization and casts: int8 (torchao, or PyTorch's own dynamic int8 on a CPU), fp16 and bf16."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from kdbench.compress.base import Compressor, as_device, check_forward, example_inputs, one_line, register
from kdbench.compress.layout import conv1d_to_linear
from kdbench.errors import KdbenchError
from kdbench.introspect import drop_instance_reprs, is_quantized_tensor, packed_linears

log = logging.getLogger(__name__)

@register("int8")
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
    path on CPUs today. Its Linears hold packed int8 weights instead of parameters (kdbench.introspect counts them).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["dynamic", "weight_only"] = "dynamic"
        # auto: torch_dynamic on a CPU (mode dynamic), torchao elsewhere. The default, because torchao's eager int8
        # is many times slower than fp32 on a CPU (see above)
        backend: Literal["torchao", "torch_dynamic", "auto"] = "auto"

    def apply(self, model, *, device, inputs=None):
        dev = as_device(device)
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
        converted = conv1d_to_linear(model)
        tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}

        def quantize_this(m: torch.nn.Module, _fqn: str) -> bool:
            return (
                type(m) is torch.nn.Linear  # not NonDynamicallyQuantizableLinear, as torchao's own filter
                and id(m.weight) not in tied
                and not is_quantized_tensor(m.weight)
            )

        try:
            quantize_(model, config, filter_fn=quantize_this)
        except Exception as e:  # noqa: BLE001
            raise KdbenchError(f"int8 not supported on {dev}: {type(e).__name__}: {one_line(e)}") from e
        drop_instance_reprs(model)
        check_forward(model, inputs or example_inputs(model, dev), "int8", dev)
        import torchao

        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        return {
            "mode": self.params.mode,
            "quantized_linear": sum(is_quantized_tensor(m.weight) for _, m in linears),
            "float_linear": [n for n, m in linears if not is_quantized_tensor(m.weight)],
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

        converted = conv1d_to_linear(model)
        tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        chosen = {name: default_dynamic_qconfig for name, m in model.named_modules()
                  if type(m) is torch.nn.Linear and id(m.weight) not in tied}
        floats = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and name not in chosen]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices, once per Linear
                quantize_dynamic(model, chosen, dtype=torch.qint8, inplace=True)
        except Exception as e:  # noqa: BLE001
            raise KdbenchError(f"int8 not supported on {dev}: {type(e).__name__}: {one_line(e)}") from e
        check_forward(model, inputs or example_inputs(model, dev), "int8", dev)
        return {
            "mode": "dynamic",
            "quantized_linear": len(packed_linears(model)),
            "float_linear": floats,
            "conv1d_to_linear": converted,
            "backend": "torch_dynamic",
            "engine": torch.backends.quantized.engine,
        }


def native_dtype_support(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `device` has native matmul kernels for `dtype` (not emulated through fp32 conversions)."""
    dev = as_device(device)
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
        dev = as_device(device)
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
            raise KdbenchError(f"{self.name} not supported on {dev}: {type(e).__name__}: {one_line(e)}") from e
        for m, n, b in derived:
            setattr(m, n, b)
        check_forward(model, inputs or example_inputs(model, dev), self.name, dev)
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "native": native,
            "float32_buffers": [n for n, b in model.named_buffers() if b.dtype == torch.float32],
        }


@register("fp16")
class Fp16(_Cast):
    """Cast weights and compute to float16 for inference.

    On CUDA, native. On CPU, float16 matmuls run natively only with AVX512-FP16/AMX-FP16 (oneDNN's
    `_is_mkldnn_fp16_supported`); elsewhere they are converted through fp32: measured on the 2-core AVX2 CI box,
    a 2048x384x1536 Linear took 250 ms in fp16 vs 56 ms in fp32. So without native support this raises unless
    `allow_emulated: true`. The forward check also catches fp16 overflow (non-finite outputs).
    """

    dtype = torch.float16


@register("bf16")
class Bf16(_Cast):
    """Cast weights and compute to bfloat16 for inference.

    On CUDA, native from Ampere (sm80) on. On CPU, native with AVX512-BF16/AMX (oneDNN's
    `_is_mkldnn_bf16_supported`); elsewhere emulated and slower than fp32 (418 ms vs 56 ms for the Linear above on
    the AVX2 box), so without native support this raises unless `allow_emulated: true`.
    """

    dtype = torch.bfloat16
