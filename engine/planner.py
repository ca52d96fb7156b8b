"""The planner: turns a single-head pattern into the exact kernels that compute it fastest.

A plan is a list of steps over disjoint key sets, merged by log-sum-exp. The structured
kernels cover the Sparse Transformer patterns (band, strided, fixed, and the unions of at most
one window, any strides and at most one fixed: a window with a stride as in the paper, with
fixed, a stride with fixed, all three, several strides) at any query length; anything else (two
fixed members) falls back to the masked kernel, which is exact and memory-safe but slower (for a
few query rows it runs on a copy of just the keys they attend). Small problems of fixed, unions
and windows (at most SMALL_KEYS keys; a union with fixed twice that, a causal window half; where
the CPU's span kernel is built: fixed alone half, a window with fixed half from two rows on, a
stride with fixed twice that over at most SMALL_KEYS^2 mask elements, windows never) run on the
masked kernel too: one call beats their several small ones there; so, on the CPU, do a chunk of
one or two class rows of strides of at most TINY_STRIDE (of a union of strides,
TINY_UNION_STRIDE), and where the span kernel is not built, short chunks of fixed alone and of
unions with fixed after up to SHORT_RUN_MASKED_KEYS keys and a decode step of one whose row
attends up to ONE_ROW_MASKED_KEYS keys.
`simplify` first removes what cannot change the mask.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch

from . import kernels
from .kernels import span_kernel
from .kernels.dense import SMALL_MASK_ELEMENTS, as_computed, computed_dtype, padded_head_dims, without_padding
from .kernels.device import kernel_device
from .kernels.fixed import SHORT_RUN_ROWS
from .kernels.masked import one_chunk
from .kernels.strided import few_classes
from .patterns import Dense, Fixed, PatternBase, SlidingWindow, Strided, Union

Partial = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Plan:
    """Named kernel steps whose partial results merge into the pattern's attention. On a CPU
    where half precision is slow (`cpu_upcast_dtypes`), the plan computes in float32: it converts
    q, k and v whole, once, unless `converts_in_steps`: its steps read a part of K and V (a
    window's keys, a few classes, two blocks and the summary columns: few query rows at the end
    of long keys; fixed at any length) and convert just that (the band its window's keys once,
    fixed its summary keys once, `fused` each call's inputs), or convert themselves to write
    their result in q's dtype (strided: a group of classes at a time as its calls read them where
    its classes outgrow `strided.CLASS_GROUP_BYTES`, else whole, unless its rows read few classes;
    its chunks written or joined straight into q's dtype). A decode step over 65536 bfloat16
    keys spent 12 ms converting them all, 90x its sliding window's 0.13 ms. On the CPU every plan's
    steps take fewer key/value heads than query heads as they are (torch's CPU attention kernel
    reads each key/value head for its H / Hkv query heads; `fused` calls whose rows all see the
    same keys fold those query heads into rows of their key/value head; the band's tiles,
    strided's class views and fixed's own blocks put the heads on the head axis,
    `band.heads_last`), instead of repeated ones; `grouped_kv_on_cuda`: so on CUDA (fixed's and
    the band's Triton kernels read key/value head h // (H / Hkv), their fallbacks repeat them
    themselves, the band's only its window's keys, a key/value head at a time; dense attention and
    a stride's short runs fold them: a decode row, a causal chunk whose square is a kept mask). On
    CUDA the head dims are padded once for every step (`pads_head_dims`). `continues`: of two
    steps, the second continues the first's partial (its `seed`: fixed's, which its Triton kernel
    merges inside its launch) instead of the two merging after. `span_kernel_reads`: its steps
    read half precision as it is where the CPU span kernel takes q, k and v (a window and strides:
    the band and each stride's classes on it; a union whose fixed step continues one other step:
    that step's float32 partial and fixed's; dense attention), so nothing is converted beforehand
    there.
    `reads_head_blocks`: its steps read per_head's blocks of heads (`attention.HeadBlocks`: a view
    whose batch axis steps over heads) in place; not a stride's classes from Lq = s on, whose views
    merge B and H (they would copy K and V, or each block would be a call of its own)."""

    backend: str
    steps: tuple[Callable[..., Partial], ...]
    converts_in_steps: bool = False
    grouped_kv_on_cuda: bool = False
    continues: bool = False
    span_kernel_reads: bool = False
    reads_head_blocks: bool = True

    def converts_whole(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether a call converts q, k and v whole before its steps (half precision where it is
        slow, unless its steps convert or read it themselves)."""
        return computed_dtype(q) != q.dtype and not (
            self.converts_in_steps or self.span_kernel_reads and span_kernel.takes(q, k, v))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Partial:
        if self.converts_whole(q, k, v):
            q, k, v = as_computed(q, k, v)
        dv = v.shape[-1]
        if pads_head_dims(q.device):
            q, k, v = padded_head_dims(q, k, v)
        if self.continues:
            first, second = self.steps
            out, lse = second(q, k, v, scale=scale, seed=first(q, k, v, scale=scale))
        else:
            out, lse = kernels.merge_partials([step(q, k, v, scale=scale) for step in self.steps], q.dtype)
        return without_padding(out, dv), lse


