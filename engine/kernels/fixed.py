"""`fixed(l, c)` as two disjoint pieces merged in place by log-sum-exp (causal; non-causal below),
on fused SDPA calls: the CPU's plan where its span kernel does not run (`span_fixed_attention`:
the same pieces as calls of the engine's own kernel, causal or not, a union's distance and
strides skipped in the kernel), and CUDA's where its Triton kernel does not run (triton_fixed.py:
one launch for what follows).

(a) The query's own block: the sequence viewed as [L/l, l] blocks, one batched dense causal
call (no copy when l divides L).
(b) The summary columns of earlier blocks: query block b sees the first b*c keys of the
gathered summary set S (c keys per block: a copy of c/l of K and V), one of three ways:
- On the CPU, where it pays and beats the others (`_shared_mask_pays`, `_shared_mask_beats_plain`:
  a prefill, a long chunk), SHARED_MASK_CALL_ROWS query rows per call attend the keys their last
  block sees under a slice of one shared [l, keys] mask (a row keeps a key by their distance
  alone, `_shared_summary_mask`): torch's CPU kernel computes calls of a block's 128 rows 32 rows
  at a time, each over every key, those of 1024 rows 256 at a time.
- Else blocks of CALL_ROWS rows and more, a few blocks, or rows within two blocks: a call per
  block, its real rows over their b*c keys with no mask and no padded row (smaller blocks a few
  per call, the keys past the ones all of the call's rows see under a prefix mask).
- Else (many small blocks; on CUDA, where a call per block would be a launch per block) the
  queries viewed as [l, L/l] (position-in-block as the head axis, block index as the row), so
  that every head shares S (a stride-0 view) and one small [rows, keys] block-causal mask; the
  blocks are cut into a few row ranges, each with the keys its last block needs, so the masked
  waste is about 1/(2 ranges).
For a few query rows (a decode step) S is not copied: offset u of every block is one strided view
of K, so the c offsets are a batch axis of one call (`_summary_offsets`); and (a) runs on the real
rows alone, not on whole padded blocks. Rows within two blocks (Lq < l) keep q, the output and
the log-sum-exp at their own rows: a decode row of fixed(4096, 64) zero-filled a 4096-row output
for one row it used. On the CPU one row with few summary keys before its block
(GATHERED_ROW_KEYS) copies exactly its keys instead: one call, nothing to merge.

On these calls a minimum distance m (for a union with a sliding window of m, whose keys it then
skips) shifts the own-block causal diagonal by m and keeps a row's summary keys at positions up to
i - m. A union's strides (which count the keys at their multiples), skipped, mask the own blocks
with one [l, l] mask and the summary keys always under the shared mask; both send the summary
keys a few query blocks per call (`_blocks_per_call`: SHARED_MASK_CALL_ROWS rows on the CPU, a row
range's worth on CUDA).

On the CPU the calls read fewer key/value heads than query heads as they are: every call keeps
the heads on the head axis (the own blocks on the batch axis, `band.heads_last`), where torch's
CPU kernel maps each query head to its key/value head, or folds a key/value head's query heads
into rows of one problem (`fused`); only row ranges repeat the summary keys, c/l of K and V.
CUDA's fused calls repeat the key/value heads.

Non-causal, each query attends every summary key (one call) and the other keys of its own block
(one batched call over the block view): no mask, no key twice. With a minimum distance or
skipped strides, the same own-block calls under one [l, l - c] mask, and every summary key, a
few query blocks per call, under slices of one shared mask.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from ..patterns.fixed import Fixed, summary_columns, summary_keys_below
from . import span_kernel, triton_fixed
from .band import grid_attention, heads_last, key_head_rows, row_grid, row_major
from .dense import (CPU_SMALL_CALL_ROWS, NEG_INF, additive_mask, as_computed, cpu_native_half, dense_attention,
                    empty_partial, fused, fused_masked, fused_under, kept_when_small, per_query_head,
                    repeated_operand, same_head_dim)
from .device import kernel_device
from .masked import MASK_BUDGET
from .merge import join_rows, merge_partials, merge_stacked, merge_to
from .strided import off_strides

# Row ranges of the transposed summary piece: the masked work is (ranges + 1) / (2 * ranges) of a
# full rectangle; more ranges mean more, smaller calls. One range per 32 blocks, 4 to 16, was
# within noise of the best of 2..32 ranges at n = 16384 and 65536 on the CPU, where a call per
# block has since measured faster still (H = 8, D = 64, fixed(128, 8): n = 4096 18 vs 21 ms,
# 16384 177 vs 177-210 ms, 65536 2.18-2.23 vs 2.48-2.49 s); `bench/gpu_check.py` times range
# counts on CUDA, where neither rule is measured yet.
MIN_RANGES, MAX_RANGES, BLOCKS_PER_RANGE = 4, 16, 32
# Query rows per call of the summary keys on the CPU, under slices of one shared mask (every
# block's rows over the last call block's keys): under 192 rows torch's CPU kernel computes 32 rows
# at a time, each over all of the call's keys; from 768 on 256. Per-call rows 64 / 256 / 512 / 1024
# / 2048, n = 16384, H = 8, D = 64, ms: union(strided 128, fixed(128, 8)) 234.7 / 219.1 / 215.4 /
# 211.7 / 216.3, union(sliding 256, fixed(128, 8)) 262.2 / 234.1 / 230.0 / 218.0 / 225.4 (two calls
# and two merges a call then: the keys every row sees unmasked, the rest under a prefix mask).
# fixed alone so, against a call per block unmasked (l >= CALL_ROWS) or row ranges (smaller), new /
# before, same process, H = 8, D = 64 (2026-12-05, seventh session): fixed(128, 8) 0.91-0.93 at
# n = 16384 (bfloat16 0.81-0.93), 0.94-0.95 at 4096; fixed(64, 4) 0.85-0.87; fixed(16, 2)
# 0.90-0.93; fixed(32, 4) 0.79-0.93 at 4096; 1024 rows of fixed(16, 2) after 65536 keys 0.72-0.80
# (docs/kernels.md has the rest). A non-causal union's step gains nothing so from its own blocks, whose call would
# span the call's blocks (union(strided 128, fixed(128, 8)) 401 -> 585 ms at 1024 rows).
SHARED_MASK_CALL_ROWS = 1024
# Query rows per call where the summary keys go without the shared mask (`_shared_mask_pays`), a
# call per block from this many rows up, smaller blocks a few per call (the keys past the ones all
# of a call's rows see under a prefix mask): union(sliding 32, fixed(16, 2)) at n = 4096, H = 8:
# 119 ms a block per call, 68 ms so (16384: 800 and 524 ms).
CALL_ROWS = 64
# The shared mask is built where the calls under it compute at least this many times its elements
# (rows x keys): building it (l rows by about all the summary keys) is a fixed cost, which a few
# rows after many keys did not repay. New / before, H = 8, D = 64: fixed(128, 8) 100 rows after
# 16384 keys 1.25-1.26 (mask / calls' elements 1.4), 512 rows 1.02-1.03 (0.26); union(sliding 256,
# fixed(128, 8)) 100 rows 1.10, 512 rows 1.11; fixed(16, 2) 256 rows after 16384 0.87-0.93 (0.07);
# fixed(128, 8) at n = 1024 1.01 (0.25), 4096 0.94 (~0.07).
SHARED_MASK_WORK = 8
# A short run of query rows (decoding, small chunks): up to this many rows read the summary keys
# in place (`_summary_offsets`) rather than copying them once for all rows, and compute their own
# block for the real rows alone rather than for whole padded blocks. Summary keys copied / in
# place, H = 8, D = 64, one process, alternating: at Lk 65536, Lq 1: fixed(128, 8) 1.81,
# union(sliding 256, fixed(128, 8)) 1.72, fixed(16, 2) 1.10; Lq 16: 1.44, 1.20, 1.09; Lq 64:
# 0.98, 0.96, 0.90; at Lk 16384 (the copy stays in cache) Lq 1: 1.00, 0.96, 1.43; Lq 16: 0.90,
# 0.98, 1.01. Own block whole / real rows, fixed(128, 8), Lq 1: 0.70 / 0.47 ms at Lk 16384, H = 8,
# D = 64; 4.53 / 2.90 ms at Lk 1024, H = 32 over 8, D = 128 (ad-hoc loops, one run each).
SHORT_RUN_ROWS = 16
# One causal row (a decode step) of fixed alone on the CPU, with at most this many summary keys
# before its block, takes a copy of exactly its keys and one call (`_one_row_gathered`), rather
# than the summary offsets' call, their merge and its own block's call and merge; head dims alike
# (those measured: with Dv != D the copy would be padded too, where the offsets pad per call).
# Gathered / offsets, mean of a decode loop (key lengths stepping down through 300 values), H = 8, D = 64,
# float32 / bfloat16, 2026-12-03: fixed(128, 8) at Lk 1024 0.59 / 0.53, 4096 0.75 / 0.61, 8192
# (504 summary keys) 0.82-0.85 / 0.69-0.70, 12288 (760) 0.93 / 0.70, 16384 (1016) 2.5 / 1.15,
# 65536 3.4 / 1.75; fixed(16, 2) at 4096 (510) 0.83 / 0.71; H = 8 over 2, D = 128, Lk 4096 0.66.
GATHERED_ROW_KEYS = 512
# Query rows a thread of the span kernel takes at a time (`span_fixed_attention`): the keys its
# rows see are packed once per strip.
FIXED_STRIP_ROWS = 256
# Where AMX runs half precision natively in torch's kernel but not in the span kernel (its build
# without AMX, measured before it had it), torch's kernel wins once rows see more summary keys than
# this: bfloat16, H = 8, D = 64, ms, span kernel / torch's (best of 9, in turn): fixed(128, 8) at
# n = 2048 (120 summary keys at most) 3.6 / 5.8, 4096 (248) 9.6 / 11.1, 8192 (504) 27.7 / 27.5,
# 16384 (1016) 94.8 / 77.7; fixed(64, 4) at 8192 (508) 26.0 / 29.1.
NATIVE_HALF_SPAN_MAX_SUMMARY_KEYS = 512


def earlier_summary_keys(x: torch.Tensor, block: int, summary: int) -> torch.Tensor:
    """The summary keys of the whole blocks before the last key's (the last block's are only its own
    block's, in its own-block piece): a copy of c/l of x [..., L, D] in its dtype, [..., keys, D]."""
    return summary_key_groups(x, block, summary).flatten(-3, -2)


