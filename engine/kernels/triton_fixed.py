"""`fixed(l, c)` on CUDA as one Triton kernel: each program walks only the keys its query tile can see.

On CUDA the fused-SDPA plan of fixed (fixed.py) is many small launches: its own blocks, the
summary keys in row ranges, their merges (141-143 aten ops for a causal prefill at Lk 4096, 36 of
them launches; H200 at n = 16384: 1.9 ms, 2.5x dense flash attention's 0.75 ms). Here one launch
does it all. A program takes BLOCK_M query rows of one head and, with an online softmax (as
FlashAttention), first the keys of its rows' own blocks (a contiguous range), then the summary
keys of the other blocks, gathered by index (`j = (t // c) * l + l - c + t % c` for the t-th
summary key): the two sets are disjoint, so no key counts twice, and a query tile reads about
its rows' attended keys, not every key block as a block-sparse mask would. A union's fixed
step passes a minimum distance (its window's keys) and the strides whose multiples it must skip;
they only mask. It also takes the union's other keys' partial as a seed, which it continues
(`triton_tiles.initial_state`), so the union's result comes out of this launch, with no merge
after. Grouped key/value heads are read as they are (head h reads h // (H / Hkv)).
The summary keys of the blocks before a tile's first row, which all its rows attend (most of a
long causal call's keys), take tiles without a mask (a union's step: with only its strides'); only
the rest compute one, as FlashAttention splits its diagonal blocks from the rest. A skipped
stride compares the rows' residues, taken once, with each key's, rather than a remainder per
score; the walks' indices stay 32-bit, which divide several times faster than 64-bit ones. Query
tiles are numbered last first, so a causal call's longest walks start first and the short ones
fill the GPU's tail. On an H200 (bfloat16, H = 8, D = 64) this ran fixed(128, 8) in 5.1 ms at
n = 131072, against 15.1 ms on the fused plan and 33 ms when every tile was masked (`python -m
bench.gpu_fixed`; before the strides' residues and the 32-bit indices, not yet run on a GPU).

Exact in the precision flash attention keeps: scores accumulate in float32 (float32 inputs in
IEEE float32, not TF32), the probabilities meet V in the inputs' dtype. Runs where Triton runs
it: on CUDA tensors, or on any under TRITON_INTERPRET=1 (the tests, on the CPU; the interpreter
computes bfloat16 products on bit patterns, so there the products are taken in float32).
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from ..patterns import Fixed
from .dense import additive_mask, math_attention
from .device import TRITON_OPTIONS, launching_on, runs_on_triton, triton
from .strided import off_strides
from .triton_merge import merge_splits
from .triton_tiles import MAX_HEAD_DIM, PROBE_TOLERANCE, attention_tiles, wide_offsets

if triton is not None:
    from .triton_tiles import initial_state, load_query_tile, softmax_step, store_rows

if triton is not None:  # without Triton fixed keeps its fused-SDPA plan everywhere
    import triton.language as tl

logger = logging.getLogger(__name__)

# Strides a union's fixed step can skip in the kernel (nested unions flatten to up to 63 strides
# beside fixed; more than this take the fused-SDPA plan).
MAX_SKIP_STRIDES = 4


def takes(q: torch.Tensor, v: torch.Tensor, causal: bool, skip_strides: tuple[int, ...], seeded: bool = False) -> bool:
    """Whether fixed runs on the Triton kernel for these inputs (continuing a partial with
    `seeded`): where Triton runs it (`runs_on_triton`), with head dims and skipped strides within
    its limits, and its variant for them matching the contract here (`matches_contract`)."""
    d, dv = q.shape[-1], v.shape[-1]
    return (max(d, dv) <= MAX_HEAD_DIM and len(skip_strides) <= MAX_SKIP_STRIDES and runs_on_triton(q.device)
            and matches_contract(q.device, q.dtype, d, dv, causal, len(skip_strides), seeded))


# The strides a probe skips, as many as the call's variant skips.
PROBE_STRIDES = (3, 5, 7, 11)


@functools.cache
def matches_contract(device: torch.device, dtype: torch.dtype, d: int, dv: int, causal: bool, skips: int,
                     seeded: bool) -> bool:
    """Whether the kernel's variant for these inputs compiles here and matches the masked math
    kernel on a small problem with every branch in play (its own block, summary keys in full and
    masked tiles, two query tiles, grouped heads, a distance, `skips` strides, rows with no key,
    keys split between programs; `seeded`: continuing a partial, in the inputs' dtype, over the
    keys the distance leaves out, from the second row on): probed once per variant and device, as
    the band's kernel is. Triton compiles a variant per dtype, causality, skip count, seed and
    head-dim tile at its first call, so a Triton too old for an argument, a variant over the GPU's
    shared memory, or a miscompile leaves those calls on the fused-SDPA plan (a seeded variant's
    on the plain one and a merge; said in the log) instead of failing requests or answering
    wrong."""
    g = torch.Generator().manual_seed(0)
    tiles = kernel_variant(dtype, d, dv, causal, skips)  # rows over two query tiles, the first
    lq = tiles["BLOCK_M"] + 7  # of which sees a full summary tile
    lk, l, c = lq + 2 * tiles["BLOCK_N"] + 6, 4, 2
    q, k, v = (torch.randn(1, h, n, width, generator=g).to(device, dtype)
               for h, n, width in ((2, lq, d), (1, lk, d), (1, lk, dv)))
    strides = PROBE_STRIDES[:skips]
    i = torch.arange(lk - lq, lk, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    near = i - j if causal else (i - j).abs()
    keep = Fixed(block=l, summary=c).allows(i, j) & (near >= 1) & off_strides(i - j, strides)
    kf, vf = k.float().expand(-1, 2, -1, -1), v.float().expand(-1, 2, -1, -1)
    seed = None
    if seeded:  # the diagonal, which the distance of 1 leaves out
        diagonal = (i == j) & (torch.arange(lq, device=device)[:, None] > 0)
        seed_out, seed_lse = math_attention(q[:, :, 1:].float(), kf, vf, scale=0.25,
                                            mask=additive_mask(diagonal[1:], torch.float32))
        seed = (1, seed_out.to(dtype), seed_lse)
        keep = keep | diagonal
    try:  # the keys in one program, and split between two with their merge (`merge_splits`)
        results = [triton_fixed_attention(q, k, v, block=l, summary=c, scale=0.25, causal=causal, min_distance=1,
                                          skip_strides=strides, splits=splits, seed=seed) for splits in (1, 2)]
    except Exception:  # noqa: BLE001 (any compile or launch error: the fused plan takes over)
        logger.warning("fixed's Triton kernel failed to run for %s: these calls go to %s",
                       _variant_name(device, dtype, d, dv, causal, skips, seeded), _fallback(seeded), exc_info=True)
        return False
    ref_out, ref_lse = math_attention(q.float(), kf, vf, scale=0.25, mask=additive_mask(keep, torch.float32))
    rows = keep.any(-1)  # a row with no key: zeros here, whatever the math kernel makes of it
    tol = PROBE_TOLERANCE[dtype]
    matches = all(torch.allclose(out.float()[..., rows, :], ref_out[..., rows, :], atol=tol, rtol=tol)
                  and torch.allclose(lse[..., rows], ref_lse[..., rows], atol=tol)
                  and bool((out[..., ~rows, :] == 0).all()) and bool((lse[..., ~rows] == float("-inf")).all())
                  for out, lse in results)
    if not matches:
        logger.warning("fixed's Triton kernel differs from the contract for %s: these calls go to %s",
                       _variant_name(device, dtype, d, dv, causal, skips, seeded), _fallback(seeded))
    return matches


def _fallback(seeded: bool) -> str:
    """What takes a failed variant's calls."""
    return "the plain variant and a merge" if seeded else "the fused-SDPA plan"