# Keys up to which fixed, unions and a non-causal window run on the masked kernel, a union with a
# fixed member up to twice as many and a causal window up to half as many: one call over every key
# under the pattern's mask beats the structured steps' several small calls there (fixed's blocks
# and summary keys, a union's merged pieces, the band's first rows, tiles and, non-causal, reversed
# last rows). Where the CPU's span kernel is built, windows keep the band and fixed alone takes
# the masked call up to half as many keys (below). Masked / structured time, H = 8, D = 64,
# float32, square unless said (`python -m bench.kernels --small`):
# - n = 32 to 128: 0.17-0.68 for fixed(16, 2) and unions of windows, strides and fixed, causal or
#   not (union(sliding 32, strided 32, fixed(64, 4)), 128 rows, not causal: 3.7 -> 0.68 ms); alike
#   at B = 8 and 32, in bfloat16, at H = 32 over 8 key/value heads with D = 128, and for 1 to 64
#   rows over 128 keys (2026-12-03, both plans on torch's calls). Unions with fixed win up to 256
#   keys (0.19-0.74: 8 to 256 heads, 1 to 256 rows, bfloat16, D = 128). Non-causal
#   sliding_window(16): 0.27-0.54 at n = 32 to 128; a causal window, two or three calls, up to half
#   as many keys (sliding_window(8, 16, 32) at n = 32 and 64: 0.37-0.96). Without the span kernel
#   (2026-12-07) fixed(16, 2) and fixed(32, 4) at 64 to 128 0.32-0.86 and windows 0.26-0.73.
# - With both plans on the span kernel (2026-12-07, twenty-fourth session; plans called directly,
#   best of 5 rounds in turn): union(sliding 16, strided 16) at n = 32 to 128 0.25-0.88, union
#   (strided 64, strided 48) at 64 to 128 0.32-0.62, unions with a stride and fixed at 192 0.44-0.80
#   and at 256 1.00-1.14; fixed(16, 2) and fixed(32, 4) at 64 0.62-0.97 in float32 and bfloat16
#   (H = 32 over 8, D = 128: 0.95-1.29; B = 4, H = 8 over 2: 0.89-1.07), at 96 0.84-1.75 and at 128
#   1.08-2.23, hence half as many keys; a window alone lost at every size, 1.16-3.26
#   (sliding_window(8) and (16) at n = 32 to 128, causal or not, both dtypes, H = 32 over 8 with
#   D = 128, B = 4 with H = 8 over 2): it keeps the band. A stride keeps its kernel at any size
#   (strided(4) at 64 to 256: 1.20-2.97).
# - Unions with fixed on the span kernel (2026-12-07, twenty-fifth session; plans called directly,
#   masks kept; H = 8, D = 64 unless said, float32 and bfloat16, B = 4 with H = 8 over 2):
#   - with strides and no window (union(strided 16, fixed(16, 2)), strided 32 with fixed(32, 4),
#     strides 8 and 24 with fixed(16, 2)), masked wins up to 128 square (0.35-0.97) and mostly
#     loses from 160 (0.88-1.84), and wins on 4 and 16 rows after 64 to 256 keys (0.33-0.91): up
#     to 256 keys and SMALL_KEYS^2 mask elements;
#   - with a window and a stride too: 0.28-1.14 up to 192, 0.97-1.36 at 256; 256 keys, as before;
#   - with a window and no stride (its band, which fixed's step continues: two calls, no merge),
#     masked wins up to 64 square (0.53-1.08) and loses at 96 causal (0.96-1.29), from 160
#     (1.16-2.77) and on one row at any size (1.25-1.64): up to 64 keys, from two rows on.
#   At H = 32 over 8 with D = 128 every union crosses sooner (a stride with fixed at 128 square
#   1.15-1.36, all three from 160 0.81-1.34): the rule does not see the heads.
SMALL_KEYS = 128
# Where the CPU's span kernel is not built (torch's calls take fixed's step and the masked plan's),
# a causal short run (2 to SHORT_RUN_ROWS rows: a small chunk) of a union with a fixed member runs
# on the masked kernel up to this many keys (with a stride among its members twice as many), and
# fixed alone from two rows on up to twice as many: one call over the keys, compacted to those the
# rows attend, beats the steps (fixed's own block, summary views and merges, a stride's class runs,
# the merges of the steps). Masked / structured time through `engine.attention`, float32, H = 8,
# D = 64 unless said, the mean of 600 calls whose key lengths step through 300 values (a decode
# loop: no mask kept), Lq 1 / 16 (2026-12-03):
# - union(sliding 128, fixed(128, 8)): Lk 512 0.85 / 0.78, 1024 0.89 / 0.82, 2048 0.99 / 0.90;
#   at 1024, H = 32 over 8 with D = 128 0.63 / 0.52, bfloat16 0.64 / 0.67.
# - union(strided 128, fixed(128, 8)) and union(sliding 64, strided 128, fixed(128, 8)): 0.60-0.74
#   at Lk 512 to 2048 (0.89-0.96 at 2048 and 16 rows); at 1024, H = 32: 0.46-0.54, bfloat16
#   0.44-0.60.
# - fixed alone, from two rows on (plans called directly in a loop of 60 key lengths, best of
#   three, Lq 2 / 4 / 8 / 16; 2026-12-05): fixed(128, 8), fixed(64, 4) and fixed(16, 2) at Lk 512
#   and 1024 0.36-0.77, at 2048 0.55-1.07 (most under 0.8), at 4096 0.84-1.36; in bfloat16
#   0.33-0.51 up to 2048 and 0.50-0.63 at 4096, with H = 8 over 2 key/value heads 0.34-0.58 up to
#   2048. One row is its fast case (a copy of exactly its keys): it keeps its plan.
# Where the span kernel is built, the structured plans keep every short run (and decode step):
# through `engine.attention` as above, best of 5 rounds, structured / masked plan (2026-12-07,
# twenty-fourth session): 4 rows of fixed(128, 8) after 1024 keys and 16 of fixed(16, 2) after 512
# 0.36-0.39; one row of union(strided 128, fixed(128, 8)) after 600 keys and of union(sliding 128,
# strided 128, fixed(128, 8)) after 512 0.88-0.89. (The masked plan's one call wins only where its
# rows' compacted mask is kept, a shape called again: 2 to 16 rows of those unions then took
# 0.56-1.22 of the structured plan's time, but through a decode loop, whose masks are new each step,
# 1.74-2.35.) On CUDA the structured plans read no device value and fixed is one Triton launch:
# they keep these runs too.
SHORT_RUN_MASKED_KEYS = 1024
# Where the span kernel is not built, one row (a decode step) of a union with a fixed member runs
# on the CPU's masked kernel, causal or not (the last row has no later key), while it attends at
# most about this many keys (its members' counts summed, `_row_keys_bound`: 1400 for 1144 in the
# first union below at 16384): the kernel lists them by arithmetic (`row_keys`) and copies just
# those for one unmasked call, where the union's steps make a dozen small calls and merges.
# Masked / structured plan, called directly in a decode loop (the key length one longer each step,
# 60 steps, best of four rounds alternating), float32, H = 8, D = 64, 2026-12-05 (attended keys in brackets):
# - union(sliding 128, strided 128, fixed(128, 8)) at Lk 2048 / 8192 / 12288 / 16384 / 24576 /
#   32768 [248 / 632 / 888 / 1144 / 1656 / 2168]: 0.28 / 0.41 / 0.47 / 0.53-0.56 / 0.74 / 0.90-1.00;
#   union(strided 128, fixed(128, 8)) 0.28 / 0.44 / 0.53 / 0.60-0.62 / 0.80-0.87 / 1.07-2.41;
#   union(sliding 256, fixed(128, 8)) [+120] 0.43 / 0.57 / 0.65 / 0.73-0.77 / 0.92-0.95 / 1.20-2.94;
#   at 65536 [4216+] 1.9-3.8.
# - H = 32 over 8, D = 128 at 2048 / 8192 / 16384: 0.32-0.48 / 0.44-0.59 / 0.74-0.87; in bfloat16
#   0.28-0.45 / 0.41-0.55 / 0.58-0.79; H = 8 over 2, bfloat16, 0.29-0.48 / 0.49-0.74 / 0.76-0.91.
# - Not causal, at 1024 / 4096 / 16384: 0.28-0.64 / 0.46-0.73 / 0.70-0.77.
# Fixed alone keeps its own gathered row (`fixed.GATHERED_ROW_KEYS`, whose index it keeps per
# block); unions of windows and strides keep their steps (0.63-1.18 up to 8192 keys, 0.99-1.32 at
# 16384).
ONE_ROW_MASKED_KEYS = 1536
# A causal chunk of one or two class rows (s <= Lq <= 2s) of a stride s of at most TINY_STRIDE runs
# on the CPU's masked kernel, and so do 2 to 2s rows of a union of strides whose smallest is s
# (each stride's step sweeps K again): each class view of so small a stride sweeps nearly all of
# K's memory, once per class, where the masked call reads the rows' keys once. Structured / masked
# time, float32, H = 8, D = 64, one process (2026-12-03), at Lk 512 / 1024 / 4096 / 16384 / 65536:
# - strided(2), Lq 2 and 4: 1.40 / 1.19 / 1.09 / 1.91 / 1.70 and 1.41 / 1.31 / 1.01 / 1.54 / 1.41;
# - strided(3), Lq 3 and 6: 2.01 / 1.66 / 1.37 / 2.11 / 2.09 and 2.16 / 1.76 / 1.29 / 1.49 / 1.56
#   (Lq 9: 0.84-0.86 from 4096 keys on; Lq 1 and 2, fewer rows than the stride, 0.58-1.33);
# - unions at Lk 1024 / 16384 / 65536, Lq 2 and 4s: strides 3 and 5 2.07 / 2.37 / 2.09 and
#   2.55 / 2.05 / 1.66; 2 and 7 2.11 / 2.71 / 2.25 and 2.36 / 2.05 / 2.13; 3 and 64 1.91 / 1.58 /
#   1.34 and 1.87 / 0.98 / 1.02, and through `engine.attention` at 12 rows after 65536 keys the
#   masked plan took 1.13x the structured one's time: so up to 2s rows (a prefill of 1024 or 4096
#   rows 0.44-0.69);
# - strided(4): 0.99-1.42 at Lq 4 to 12, strided(6) and (8) mostly below 1: they keep their kernel.
# A union of strides whose smallest s is 4 or 5 (TINY_UNION_STRIDE) runs on it too for s to 2s rows.
# The same ratios at Lq s, 1.5s, 2s and Lk 512 / 4096 / 65536 (2026-12-03): strides 4 and 5
# 2.88-3.33 / 1.63-1.87 / 2.09-2.12; 4 and 9 2.24-2.35 / 1.43-1.48 / 1.73-1.99; 5 and 6 3.04-3.62 /
# 1.63-1.74 / 1.78-1.92; 5 and 11 2.86-3.18 / 1.48-1.53 / 1.45-1.60; 5 and 64 2.35-2.68 / 1.15-1.21
# / 1.21-1.35; 5 and 128 2.35-2.67 / 1.10-1.16 / 0.99-1.10; 4, 6 and 9 3.73-4.31 / 2.12-2.33 /
# 2.44-3.01; strides 4 and 6 in bfloat16 at Lk 4096 / 65536 1.27-1.59 / 1.55-1.79, and at H = 32
# over 8 with D = 128 2.64-2.77 / 1.86-2.30 (through `engine.attention`). Fewer rows than s were
# mixed (strides 5 and 7 at 2 rows: 0.84 at Lk 16384, 1.32-1.44 elsewhere; 4 and 64 0.69), and so
# were s = 6 (strides 6 and 9 at 2 rows 0.25-0.63, at 6 and 12 rows 1.18-2.25) and a stride of 4
# or 5 alone (0.77-1.72): they keep their plans. Without causality (each row attends its class
# both ways, the keys after it included) the unions alike, at Lq 2 / s / 1.5s / 2s and Lk 512 /
# 16384 / 65536: strides 2 and 7 2.74-2.90 / 1.99-2.16 / 2.12-2.48; 3 and 64 1.79-2.52 /
# 1.08-1.82 / 1.33-1.90; 4 and 9 (from s rows) 1.84-1.96 / 1.27-1.48 / 1.54-1.72; 5 and 7 2.83-3.19
# / 1.41-1.58 / 1.74-1.85; 5 and 64 2.04-2.29 / 0.99-1.08 / 1.19-1.33; 4, 6 and 9 3.56-3.85 /
# 2.34-2.56 / 2.33-2.91; strides 5 and 64 at 2 rows 0.19-0.75. A stride alone was mixed (strided(2)
# 0.59-1.71, strided(4) 0.33-1.13): causal only.
# On CUDA a class view's rows are whole memory transactions, and strided is one flash call.
TINY_STRIDE = 3
TINY_UNION_STRIDE = 5