def summary_key_groups(x: torch.Tensor, block: int, summary: int, whole: int | None = None) -> torch.Tensor:
    """`earlier_summary_keys` in place (or the first `whole` blocks'): a view of x [..., L, D],
    [..., blocks, c, D], made in one op (a slice, `unflatten` and a slice took 3x its host time,
    which a decode step's call mostly is)."""
    *lead, length, features = x.shape
    *lead_strides, row, feature = x.stride()
    whole = (length - 1) // block if whole is None else whole
    return x.as_strided((*lead, whole, summary, features), (*lead_strides, block * row, row, feature),
                        x.storage_offset() + (block - summary) * row)


def short_run(lq: int, lk: int, block: int, summary: int) -> bool:
    """Whether causal fixed takes these query rows as a short run (its summary mask within budget)."""
    return lq <= SHORT_RUN_ROWS and lq < block and summary * lq * ((lk - 1) // block) <= MASK_BUDGET


def _shared_mask_pays(lq: int, lk: int, block: int, summary: int) -> bool:
    """Whether causal fixed's summary keys go under one shared mask on the CPU (SHARED_MASK_WORK):
    the calls compute at least that many times the mask's elements (about lk * c: l rows by the
    summary keys of every block), and those stay within MASK_BUDGET."""
    mask = summary * (lk + max(SHARED_MASK_CALL_ROWS, block))
    return mask <= MASK_BUDGET and SHARED_MASK_WORK * mask <= lq * (lk - lq // 2) * summary // block


def _shared_mask_beats_plain(lq: int, lk: int, block: int, heads_per_kv: int) -> bool:
    """Whether plain causal fixed (no distance, no stride) is faster under the shared mask than on
    its other CPU paths. Blocks of CALL_ROWS rows and more go per block otherwise, which gains
    nothing once a block's call has CPU_SMALL_CALL_ROWS rows (grouped heads: a key/value head's
    query heads folded into rows, `fused`): shared / per block, fixed(256, 16), n = 16384, H = 8,
    D = 64, 0.94-1.03; H = 32 over 8, D = 128, n = 4096, fixed(128, 8) 1.01-1.07, fixed(64, 4)
    1.00-1.08 (H = 8 over 2, D = 64, fixed(128, 8) at 16384: 0.92-0.99). Smaller blocks go in row
    ranges otherwise, which keep their lead while a call's rows are as many as the positions an
    average row sees (the keys its first rows compute under the mask): fixed(16, 2) and fixed(32,
    4), H = 8, D = 64, 1.03-1.19 at n = 1024, 1536 and 2048 (0.96-0.97 in one run at 2048), 0.80
    at 3072, 0.78-0.81 at 4096; H = 32 over 8, fixed(32, 4) 0.75-0.88; H = 32 over 2, fixed(16, 2)
    0.69-0.84."""
    if block >= CALL_ROWS:
        return block * heads_per_kv < CPU_SMALL_CALL_ROWS
    return min(lq, SHARED_MASK_CALL_ROWS) < lk - lq // 2


def _range_count(query_blocks: int) -> int:
    """Row ranges for the summary keys of this many query blocks (BLOCKS_PER_RANGE)."""
    return min(MAX_RANGES, max(MIN_RANGES, query_blocks // BLOCKS_PER_RANGE))


def _blocks_per_call(block: int, query_blocks: int, widest: Callable[[int], int], device: torch.device,
                     rows: int) -> int:
    """Query blocks per call where the summary keys go a few blocks per call. On the CPU `rows` rows
    (SHARED_MASK_CALL_ROWS or CALL_ROWS), or one block. On CUDA, where every call and merge is a
    launch whatever its size (a block per call took a union(sliding 128, fixed(128, 8)) at n = 4096
    to 2,694 ops, emulated), as many as a row range holds (`_range_count`). Either way fewer where
    a call's mask, its rows by `widest(blocks)` keys, would pass MASK_BUDGET."""
    if kernel_device(device) == "cpu":
        group = max(1, rows // block)
    else:
        group = -(-query_blocks // _range_count(query_blocks))
    while group > 1 and group * block * widest(group) > MASK_BUDGET:
        group = -(-group // 2)
    return group


def summary_keys_seen(i: torch.Tensor, block: int, summary: int, min_distance: int) -> torch.Tensor:
    """How many summary keys of earlier blocks a row at position i attends: those at positions
    up to i - min_distance, a prefix of the gathered summary keys (`summary_columns`)."""
    return torch.minimum(summary_keys_below((i - min_distance + 1).clamp(min=0), block, summary), i // block * summary)


@kept_when_small(lambda b0, b1, c, dtype, device: (b1 - b0) * (b1 - 1) * c)
def summary_mask(b0: int, b1: int, c: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[b1 - b0, (b1 - 1) * c] additive mask: block b keeps summary keys of blocks < b (a small one
    kept for the next call)."""
    blocks = torch.arange(b0, b1, device=device)[:, None]
    keys = torch.arange((b1 - 1) * c, device=device)[None, :] // c
    return additive_mask(keys < blocks, dtype)


def fixed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, summary: int, scale: float,
    causal: bool = True, min_distance: int = 0, skip_strides: tuple[int, ...] = (),
    seed: tuple[torch.Tensor, torch.Tensor] | None = None, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-pattern attention over the keys at i - j >= min_distance (causal) or |i - j| >=
    min_distance (for a union with a sliding window, whose keys it then skips), and not at
    (i - j) mod s == 0 for any s in skip_strides (for a union with those strides); queries bottom-right
    aligned; (out, lse). On CUDA with Triton installed one launch of the Triton kernel
    (triton_fixed.py), on the CPU the span kernel's two calls where it takes them
    (`span_fixed_attention`), elsewhere the fused-SDPA calls below. `seed`: the union's partial (out, lse)
    over its other members' keys, every row, which the result continues: inside the kernel's
    launch where its seeded variant runs, else merged after (in q's dtype, as a plan merges its
    steps). `out_dtype`, where given, is the output's (on the CPU float32 for a partial that a
    union's merge takes, so that its result is rounded once)."""
    kwargs = dict(block=block, summary=summary, scale=scale, causal=causal, min_distance=min_distance,
                  skip_strides=skip_strides)
    if seed is not None and triton_fixed.takes(q, v, causal, skip_strides, seeded=True):
        return triton_fixed.triton_fixed_attention(q, k, v, seed=(0, *seed), **kwargs)
    if _on_span_kernel(q, k, v, block=block, summary=summary):
        return span_fixed_attention(q, k, v, block=block, summary=summary, scale=scale, causal=causal,
                                    min_distance=min_distance, skip_strides=skip_strides, seed=seed,
                                    out_dtype=out_dtype)
    if triton_fixed.takes(q, v, causal, skip_strides):
        own = triton_fixed.triton_fixed_attention(q, k, v, **kwargs)
    else:
        own = fused_fixed_attention(q, k, v, **kwargs)
    if seed is not None:
        return merge_partials([seed, own], out_dtype or q.dtype)
    return own if out_dtype is None else (own[0].to(out_dtype), own[1])


def _on_span_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, summary: int) -> bool:
    """Whether fixed goes to the CPU span kernel (`span_fixed_attention`): short runs too
    (fixed(128, 8), H = 8, D = 64, float32, span / torch's calls, one row after 4096, 16384 and
    65536 keys 0.46, 0.69, 0.73; 16 rows 0.40, 0.51, 0.73; bfloat16 at 16384 0.53 and 0.39), a
    union's step too (its distance and strides skipped in the kernel: no mask), causal or not; up to
    NATIVE_HALF_SPAN_MAX_SUMMARY_KEYS in half precision that torch's kernel runs natively (AMX) and
    the span kernel does not (`span_kernel.computes_natively`), and where the kernel takes q, k
    and v."""
    few_summary_keys = (k.shape[-2] - 1) // block * summary <= NATIVE_HALF_SPAN_MAX_SUMMARY_KEYS
    return ((few_summary_keys or not cpu_native_half(q.dtype) or span_kernel.computes_natively(q.dtype))
            and span_kernel.takes(q, k, v))


def span_fixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, summary: int,
                         scale: float, causal: bool = True, min_distance: int = 0, skip_strides: tuple[int, ...] = (),
                         seed: tuple[torch.Tensor, torch.Tensor] | None = None, out_dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """fixed on the CPU span kernel: each row's own block, then the summary keys, each call
    continuing the one before (its seed: no merge pass), all over K and V as they are. Causal: the
    own block is the l keys anchored at its block's start, none past the row; the summary keys are
    those of earlier blocks (a prefix of them, c more every l rows, read in place:
    `summary_key_groups`). Non-causal: the own block's l - c keys before its summary columns, then
    every whole block's summary keys and a partial last block's for every row. Every row of a block
    sees the same summary keys, so nothing is computed under a mask. A union's step skips the keys
    nearer than its window (`min_distance`, both ways without causality: the own blocks' call not
    made where that passes the block) and at its strides' multiples in the kernel, and continues
    the union's other steps' partial (`seed`). Grouped key/value heads read as they are; (out in
    `out_dtype`, q's unless said, lse)."""
    l, c = block, summary
    lk = k.shape[-2]
    every_call = dict(min_distance=min_distance, skip_strides=skip_strides, row_shift=lk - q.shape[-2],
                      rows_per_step=l, strip_rows=FIXED_STRIP_ROWS)
    own_keys = l if causal else l - c  # non-causal, its summary columns are in every row's summary call
    chain = []  # (keys, values, their span) of each call in turn
    if min_distance < l and own_keys:
        chain.append((k, v, dict(keys_per_step=l, first=0, last=own_keys - 1, causal=causal)))
    if causal:
        chain.append((*(summary_key_groups(x, l, c) for x in (k, v)),
                      dict(keys_per_step=c, first=-span_kernel.UNBOUNDED, last=-1, causal=bool(min_distance),
                           group_positions=(l, l - c))))
    else:
        whole = lk // l
        tail_first = (whole + 1) * l - c  # a partial last block's summary columns, from here
        every_row = dict(first=-span_kernel.UNBOUNDED, last=span_kernel.UNBOUNDED, causal=False)
        chain.append((*(summary_key_groups(x, l, c, whole) for x in (k, v)),
                      dict(group_positions=(l, l - c), **every_row)))
        if lk > tail_first:
            chain.append((k[..., tail_first:, :], v[..., tail_first:, :],
                          dict(group_positions=(lk - tail_first, tail_first), **every_row)))
    # a decode row's summary keys, the last call, read once for a key/value head's query heads
    folded = _summary_rows_folded(q, k, block=l, summary=c, causal=causal, skip_strides=skip_strides)
    for n, (keys, values, span) in enumerate(chain):
        dtype = (out_dtype or q.dtype) if n == len(chain) - 1 else torch.float32  # partials in float32, rounded once
        if seed is not None and seed[0].dtype == dtype:  # continued in place
            out, lse = seed
        else:
            out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=dtype)
            lse = seed[1] if seed is not None else q.new_empty(q.shape[:-1], dtype=torch.float32)
        if folded and n == len(chain) - 1:
            # The row is the last key's: the summary keys at least `min_distance` before it, a
            # prefix of them (they lie in order), the same for each of its rows.
            last = summary_keys_below(lk - min_distance, l, c) - 1
            group = q.shape[1] // k.shape[1]
            rows = functools.partial(key_head_rows, group=group)
            span_kernel.span_attention(rows(q), keys, values, rows(out), rows(lse), scale=scale,
                                       seed=None if seed is None else (rows(seed[0]), rows(seed[1])),
                                       rows_per_step=group, first=-span_kernel.UNBOUNDED, last=last)
        else:
            span_kernel.span_attention(q, keys, values, out, lse, scale=scale, seed=seed, **span, **every_call)
        seed = out, lse
    return seed


def _summary_rows_folded(q: torch.Tensor, k: torch.Tensor, *, block: int, summary: int, causal: bool,
                         skip_strides: tuple[int, ...]) -> bool:
    """Whether a causal decode row over grouped heads reads its summary keys once for a key/value
    head's query heads (rows of it at one position, `key_head_rows`: the span kernel computes them
    together) rather than once a query head (`span_kernel.folding_pays`): fixed alone, or a union's
    step after a window (not after strides: each row skips their keys by its own position). The
    summary keys' call alone, folded / not, bfloat16, fixed(128, 8), best of 27 in one process:
    H = 32 over 8, D = 128, after 4096 keys 0.90-1.01, after 16384 0.67, after 65536 0.77; H = 16
    over 2, D = 64, after 65536 0.55; H = 8 over 2, D = 64, after 65536 0.66 (float32 0.62)."""
    h, hkv = q.shape[1], k.shape[1]
    return (causal and not skip_strides and q.shape[-2] == 1 and h > hkv
            and span_kernel.folding_pays(hkv, 1, h // hkv, (k.shape[-2] - 1) // block * summary))


def fused_fixed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, summary: int, scale: float,
    causal: bool = True, ranges: int | None = None, min_distance: int = 0,
    skip_strides: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fixed_attention` on the device's fused SDPA kernel, in the pieces the module docstring
    describes; (out float32, lse). `ranges` overrides the row-range count (`_range_count`)."""
    (q,) = as_computed(q)  # once: every path's calls read each query row, some several times
    b, h, lq, _ = q.shape
    lk, dv, l, c = k.shape[-2], v.shape[-1], block, summary
    short = causal and short_run(lq, lk, l, c)
    # Grouped key/value heads are repeated, but on the CPU, which reads them as they are: torch's CPU
    # kernel maps query head h to key/value head h // (H / Hkv) on the head axis, and every call here
    # keeps the heads there (CUDA's fused kernels take equal heads only).
    if kernel_device(q.device) != "cpu":
        k, v = (per_query_head(x, h) for x in (k, v))
    if short and lq == 1 and not (min_distance or skip_strides) and kernel_device(q.device) == "cpu" \
            and (lk - 1) // l * c <= GATHERED_ROW_KEYS and q.shape[-1] == dv:
        return _one_row_gathered(q, k, v, block=l, summary=c, scale=scale)
    if not causal:
        if min_distance or skip_strides:
            return _non_causal_far(q, k, v, block=block, summary=summary, scale=scale, min_distance=min_distance,
                                   skip_strides=skip_strides)
        return _non_causal(q, k, v, block=block, summary=summary, scale=scale)
    few_rows = lq < l  # within two blocks: their real rows alone, each call padding what it reads
    if not few_rows:  # whole blocks: one head dim for the views of K and V the calls share
        q, k, v = same_head_dim(q, k, v)
    d = q.shape[-1]
    offset = lk - lq
    first = offset // l  # first query block
    blocks = -(-lk // l)  # key blocks, the last maybe partial
    nq = blocks - first
    # Row 0 of q, out and lse is position `base`: the real rows alone (few rows), or whole blocks
    # (q zero-padded to them: the padding lies in every query's future).
    base = offset if few_rows else first * l
    pad_q = (offset - base, blocks * l - lk if not few_rows else 0)
    if any(pad_q) or not q.is_contiguous():
        q = F.pad(q, (0, 0, *pad_q))

    # The query blocks' own keys in C order: a view, or a copy of those blocks only (zero-padded
    # to whole blocks: the padding lies in every query's future), never all of K.
    def own_rows(x: torch.Tensor) -> torch.Tensor:
        x = x[..., first * l :, :]
        return row_major(F.pad(x, (0, 0, 0, blocks * l - lk)) if blocks * l > lk else x)

    def own_keep(r0: int, r1: int, keys: int) -> torch.Tensor | None:
        """Rows r0..r1-1 of the one [l, l] mask every block shares (i - j is the offset within
        the block) where strides are skipped: just those rows (the whole mask at l = 4096 took 81
        of a 140 ms decode step)."""
        if not skip_strides:
            return None
        delta = torch.arange(r0, r1, device=q.device)[:, None] - torch.arange(keys, device=q.device)[None, :]
        return _far_off_strides(delta, min_distance, skip_strides, causal=True)

    if few_rows:  # just the real rows, a call per block they touch (two at most)
        out = torch.zeros(b * h, lq, dv, dtype=torch.float32, device=q.device)
        lse = torch.full((b * h, lq), NEG_INF, dtype=torch.float32, device=q.device)
        for blk in range(first, blocks):
            r0, r1 = max(blk * l, offset), min(blk * l + l, lk)  # the block's query positions
            at, keys = r0 - blk * l, slice(blk * l, min(blk * l + l, lk))
            rows = slice(r0 - base, r1 - base)
            keep = own_keep(at, at + r1 - r0, keys.stop - keys.start)
            if keep is None:
                o, s_lse = dense_attention(q[..., rows, :], k[..., keys, :], v[..., keys, :], scale=scale,
                                           diagonal=at - min_distance)
            else:
                o, s_lse = fused_masked(q[..., rows, :], k[..., keys, :], v[..., keys, :], keep, scale=scale)
            out[:, rows], lse[:, rows] = o.reshape(b * h, r1 - r0, dv), s_lse.reshape(b * h, r1 - r0)
    else:
        # [B*H, nq, l, D]: batch items and heads on the batch axis, the blocks on the head axis. Grouped
        # key/value heads swap the two (`heads_last`): torch's CPU kernel maps query head i of the
        # B*H to key/value head i // (H / Hkv) of the B*Hkv, the right one in every batch item.
        grouped = k.shape[1] != h
        qb, kb, vb = (heads_last(row_grid(x, 0, (nq, l), (l, 1)), grouped)
                      for x in (row_major(q), own_rows(k), own_rows(v)))
        if skip_strides:
            own_out, own_lse = fused_masked(qb, kb, vb, own_keep(0, l, l), scale=scale)
        else:
            own_out, own_lse = dense_attention(qb, kb, vb, scale=scale, diagonal=-min_distance)
        own_out, own_lse = heads_last(own_out, grouped), heads_last(own_lse, grouped)
        # float32 in C order: one copy at most (the CUDA kernels' output is half precision, laid out
        # [B, L, H, D]), none for the CPU's (laid out as q)
        out = own_out.to(torch.float32, memory_format=torch.contiguous_format).reshape(b * h, nq * l, -1)
        lse = own_lse.reshape(b * h, nq * l).contiguous()

    lo = max(first, 1)  # block 0 sees no summary key
    real = slice(offset - base, offset - base + lq)
    if lo < blocks and short:
        _summary_offsets(q, k, v, out, lse, base=base, block=l, summary=c, real=real, scale=scale,
                         min_distance=min_distance, skip_strides=skip_strides)
    elif lo < blocks:
        ks, vs = as_computed(*(earlier_summary_keys(x, l, c) for x in (k, v)))  # once: each block's call reads a prefix
        cpu = kernel_device(q.device) == "cpu"
        shared = bool(skip_strides) or ranges is None and cpu and _shared_mask_pays(lq, lk, l, c) and (
            min_distance or _shared_mask_beats_plain(lq, lk, l, h // k.shape[1]))
        if shared or few_rows or min_distance or ranges is None and (
                blocks - lo <= (MIN_RANGES if cpu else MAX_RANGES) or cpu and l >= CALL_ROWS):
            _summary_per_block(q, ks, vs, out, lse, range(lo, blocks), base=base, block=l, summary=c, real=real,
                               scale=scale, min_distance=min_distance, skip_strides=skip_strides, shared=shared)
        else:
            q_heads = q.reshape(b * h, nq, l, d).transpose(1, 2)  # [B*H, l, nq, D]: position in block as heads
            # The summary keys as [B*H, 1, keys, D], repeated for grouped heads (c/l of K and V),
            # which a block's l positions, the head axis here, share by a stride-0 view.
            ks, vs = (per_query_head(x, h).reshape(b * h, 1, -1, x.shape[-1]) for x in (ks, vs))
            ranges = ranges or _range_count(blocks - lo)
            step = -(-(blocks - lo) // ranges)
            for b0 in range(lo, blocks, step):
                b1 = min(blocks, b0 + step)
                keys = (b1 - 1) * c
                mask = summary_mask(b0, b1, c, q.dtype, q.device)
                o, s_lse = fused(q_heads[:, :, b0 - first : b1 - first], ks[:, :, :keys].expand(-1, l, -1, -1),
                                  vs[:, :, :keys].expand(-1, l, -1, -1), scale=scale, is_causal=False, mask=mask)
                # merged in place in the same transposed view of (out, lse): no copy of the call's results
                part_out = out.view(b * h, nq, l, -1).transpose(1, 2)[:, :, b0 - first : b1 - first]
                part_lse = lse.view(b * h, nq, l).transpose(1, 2)[:, :, b0 - first : b1 - first]
                merge_to(part_out, part_lse, (part_out, part_lse), (o, s_lse))
    return out.view(b, h, -1, out.shape[-1])[..., real, :dv], lse.view(b, h, -1)[..., real]


def _one_row_gathered(q, k, v, *, block: int, summary: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal row, the last position (a decode step), on a copy of exactly its keys: the
    summary keys of the blocks before its own, then its own block up to it, in one unmasked call,
    with nothing to merge (GATHERED_ROW_KEYS)."""
    l, c = block, summary
    i = k.shape[-2] - 1
    start = i // l * l
    index = block_row_keys(start, l, c, q.device)[: start // l * c + i - start + 1]
    out, lse = fused(q, k.index_select(-2, index), v.index_select(-2, index), scale=scale, is_causal=False)
    return out.float(), lse


@kept_when_small(lambda start, block, summary, device: start // block * summary + block)
def block_row_keys(start: int, block: int, summary: int, device: torch.device) -> torch.Tensor:
    """The keys of the block starting at `start` whose prefixes its rows attend: its last row's keys
    (`Fixed.row_keys`: the summary keys of the blocks before it, then its own positions), kept: a
    decode loop's steps through one block share it, where building it took five small ops a step."""
    return Fixed(block=block, summary=summary).row_keys(start + block - 1, device)


def _summary_offsets(q, k, v, out, lse, *, base: int, block: int, summary: int, real: slice, scale: float,
                     min_distance: int, skip_strides: tuple[int, ...]) -> None:
    """The summary piece for a few query rows (a decode step, a short chunk) without copying the
    summary keys: offset u of every block is one strided view of K and V, so the c offsets are c
    views, the head axis of one call (each row's query repeated by a stride-0 view) under one
    [c, rows, blocks] mask, merged over the offsets by log-sum-exp and into (out, lse) in place.
    Fewer key/value heads than query heads (on the CPU) are taken as they are: the offsets on the
    batch axis and the batch items' heads on the head axis (`band.heads_last`), which torch's CPU
    kernel maps by H / Hkv."""
    l, c = block, summary
    b, h, _, d = q.shape
    first_i, last_i = real.start + base, real.stop - 1 + base  # the rows' positions (row 0 at `base`)
    t = torch.arange(last_i // l, device=q.device)  # key blocks before the last row's
    if not len(t):
        return
    if not skip_strides and first_i // l == last_i // l and last_i // l * l - 1 <= first_i - min_distance:
        keep = None  # every row keeps every such key (one block's rows, the nearest key far enough): no mask
    else:
        j = t[None, None, :] * l + torch.arange(l - c, l, device=q.device)[:, None, None]  # [c, 1, blocks]
        at = torch.arange(first_i, last_i + 1, device=q.device)[None, :, None]
        keep = (t < at // l) & _far_off_strides(at - j, min_distance, skip_strides, causal=True)  # [c, rows, blocks]
    grouped = k.shape[1] != h
    # [B*H, c, ...]: offset u of every block on the head axis (grouped heads: swapped), its keys
    kv, vv = (heads_last(row_grid(row_major(x), l - c, (c, 1), (len(t), l)), grouped) for x in (k, v))
    rows = heads_last(repeated_operand(q.reshape(b * h, 1, -1, d)[:, :, real].expand(-1, c, -1, -1)), grouped)
    merged, total = _over_offsets(rows, kv, vv, None if keep is None else heads_last(keep[None], grouped), scale,
                                  dim=0 if grouped else 1)
    merge_to(out[:, real], lse[:, real], (out[:, real], lse[:, real]), (merged, total))


def _over_offsets(rows, kv, vv, keep: torch.Tensor | None, scale: float, dim: int):
    """One call over the summary offsets along `dim` (under `keep`; None: every key), merged over
    them by log-sum-exp: (out float32, lse) without that axis."""
    return merge_stacked(*fused_masked(rows, kv, vv, keep, scale=scale), dim)


def _at_call_ends(count, ends: list[tuple[int, int]], *args) -> list[list[int]]:
    """count(positions, *args) at each call's first and last row positions, on the host in one
    go: the summary key counts grow with the position, so these are each call's least and most,
    known without reading a device's tensor."""
    return count(torch.tensor(ends, dtype=torch.int64).reshape(-1, 2), *args).tolist()


def _summary_per_block(q_rows, ks, vs, out, lse, blocks: range, *, base: int, block: int, summary: int,
                       real: slice, scale: float, min_distance: int, skip_strides: tuple[int, ...],
                       shared: bool) -> None:
    """The summary piece a few query blocks per call (`_blocks_per_call`), on its real rows in their
    natural order, merged into (out, lse) in place. A row at i sees the summary keys of earlier
    blocks at positions <= i - m (m the minimum distance, 0 without one), off the skipped strides:
    where `shared` (always with strides), every call's keys under a slice of one shared mask
    (`_shared_summary_mask`), SHARED_MASK_CALL_ROWS rows a call. Else the keys are a prefix of them:
    those all of a call's rows see run unmasked, the rest under a small prefix mask, a block per
    call from CALL_ROWS rows up (with a distance SHARED_MASK_CALL_ROWS rows a call). q_rows
    [B, H, L, D], the keys [B, Hkv, keys, D] (grouped heads as they are: torch's CPU kernel maps
    them, or `fused` folds a key/value head's query heads into rows of one problem); (out, lse)
    over [B*H, L, *]."""
    l, c = block, summary
    last = blocks.stop - 1
    if shared:
        group = _blocks_per_call(l, len(blocks), lambda g: last * c, q_rows.device, SHARED_MASK_CALL_ROWS)
        mask = _shared_summary_mask(last, (last + group - 1) * c, block=l, summary=c, min_distance=min_distance,
                                    skip_strides=skip_strides, causal=True, dtype=q_rows.dtype, device=q_rows.device)
    else:
        reach = -(-min_distance // l) + 1  # blocks of summary keys some but not all of a call's rows see
        group = _blocks_per_call(l, len(blocks), lambda g: (g + reach) * c, q_rows.device,
                                 SHARED_MASK_CALL_ROWS if min_distance else CALL_ROWS)
    calls = [(r0, r1) for r0, r1 in ((max(b * l - base, real.start), min((b + group) * l - base, real.stop))
                                     for b in range(blocks.start, blocks.stop, group)) if r1 > r0]  # real rows
    ends = _at_call_ends(summary_keys_seen, [(r0 + base, r1 - 1 + base) for r0, r1 in calls],
                         l, c, min_distance)
    for (r0, r1), (lo, hi) in zip(calls, ends):
        rows = q_rows[:, :, r0:r1]
        if shared:  # every key under the mask
            parts = [fused_under(rows, ks[:, :, :hi], vs[:, :, :hi], *_call_mask(mask, r0 + base, r1 + base, hi,
                                                                                  last=last, block=l, summary=c),
                                 scale=scale)] if hi else []
        else:  # the keys every row sees unmasked, the rest under a prefix mask
            parts = [fused(rows, ks[:, :, :lo], vs[:, :, :lo], scale=scale, is_causal=False)] if lo else []
            if hi > lo:
                # How many summary keys each row sees: those of earlier blocks, at positions <= i - m.
                seen = summary_keys_seen(torch.arange(r0, r1, device=q_rows.device) + base, l, c, min_distance)
                keep = torch.arange(lo, hi, device=rows.device)[None, :] < seen[:, None]
                parts.append(fused_masked(rows, ks[:, :, lo:hi], vs[:, :, lo:hi], keep, scale=scale))
        for o, s_lse in parts:
            merge_to(out[:, r0:r1], lse[:, r0:r1], (out[:, r0:r1], lse[:, r0:r1]),
                     (o.flatten(0, 1), s_lse.flatten(0, 1)))


def _far_off_strides(apart: torch.Tensor, min_distance: int, skip_strides: tuple[int, ...],
                     causal: bool) -> torch.Tensor:
    """Which keys at distances `apart` (i - j) a union's fixed step keeps: at least m back (without
    causal, m either way), off the strides' multiples."""
    far_enough = apart >= min_distance if causal else apart.abs() >= min_distance
    return far_enough & off_strides(apart, skip_strides)


def _shared_summary_mask(last: int, width: int, *, block: int, summary: int, min_distance: int,
                         skip_strides: tuple[int, ...], causal: bool, dtype: torch.dtype,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every call's summary-key mask at once, where a row's keys are not a prefix of them: rows
    r = 0 .. l-1 of block `last` over the first `width` summary keys (of blocks 0, 1, ...; those
    past the real keys stand for blocks after `last`), as (additive mask, count of kept keys before
    each column, [l, width + 1]). A row keeps a key by their distance alone: i - j >= m off the
    strides, in an earlier block (without causal |i - j| >= m off the strides, any block). Row r of
    block b is as far from summary key j as row r of block `last` from j + (last - b) * c, so
    every block's mask is a slice of this one, built once rather than per call (its elementwise
    passes over rows x keys per call took 58 of fixed(128, 8)'s 318 ms skipping strided(128)'s
    keys at n = 16384, H = 8)."""
    l, c = block, summary
    at = summary_columns(-(-width // c) * l, l, c, device)[:width]
    apart = (last * l + torch.arange(l, device=device))[:, None] - at[None, :]
    keep = _far_off_strides(apart, min_distance, skip_strides, causal)
    if causal:  # earlier blocks only: the own block's keys are its own call's
        keep &= at < last * l
    return additive_mask(keep, dtype), F.pad(keep.cumsum(-1, dtype=torch.int32), (1, 0))


def _call_mask(shared: tuple[torch.Tensor, torch.Tensor], first: int, stop: int, keys: int, *, last: int, block: int,
               summary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows at positions first .. stop - 1 over the first `keys` summary keys, from the shared mask
    (`_shared_summary_mask`): (additive mask [1, 1, rows, keys], rows that keep no key), a view for
    one block's rows. 4-D, so that `fused` leaves fewer key/value heads to torch's CPU kernel rather
    than fold each one's query heads into rows under copies of the mask (the summary keys are few):
    unions with fixed(128, 8) over 2 key/value heads of 8 at n = 16384 took 0.92-0.94 of the time
    so, over equal heads 0.98-1.01."""
    mask, kept = shared
    l, c = block, summary
    masks, empty = [], []
    for b in range(first // l, (stop - 1) // l + 1):
        r0, r1 = max(first - b * l, 0), min(stop - b * l, l)  # the rows' offsets in their block
        at = (last - b) * c  # this block's first summary key in the shared mask
        masks.append(mask[r0:r1, at : at + keys])
        empty.append(kept[r0:r1, at + keys] == kept[r0:r1, at])
    mask, empty = (masks[0], empty[0]) if len(masks) == 1 else (torch.cat(masks), torch.cat(empty))
    return mask[None, None], empty


def _non_causal(q, k, v, *, block: int, summary: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal fixed: every query attends all summary keys (one call over one copy of them,
    c/l of K and V) and the other l - c keys of its own block (`_own_blocks`), merged by
    log-sum-exp: no mask, no key twice."""
    lk, l, c = k.shape[-2], block, summary
    parts = []
    columns = summary_columns(lk, l, c, k.device)
    if len(columns):
        parts.append(fused(q, k.index_select(-2, columns), v.index_select(-2, columns), scale=scale, is_causal=False))
    own = _own_blocks(q, k, v, block=l, summary=c, scale=scale)
    if own:
        parts.append(join_rows(own))
    return merge_partials(parts)


def _own_blocks(q, k, v, *, block: int, summary: int, scale: float,
                keep: Callable[[int, int, int, int], torch.Tensor] | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-causal: each query's own block's keys before its summary columns (those are every
    query's), as consecutive row pieces (none where c = l): the whole blocks of query rows in one
    batched call over the block view, a first block that starts before the first query row and a
    last, partial block apart; under `keep(i0, rows, j0, keys)` (by positions, of a rule in i - j
    alone: within a whole block that is the offset, so one [l, l - c] mask serves them all) where
    given."""
    b, h, lq, _ = q.shape
    lk, l, c = k.shape[-2], block, summary
    if c == l:
        return []
    offset = lk - lq
    first, whole = offset // l, lk // l  # the first query block; whole key blocks
    start = -(-offset // l)  # the first query block whose rows are all queries

    def alone(i0: int, i1: int, j0: int, j1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query positions i0 .. i1 - 1 against keys j0 .. j1 - 1 of their block, one call."""
        rows, keys = slice(i0 - offset, i1 - offset), slice(j0, j1)
        return fused_masked(q[..., rows, :], k[..., keys, :], v[..., keys, :],
                            None if keep is None else keep(i0, i1 - i0, j0, j1 - j0), scale=scale)

    pieces = []
    if start > first and first < whole:  # the first block's query rows alone (no dummy rows)
        pieces.append(alone(offset, min(start * l, lk), first * l, first * l + l - c))
    if whole > start:  # grouped key/value heads as they are (`grid_attention`)
        qb = q[..., start * l - offset : whole * l - offset, :].reshape(b * h, whole - start, l, -1)
        kb, vb = (row_grid(row_major(x), start * l, (whole - start, l), (l - c, 1)) for x in (k, v))
        kept = None if keep is None else keep(0, l, 0, l - c)
        o, o_lse = grid_attention(qb, kb, vb, None if kept is None else additive_mask(kept, q.dtype),
                                  None if kept is None else ~kept.any(-1), scale=scale)
        rows = (whole - start) * l  # by count, not -1: a v of head dim 0 gives an output of no elements
        pieces.append((o.reshape(b, h, rows, o.shape[-1]), o_lse.reshape(b, h, rows)))
    if lk > whole * l:  # the last, partial block: its keys before the summary columns
        pieces.append(alone(max(whole * l, offset), lk, whole * l, min(lk, whole * l + l - c)))
    return pieces


def _non_causal_far(q, k, v, *, block: int, summary: int, scale: float, min_distance: int,
                    skip_strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal fixed's keys at |i - j| >= m (a union with a window reaching both ways) off the
    skipped strides' multiples (a union with strides): its own block's keys before the summary
    columns (`_own_blocks`, under the rule), and every summary key (one copy of them all) under
    slices of one shared mask (`_shared_summary_mask`), a few blocks per call (`_blocks_per_call`),
    merged into the first partial in place. Per query block, its own block and the summary keys in
    one call each (and before, those every row keeps unmasked and the nearer ones under small
    masks in four) took 1.4x (and 1.8x) as long: union(strided 128, fixed(128, 8)), n = 16384,
    H = 8, 520 (685) ms against 374."""
    lq, lk, l, c = q.shape[-2], k.shape[-2], block, summary
    offset = lk - lq

    def keep(i0: int, rows: int, j0: int, keys: int) -> torch.Tensor:
        apart = torch.arange(i0, i0 + rows, device=q.device)[:, None] - torch.arange(j0, j0 + keys, device=q.device)
        return _far_off_strides(apart, min_distance, skip_strides, causal=False)

    # none where every key of a query's block is nearer than m (a union's window of at least l)
    own = _own_blocks(q, k, v, block=l, summary=c, scale=scale, keep=keep) if min_distance < l else []
    out, lse = join_rows(own) if own else empty_partial(q, v.shape[-1])
    out, lse = out.to(torch.float32, memory_format=torch.contiguous_format), lse.contiguous()
    columns = summary_columns(lk, l, c, k.device)
    if not len(columns):
        return out, lse
    ks, vs = as_computed(k.index_select(-2, columns), v.index_select(-2, columns))  # once, for every block
    last = -(-lk // l) - 1  # the last block: the shared mask's rows are its rows
    group = _blocks_per_call(l, last + 1 - offset // l, lambda g: len(columns), q.device, SHARED_MASK_CALL_ROWS)
    shared = _shared_summary_mask(last, (2 * last + 1) * c, block=l, summary=c, min_distance=min_distance,
                                  skip_strides=skip_strides, causal=False, dtype=q.dtype, device=q.device)
    for b in range(offset // l, last + 1, group):
        r0, r1 = max(b * l, offset) - offset, min((b + group) * l, lk) - offset  # the blocks' query rows
        part = fused_under(q[..., r0:r1, :], ks, vs, *_call_mask(shared, r0 + offset, r1 + offset, len(columns),
                                                                  last=last, block=l, summary=c), scale=scale)
        merge_to(out[..., r0:r1, :], lse[..., r0:r1], (out[..., r0:r1, :], lse[..., r0:r1]), part)
    return out, lse
