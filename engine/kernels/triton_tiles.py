"""What the engine's Triton attention kernels (fixed's, the band's) share: the tiles they compute
in, sized for the GPUs' shared memory, the dtype their products take, and how near a probe of a
variant must come to the math kernel."""

from __future__ import annotations

import os

import torch

from .device import triton
from .triton_merge import feature_tile

if triton is not None:
    import triton.language as tl

# Widest head dim (q's or v's) the tiles are sized for (`attention_tiles`), as flash attention's
# 256; wider ones take the kernels' torch plans.
MAX_HEAD_DIM = 256
# Probe dtypes' tolerance against the float32 math kernel (a miscompile is far off; rounding is not).
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def attention_tiles(dtype: torch.dtype, d: int, dv: int) -> dict:
    """A kernel's tiles, product dtype, warps and pipeline stages for these inputs. A program holds
    a query tile and, per stage, a key and a value tile. One tile size for every length (decode
    steps too), so a variant compiled once serves all; tiles whose shared memory fits the 99 KB a
    block gets on sm_86 and sm_89 (RTX 30 and 40, A10, L4), the least from sm_80 on. float32 in
    IEEE float32 takes several times half precision's: 176 KB at 64 x 64 tiles, D = 128, 3 stages;
    72 KB as below; D = 256 at 32 x 32 tiles 100 KB, at 32 x 16 66 KB. Half precision at D = 256
    took 172 KB at 64 x 64 tiles and 3 stages (229 KB on sm_90), 70 KB at 64 x 32 and 2 (fixed's
    kernel). tests/test_triton_compile.py compiles them for sm_86 and sm_90, specialised as
    launches are."""
    half = dtype != torch.float32
    widest = max(d, dv)
    return dict(DOT_DTYPE=dot_dtype(dtype), IEEE=not half,
                BLOCK_M=64 if half or widest <= 128 else 32,
                BLOCK_N=(64 if half else 32) if widest <= 128 else (32 if half else 16),
                BLOCK_D=feature_tile(d), BLOCK_DV=feature_tile(dv),
                num_warps=4 if widest <= 64 else 8, num_stages=3 if half and widest <= 128 else 2)


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether a kernel must take its row offsets in 64 bits for these tensors: an element's offset
    within its [rows, features] plane (the batch and head offsets are 64-bit always) reaches 2^31,
    as a packed-qkv view of 175,000 tokens does (rows 3 x 32 x 128 elements apart). In 32 bits it
    wraps, and the kernel reads or writes out of bounds. Otherwise 32 bits, the variant measured."""
    return any(sum((size - 1) * abs(stride) for size, stride in zip(x.shape[-2:], x.stride()[-2:])) >= 2**31
               for x in tensors if x.numel())


def dot_dtype(dtype: torch.dtype):
    """The dtype the products take: the inputs' own, but float32 for bfloat16 in the interpreter
    (which computes bfloat16 products on bit patterns)."""
    if dtype == torch.float32 or dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