# One pattern per kernel family the planner picks at KERNEL_FAMILY_TOKENS tokens, past the small
# problems (a call of each at start-up warms them all). A stride that leaves a partial class row
# there: without causality its own keys merge into it (CUDA's merge kernel, which the unions no
# longer launch where their last kernel continues the others' partial).
KERNEL_FAMILY_TOKENS = 4 * SMALL_KEYS
_WINDOW, _STRIDE, _FIXED = SlidingWindow(window=8), Strided(stride=24), Fixed(block=16, summary=2)
KERNEL_FAMILY_PATTERNS: tuple[PatternBase, ...] = (
    Dense(), _WINDOW, _STRIDE, _FIXED, Union(patterns=(_WINDOW, _STRIDE)), Union(patterns=(_WINDOW, _FIXED)),
    Union(patterns=(_STRIDE, _FIXED)), Union(patterns=(_WINDOW, _STRIDE, _FIXED)),
    Union(patterns=(_FIXED, Fixed(block=12, summary=1))),  # masked: two fixed
)


def warm_up_calls(device: torch.device) -> Iterator[tuple[torch.Tensor, PatternBase, bool]]:
    """(q, pattern, causal) of the calls (q on the CPU, serving as k and v too) that warm the
    engine on `device` before the service reports ready: one per kernel family, and on CUDA per
    dtype, common head dim (32, 64, 128) and causality too. There the Triton kernels (fixed's, the
    merges) compile a variant for each, in seconds, once (Triton keeps them on disk); a new length
    compiles nothing after (tests/test_triton_compile.py)."""
    cuda = kernel_device(device) == "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if cuda else (torch.float32,)
    for dtype, head_dim, causal in itertools.product(dtypes, (32, 64, 128) if cuda else (32,),
                                                     (True, False) if cuda else (True,)):
        q = torch.randn(1, 2, KERNEL_FAMILY_TOKENS, head_dim, dtype=dtype)
        for pattern in KERNEL_FAMILY_PATTERNS:
            yield q, pattern, causal


