"""Strided attention as s independent dense attentions, one per residue class.

Positions with the same residue mod s attend only each other (causally; without causal, the whole
class: `_every_class_key`). Viewing [L, D] as [L/s, s, D] and swapping the first two axes turns
`strided(s)` into dense causal attention over s classes of length L/s, batched in each fused call:
n^2/s work, with no copy of K or V below CLASS_MAJOR_KEY_ROWS key class rows (the view's strides go
straight to the kernel; keys past the last whole class row are each seen only by the query at their
own position, added apart), none of Q when s divides its rows' span, and none of the output where
each call takes every class (the kernel writes it in the query's memory order, the natural one).
The class rows are cut into chunks, one call each, so that little of the causal square's empty
half is computed and no chunk's mask outgrows the masked kernel's MASK_BUDGET (small strides at
long lengths); on the CPU the chunks go a group of classes at a time where the classes' keys
outgrow CLASS_GROUP_BYTES, so that the chunks after a group's first read its keys from cache, and
half precision computed in float32 is converted a group at a time, in cache, as the calls read it. A
minimum distance m (for a union with a sliding window, whose keys it then skips) drops the first
ceil(m/s) query class rows and shifts the mask's diagonal. Skipped strides (for a union with other
strides, which count the keys at their multiples) mask those keys.

On the CPU a long run's classes go to the span kernel (`span_kernel`, C++ built at first use)
where it takes them: one call, each thread computing whole classes with their keys packed once, in
cache (1024 keys at a time), and no copy of K, V or the output; else (no compiler, skipped strides,
longer classes in half precision that AMX runs natively) to torch's kernel in chunks as above.
strided(64), H = 8, D = 64, float32, ms, span kernel / torch's in chunks: n = 16384 28.2 / 40.8,
65536 296.6 / 430.5.

Fewer query rows than s (a decode step, a short chunk) leave most classes without a query: then
each row, alone in its class, attends a view of its class's keys, and only those classes are read,
on the span kernel where it takes them (no skipped strides' mask), else in torch's fused call.

Fewer key/value heads than query heads are read as they are on the CPU: a long run's class views
go to the kernel with the batch items' heads on the head axis (`band.grid_attention`), a short
run's with each key/value head's query heads as rows; only the few keys of a partial last class
row are copied for each query head (`dense.per_query_head`). strided(64), ms: H = 32 over 8,
D = 128, n = 4096, 45 against 49-53 a key/value head at a time; H = 8 over 2, D = 64, n = 16384,
57-61 against 62-78 repeating them; and H = 8 over 2, n = 4096, 8.3 MiB against 24.1 repeating
them (12.2 a key/value head at a time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import span_kernel
from .band import batch_and_heads_merge, grid_attention, row_grid, row_major, row_range
from .dense import (CPU_CAUSAL_SKIP_ROWS, CPU_QUERY_BLOCK_ROWS, CPU_SMALL_CALL_ROWS, NEG_INF, additive_mask,
                    as_computed, computed_dtype, cpu_native_half, empty_partial, fused_under, kept_when_small,
                    per_query_head, swapped_axes)
from .device import kernel_device, values_on_host
from .masked import MASK_BUDGET
from .merge import join_rows, merge_to

# Query class rows per chunk: at least `chunk_rows`, at most MAX_CHUNKS chunks. 64-row chunks were
# the fastest of 16..256 for strided(64) at n = 16384 and strided(128) at 65536 (CPU, 2 cores).
# A causal square of CPU_CAUSAL_SKIP_ROWS class rows and more goes as one call: the kernel skips
# its empty blocks itself. On an AMD EPYC chunks had matched that at 1024 rows; on an Intel Xeon
# (AVX-512, AMX) one call took, H = 8, D = 64, ms, float32 / bfloat16 against 8 chunks: strided(64)
# at n = 49152 304 / 124 against 427 / 193, at 65536 516 / 207 against 635 / 292; a union's stride
# (sliding 64, strided 64, 1023 rows) at 65536 532 / 232 against 646 / 299. Classes of up to 192
# rows take 32-row chunks: the kernel computes 32 query rows at a time below 192 rows, each over
# every key of its call, so halving a chunk cuts the keys its first half reads. Best of six calls
# in turn, H = 8, D = 64, ms for 32 / 64 rows: strided(128) at 64 / 96 / 128 / 160 / 192 class
# rows 12.5 / 13.2, 28.5 / 32.1, 44.3 / 46.7, 64.7 / 67.9, 72.3 / 73.6, with sliding_window(128)
# in a union 38.7 / 47.5, 76.9 / 80.5, 110.9 / 113.3, 146.6 / 148.4, 149.3 / 147.8; at 256 rows
# (strided(64), n = 16384) 58.7 / 56.7.
CHUNK_ROWS = 64
SMALL_CLASS_CHUNK_ROWS = 32
MAX_CHUNKS = 8
# Where half precision runs natively (AMX), chunks of at least 256 rows: each call packs the keys it
# reads, and the matrix products cost little beside that, so computing more of the causal square's
# empty half in fewer calls pays. bfloat16, H = 8, D = 64, ms, 256-row chunks (or one call) against
# the float32 rule's: strided(128) at n = 16384 21.0 / 25.8, strided(64) at 12288 / 16384 / 32768
# 15.3 / 19.7, 24.2 / 31.9, 72.0 / 102.3; a union's stride (sliding 128, strided 128) at 16384 /
# 65536 18.1 / 20.0, 148.5 / 222.8.
NATIVE_HALF_CHUNK_ROWS = 256
# torch's CPU kernel runs key lengths that are multiples of 16 faster than those just below them,
# though they hold more keys: [64 rows, N keys] x 1024 problems, D = 64, ms: N = 124 23.8, 127 24.9,
# 128 20.7; 248 41.9, 255 43.6, 256 38.4 (100 19.4 against 112's 19.9 the exception). A union's
# stride, which skips the window's keys, saw 127 key class rows where the stride alone sees 128.
KEY_ROWS_MULTIPLE = 16
# From this many key class rows read on the CPU (float32, or half precision computed in it), where
# the calls read each key more than once (more query class rows than the kernel computes at a time,
# CPU_QUERY_BLOCK_ROWS), K and V are copied class by class (`_keys_as_read`) before the calls: each
# chunk's call (and each of the kernel's query blocks) reads its keys again, and a view's class rows
# lie s rows apart, a memory page apart for s >= 16 at D = 64, where a copy's are adjacent. Until
# the eleventh session the rule counted query class rows, so a chunk of a long prefill read its many
# keys as views: copies / views at 512 or 1024 key class rows after 65536 keys, ms, strided(128)
# with 48 / 64 / 96 / 192 / 256 query class rows 67.5 / 72.5, 77.3 / 83.2, 104.3 / 116.0, 162.8 /
# 195.5, 187.5 / 228.2; strided(64) with 64 / 128 / 256 rows 77.4 / 84.3, 122.0 / 151.5, 194.3 /
# 247.5; the union (sliding 128, strided 128) with 64 rows 90.7 / 104.0; but with 32 rows (one call,
# one query block) 60.0 / 42.5 and 59.7 / 43.0, and at 256 key class rows 22.7 / 19.9, 33.0 / 31.0,
# 43.1 / 40.7 (strided(64) at 16384 after 4096 and 8192 rows, strided(128) at 32768 after 8192; best
# of 5 in turn). Squares, whose query and key class rows are alike, before: engine.attention, Intel
# Xeon, H = 8, D = 64, float32, ms, views / copies (best of 8, in turn): strided(64) at n = 24576 /
# 28672 / 32768 / 65536 (384 / 448 / 512 / 1024 class rows) 88.7 / 80.2, 123.2 / 102.7, 147.0 /
# 137.2, 461.2 / 401.1; n = 65000 525.6 / 469.9; strided(128) at 65536 338.3 / 292.5 and the union
# (sliding 128, strided 128) 467.6 / 437.2; without causal, strided(64) at 32768 178.9 / 155.5,
# strided(128) at 65536 354.8 / 290.3. At 128 and 256 class rows the copies lost 4-8% (strided(64)
# at 16384, strided(128) at 16384 and 32768), and native bfloat16, whose chunks are 256 rows, gained
# nothing anywhere (copies / views 1.00-1.04 from 384 rows, 1.07-1.22 below). The copies raise a
# call's peak memory by K's and V's size (strided(64) at 65536, H = 8, float32: 386 MiB against 130,
# a union's 392 either way), so larger K and V are read as views.
CLASS_MAJOR_KEY_ROWS = 384
CLASS_MAJOR_MAX_BYTES = 1 << 30
# Several chunks re-read their classes' keys, each chunk's call streaming every class's from memory.
# On the CPU classes whose K and V together outgrow this go a group of classes at a time instead,
# all chunks of a group before the next (`_chunk_results`), so the later chunks read the group's
# keys from cache, and the class-by-class copies are made a group at a time (strided(128) at n =
# 65536, H = 8, float32: peak 163 MiB against 386). One chunk (one call) gains nothing from groups.
# engine.attention, Intel Xeon, H = 8, D = 64, float32, ms, one group / groups of 16 MiB (best of
# 6-7, in turn): strided(64) at n = 16384 / 24576 / 32768 (256 / 384 / 512 class rows) 47.4 /
# 45.3, 97.1 / 86.5, 143.9 / 134.1; strided(128) at 16384 / 24576 / 32768 / 65536 30.0 / 29.6,
# 61.7 / 56.3, 100.4 / 89.9, 309.5 / 267.5; strided(512) at 65536 131.7 / 121.5; the union
# (sliding 128, strided 128) at 16384 / 65536 69.6 / 67.4, 464.5 / 432.7. Groups of 4 and 64 MiB
# did no better (strided(128) at 65536: 293.3 and 286.5 against 278.2). In native bfloat16 (256-row
# chunks) groups of 16 MiB took 0.90-1.05 of one group's time at 512 class rows. Half precision
# computed in float32 (float16 on that Xeon, bfloat16 without AMX) goes in groups too where its
# classes outgrow the budget in float32, even as one chunk, each group's q, K and V converted just
# before its calls, the result written straight in q's dtype: float16, H = 8, D = 64, ms, converted
# whole / a group at a time (best of 5 in turn, float32 alongside): strided(64) at n = 8192 /
# 16384 / 32768 / 65536 (one call) 16.1 / 15.3, 51.7 / 47.5, 145.5 / 126.3, 473.0 / 445.3 (float32
# 14.7, 46.0, 126.5, 442.6); strided(128) at 65536 294.6 / 259.9 (259.8); 8192 rows after 65536
# keys 102.8 / 77.0 (89.0). One group of converted class views lost (strided(64) at 4096: 5.8
# against 4.9): classes within the budget are converted whole, once, as q's rows lie.
CLASS_GROUP_BYTES = 16 << 20


# The span kernel (`span_kernel`) takes a class's keys 1024 at a time with a running softmax, so
# it beats torch's kernel in chunks at any class length in float32 (it held a class's keys whole
# until 2026-12-06's second session, and lost from 4096 rows). engine.attention, Intel Xeon, H = 8,
# D = 64, ms, span kernel / torch's (best of 3, in turn): strided(32) at n = 65536 (2048 rows)
# 666 / 861, strided(16) (4096 rows) 1276 / 1478, strided(8) (8192) 2434 / 2599; strided(2) at
# 32768 (16384 rows) 2427 / 2516.
# Where AMX runs half precision natively in torch's kernel but not in the span kernel (its build
# without AMX, measured before it had it), torch's kernel wins from fewer class rows: bfloat16, H =
# 8, D = 64, ms, span kernel / torch's (256-row chunks; best of 6, in turn): 64 rows (strided(256)
# at n = 16384) 11.5 / 20.4, 128 rows (strided(128)) 17.1-17.2 / 22.4-23.6, 170 (strided(96))
# 27.4 / 38.1; 256 rows 26.5-26.6 / 24.7-24.9 (strided(64) at 16384), 50.0 / 50.1 (strided(128) at
# 32768); 1024 rows (strided(64) at 65536) 310.8 / 208.2.
NATIVE_HALF_SPAN_MAX_KEY_ROWS = 192
# Where the span kernel computes half precision natively too (AMX), it takes longer classes from
# this many query class rows (one AMX tile's): bfloat16, 16384 keys (256 key class rows, strided(64)),
# H = 8, D = 64, ms, span kernel / torch's (best of 20, in turn): 2 query class rows 3.01 / 2.51, 8
# rows 3.23 / 2.91, 16 rows 3.26 / 3.20, 32 rows 4.40 / 4.59.
NATIVE_SPAN_MIN_QUERY_ROWS = 16


def off_strides(distance: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """Where a distance i - j is a multiple of none of `strides`: the keys a union's other strided
    members do not count."""
    keep = torch.ones(distance.shape, dtype=torch.bool, device=distance.device)
    for stride in strides:
        keep &= distance % stride != 0
    return keep


def _classes(x: torch.Tensor, start: int, stop: int, stride: int) -> torch.Tensor:
    """Rows [start, stop) (a multiple of stride long; zero rows past L) as the view
    [B*H, stride, (stop-start)/stride, D]: class c holds positions start + c, start + c + s, ..."""
    b, h, length, d = x.shape
    # On the CPU a view where the strides allow (a grouped-query run's stride-0 heads included:
    # copying them wrote one key/value head out H / Hkv times, 56 ms for 24 rows after 65536 keys),
    # else a copy; CUDA's kernels get C-order copies of other layouts, as they were tried on.
    if stop > length or kernel_device(x.device) != "cpu" and not x.is_contiguous():
        x = F.pad(x, (0, 0, 0, max(0, stop - length)))
    rows = (stop - start) // stride
    return x[..., start:stop, :].reshape(b * h, rows, stride, d).transpose(1, 2)


def strided_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stride: int, scale: float, min_distance: int = 0,
    skip_strides: tuple[int, ...] = (), out_dtype: torch.dtype | None = None,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Strided attention with i - j >= min_distance, off `skip_strides`, as (first row, out, lse)
    pieces over consecutive query rows, queries bottom-right aligned; rows before the first piece
    see no key (rows inside one whose keys are all skipped get zeros and -inf). Half precision on
    a CPU where it is slow is computed in float32 (`as_computed`): a long run converts a group of
    classes at a time as its calls read them where the classes outgrow CLASS_GROUP_BYTES
    (`_class_groups`), else whole, and a short run whole unless its rows read few classes
    (`few_classes`: then each call converts what it reads). The pieces come in `out_dtype` (q's
    unless said: a union that merges or continues them after asks for float32, so that its result
    is rounded once), or float32 where the keys of a partial last class row merge in here (a short
    run's on torch's calls: in the dtype those compute).

    On the span kernel the class rows go in one call. On torch's kernel query class rows are cut
    into chunks; a chunk sees the key class rows up to its last row under
    one shared [chunk, keys] mask, so the work is ~(chunks + 1) / (2 chunks) of the full square
    (the CPU kernel's own causal skipping is coarse: none below 512 rows)."""
    if q.shape[-2] < stride:
        if not few_classes(q.shape[-2], stride):
            q, k, v = as_computed(q, k, v)
        return _short_run_pieces(q, k, v, stride=stride, scale=scale, min_distance=min_distance,
                                 skip_strides=skip_strides, out_dtype=out_dtype)
    b, h, lq, _ = q.shape
    lk, dv, s = k.shape[-2], v.shape[-1], stride
    offset = lk - lq
    total = -(-lk // s) * s  # queries padded to whole classes
    # Keys in whole class rows only (views, no copy): the last, partial key class row holds, for
    # each real query of the last query class row, its own position alone (`_with_own_keys`).
    key_rows = lk // s
    unpadded_q = q
    lead = offset % s  # queries start at a class boundary: up to s - 1 dummy rows
    if lead:
        q = F.pad(q, (0, 0, lead, 0))
    # Query class row r (position offset - lead + r*s + c) sees key class rows 0 .. r + diag.
    back = _class_rows_back(min_distance, s)
    diag = (offset - lead) // s - back
    skip = max(0, -diag)  # leading query class rows that see no key
    rows = (total - offset + lead) // s - skip
    if rows <= 0 or skip * s - lead >= lq:
        return []
    seen = diag + skip  # local query class row r sees key class rows 0 .. seen + r
    device, dtype = kernel_device(q.device), computed_dtype(q)
    read = _masked_key_rows(min(seen + rows, key_rows), key_rows, device)  # key class rows read

    def class_views(q, k, v):
        return _classes(q, skip * s, (skip + rows) * s, s), *(_classes(x, 0, read * s, s) for x in (k, v))

    own_keys = min_distance == 0 and not skip_strides and key_rows * s < lk
    out_dtype = dtype if own_keys else out_dtype or q.dtype  # rounded once, after the own keys merge in
    qc, kc, vc = class_views(q, k, v)
    if _on_span_kernel(qc, kc, vc):  # into a buffer laid out as q's rows
        out, lse = _row_ordered(qc, rows, dv, out_dtype)
        # Local query class row r at key class row own + r: it sees those up to `back` rows before
        # (seen + r), off the skipped strides' class rows (`class_strides`).
        own = seen + back
        span_kernel.span_attention(qc, kc, vc, out, lse, first=-span_kernel.UNBOUNDED, last=-back, row_shift=own,
                                   skip_strides=class_strides(s, skip_strides), scale=scale)
        results = [(0, rows, out, lse)]
    else:
        results = _torch_chunk_results(q, k, v, (qc, kc, vc), class_views, rows=rows, seen=seen, back=back,
                                       key_rows=key_rows, skip_strides=skip_strides, scale=scale,
                                       out_dtype=out_dtype)
    pieces = []
    for c0, c1, out, lse in results:
        first = (skip + c0) * s - lead  # q row of the chunk's first position
        out = out.transpose(1, 2).reshape(b, h, (c1 - c0) * s, dv)
        lse = lse.transpose(1, 2).reshape(b, h, (c1 - c0) * s)
        lo, hi = max(0, -first), min((c1 - c0) * s, lq - first)  # drop dummy and padded rows
        if hi > lo:
            pieces.append((first + lo, out[..., lo:hi, :], lse[..., lo:hi]))
    if own_keys:
        pieces[-1] = _with_own_keys(pieces[-1], unpadded_q, k, v, first_row=max(0, key_rows * s - offset),
                                    scale=scale)
    return pieces


def class_strides(stride: int, skip_strides: tuple[int, ...]) -> tuple[int, ...]:
    """The skipped strides in a stride's class rows: keys t class rows back from a query lie t * s
    positions back, a multiple of s' exactly where t is one of s' / gcd(s, s')."""
    return tuple(skipped // math.gcd(stride, skipped) for skipped in skip_strides)


def _on_span_kernel(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> bool:
    """Whether class views (a long run's classes, a short run's rows' own) go to the CPU span kernel
    (`span_kernel`) rather than torch's kernel (in chunks; one fused call): on the CPU, in half
    precision that torch's kernel runs natively (AMX) up to
    NATIVE_HALF_SPAN_MAX_KEY_ROWS key class rows, or past them from NATIVE_SPAN_MIN_QUERY_ROWS query
    class rows where the span kernel computes it natively too (`span_kernel.computes_natively`), and
    where the kernel takes the views."""
    short_enough = (not cpu_native_half(qc.dtype) or kc.shape[-2] <= NATIVE_HALF_SPAN_MAX_KEY_ROWS
                    or (span_kernel.computes_natively(qc.dtype) and qc.shape[-2] >= NATIVE_SPAN_MIN_QUERY_ROWS))
    return short_enough and span_kernel.takes(qc, kc, vc)


def _torch_chunk_results(q, k, v, views, class_views, *, rows: int, seen: int, back: int, key_rows: int,
                         skip_strides: tuple[int, ...], scale: float, out_dtype: torch.dtype):
    """`strided_pieces`' class rows on torch's kernel, in chunks: (first row, last row + 1, out, lse)
    of each, as `_chunk_results` gives them, from q's, K's and V's class `views` (or, converted
    whole, `class_views` of their float32 copies)."""
    qc, kc, vc = views
    s, device, dtype = kc.shape[1], kernel_device(q.device), computed_dtype(q)
    square = seen == 0 and not skip_strides  # chunk [0, c1) is then the causal square of c1 class rows
    if square and rows >= CPU_CAUSAL_SKIP_ROWS and device != "cuda":
        # The CPU kernel skips a square's empty blocks itself from that many rows: the whole class
        # rows' square is one call (a partial last class row, where s does not divide the keys, a
        # masked one after it).
        size = min(rows, key_rows)
    else:
        # On CUDA the flash kernel skips the causal square's empty half itself: one chunk.
        size = rows if device == "cuda" else max(chunk_rows(rows, q.dtype), -(-rows // MAX_CHUNKS))
        if seen or size < rows or skip_strides:  # masked chunks: each mask within the masked kernel's budget
            size = min(size, max(1, MASK_BUDGET // min(seen + rows, key_rows)))
    chunks = []  # (first row, last row + 1, key class rows read, mask and its empty rows, or None: causal)
    for c0 in range(0, rows, size):
        c1 = min(rows, c0 + size)
        width = min(seen + c1, key_rows)  # key class rows this chunk sees
        if square and c0 == 0 and c1 == width and _square_unmasked(c1, key_rows, device):  # no mask
            chunks.append((c0, c1, width, None))
        else:  # local row r sees key class rows up to seen + r: back or more class rows before its own
            width = _masked_key_rows(width, key_rows, device)
            chunks.append((c0, c1, width, class_distance_mask(seen + c0 + back, c1 - c0, width, back, s, skip_strides,
                                                              True, dtype, q.device)))
    groups = _class_groups(kc, vc, len(chunks), dtype, device)
    if len(groups) == 1:  # every class in each call: converted whole, once
        qc, kc, vc = class_views(*as_computed(q, k, v))
    return _chunk_results(qc, kc, vc, chunks, groups, rows, scale=scale, device=device, out_dtype=out_dtype)


def chunk_rows(rows: int, dtype: torch.dtype) -> int:
    """The fewest query class rows per chunk for `rows` of them on the CPU: fewer for short
    classes, more where half precision runs natively."""
    if cpu_native_half(dtype):
        return NATIVE_HALF_CHUNK_ROWS
    return SMALL_CLASS_CHUNK_ROWS if rows <= CPU_SMALL_CALL_ROWS else CHUNK_ROWS


def _chunk_results(qc, kc, vc, chunks, groups: list[tuple[int, int]], rows: int, *, scale: float, device: str,
                   out_dtype: torch.dtype):
    """(first row, last row + 1, out, lse) of each chunk's call over the class views (out and lse
    [N, s, rows, *], laid out as q's rows). In several `groups` (`_class_groups`) the chunks go a
    group of classes at a time, every chunk of a group before the next, so that the later chunks
    find the group's keys in cache, and each group's q, K and V in a half precision computed in
    float32 are converted just before its calls (in cache: converting them whole wrote them out to
    memory and read them back); the results are then written into one buffer in q's row order, of
    `out_dtype` (q's, or the computed one where the caller merges more keys into it after, so that
    it is rounded once), and come back as one chunk."""

    def call(q_group: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk):
        c0, c1, width, masked = chunk
        q_rows, k_rows, v_rows = row_range(q_group, c0, c1 - c0), row_range(keys, 0, width), row_range(values, 0, width)
        if masked is None:
            return grid_attention(q_rows, k_rows, v_rows, None, None, scale=scale, is_causal=True)
        return grid_attention(q_rows, k_rows, v_rows, *masked, scale=scale)

    if len(groups) == 1:
        keys, values = _keys_as_read(rows, kc, vc, device)
        return [(chunk[0], chunk[1], *call(qc, keys, values, chunk)) for chunk in chunks]
    out, lse = _row_ordered(qc, rows, vc.shape[-1], out_dtype)
    for g0, g1 in groups:
        keys, values = _keys_as_read(rows, kc[:, g0:g1], vc[:, g0:g1], device)
        (q_group,) = as_computed(qc[:, g0:g1])
        for chunk in chunks:
            c0, c1 = chunk[:2]
            part_out, part_lse = call(q_group, keys, values, chunk)
            out[:, g0:g1, c0:c1].copy_(part_out)
            lse[:, g0:g1, c0:c1].copy_(part_lse)
    return [(0, rows, out, lse)]


def _row_ordered(qc: torch.Tensor, rows: int, dv: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty out [N, s, rows, dv] of `dtype` and float32 lse [N, s, rows] for results over the
    class views qc [N, s, rows, *], laid out as q's rows (class row by class row), so that the
    result over [B, H, L, *] is a view of them."""
    n, s = qc.shape[:2]
    out = qc.new_empty(n, rows, s, dv, dtype=dtype).transpose(1, 2)
    return out, torch.empty(n, rows, s, dtype=torch.float32, device=qc.device).transpose(1, 2)


def _class_groups(kc: torch.Tensor, vc: torch.Tensor, chunks: int, dtype: torch.dtype,
                  device: str) -> list[tuple[int, int]]:
    """The consecutive ranges of classes that `chunks` calls over K's and V's class views go a range
    at a time (`_chunk_results`), of near-equal size: on the CPU, where several chunks re-read the
    classes or the views need converting to `dtype` (half precision computed in float32), ranges
    whose keys and values (as computed) take at most about CLASS_GROUP_BYTES; else one range."""
    classes = kc.shape[1]
    if device != "cpu" or chunks == 1 and dtype == kc.dtype:
        return [(0, classes)]
    class_bytes = sum(_as_stored(x)[:, :1].numel() for x in (kc, vc)) * torch.finfo(dtype).bits // 8
    count = min(classes, max(1, -(-classes * class_bytes // CLASS_GROUP_BYTES)))
    size = -(-classes // count)
    return [(g, min(classes, g + size)) for g in range(0, classes, size)]


def _as_stored(x: torch.Tensor) -> torch.Tensor:
    """A class view whose one key/value head is repeated with stride 0 (`attention`'s per-head
    runs) as that head alone: what is stored, copied and counted."""
    return x[:1] if x.stride(0) == 0 else x


def _keys_as_read(rows: int, kc: torch.Tensor, vc: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K's and V's `_classes` views [N, s, R, D] as the calls for `rows` query class rows read them
    on `device` (its `kernel_device`): copied class by class, each class's rows adjacent, where
    they are converted anyway (`as_computed`), or on the CPU where they are CLASS_MAJOR_KEY_ROWS
    class rows or more, the calls read them more than once (more than CPU_QUERY_BLOCK_ROWS query
    class rows), half precision is not computed natively and the copies fit
    CLASS_MAJOR_MAX_BYTES; else the views. One key/value head repeated for several query heads
    (stride 0, `attention`'s per-head runs) is copied once."""
    sources = [_as_stored(x) for x in (kc, vc)]
    if computed_dtype(kc) != kc.dtype:
        copies = as_computed(*sources)
    elif (device != "cpu" or cpu_native_half(kc.dtype) or kc.shape[-2] < CLASS_MAJOR_KEY_ROWS
            or rows <= CPU_QUERY_BLOCK_ROWS
            or sum(x.numel() * x.element_size() for x in sources) > CLASS_MAJOR_MAX_BYTES):
        return kc, vc
    else:
        copies = tuple(x.contiguous() for x in sources)
    return copies[0].expand_as(kc), copies[1].expand_as(vc)


def _square_unmasked(rows: int, key_rows: int, device: str) -> bool:
    """Whether a causal square of `rows` class rows goes to the kernel as one (is_causal, no mask)
    on `device`: below CPU_CAUSAL_SKIP_ROWS rows on the CPU not where its keys can be read to a
    multiple of KEY_ROWS_MULTIPLE (`_masked_key_rows`), as that masked call is faster (a union's
    stride, 127 rows of strided(128) at n = 16384, H = 8, D = 64: float32 36.6 / 43.8 ms, bfloat16
    18.1 / 31.6)."""
    return rows >= CPU_CAUSAL_SKIP_ROWS or _masked_key_rows(rows, key_rows, device) == rows


def _masked_key_rows(rows: int, key_rows: int, device: str) -> int:
    """The key class rows a masked chunk reads on `device` (its `kernel_device`): on the CPU `rows`
    rounded up to a multiple of KEY_ROWS_MULTIPLE where there are that many (the mask drops the
    extra ones)."""
    return min(key_rows, -(-rows // KEY_ROWS_MULTIPLE) * KEY_ROWS_MULTIPLE) if device == "cpu" else rows


def _with_own_keys(piece, q, k, v, *, first_row: int, scale: float):
    """The last piece with query rows first_row.. (those past the last whole key class row) also
    attending the key at their own position, merged into it in place by log-sum-exp: that key's
    score alone, and its value."""
    row, out, lse = piece
    lk, lq, h = k.shape[-2], q.shape[-2], q.shape[1]
    own_k, own_v = (per_query_head(x[..., lk - lq + first_row :, :], h) for x in (k, v))
    own_lse = (q[..., first_row:, :].float() * own_k.float()).sum(-1) * scale
    at = first_row - row
    merge_to(out[..., at:, :], lse[..., at:], (out[..., at:, :], lse[..., at:]), (own_v, own_lse))
    return piece


def _short_run_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stride: int, scale: float, min_distance: int,
    skip_strides: tuple[int, ...], out_dtype: torch.dtype | None = None,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """`strided_pieces` for fewer query rows than the stride: each row is alone in its class, so
    the rows in one class row (at most two such runs) attend, one call per run, views of their
    own classes' keys up to ceil(m/s) class rows back: no class without a query, and no mask but
    the one dropping skipped strides' keys, which every row of a run shares. Fewer key/value heads
    than query heads are taken as they are: the query heads of a key/value head are rows of its
    class problems, so each class's keys are read once for all of them. The runs go to the span
    kernel where it takes them (`_on_span_kernel`; the skipped strides' class rows as its mask),
    written in `out_dtype` (q's unless said: float32 for a partial that a union's band or fixed
    step continues, so that the result is rounded once), else to torch's fused call (under
    `class_distance_mask`, kept: a decode loop's steps in one class row reuse it). Span kernel /
    torch's call through `engine.attention`, H = 8, D = 64, after 16384 keys, in turn (AMD EPYC):
    one row float32 strided(64) 0.97, strided(128) 1.06, the union's stride (sliding 128, strided
    128) 0.90, after 65536 keys 1.01-1.03 and 0.94; bfloat16 0.58 / 0.63 / 0.70; 4 rows 0.91-0.96;
    16 rows 0.70 / 0.82 / 0.81; H = 32 over 8 0.93-0.99."""
    b, h, lq, _ = q.shape
    # per_head's blocks of heads (`attention.HeadBlocks`), whose B and H do not merge: an item at a
    # time, whose class rows are views (`row_major` would copy K and V whole)
    if b > 1 and not all(batch_and_heads_merge(x) for x in (q, k, v)):
        items = [_short_run_pieces(q[i : i + 1], k[i : i + 1], v[i : i + 1], stride=stride, scale=scale,
                                   min_distance=min_distance, skip_strides=skip_strides, out_dtype=out_dtype)
                 for i in range(b)]
        return [(row, torch.cat([pieces[j][1] for pieces in items]), torch.cat([pieces[j][2] for pieces in items]))
                for j, (row, _, _) in enumerate(items[0])]
    lk, s, hkv = k.shape[-2], stride, k.shape[1]
    group = h // hkv
    offset = lk - lq
    back = _class_rows_back(min_distance, s)
    k, v = row_major(k), row_major(v)
    pieces = []
    row = 0
    while row < lq:
        class_row, first_class, keys = _class_row_keys(offset + row, s, back)
        run = min(lq - row, s - first_class)
        if keys > 0:
            qc, kc, vc = _class_run(q, k, v, row, run, first_class, keys, s)
            dv = v.shape[-1]
            if _on_span_kernel(qc, kc, vc):
                out = q.new_empty(*qc.shape[:-1], dv, dtype=out_dtype or q.dtype)
                lse = q.new_empty(qc.shape[:-1], dtype=torch.float32)
                keep = _class_row_keep(class_row, keys, back, s, skip_strides, group, q.device)
                span_kernel.span_attention(qc, kc, vc, out, lse, first=-span_kernel.UNBOUNDED,
                                           last=span_kernel.UNBOUNDED, scale=scale, mask=keep)
            else:
                mask, empty = class_distance_mask(class_row, 1, keys, back, s, skip_strides, True, q.dtype, q.device) \
                    if skip_strides else (None, None)
                out, lse = fused_under(qc, kc, vc, mask, empty, scale=scale)
            pieces.append((row, swapped_axes(out, (b, hkv, run, group, dv), (b, h, run, dv)),
                           swapped_axes(lse, (b, hkv, run, group), (b, h, run))))
        row += run
    return pieces


def _class_rows_back(min_distance: int, stride: int) -> int:
    """The class rows between a query and its nearest key at a distance of at least `min_distance`
    in its class: the distance over the stride, rounded up."""
    return -(-min_distance // stride)


def _class_row_keys(position: int, stride: int, back: int) -> tuple[int, int, int]:
    """The class row and class of a query at `position`, and how many key class rows of its class
    it attends: 0 .. class row - back (`back` class rows between it and its nearest key)."""
    class_row, first_class = divmod(position, stride)
    return class_row, first_class, class_row - back + 1


def _class_row_keep(class_row: int, keys: int, back: int, stride: int, skip_strides: tuple[int, ...], group: int,
                    device: torch.device) -> torch.Tensor | None:
    """The span kernel's mask for a run's class problems, whose `group` rows (query heads) all sit
    at key class row `class_row`: its `keys` key class rows less the skipped strides' ([group,
    keys], one row shared by stride 0), as the kernel skips strides by row, not head; None where
    none are skipped."""
    if not skip_strides:
        return None
    return class_keep(class_row, 1, keys, back, stride, skip_strides, True, device).expand(group, -1)


def _class_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int, run: int, first_class: int, keys: int,
               stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query rows row .. row + run - 1 (one class row, classes first_class ..) as their class
    problems, views: the query heads of a key/value head as rows of its problems [B*Hkv, run, H/Hkv,
    D], and each class's first `keys` key rows and values [B*Hkv, run, keys, *] (k and v `row_major`)."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qc = swapped_axes(row_range(q, row, run), (b, hkv, h // hkv, run, d), (b * hkv, run, h // hkv, d))
    return (qc, *(row_grid(x, first_class, (run, 1), (keys, stride)) for x in (k, v)))


def decode_row_calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strides: tuple[int, ...],
                     min_distance: int, out_dtype: torch.dtype | None = None
                     ) -> tuple[tuple[span_kernel.SpanArguments, ...], torch.Tensor, torch.Tensor] | None:
    """A decode row's (Lq = 1, causal) keys of each of `strides` at distance >= min_distance, each
    off the earlier strides' multiples (a union's: each key counted once), as span kernel calls to
    join another over the row's other keys (a union's window: `span_band_attention`'s `joined`),
    which computes them all in one library call: (their `span_kernel.span_arguments`, which hold
    the views they read, a copy of K and V where their rows are not adjacent among them, and the
    out [B, H, 1, Dv] in `out_dtype`, q's unless said, and the lse they write, which they all point
    into). A stride the row sees no key of makes no call. None where the row sees none of these
    keys, B and H do not merge (per_head's blocks) or the span kernel does not take a stride's class
    views (`_on_span_kernel`): `strided_pieces` then."""
    b, h, _, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    if not all(batch_and_heads_merge(x) for x in (q, k, v)):
        return None
    k, v = row_major(k), row_major(v)
    out = q.new_empty(b, h, 1, dv, dtype=out_dtype or q.dtype)
    lse = q.new_empty(b, h, 1, dtype=torch.float32)
    group = h // hkv  # the class problems' rows: the out's rows, in their order
    rows_out = swapped_axes(out, (b, hkv, group, 1, dv), (b * hkv, 1, group, dv))
    rows_lse = swapped_axes(lse, (b, hkv, group, 1), (b * hkv, 1, group))
    calls = []
    for n, stride in enumerate(strides):
        back = _class_rows_back(min_distance, stride)
        class_row, first_class, keys = _class_row_keys(k.shape[-2] - 1, stride, back)
        if keys <= 0:
            continue
        qc, kc, vc = _class_run(q, k, v, 0, 1, first_class, keys, stride)
        if not _on_span_kernel(qc, kc, vc):
            return None
        keep = _class_row_keep(class_row, keys, back, stride, strides[:n], group, q.device)
        calls.append(span_kernel.span_arguments(qc, kc, vc, rows_out, rows_lse, first=-span_kernel.UNBOUNDED,
                                                last=span_kernel.UNBOUNDED, mask=keep))
    return (tuple(calls), out, lse) if calls else None


def few_classes(lq: int, stride: int) -> bool:
    """Whether Lq rows read so few of a stride's classes that converting just those (scattered
    rows, gathered per call) beats converting K and V whole: up to half of them. Per call / whole,
    bfloat16, Lk 65536, H = 8: strided(64) at 16, 32, 48 rows 0.63, 0.88, 1.17; strided(128) at
    32, 48, 63 rows 0.55, 0.82, 0.71."""
    return 2 * lq <= stride


def strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stride: int, scale: float, causal: bool = True,
    min_distance: int = 0, skip_strides: tuple[int, ...] = (), out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(i - j) mod stride == 0` attention with |i - j| >= min_distance and (i - j) a multiple of
    none of `skip_strides` (for a union with those strides, which count such keys), causal or over
    every key, queries bottom-right aligned; (out, lse) over [B, H, Lq, *]. Fewer rows than the
    stride have no key of their class after them (the next lies s past a row, beyond the last key),
    so they take the causal kernel either way: it reads only their classes. Half precision on a CPU
    where it is slow is computed in float32 (converted as `strided_pieces` says; without causal
    whole, here), and the pieces join straight into q's dtype, or `out_dtype` (float32 for a partial
    that a union's fixed step continues or merges)."""
    dtype = out_dtype or q.dtype
    if not causal and q.shape[-2] >= stride:
        return _every_class_key(*as_computed(q, k, v), stride=stride, scale=scale, min_distance=min_distance,
                                skip_strides=skip_strides)
    pieces = strided_pieces(q, k, v, stride=stride, scale=scale, min_distance=min_distance,
                            skip_strides=skip_strides, out_dtype=out_dtype)
    # The pieces are consecutive: join them (one copy), after empty rows for those that see no key.
    first = pieces[0][0] if pieces else q.shape[-2]
    if first:
        pieces.insert(0, (0, *empty_partial(q[..., :first, :], v.shape[-1])))
    return join_rows([(out, lse) for _, out, lse in pieces], dtype)


@kept_when_small(lambda first, rows, key_rows, *rule: rows * key_rows)
def class_distance_mask(first: int, rows: int, key_rows: int, near: int, stride: int, skip_strides: tuple[int, ...],
                        causal: bool, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`class_keep` as torch's kernel takes it: the additive mask, and its rows that keep no key, or
    None where the host knows there are none (`_every_row_keeps_a_key`: then no pass over the
    output zeroes them, two launches on CUDA). A small one is kept for the next call: on CUDA
    building it took ten to sixteen launches."""
    keep = class_keep(first, rows, key_rows, near, stride, skip_strides, causal, device)
    if not skip_strides and _every_row_keeps_a_key(first, rows, key_rows, near, causal):
        return additive_mask(keep, dtype), None
    return additive_mask(keep, dtype), ~keep.any(-1)


@kept_when_small(lambda first, rows, key_rows, *rule: rows * key_rows)
def class_keep(first: int, rows: int, key_rows: int, near: int, stride: int, skip_strides: tuple[int, ...],
               causal: bool, device: torch.device) -> torch.Tensor:
    """Which key class rows 0 .. key_rows - 1 the class rows first .. first + rows - 1 (in the keys'
    class-row numbering) keep, [rows, key_rows]: those at least `near` class rows back (without
    causal, either way) and off the skipped strides' multiples. A small one is kept for the next
    call (a decode loop's steps in one class row)."""
    apart = torch.arange(first, first + rows, device=device)[:, None] - torch.arange(key_rows, device=device)[None, :]
    keep = (apart if causal else apart.abs()) >= near
    if skip_strides:
        keep &= off_strides(apart * stride, skip_strides)
    return keep


def _every_row_keeps_a_key(first: int, rows: int, key_rows: int, near: int, causal: bool) -> bool:
    """Whether each class row first .. first + rows - 1 has a key class row in 0 .. key_rows - 1 at
    least `near` away (back, or without causal either way), from the rows' farthest keys: row x's
    is key row 0, x back, or without causal also key row key_rows - 1, nearest for x halfway."""
    if key_rows <= 0:
        return False
    if causal:
        return first >= near

    def farthest(x: int) -> int:
        return max(abs(x), abs(x - key_rows + 1))

    last = first + rows - 1
    middle = [min(max(x, first), last) for x in ((key_rows - 1) // 2, key_rows // 2)]
    return min(farthest(x) for x in middle) >= near


def _every_class_key(q, k, v, *, stride: int, scale: float, min_distance: int,
                     skip_strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal strided attention: each query attends every key of its class, n^2/s work over
    the class views, without a mask in one call or, with a minimum distance m (a union with a
    window reaching both ways) or skipped strides, under one shared mask that drops the key class
    rows nearer than ceil(m/s) and those at a skipped stride's multiples, in calls of at most
    MASK_BUDGET mask elements; on the CPU in one span-kernel call where it takes them (its rows
    skip the near and the skipped strides' class rows by position: `class_strides`). Keys in whole
    class rows are a view;
    the last, partial row gives classes c < Lk mod s one more key each, merged in by log-sum-exp."""
    b, h, lq, _ = q.shape
    lk, dv, s = k.shape[-2], v.shape[-1], stride
    lead = (lk - lq) % s  # queries from a class boundary on: up to s - 1 dummy rows each side
    q_rows = -(-(lead + lq) // s)
    base = (lk - lq - lead) // s  # the key class row of query class row 0
    near = _class_rows_back(min_distance, s)  # key class rows t' with |t - t'| < near are dropped
    trail = q_rows * s - lead - lq
    qc = _classes(F.pad(q, (0, 0, lead, trail)) if lead or trail else q, 0, q_rows * s, s)
    key_rows, rest = divmod(lk, s)
    kc, vc = _classes(k, 0, key_rows * s, s), _classes(v, 0, key_rows * s, s)
    step = max(1, MASK_BUDGET // max(1, key_rows))
    on_span_kernel = key_rows and _on_span_kernel(qc, kc, vc)
    if not on_span_kernel:  # torch's calls below: K and V class by class where that pays
        kc, vc = _keys_as_read(q_rows, kc, vc, kernel_device(q.device))
    if on_span_kernel:  # every key of the class: an unbounded span, into a buffer laid out as q's rows
        out, lse = _row_ordered(qc, q_rows, dv, qc.dtype)
        span_kernel.span_attention(qc, kc, vc, out, lse, first=-span_kernel.UNBOUNDED, last=span_kernel.UNBOUNDED,
                                   row_shift=base, min_distance=near, skip_strides=class_strides(s, skip_strides),
                                   scale=scale)
    elif key_rows and not near and not skip_strides:  # a fresh result, merged into in place below
        out, lse = grid_attention(qc, kc, vc, None, None, scale=scale)
    elif key_rows and q_rows <= step:  # one masked call: its result, fresh too
        mask, empty = class_distance_mask(base, q_rows, key_rows, near, s, skip_strides, False, q.dtype, q.device)
        out, lse = grid_attention(qc, kc, vc, mask, empty, scale=scale)
    else:  # calls within MASK_BUDGET, each written into a buffer of empty rows
        out = torch.zeros(b * h, s, q_rows, dv, dtype=q.dtype, device=q.device)
        lse = torch.full((b * h, s, q_rows), NEG_INF, dtype=torch.float32, device=q.device)
        for t0 in range(0, q_rows if key_rows else 0, step):
            t1 = min(q_rows, t0 + step)
            mask, empty = class_distance_mask(base + t0, t1 - t0, key_rows, near, s, skip_strides, False, q.dtype,
                                              q.device)
            if empty is None or not values_on_host(q.device) or not bool(empty.all()):
                out[:, :, t0:t1], lse[:, :, t0:t1] = grid_attention(qc[:, :, t0:t1], kc, vc, mask, empty, scale=scale)
    if rest:  # class c < rest: the key at key_rows * s + c
        last_k, last_v = (per_query_head(x[..., key_rows * s :, :], h).reshape(b * h, rest, 1, -1) for x in (k, v))
        last_lse = (qc[:, :rest].float() * last_k.float()).sum(-1) * scale
        if near or skip_strides:  # rows too near that key, or at a skipped stride's multiple: it is not theirs
            far, _ = class_distance_mask(base - key_rows, q_rows, 1, near, s, skip_strides, False, torch.float32,
                                         q.device)  # the mask's column of key class row `key_rows`
            last_lse = last_lse + far[:, 0]
        merge_to(out[:, :rest], lse[:, :rest], (out[:, :rest], lse[:, :rest]),
                 (last_v.expand(-1, -1, q_rows, -1), last_lse))
    keep_rows = slice(lead, lead + lq)
    return (out.transpose(1, 2).reshape(b, h, q_rows * s, dv)[..., keep_rows, :],
            lse.transpose(1, 2).reshape(b, h, q_rows * s)[..., keep_rows])
