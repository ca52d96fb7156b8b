"""Sliding window on CUDA as one Triton kernel: each query tile walks only its band of keys.

A program takes BLOCK_M query rows of one head. Row i attends keys i - w + 1 .. i (without causal
also .. i + w - 1), so the tile's rows together attend one contiguous key range, from its first
row's lowest key to its last row's highest, about w + BLOCK_M keys: its key tiles start there
(not at a multiple of the tile), and the work is n * (w + BLOCK_M) against the ideal n * w: only
the last key tile reaches past the band, by less than a tile. The keys every row of the tile attends (from its
last row's lowest to its first row's highest) take tiles without a mask; only the tiles at the
two edges of the band compute one (as FlashAttention splits its diagonal blocks from the rest).
Programs are numbered query tile first, so those running side by side are neighbouring tiles of
one head, whose key ranges overlap in L2.

Exact in the precision flash attention keeps, as fixed's kernel (triton_fixed.py): scores
accumulate in float32 (float32 inputs in IEEE float32, not TF32), the probabilities meet V in the
inputs' dtype. Runs where Triton runs it: on CUDA tensors, or on any under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from .dense import additive_mask, math_attention
from .device import TRITON_OPTIONS, launching_on, runs_on_triton, triton
from .triton_tiles import MAX_HEAD_DIM, PROBE_TOLERANCE, attention_tiles, wide_offsets

if triton is not None:  # without Triton the band keeps the flash local window or its tiles
    import triton.language as tl

    from .triton_tiles import initial_state, load_query_tile, softmax_step, store_rows

logger = logging.getLogger(__name__)


def takes(q: torch.Tensor, v: torch.Tensor, causal: bool, seeded: bool = False) -> bool:
    """Whether the band runs on the Triton kernel for these inputs (continuing a partial with
    `seeded`): half precision (in float32 the band's tiles on the memory-efficient kernel were as
    fast: 4.0 ms against 4.4 at n = 65536, w = 256, H = 8, D = 64 on an H200), where Triton runs it
    (`runs_on_triton`), head dims within MAX_HEAD_DIM, and its variant for them matching the
    contract here (`matches_contract`)."""
    d, dv = q.shape[-1], v.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and max(d, dv) <= MAX_HEAD_DIM and runs_on_triton(q.device)
            and matches_contract(q.device, q.dtype, d, dv, causal, seeded))


@functools.cache
def matches_contract(device: torch.device, dtype: torch.dtype, d: int, dv: int, causal: bool, seeded: bool) -> bool:
    """Whether the kernel's variant for these inputs compiles here and matches the masked math
    kernel on a tiny problem with every branch in play (edge tiles, a full tile, grouped heads,
    queries bottom-right aligned, rows past the last tile's end; `seeded`: continuing a partial
    over the keys outside the band, in the inputs' dtype, that the first row lacks): probed once
    per variant and device, as fixed's kernel is. A failure leaves those calls to the flash local
    window or the band's tiles (and a seed to a merge after; said in the log) instead of failing
    requests or answering wrong."""
    g = torch.Generator().manual_seed(0)
    variant = kernel_variant(dtype, d, dv)
    lq, w = variant["BLOCK_M"] + 3, variant["BLOCK_N"] + 5  # a full tile, two edges, a short last tile
    lk = lq + 6
    q, k, v = (torch.randn(1, h, n, width, generator=g).to(device, dtype)
               for h, n, width in ((2, lq, d), (1, lk, d), (1, lk, dv)))
    i = torch.arange(lk - lq, lk, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    keep = (i - j < w) & (j - i < (1 if causal else w))
    rest = ~keep & (j <= i) if causal else ~keep  # the keys a seed brings: from the second row on
    rest[0] = False
    kf, vf = k.float().expand(-1, 2, -1, -1), v.float().expand(-1, 2, -1, -1)
    seed = None
    if seeded:
        seed_out, seed_lse = math_attention(q[:, :, 1:].float(), kf, vf, scale=0.25,
                                            mask=additive_mask(rest[1:], torch.float32))
        seed = (1, seed_out.to(dtype), seed_lse)
    try:
        out, lse = triton_band_attention(q, k, v, window=w, scale=0.25, causal=causal, seed=seed)
    except Exception:  # noqa: BLE001 (any compile or launch error: the other plans take over)
        logger.warning("the band's Triton kernel failed to run for %s: these calls go to %s",
                       _variant_name(device, dtype, d, dv, causal, seeded), _fallback(seeded), exc_info=True)
        return False
    ref_out, ref_lse = math_attention(q.float(), kf, vf, scale=0.25,
                                      mask=additive_mask(keep | rest if seeded else keep, torch.float32))
    tol = PROBE_TOLERANCE[dtype]
    matches = (torch.allclose(out.float(), ref_out, atol=tol, rtol=tol)
               and torch.allclose(lse, ref_lse, atol=tol))
    if not matches:
        logger.warning("the band's Triton kernel differs from the contract for %s: these calls go to %s",
                       _variant_name(device, dtype, d, dv, causal, seeded), _fallback(seeded))
    return matches


def _fallback(seeded: bool) -> str:
    """What takes a failed variant's calls."""
    return "the plain variant and a merge" if seeded else "the flash local window or the band's tiles"


def _variant_name(device: torch.device, dtype: torch.dtype, d: int, dv: int, causal: bool, seeded: bool) -> str:
    return (f"{dtype} on {device}, head dims {d} / {dv}, {'causal' if causal else 'non-causal'}"
            f"{', continuing a partial' if seeded else ''}")


def triton_band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, causal: bool = True,
    seed: tuple[int, torch.Tensor, torch.Tensor] | None = None, variant: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window attention in one launch, queries bottom-right aligned: (out in q's dtype
    [B, H, Lq, Dv], lse float32 [B, H, Lq]). Every row attends at least its own position's key.
    `seed` = (first row, out [B, H, rows, Dv] in any float dtype, lse float32 [B, H, rows]): a partial
    result of those rows over keys the band does not hold (a union's strided keys), which the kernel
    continues (`initial_state`), so that they come out merged with it, with no merge launch after.
    `variant` replaces `kernel_variant`'s tiles (a benchmark's sweep)."""
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    assert lk >= lq, "queries are bottom-right aligned: at least as many keys as queries"
    out = torch.empty(b, h, lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    seed_first, seed_out, seed_lse = seed if seed is not None else (0, out, lse)  # unread unless SEEDED
    variant = {**kernel_variant(q.dtype, d, dv), **(variant or {}), "CAUSAL": causal, "SEEDED": seed is not None,
               "WIDE_OFFSETS": wide_offsets(q, k, v, out, seed_out)}
    query_tiles = triton.cdiv(lq, variant["BLOCK_M"])
    if lq and b * h:
        with launching_on(q.device):
            _band_kernel[(b * h * query_tiles,)](
                q, k, v, out, lse, seed_out, seed_lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                *lse.stride(), *seed_out.stride(), *seed_lse.stride(), h, h // hkv, lq, lk, d, dv, window,
                query_tiles, seed_first, seed_lse.shape[-1], scale * math.log2(math.e), **variant, **TRITON_OPTIONS,
            )
    return out, lse


# Key tiles of 32 rows in half precision up to D = 128: of 64 x 64 (`attention_tiles`), 64 x 32,
# 64 x 128, 128 x 32, 128 x 64 and 128 x 128 tiles in 2 to 4 stages, 64 x 32 in 3 was the fastest
# at every n and window (H200, bfloat16, H = 8, D = 64; n = 131072, w = 128 / 256 / 1024: 0.32 /
# 0.40 / 0.95 ms, against 0.44 / 0.52 / 1.06 at 64 x 64 and flash's local window 0.49 / 0.99 /
# 1.88), and within 5% of the best at D = 128 (`python -m bench.gpu_band`). Thinner key tiles
# waste less at the band's two edges.
HALF_KEY_TILE = 32


def kernel_variant(dtype: torch.dtype, d: int, dv: int) -> dict:
    """The kernel's compile-time arguments for these inputs: `attention_tiles`, as fixed's kernel,
    with key tiles of HALF_KEY_TILE rows in half precision up to D = 128."""
    tiles = attention_tiles(dtype, d, dv)
    if dtype != torch.float32 and max(d, dv) <= 128:
        tiles["BLOCK_N"] = HALF_KEY_TILE
    return tiles


if triton is not None:
    @triton.jit
    def _band_tiles(acc, m_i, l_i, q, k_base, v_base, i, start, tiles, lk, window, skn, skd, svn, svd, d, dv,
                    qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    WIDE_OFFSETS: tl.constexpr):
        """`tiles` key tiles from key `start` on, into the online softmax (acc, m_i, l_i): with
        MASKED each score outside the band or past the last key is -inf, else every key counts."""
        feats, vfeats = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
        for tile in range(tiles):
            j = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            if WIDE_OFFSETS:  # `wide_offsets`
                j = j.to(tl.int64)
            if MASKED:
                load = j < lk
                kt = tl.load(k_base + j[None, :] * skn + feats[:, None] * skd,
                             mask=load[None, :] & (feats[:, None] < d), other=0.0).to(DOT_DTYPE)
            else:  # every key of a full tile exists
                kt = tl.load(k_base + j[None, :] * skn + feats[:, None] * skd, mask=feats[:, None] < d,
                             other=0.0).to(DOT_DTYPE)
            if IEEE:
                scores = tl.dot(q, kt, input_precision="ieee") * qk_scale
            else:
                scores = tl.dot(q, kt) * qk_scale
            if MASKED:
                diff = i[:, None] - j[None, :]
                keep = load[None, :] & (diff < window)
                if CAUSAL:
                    keep &= diff >= 0
                else:
                    keep &= -diff < window
                scores = tl.where(keep, scores, float("-inf"))
            if MASKED:
                vt = tl.load(v_base + j[:, None] * svn + vfeats[None, :] * svd,
                             mask=load[:, None] & (vfeats[None, :] < dv), other=0.0).to(DOT_DTYPE)
            else:
                vt = tl.load(v_base + j[:, None] * svn + vfeats[None, :] * svd, mask=vfeats[None, :] < dv,
                             other=0.0).to(DOT_DTYPE)
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, scores, vt, DOT_DTYPE, IEEE)
        return acc, m_i, l_i

    # As in fixed's kernel: the lengths, the window and the log-sum-exp's batch and head strides
    # vary from request to request and are not specialised on (a new length compiles nothing); the
    # head dims and the other strides are, so that a head dim that is a multiple of 16 loads tiles
    # as 16-byte vectors into the pipeline.
    # So are a seed's rows and its log-sum-exp's strides (`triton_band_attention`'s `seed`, whose
    # makers lay it out variously); its output's strides are specialised on, as Out's are.
    @triton.jit(do_not_specialize=["heads", "group", "lq", "lk", "window", "query_tiles", "slb", "slh", "sslb", "sslh",
                                   "sslm", "seed_first", "seed_rows"])
    def _band_kernel(
        Q, K, V, Out, Lse, Seed, SeedLse,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
        ssb, ssh, ssm, ssd, sslb, sslh, sslm,
        heads, group, lq, lk, d, dv, window, query_tiles, seed_first, seed_rows, qk_scale,
        CAUSAL: tl.constexpr, SEEDED: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        WIDE_OFFSETS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_m = pid % query_tiles  # query tile first: neighbouring programs share keys in L2
        pid_bh = (pid // query_tiles).to(tl.int64)  # offsets past 2^31 elements
        head, item = pid_bh % heads, pid_bh // heads
        kv_head = head // group
        q, rows, i, row_ok, first, last = load_query_tile(Q, pid_m, item, head, sqb, sqh, sqm, sqd, lq, lk, d,
                                                          DOT_DTYPE, BLOCK_M, BLOCK_D, WIDE_OFFSETS)
        k_base = K + item * skb + kv_head * skh
        v_base = V + item * svb + kv_head * svh

        # The tile's keys, lo .. hi - 1; those all its rows attend, full_lo .. full_hi - 1.
        after = 0 if CAUSAL else window - 1  # keys a row attends past its own position
        lo = tl.maximum(first - window + 1, 0)
        hi = tl.minimum(last + after + 1, lk)
        full_lo = tl.maximum(last - window + 1, lo)
        full_hi = tl.minimum(first + after + 1, hi)
        # Masked tiles from lo past full_lo, full tiles while they fit below full_hi, masked tiles to hi.
        edge_tiles = (full_lo - lo + BLOCK_N - 1) // BLOCK_N
        full_start = lo + edge_tiles * BLOCK_N
        full_tiles = tl.maximum(full_hi - full_start, 0) // BLOCK_N
        tail_start = full_start + full_tiles * BLOCK_N
        tail_tiles = tl.maximum(hi - tail_start + BLOCK_N - 1, 0) // BLOCK_N

        acc, m_i, l_i = initial_state(Seed + item * ssb + head * ssh, SeedLse + item * sslb + head * sslh, rows, row_ok,
                                      seed_first, seed_rows, ssm, ssd, sslm, dv, SEEDED, BLOCK_M, BLOCK_DV)
        acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, i, lo, edge_tiles, lk, window,
                                    skn, skd, svn, svd, d, dv, qk_scale, True, CAUSAL, DOT_DTYPE, IEEE,
                                    BLOCK_N, BLOCK_D, BLOCK_DV, WIDE_OFFSETS)
        acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, i, full_start, full_tiles, lk, window,
                                    skn, skd, svn, svd, d, dv, qk_scale, False, CAUSAL, DOT_DTYPE, IEEE,
                                    BLOCK_N, BLOCK_D, BLOCK_DV, WIDE_OFFSETS)
        acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, i, tail_start, tail_tiles, lk, window,
                                    skn, skd, svn, svd, d, dv, qk_scale, True, CAUSAL, DOT_DTYPE, IEEE,
                                    BLOCK_N, BLOCK_D, BLOCK_DV, WIDE_OFFSETS)

        store_rows(Out + item * sob + head * soh, Lse + item * slb + head * slh, acc, m_i, l_i, rows, row_ok,
                   som, sod, slm, dv, BLOCK_DV)