def pads_head_dims(device: torch.device) -> bool:
    """Whether the plan pads head dims once for its device's kernels (`padded_head_dims`): CUDA's."""
    return kernel_device(device) == "cuda"


def simplify(pattern: PatternBase, lk: int) -> PatternBase:
    """An equivalent pattern in its simplest form for keys in [0, lk): kept per pattern and Lk, Lk
    capped past the pattern's largest size (`_largest_size`: its rules compare only those with Lk),
    so that a decode loop, whose every step brings a new Lk, finds it (a union of a window and a
    stride took 12 us to simplify, half its plan's making)."""
    return _simplest(pattern, min(lk, _largest_size(pattern) + 1))


def _largest_size(pattern: PatternBase) -> int:
    """The largest window, stride or block among the pattern's leaves (0 for dense)."""
    largest = 0
    for leaf in pattern.leaves() if isinstance(pattern, Union) else (pattern,):
        if isinstance(leaf, SlidingWindow):
            largest = max(largest, leaf.window)
        elif isinstance(leaf, Strided):
            largest = max(largest, leaf.stride)
        elif isinstance(leaf, Fixed):
            largest = max(largest, leaf.block)
    return largest


@functools.lru_cache(maxsize=4096)
def _simplest(pattern: PatternBase, lk: int) -> PatternBase:
    """`simplify`'s answer, made."""
    if isinstance(pattern, SlidingWindow) and pattern.window >= lk:
        return Dense()
    if isinstance(pattern, Strided) and pattern.stride == 1:
        return Dense()
    if isinstance(pattern, Strided) and pattern.stride >= lk:  # |i - j| < lk: only j = i is a multiple
        return simplify(SlidingWindow(window=1), lk)  # (strided's work and padding grow with s; Lk 1: dense)
    if isinstance(pattern, Fixed) and (pattern.block >= lk or pattern.summary == pattern.block):
        return Dense()  # one block, or every column a summary column
    if isinstance(pattern, Union):
        members: list[PatternBase] = []
        for leaf in (simplify(p, lk) for p in pattern.leaves()):
            if isinstance(leaf, Dense):
                return Dense()
            if leaf not in members:
                members.append(leaf)
        members = [m for m in members if not any(_covers(other, m) for other in members if other != m)]
        # Flattened, a valid union may hold more members than a union may list (up to MAX_LEAVES).
        return members[0] if len(members) == 1 else Union.model_construct(patterns=tuple(members))
    return pattern


