"""What the engine's Triton attention kernels (fixed's, the band's) share: the tiles they compute
in, sized for the GPUs' shared memory, the dtype their products take, when their row offsets
need 64 bits, how near a probe of a variant must come to the math kernel; and the jitted pieces
of the FlashAttention loop around their key walks (a query tile's load, the online softmax's
starting state, empty or a partial's, a key tile's step, the rows' store), which Triton inlines:
sm_90's PTX has the same instructions as when each kernel wrote them out."""

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
    launches are. q's and v's features take one tile width, the wider's: on an H200 (Triton 3.6)
    D = 40 with Dv = 24 in half precision, in tiles of 64 and 32 features, answered wrong in
    fixed's kernel (and once read out of bounds), where 40 / 40, 48 / 24 and 24 / 24 were exact."""
    half = dtype != torch.float32
    widest = max(d, dv)
    return dict(DOT_DTYPE=dot_dtype(dtype), IEEE=not half,
                BLOCK_M=64 if half or widest <= 128 else 32,
                BLOCK_N=(64 if half else 32) if widest <= 128 else (32 if half else 16),
                BLOCK_D=feature_tile(widest), BLOCK_DV=feature_tile(widest),
                num_warps=4 if widest <= 64 else 8, num_stages=3 if half and widest <= 128 else 2)


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether a kernel must take its row offsets in 64 bits for these tensors: an element's offset
    within its [rows, features] plane (the batch and head offsets are 64-bit always) reaches 2^31,
    as a packed-qkv view of 175,000 tokens does (rows 3 x 32 x 128 elements apart). In 32 bits it
    wraps, and the kernel reads or writes out of bounds. Otherwise 32 bits, the variant measured."""
    for x in tensors:
        (rows, feats), (row_stride, feat_stride) = x.shape[-2:], x.stride()[-2:]
        if x.numel() and (rows - 1) * abs(row_stride) + (feats - 1) * abs(feat_stride) >= 2**31:
            return True
    return False


def dot_dtype(dtype: torch.dtype):
    """The dtype the products take: the inputs' own, but float32 for bfloat16 in the interpreter
    (which computes bfloat16 products on bit patterns)."""
    if dtype == torch.float32 or dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


if triton is not None:
    @triton.jit
    def load_query_tile(Q, pid_m, item, head, sqb, sqh, sqm, sqd, lq, lk, d, DOT_DTYPE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, WIDE_OFFSETS: tl.constexpr):
        """Query tile `pid_m` of one head: (its rows of q in the products' dtype, the row indices
        (64-bit with WIDE_OFFSETS: `wide_offsets`), their positions i (queries bottom-right
        aligned: row r is position Lk - Lq + r), which rows exist, the tile's first and last
        positions)."""
        offset = lk - lq
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        i = rows + offset
        row_ok = rows < lq
        if WIDE_OFFSETS:
            rows = rows.to(tl.int64)
        feats = tl.arange(0, BLOCK_D)
        q = tl.load(Q + item * sqb + head * sqh + rows[:, None] * sqm + feats[None, :] * sqd,
                    mask=row_ok[:, None] & (feats[None, :] < d), other=0.0).to(DOT_DTYPE)
        first = pid_m * BLOCK_M + offset
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, lq) - 1 + offset
        return q, rows, i, row_ok, first, last

    @triton.jit
    def initial_state(Seed, SeedLse, rows, row_ok, seed_first, seed_rows, ssm, ssd, sslm, dv, SEEDED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
        """The online softmax's starting (acc, m_i, l_i): nothing seen, or with SEEDED the partial
        (out, lse) over other keys of rows seed_first .. seed_first + seed_rows - 1, as if the walk
        had already seen those keys (acc = out, m_i = lse in base 2, l_i = 1; a row of the partial
        without keys, and any other row, starts empty), so that the rows' result is the exact merge
        of both key sets, at any magnitude of lse, with no second pass over the outputs. Seed and
        SeedLse point at the tile's batch item and head."""
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if SEEDED:
            at = rows - seed_first
            seeded = row_ok & (at >= 0) & (at < seed_rows)
            lse = tl.load(SeedLse + at * sslm, mask=seeded, other=float("-inf"))
            seen = lse > float("-inf")
            vfeats = tl.arange(0, BLOCK_DV)
            acc = tl.load(Seed + at[:, None] * ssm + vfeats[None, :] * ssd,
                          mask=(seeded & seen)[:, None] & (vfeats[None, :] < dv), other=0.0).to(tl.float32)
            m_i = lse * 1.4426950408889634  # log2(e)
            l_i = tl.where(seen, 1.0, 0.0)
        return acc, m_i, l_i

    @triton.jit
    def softmax_step(acc, m_i, l_i, scores, vt, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
        """One key tile into the online softmax (as FlashAttention): `scores` in base 2, -inf where
        masked; the running max m_i and sum l_i rescaled, P @ V added to acc. A row with no key yet
        keeps max -inf and adds nothing."""
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing to rescale from
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        if IEEE:
            pv = tl.dot(p.to(DOT_DTYPE), vt, input_precision="ieee")
        else:
            pv = tl.dot(p.to(DOT_DTYPE), vt)
        return acc * alpha[:, None] + pv, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def store_rows(Out, Lse, acc, m_i, l_i, rows, row_ok, som, sod, slm, dv, BLOCK_DV: tl.constexpr):
        """The online softmax's rows normalised and stored: out = acc / l in Out's dtype, lse (natural
        log) from the running max m_i (base 2) and sum l_i; a row that saw no key gets zeros and
        -inf. Out and Lse point at the tile's batch item and head."""
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        vfeats = tl.arange(0, BLOCK_DV)
        tl.store(Out + rows[:, None] * som + vfeats[None, :] * sod, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (vfeats[None, :] < dv))
        tl.store(Lse + rows * slm, lse, mask=row_ok)
