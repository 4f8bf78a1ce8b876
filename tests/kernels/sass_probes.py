"""Tiny @triton.jit kernels whose SASS counts are known, compiled for sm_90 by tests/kernels/test_static_model.py
(in a child process without TRITON_INTERPRET)."""

import triton
import triton.language as tl


@triton.jit
def exp2_sum(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """One program sums exp2 over n elements, a tile per iteration: one MUFU.EX2 and 4 bytes read per element."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.exp2(tl.load(x_ptr + offs, mask=offs < n, other=0.0))
    tl.store(y_ptr + tl.arange(0, BLOCK), acc)


@triton.jit
def copy(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """y = x over one tile per program: 8 bytes moved per element, no MUFU, no loop, no barrier."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def tile_sum(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """A tile's sum: across warps it meets in shared memory behind barriers; inside one warp, shuffles only."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + tl.program_id(0), tl.sum(tl.load(x_ptr + offs), axis=0))