def _covers(wide: PatternBase, narrow: PatternBase) -> bool:
    """Whether `wide` allows every key `narrow` does (by rules cheap to decide; distinct members
    of a union, leaves, so two never cover each other)."""
    if narrow == SlidingWindow(window=1):
        return True  # j = i only, which every leaf pattern allows
    if isinstance(wide, SlidingWindow) and isinstance(narrow, SlidingWindow):
        return wide.window >= narrow.window  # nested windows
    if isinstance(wide, Strided) and isinstance(narrow, Strided):
        return narrow.stride % wide.stride == 0  # multiples of a multiple of s
    if isinstance(wide, Fixed) and isinstance(narrow, Fixed):
        # narrow's blocks lie inside wide's, and in each of wide's blocks narrow's first summary
        # column (offset l' - c') is at or past wide's (l - c): fixed(128, 8) covers fixed(128, 2)
        return wide.block % narrow.block == 0 and wide.block - wide.summary <= narrow.block - narrow.summary
    return False


@functools.lru_cache(maxsize=4096)
def plan(pattern: PatternBase, lq: int, lk: int, causal: bool, device: str) -> Plan:
    """The plan for one single-head pattern (per_head is resolved before this) on `device`, the
    engine's `kernel_device` ('cpu', 'cuda'): each kernel picks that device's fused calls. A decode
    loop asks with a new Lk at every step: its plan is then made from kept parts (`simplify`'s
    pattern, `structured_plan`), its rules' arithmetic alone done anew (union(sliding 128, strided
    128), one row: 4.8 us, against 23 when the parts were made each time)."""
    pattern = simplify(pattern, lk)
    if isinstance(pattern, Dense):
        return Plan("sdpa", (partial(kernels.dense_attention, diagonal=(lk - lq) if causal else None),),
                    grouped_kv_on_cuda=not causal or lq * lq <= SMALL_MASK_ELEMENTS, span_kernel_reads=True)
    on_masked = (_small_on_masked(pattern, lq, lk, causal, device)
                 or _short_run_on_masked(pattern, lq, lk, causal, device)
                 or _tiny_strides_on_masked(pattern, lq, causal, device))
    structured = None if on_masked else structured_plan(pattern, lq, causal, device)
    return structured or masked_plan(pattern, lq, lk, causal)


