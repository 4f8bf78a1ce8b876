"""What a model holds: parameter counts, tensor bytes, quantised and packed weights, transformer blocks and widths.

A leaf (torch, the standard library and kdbench.errors only), so that compress, profile, methods and run can
all read models without importing each other.
"""

from __future__ import annotations

import torch

from kdbench.errors import KdbenchError

PARAMS_METHOD = (
    "model.parameters() (tied weights once); quantized tensor subclasses count their logical elements (the float "
    "shape they stand for) and their nonzeros after dequantize(), and so do the packed weights of torch.ao "
    "dynamically quantized Linears; buffers are not parameters"
)


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """True for tensor subclasses such as torchao's Int8Tensor (plain Parameters detach to torch.Tensor)."""
    return type(t.detach()) is not torch.Tensor


def packed_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """PyTorch's own dynamically quantized Linears (torch.ao, the int8 compressor's torch_dynamic backend): their
    int8 weights are packed for the CPU kernels, held by the module but not as parameters."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [m for m in model.modules() if isinstance(m, DynamicLinear)]


def is_quantized_model(model: torch.nn.Module) -> bool:
    """Quantized weights anywhere: torchao tensor subclasses, or torch.ao's packed dynamic Linears."""
    return any(is_quantized_tensor(p) for p in model.parameters()) or bool(packed_linears(model))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, nonzero) parameter elements; see PARAMS_METHOD for what is counted."""
    total = nonzero = 0
    for m in packed_linears(model):  # their weights are no parameters: count the packed ones
        for t in (m.weight().dequantize(), m.bias()):
            if t is not None:
                total += t.numel()
                nonzero += int(torch.count_nonzero(t))
    for p in model.parameters():
        t = p.detach()
        total += t.numel()  # logical elements, also for torchao subclasses
        if is_quantized_tensor(t):
            try:
                t = t.dequantize()
            except Exception:  # noqa: BLE001 - a subclass without dequantize: count it as dense
                nonzero += t.numel()
                continue
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers in memory (inner tensors of quantized subclasses; tied weights once)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if is_quantized_tensor(t) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for n in names:
                inner = getattr(t, n)
                if isinstance(inner, torch.Tensor):
                    add(inner)
            return
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t.detach())
    for m in packed_linears(model):  # int8 weights (1 byte each) and float biases, packed outside the parameters
        total += m.weight().numel() + sum(b.numel() * b.element_size() for b in [m.bias()] if b is not None)
    return total


def drop_instance_reprs(model: torch.nn.Module) -> None:
    """Make a torchao-quantised model picklable, in place."""
    # quantize_ sets a per-instance `extra_repr` (a bound functools.partial) that pickle cannot save; the class's
    # own extra_repr is fine for printing.
    for m in model.modules():
        m.__dict__.pop("extra_repr", None)


# ---------------------------------------------------------------------------------------------------------------
# Layer stacks and transformer blocks: what the intermediate-layer methods map and freeze


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)  # DistilBERT maps it to n_layers, T5 to num_layers (its encoder's)


def hidden_width(model) -> int:
    return int(model.config.hidden_size)  # DistilBERT maps it to dim, T5 to d_model (both its stacks' width)


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def layer_stacks(model) -> dict[str, int]:
    """The model's layer stacks and their layer counts: {"": L} for a one-stack model (BERT, GPT-2, Llama);
    {"encoder": Le, "decoder": Ld} for an encoder-decoder (T5: num_layers and num_decoder_layers, which T5Config
    sets to num_layers when it is not given)."""
    if not is_encoder_decoder(model):
        return {"": num_layers(model)}
    config = model.config
    decoder = next((getattr(config, k) for k in ("num_decoder_layers", "decoder_layers")
                    if getattr(config, k, None) is not None), config.num_hidden_layers)
    return {"encoder": num_layers(model), "decoder": int(decoder)}


_BLOCK_NAMES = ("layer", "layers", "h", "block", "blocks")


def transformer_blocks(model, method: str = "progressive"):
    """(name, ModuleList) of the model's transformer blocks, input side first.

    The one (outermost) ModuleList of exactly num_hidden_layers modules; where there are several, the one named
    layer, layers, h, block or blocks: `bert.encoder.layer` (BERT, RoBERTa, ELECTRA), `distilbert.transformer.layer`
    (DistilBERT), `transformer.h` (GPT-2), `model.layers` (Llama, Qwen). An encoder-decoder has two: an error.
    """
    n = num_layers(model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    # Outermost lists only: a list inside a block that happens to have n entries (T5's sub-layers) is no candidate.
    found = [(name, m) for name, m in found if not any(name.startswith(f"{other}.") for other, _ in found)]
    named = [(name, m) for name, m in found if name.rsplit(".", 1)[-1] in _BLOCK_NAMES]
    pick = named if len(named) == 1 else found
    if n < 1 or len(pick) != 1:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        seen = f"found {len(pick)}: {', '.join(name for name, _ in pick)}" if pick else "found none"
        raise KdbenchError(f"method {method!r}: cannot find the transformer blocks of the {model_type!r} student "
                           f"(one ModuleList of its {n} layers; {seen})")
    return pick[0]


def stack_blocks(model, method: str = "progressive") -> dict:
    """{stack: ModuleList of its transformer blocks}, input side first: {"": blocks} for a one-stack model (see
    `transformer_blocks`); {"encoder": ..., "decoder": ...} for an encoder-decoder, each the one outermost
    ModuleList of the stack's layer count under the stack's module (T5: encoder.block, decoder.block; BART:
    model.encoder.layers, model.decoder.layers)."""
    if not is_encoder_decoder(model):
        return {"": transformer_blocks(model, method)[1]}
    out = {}
    for stack, n in layer_stacks(model).items():
        found = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == n and stack in name.split(".")[:-1]]
        found = [(name, m) for name, m in found if not any(name.startswith(f"{other}.") for other, _ in found)]
        if n < 1 or len(found) != 1:
            model_type = getattr(model.config, "model_type", type(model).__name__)
            seen = f"found {len(found)}: {', '.join(name for name, _ in found)}" if found else "found none"
            raise KdbenchError(f"method {method!r}: cannot find the {stack} blocks of the {model_type!r} student "
                               f"(one ModuleList of its {n} {stack} layers; {seen})")
        out[stack] = found[0][1]
    return out


def stack_parameters(model, exclude=()) -> tuple[list, dict[str, list[list]], list]:
    """The model's parameters as (input side, {stack: [block 1, ..., block L]}, the rest), leaving out those in
    `exclude`.

    Input side: the parameters registered before the first block (the embeddings, ELECTRA's embedding projection,
    T5's shared embeddings); the rest: everything after it that is in no block (pooler, final norms, classifier,
    an encoder's final norm between its blocks and the decoder's). HF models register their modules in the order
    of the forward pass. A tied weight counts once, where it is first registered.
    """
    stacks = stack_blocks(model)
    block_of = {id(p): (stack, i) for stack, blocks in stacks.items() for i, block in enumerate(blocks)
                for p in block.parameters()}
    skip = {id(p) for p in exclude}
    before, per_stack, rest = [], {stack: [[] for _ in blocks] for stack, blocks in stacks.items()}, []
    for p in model.parameters():
        if id(p) in skip:
            continue
        if id(p) in block_of:
            stack, i = block_of[id(p)]
            per_stack[stack][i].append(p)
        else:
            (rest if any(any(b) for b in per_stack.values()) else before).append(p)
    return before, per_stack, rest