def _variant_name(device: torch.device, dtype: torch.dtype, d: int, dv: int, causal: bool, skips: int,
                  seeded: bool) -> str:
    return (f"{dtype} on {device}, head dims {d} / {dv}, {'causal' if causal else 'non-causal'}, {skips} skipped strides"
            f"{', continuing a partial' if seeded else ''}")


def triton_fixed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, summary: int, scale: float,
    causal: bool = True, min_distance: int = 0, skip_strides: tuple[int, ...] = (), splits: int | None = None,
    seed: tuple[int, torch.Tensor, torch.Tensor] | None = None, variant: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fixed_attention`'s contract in one launch: (out in q's dtype [B, H, Lq, Dv], lse float32
    [B, H, Lq]); rows with no key get zeros and -inf. With few programs (a decode step) each query
    tile's keys are split between `splits` programs (`key_splits` unless given), whose partials
    merge by log-sum-exp after in one more launch (`merge_splits`), as flash-decoding does.
    `seed` = (first row, out [B, H, rows, Dv] in any float dtype, lse float32 [B, H, rows]): a
    partial result of those rows over keys fixed's step does not hold (a union's window and
    strides), which the first split continues, so that they come out merged with it.
    `variant` replaces `kernel_variant`'s tiles (a benchmark's sweep)."""
    assert len(skip_strides) <= MAX_SKIP_STRIDES, "more skipped strides than the kernel takes"
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    variant = {**kernel_variant(q.dtype, d, dv, causal, len(skip_strides)), **(variant or {})}
    query_tiles = triton.cdiv(lq, variant["BLOCK_M"]) if lq else 0
    splits = splits or key_splits(b * h * query_tiles, lk, block, summary, variant["BLOCK_N"])
    shape = (splits, b, h, lq) if splits > 1 else (b, h, lq)  # partials, or the result itself
    out = torch.empty(*shape, dv, dtype=torch.float32 if splits > 1 else q.dtype, device=q.device)
    lse = torch.empty(shape, dtype=torch.float32, device=q.device)
    if lq and b * h:
        strides = tuple(skip_strides) + (1,) * (MAX_SKIP_STRIDES - len(skip_strides))
        split_strides = (out.stride(0), lse.stride(0)) if splits > 1 else (0, 0)
        o, l = (out[0], lse[0]) if splits > 1 else (out, lse)
        seed_first, seed_out, seed_lse = seed if seed is not None else (0, o, l)  # unread unless SEEDED
        # Heads on the grid's first axis, which takes 2^31 - 1 programs (the others 65535).
        grid = (b * h, query_tiles, splits)
        with launching_on(q.device):
            _fixed_kernel[grid](
                q, k, v, out, lse, seed_out, seed_lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                *l.stride(), *split_strides, *seed_out.stride(), *seed_lse.stride(), h, h // hkv, lq, lk, d, dv,
                block, summary, min_distance, *strides, splits, seed_first, seed_lse.shape[-1],
                scale * math.log2(math.e), SEEDED=seed is not None, WIDE_OFFSETS=wide_offsets(q, k, v, o, seed_out),
                **variant, **TRITON_OPTIONS,
            )
    if splits > 1:
        out, lse = merge_splits(out, lse, q.dtype)
    return out, lse


# Programs that keep a GPU busy (about two per SM of an H100's 132), and the fewest key tiles
# worth a program of their own: a launch with fewer programs splits each query tile's keys.
BUSY_PROGRAMS = 256
MIN_TILES_PER_SPLIT = 8


def key_splits(programs: int, lk: int, block: int, summary: int, block_n: int) -> int:
    """Into how many programs each query tile's keys go: 1 when `programs` already fill the GPU,
    else up to BUSY_PROGRAMS in all, each with at least MIN_TILES_PER_SPLIT key tiles (its own
    block's and the summary keys', at most, for a tile at the end of Lk keys)."""
    if programs == 0 or programs >= BUSY_PROGRAMS:
        return 1
    tiles = triton.cdiv(block, block_n) + triton.cdiv(triton.cdiv(lk, block) * summary, block_n)
    return max(1, min(BUSY_PROGRAMS // programs, tiles // MIN_TILES_PER_SPLIT))


# Query tiles of 128 rows against key tiles of 32 in half precision up to D = 64: of 64 x 64
# (`attention_tiles`) in 3 and 4 stages, 64 x 128, 128 x 64 with 4 and 8 warps, 128 x 128 and
# 128 x 32, the fastest at n = 4096, 16384 and 65536 and 2% off the best (128 x 64) at 131072
# (H200, bfloat16, H = 8, D = 64, fixed(128, 8): 0.105 / 0.258 / 1.55 / 5.06 ms against 0.130 /
# 0.348 / 2.08 / 6.61 at 64 x 64; `python -m bench.gpu_fixed`).
HALF_TILES = dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)


def kernel_variant(dtype: torch.dtype, d: int, dv: int, causal: bool, skips: int) -> dict:
    """The kernel's compile-time arguments for these inputs: causality, the skip count and
    `attention_tiles`, with HALF_TILES in half precision up to D = 64."""
    tiles = attention_tiles(dtype, d, dv)
    if dtype != torch.float32 and max(d, dv) <= 64:
        tiles.update(HALF_TILES)
    return dict(CAUSAL=causal, SKIPS=skips, **tiles)


if triton is not None:
    @triton.jit
    def _key_tile(acc, m_i, l_i, q, k_base, v_base, j, load, keep, skn, skd, svn, svd, d, dv, qk_scale,
                  LOADS_MASKED: tl.constexpr, SCORES_MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  WIDE_OFFSETS: tl.constexpr):
        """The keys j into the online softmax (acc, m_i, l_i): with LOADS_MASKED only those with
        `load` are read (else every key exists), with SCORES_MASKED the scores off `keep` are -inf
        (else every key counts)."""
        if WIDE_OFFSETS:  # `wide_offsets`
            j = j.to(tl.int64)
        feats, vfeats = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
        k_mask, v_mask = feats[:, None] < d, vfeats[None, :] < dv
        if LOADS_MASKED:
            k_mask &= load[None, :]
            v_mask &= load[:, None]
        kt = tl.load(k_base + j[None, :] * skn + feats[:, None] * skd, mask=k_mask, other=0.0).to(DOT_DTYPE)
        if IEEE:
            scores = tl.dot(q, kt, input_precision="ieee") * qk_scale
        else:
            scores = tl.dot(q, kt) * qk_scale
        if SCORES_MASKED:
            scores = tl.where(keep, scores, float("-inf"))
        vt = tl.load(v_base + j[:, None] * svn + vfeats[None, :] * svd, mask=v_mask, other=0.0).to(DOT_DTYPE)
        return softmax_step(acc, m_i, l_i, scores, vt, DOT_DTYPE, IEEE)

    @triton.jit
    def _off_strides(keep, j, r0, r1, r2, r3, s0, s1, s2, s3, SKIPS: tl.constexpr):
        """`keep` less the keys j at a multiple of a skipped stride from the row: i - j = 0 mod s
        where the rows' residues r = i mod s (taken once) meet the keys' (a residue per key, not
        a remainder per score)."""
        if SKIPS > 0:
            keep &= r0[:, None] != (j % s0)[None, :]
        if SKIPS > 1:
            keep &= r1[:, None] != (j % s1)[None, :]
        if SKIPS > 2:
            keep &= r2[:, None] != (j % s2)[None, :]
        if SKIPS > 3:
            keep &= r3[:, None] != (j % s3)[None, :]
        return keep

    # Triton compiles a variant per class of each integer argument (1, a multiple of 16, other).
    # Those that vary from request to request are not specialised on: the lengths, the pattern's
    # numbers, the log-sum-exp's strides (Lq: a decode step's 1 was a variant of its own) and the
    # split strides. The head dims and the strides of q, k, v and the output are: with a head dim
    # that is a multiple of 16 they always are one too, and known so, tiles load as 16-byte
    # vectors into the pipeline's shared memory (an unknown head dim masked each feature on its
    # own: every element a 2-byte load, nothing pipelined). So a new length or pattern compiles
    # nothing (with a head dim that is an odd multiple of 8 the lengths' parity can); the probe
    # (`matches_contract`) compiles the variants its calls use. tests/test_triton_compile.py
    # checks this against Triton's own compile keys.
    # So are a seed's rows and its log-sum-exp's strides (which differ between the steps that make
    # seeds: 7 rows' strided partial had its rows' lse 32 apart); its output's strides are
    # specialised on, as Out's are.
    @triton.jit(do_not_specialize=["heads", "group", "lq", "lk", "block", "summary", "min_distance",
                                   "s0", "s1", "s2", "s3", "splits", "slb", "slh", "sos", "sls", "sslb", "sslh",
                                   "sslm", "seed_first", "seed_rows"])
    def _fixed_kernel(
        Q, K, V, Out, Lse, Seed, SeedLse,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm, sos, sls,
        ssb, ssh, ssm, ssd, sslb, sslh, sslm,
        heads, group, lq, lk, d, dv, block, summary, min_distance, s0, s1, s2, s3, splits, seed_first, seed_rows,
        qk_scale,
        CAUSAL: tl.constexpr, SKIPS: tl.constexpr, SEEDED: tl.constexpr, DOT_DTYPE: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        WIDE_OFFSETS: tl.constexpr,
    ):
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # a causal call's longest tiles first
        pid_bh = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements
        pid_s = tl.program_id(2)  # 32-bit: the key walks' indices divide (64-bit division is slow)
        head, item = pid_bh % heads, pid_bh // heads
        kv_head = head // group
        q, rows, i, row_ok, first, last = load_query_tile(Q, pid_m, item, head, sqb, sqh, sqm, sqd, lq, lk, d,
                                                          DOT_DTYPE, BLOCK_M, BLOCK_D, WIDE_OFFSETS)
        k_base = K + item * skb + kv_head * skh
        v_base = V + item * svb + kv_head * svh
        first_block, last_block = first // block, last // block

        # The seed goes into the first split's partial alone (the splits' merge adds it once).
        acc, m_i, l_i = initial_state(Seed + item * ssb + head * ssh, SeedLse + item * sslb + head * sslh, rows, row_ok,
                                      seed_first, tl.where(pid_s == 0, seed_rows, 0), ssm, ssd, sslm, dv, SEEDED,
                                      BLOCK_M, BLOCK_DV)

        # The summary keys every row of the tile attends, in full tiles: those of the blocks
        # before the first row's block, min_distance or more before it (most of a long causal
        # call's keys). Without a mask, or with only the skipped strides'.
        full_blocks = tl.minimum(first_block, tl.maximum(first - min_distance + 1, 0) // block)
        full_tiles = full_blocks * summary // BLOCK_N
        r0, r1, r2, r3 = i % s0, i % s1, i % s2, i % s3  # the rows' residues (the padding's 1s unused)
        every_key = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
        for tile in range(pid_s, full_tiles, splits):  # this split's share
            t = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            j = (t // summary) * block + block - summary + t % summary
            keep = _off_strides(every_key, j, r0, r1, r2, r3, s0, s1, s2, s3, SKIPS)
            acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, j, None, keep, skn, skd, svn, svd, d, dv,
                                      qk_scale, False, SKIPS > 0, DOT_DTYPE, IEEE, BLOCK_N, BLOCK_D, BLOCK_DV,
                                      WIDE_OFFSETS)

        # The rest, masked: first the rows' own blocks, keys first_block * l .. the last row
        # (causal) or its block's end; then the summary keys of the other blocks from the first
        # past the full tiles, the t-th at (t // c) * l + l - c + t % c (causal: those of the
        # blocks before the last row's).
        my_start = i // block * block  # each row's block, as a key range: no division in the loop
        my_end = my_start + block
        own_lo = first_block * block
        own_hi = last + 1 - min_distance if CAUSAL else tl.minimum((last_block + 1) * block, lk)
        own_tiles = tl.maximum(own_hi - own_lo + BLOCK_N - 1, 0) // BLOCK_N
        summary_keys = (last_block if CAUSAL else (lk + block - 1) // block) * summary
        rest = own_tiles + (summary_keys - full_tiles * BLOCK_N + BLOCK_N - 1) // BLOCK_N
        for tile in range(pid_s, rest, splits):  # this split's share
            own = tile < own_tiles
            t = (full_tiles + tile - own_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            gathered = tl.where(t < summary_keys, (t // summary) * block + block - summary + t % summary, -1)
            j = tl.where(own, own_lo + tile * BLOCK_N + tl.arange(0, BLOCK_N), gathered)
            load = (j >= 0) & (j < lk)
            diff = i[:, None] - j[None, :]
            # own tiles keep their rows' own block, summary tiles every other block's keys
            in_my_block = (j[None, :] >= my_start[:, None]) & (j[None, :] < my_end[:, None])
            keep = load[None, :] & row_ok[:, None] & (in_my_block == own)
            if CAUSAL:
                keep &= diff >= min_distance
            else:
                keep &= (diff >= min_distance) | (-diff >= min_distance)
            keep = _off_strides(keep, j, r0, r1, r2, r3, s0, s1, s2, s3, SKIPS)
            acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, j, load, keep, skn, skd, svn, svd, d, dv,
                                      qk_scale, True, True, DOT_DTYPE, IEEE, BLOCK_N, BLOCK_D, BLOCK_DV,
                                      WIDE_OFFSETS)

        split = pid_s.to(tl.int64)
        store_rows(Out + split * sos + item * sob + head * soh, Lse + split * sls + item * slb + head * slh,
                   acc, m_i, l_i, rows, row_ok, som, sod, slm, dv, BLOCK_DV)