def _steps_on_span_kernel(device: str) -> bool:
    """Whether the plans' steps on `device` run on the CPU span kernel (the band's, fixed's, the
    masked plan's calls): on the CPU where it is built. The masked-or-structured rules differ there."""
    return device == "cpu" and span_kernel.library() is not None


def _small_on_masked(pattern: PatternBase, lq: int, lk: int, causal: bool, device: str) -> bool:
    """Whether one masked call over Lk keys beats the pattern's structured steps (SMALL_KEYS)."""
    on_span_kernel = _steps_on_span_kernel(device)
    if _union_with(pattern, Fixed):
        return _small_union_with_fixed_on_masked(pattern, lq, lk) if on_span_kernel else lk <= 2 * SMALL_KEYS
    if isinstance(pattern, Union):
        return lk <= SMALL_KEYS
    if on_span_kernel:
        return isinstance(pattern, Fixed) and lk <= SMALL_KEYS // 2
    if isinstance(pattern, Fixed) or isinstance(pattern, SlidingWindow) and not causal:
        return lk <= SMALL_KEYS
    return isinstance(pattern, SlidingWindow) and lk <= SMALL_KEYS // 2


def _small_union_with_fixed_on_masked(pattern: Union, lq: int, lk: int) -> bool:
    """On the span kernel, whether one masked call beats the steps of a union with fixed, by its
    other members (SMALL_KEYS): with a window and a stride (three steps and their merges) over up
    to twice SMALL_KEYS keys; with strides alone over that many and SMALL_KEYS^2 mask elements;
    with a window alone (its band, which fixed's step continues: two calls, no merge) from two rows
    on over up to half as many keys."""
    if not _union_with(pattern, Strided):
        return lq > 1 and lk <= SMALL_KEYS // 2
    return lk <= 2 * SMALL_KEYS and (_union_with(pattern, SlidingWindow) or lq * lk <= SMALL_KEYS * SMALL_KEYS)


def _short_run_on_masked(pattern: PatternBase, lq: int, lk: int, causal: bool, device: str) -> bool:
    """Whether a few rows run on the CPU's masked kernel where the span kernel is not built (with
    it, fixed's step runs on it, and the structured plans keep them): two or more causal rows of
    fixed alone (twice SHORT_RUN_MASKED_KEYS), a few causal rows of a union with fixed
    (SHORT_RUN_MASKED_KEYS; with a stride among its members twice as many) and one row of one,
    causal or not (ONE_ROW_MASKED_KEYS)."""
    if device != "cpu" or lq > SHORT_RUN_ROWS or _steps_on_span_kernel(device):
        return False
    if isinstance(pattern, Fixed):  # one row is its fast case: a copy of exactly its keys
        return causal and lq > 1 and lk <= 2 * SHORT_RUN_MASKED_KEYS
    if not _union_with(pattern, Fixed):
        return False
    if lq == 1:
        return _row_keys_bound(pattern, lk - 1) <= ONE_ROW_MASKED_KEYS
    return causal and lk <= SHORT_RUN_MASKED_KEYS * (2 if _union_with(pattern, Strided) else 1)


def _tiny_strides_on_masked(pattern: PatternBase, lq: int, causal: bool, device: str) -> bool:
    """Whether a chunk of strides alone runs on the CPU's masked kernel: one or two class rows (s to
    2s) of a stride s of at most TINY_STRIDE, causal, and of a union of strides whose smallest s is
    at most TINY_UNION_STRIDE, causal or not, from 2 rows on where s is at most TINY_STRIDE."""
    members = pattern.patterns if isinstance(pattern, Union) else (pattern,)
    if device != "cpu" or not all(isinstance(member, Strided) for member in members):
        return False
    stride = min(member.stride for member in members)
    if len(members) == 1:
        return causal and stride <= TINY_STRIDE and stride <= lq <= 2 * stride
    fewest = 2 if stride <= TINY_STRIDE else stride
    return stride <= TINY_UNION_STRIDE and fewest <= lq <= 2 * stride


def _row_keys_bound(pattern: PatternBase, i: int) -> int:
    """At least as many keys as query i attends under causality: its members' counts summed, in
    integer arithmetic (a union's exact count costs O(i) tensor work, a decode step's time)."""
    total = 0
    for leaf in pattern.leaves() if isinstance(pattern, Union) else (pattern,):
        if isinstance(leaf, SlidingWindow):
            total += min(leaf.window, i + 1)
        elif isinstance(leaf, Strided):
            total += i // leaf.stride + 1
        elif isinstance(leaf, Fixed):  # earlier blocks' summary keys, then its own block up to i
            total += i // leaf.block * leaf.summary + i % leaf.block + 1
        else:
            total += i + 1
    return min(total, i + 1)


def _union_with(pattern: PatternBase, kind: type) -> bool:
    """Whether the pattern is a union with a member of this kind."""
    return isinstance(pattern, Union) and any(isinstance(member, kind) for member in pattern.patterns)


def masked_plan(pattern: PatternBase, lq: int, lk: int, causal: bool) -> Plan:
    """The masked kernel's plan: any pattern, exact and memory-safe."""
    return Plan("masked", (partial(kernels.masked_attention, pattern=pattern, causal=causal),),
                converts_in_steps=one_chunk(lq, lk))


@functools.lru_cache(maxsize=4096)
def structured_plan(pattern: PatternBase, lq: int, causal: bool, device: str) -> Plan | None:
    """The structured kernel of a Sparse Transformer pattern, for any query length (each handles
    a short run at the end of long keys too), or None. Without causality the same, the band
    reaching both ways, each stride class attending all of itself, each fixed block itself and
    every other block's summary keys. Its steps read Lk from their inputs, so it is kept without
    it: a decode loop's steps find it (a union's took 8 us to make)."""
    if isinstance(pattern, Strided):  # fewer rows than s read only their classes' keys; it converts itself
        one_per_class = lq < pattern.stride  # each row alone in its class: grouped heads fold on CUDA
        return Plan("strided", (partial(kernels.strided_attention, stride=pattern.stride, causal=causal),),
                    converts_in_steps=True, grouped_kv_on_cuda=one_per_class, reads_head_blocks=one_per_class)
    if isinstance(pattern, Fixed):  # the query rows' blocks and the summary keys, each converted once
        return Plan("fixed", (partial(kernels.fixed_attention, block=pattern.block, summary=pattern.summary,
                                      causal=causal),), converts_in_steps=True, grouped_kv_on_cuda=True)
    if isinstance(pattern, SlidingWindow):  # the band converts its window's keys itself, at any length
        return Plan("band", (partial(kernels.band_attention, window=pattern.window, causal=causal),),
                    converts_in_steps=True, grouped_kv_on_cuda=True)
    if isinstance(pattern, Union):
        return _structured_union(pattern, lq, causal, device)
    return None


def _structured_union(pattern: Union, lq: int, causal: bool, device: str) -> Plan | None:
    """A union of at most one window, any strides and at most one fixed as disjoint steps merged
    by log-sum-exp, each key counted once: the band takes the keys nearer than w, each stride the
    rest of its own less an earlier stride's multiples (`skip_strides`), fixed the rest of its own
    (at distance >= w, off every stride), or None for any other union (two fixed members). On CUDA
    it takes grouped heads where each member's own plan does (its steps read them as those do).
    After one other step (the band's, the band and a stride's, a stride's) fixed's step continues
    that step's partial (`Plan.continues`). On the CPU such a union reads half precision as it
    is where the span kernel takes it (`Plan.span_kernel_reads`), the step before fixed's in
    float32 (`out_dtype`), so that its result is rounded once, in fixed's step; so are the steps
    that merge (`to_partial`), rounded once in the merge."""
    members: dict[type, list[PatternBase]] = {}
    for member in pattern.patterns:
        members.setdefault(type(member), []).append(member)
    if not set(members) <= {SlidingWindow, Strided, Fixed} or len(members.get(SlidingWindow, ())) > 1 \
            or len(members.get(Fixed, ())) > 1:
        return None
    window = members[SlidingWindow][0].window if SlidingWindow in members else 0
    fixed = members[Fixed][0] if Fixed in members else None
    strides = tuple(sorted(member.stride for member in members.get(Strided, ())))  # the densest unmasked
    continues = bool(fixed and (window or len(strides) == 1))  # fixed's step after one other step
    # On the CPU a partial that the next step continues or the merge takes comes in float32, so that
    # the result is rounded once (in fixed's step where it continues the other, else in the merge).
    float32_partial = device == "cpu" and (1 if window else len(strides)) + bool(fixed) > 1
    reads_half = bool(window and strides and not fixed or continues and device == "cpu")
    to_partial = {"out_dtype": torch.float32} if float32_partial else {}
    if window and strides:
        steps = [partial(kernels.band_strided_attention, window=window, strides=strides, causal=causal, **to_partial)]
    elif window:
        steps = [partial(kernels.band_attention, window=window, causal=causal, **to_partial)]
    else:
        steps = [partial(kernels.strided_attention, stride=stride, skip_strides=strides[:n], causal=causal,
                         **to_partial) for n, stride in enumerate(strides)]
    if fixed:
        steps.append(partial(kernels.fixed_attention, block=fixed.block, summary=fixed.summary, causal=causal,
                             min_distance=window, skip_strides=strides, **({} if continues else to_partial)))
    name = "+".join(kind for kind, present in (("band", window), ("strided", strides), ("fixed", fixed)) if present)
    few_rows = all(few_classes(lq, stride) for stride in strides) and (not fixed or lq < fixed.block)
    alone = [structured_plan(member, lq, causal, device) for member in pattern.patterns]  # each member's own plan
    return Plan(name, tuple(steps), converts_in_steps=few_rows,
                grouped_kv_on_cuda=all(p.grouped_kv_on_cuda for p in alone), continues=continues,
                span_kernel_reads=reads_half, reads_head_blocks=all(p.reads_head_blocks for p in alone))
