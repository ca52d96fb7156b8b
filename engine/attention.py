"""`engine.attention`: the contract's Python entry point (CONTRACT §5)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .kernels.band import batch_and_heads_merge
from .kernels.dense import empty_partial, repeated_operand
from .kernels.device import kernel_device
from .patterns import PatternBase, head_groups, parse_pattern
from .planner import plan

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_4d(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:  # the kernels read strided memory
        raise TypeError(f"{name}: expected a dense tensor, got a {'nested' if x.is_nested else x.layout} one")
    if x.dim() == 3:
        return x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected shape [B, H, L, D] or [H, L, D], got {list(x.shape)}")
    return x


def shape_problem(q: Sequence[int], k: Sequence[int], v: Sequence[int]) -> tuple[str, str] | None:
    """The first way 4-D shapes of q, k, v break CONTRACT §2, as (the tensor, what is wrong), or
    None: the one rule for the engine's errors and the service's 422s."""
    (b, h, lq, d), (bk, hkv, lk, dk), (bv, hv, lv, _) = q, k, v
    if bk != b:
        return "k", f"batch {bk} must equal q's batch {b}"
    if bv != b:
        return "v", f"batch {bv} must equal q's batch {b}"
    if dk != d:
        return "k", f"head dim {dk} must equal q's head dim {d}"
    if hkv == 0 or h % hkv:
        return "k", f"{hkv} key/value heads do not divide q's {h} heads"
    if (hv, lv) != (hkv, lk):
        return "v", f"heads and length {[hv, lv]} must equal k's {[hkv, lk]}"
    if lq > lk:
        return "q", f"query length {lq} exceeds key length {lk}"
    if d == 0:
        return "q", "head dim 0: q and k need at least one feature"
    return None


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError naming the tensor whose shape or dtype breaks CONTRACT §2."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} is not one of float32, float16, bfloat16")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} differs from q's {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: on {x.device}, q on {q.device}")
    problem = shape_problem(q.shape, k.shape, v.shape)
    if problem:
        raise ValueError(f"{problem[0]}: {problem[1]}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: PatternBase | dict | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Exact sparse attention: output [B, H, Lq, Dv] in q's dtype, and the float32 natural-log
    log-sum-exp [B, H, Lq] when `return_lse`. 3-D inputs [H, L, D] give 3-D results. Forward only
    (an inference engine): inputs that require grad are read as they are, results carry no graph.
    Scores and outputs are float32: inputs that `float32_problem` names (|q|, |k| ~ 1e19; v near
    float32's largest over many keys) may overflow them, and rows then come back NaN, inf or zero;
    the service refuses those inputs (422)."""
    if torch.is_grad_enabled() and (getattr(q, "requires_grad", False) or getattr(k, "requires_grad", False)
                                    or getattr(v, "requires_grad", False)):
        with torch.no_grad():  # only then: entering it costs 3.5 us, 8% of a tiny call
            return attention(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
    squeeze = getattr(q, "ndim", None) == 3
    q, k, v, pattern = checked_arguments(q, k, v, pattern, causal=causal, return_lse=return_lse)
    q, scale = positive_scale(q, checked_scale(effective_scale(scale, q.shape[-1])))
    q, k, v = (_features_adjacent(x) for x in (q, k, v))
    if math.prod(q.shape[:3]):
        out, lse = run_heads(q, k, v, pattern, causal=causal, scale=scale)
    else:  # no query row (B, H or Lq is 0): nothing to compute, and the kernels assume rows
        out, lse = empty_partial(q, v.shape[3])
    if out.dtype != q.dtype:  # Tensor.to costs a microsecond even where it returns out itself
        out = out.to(q.dtype)
    if squeeze:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


def checked_arguments(q, k, v, pattern, *, causal: bool, return_lse: bool = False):
    """(q, k, v as [B, H, L, D], the pattern object), or the ValueError or TypeError naming the
    argument that breaks CONTRACT §2: the one check of `attention` and `Batcher.submit`."""
    q, k, v = _as_4d("q", q), _as_4d("k", k), _as_4d("v", v)
    check_shapes(q, k, v)
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):  # "false" would be truthy
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    pattern = parse_pattern(pattern)
    pattern.check_heads(q.shape[1])  # here, not in the kernels: a call with no query row runs none
    return q, k, v, pattern


def _features_adjacent(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy in C order, so that each row's features are adjacent and the innermost dimension:
    torch's CPU kernel misreads any other last stride (a transposed view gave errors of 1e35), even
    that of a head dim of 1, which torch calls contiguous whatever its stride (so `contiguous()` keeps
    it); and it lays its output out like q, so a view whose rows overlap (rows 1 apart, as `unfold`
    makes) came back with its features 2 apart and was misread too (errors of 1e32). Other views
    (slices of a packed qkv, transposes, expanded key/value heads of stride 0) are read in place."""
    shape, strides = x.shape, x.stride()
    in_place = strides[-1] == 1 and (x.is_contiguous() or all(
        size == 1 or stride == 0 or stride >= max(shape[-1], 2) for size, stride in zip(shape[:-1], strides[:-1])))
    return x if in_place else x.clone(memory_format=torch.contiguous_format)


def effective_scale(scale: float | None, head_dim: int) -> float:
    """The scale a call uses: the given one, or 1 / sqrt(D) by default (CONTRACT §2)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (str, bytes, bytearray, bool)):  # float() would read "2" and True as numbers
        raise TypeError(f"scale: expected a number, got {scale!r}")
    try:
        return float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale: expected a number, got {scale!r}") from None
    except OverflowError:  # an int or Fraction past float's range
        raise ValueError(f"scale: must be finite, got {scale!r:.40}") from None


# The kernels compute in float32: scores as q.k summed term by term and scaled (exp2-based softmaxes
# also multiply by log2(e): hence the margin), outputs as sums of up to Lk values weighted by at
# most 1 before the normalisation (under FLOAT32_MAX). Bounds under these keep every intermediate finite.
FLOAT32_MAX = torch.finfo(torch.float32).max
SCORE_LIMIT = FLOAT32_MAX / 4
FLOAT32_ZERO_SCALE = 2.0**-150  # rounds to 0 in float32, whose smallest step is 2^-149


def score_bound(head_dim: int, scale: float, q_peak: float, k_peak: float) -> float:
    """An upper bound of |every partial sum of a score|, scaled or not, from the largest |q| and |k|
    elements. A scale below float32's range goes into q (`positive_scale`), and the kernels' scale
    is then 1; one past SCORE_LIMIT is refused (inf here)."""
    if abs(scale) > SCORE_LIMIT:
        return math.inf
    if abs(scale) <= FLOAT32_ZERO_SCALE:
        return head_dim * (abs(scale) * q_peak) * k_peak
    return max(1.0, abs(scale)) * head_dim * q_peak * k_peak


def float32_problem(head_dim: int, key_length: int, scale: float, peaks: tuple[float, float, float]) -> tuple[str, str] | None:
    """The input that could take the kernels' float32 arithmetic out of range, as (its name, what is
    wrong), or None, from the largest |q|, |k| and |v| elements: the scale when it takes the scores
    past SCORE_LIMIT, else the larger of q and k; v when Lk of its values could sum past FLOAT32_MAX.
    Past them the engine may return NaN, inf or zero rows, so the service refuses such inputs (422)."""
    q_peak, k_peak, v_peak = peaks
    bound = score_bound(head_dim, scale, q_peak, k_peak)
    if bound > SCORE_LIMIT:
        name = "scale" if score_bound(head_dim, 1.0, q_peak, k_peak) <= SCORE_LIMIT else "q" if q_peak >= k_peak else "k"
        return name, (f"scores may overflow float32: max(1, |scale|) * D * max|q| * max|k| = {bound:.3g}, over "
                      f"{SCORE_LIMIT:.3g}; scale q, k or `scale` down")
    if key_length * v_peak > FLOAT32_MAX:
        return "v", (f"outputs may overflow float32: Lk * max|v| = {key_length * v_peak:.3g}, over {FLOAT32_MAX:.3g}; "
                     "scale v down")
    return None


def checked_scale(scale: float) -> float:
    """`scale`, or the ValueError for one the kernels cannot take (`attention` and `Batcher.submit`)."""
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    if abs(scale) > SCORE_LIMIT:  # the kernels' float32 scale (times log2(e) in exp2 softmaxes) would be inf
        raise ValueError(f"scale: |scale| must be at most {SCORE_LIMIT:.3g}, got {scale}")
    return scale


def positive_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """(q, scale) giving the same scores with a scale that is positive in float32. torch's fused
    kernels mask scores before scaling them, so zero or a negative scale turns a masked key into
    NaN or +inf: a negative scale negates q instead (exact), and one that is zero in float32 goes
    into q, in float64 (all zeros for scale 0 or ordinary q: attention uniform over the allowed
    keys)."""
    if scale < 0:
        q, scale = -q, -scale
    if scale <= FLOAT32_ZERO_SCALE:
        return (q.double() * scale).to(q.dtype), 1.0
    return q, scale


@functools.lru_cache(maxsize=4096)
def backend_for(pattern: PatternBase, heads: int, lq: int, lk: int, causal: bool, device: str) -> str:
    """The kernels a call would use on `device` (its `kernel_device`), e.g. 'band' or 'sdpa,strided'
    for per_head groups."""
    return ",".join(dict.fromkeys(plan(p, lq, lk, causal, device).backend for p, _ in head_groups(pattern, heads)))


# Grouped-query attention whose plan takes equal heads only (on CUDA, `Plan.grouped_kv_on_cuda`;
# per_head groups that split a key/value head's query heads, on either device) and whose key/value
# heads, repeated for every query head, would take more than this many bytes runs one key/value
# head at a time, on stride-0 views of it: the kernels then copy at most one key/value head's
# repeats (the dense kernel none), not all of them.
GQA_REPEAT_BYTES = 1 << 26
# So does a short run of query rows (at most this fraction of the keys: decoding, small chunks),
# whose attention costs less than repeating the keys would: H = 32 over Hkv = 8, D = 128, Lk 1024,
# Lq 1, repeated / views, ms: dense 5.07 / 0.84, sliding_window(256) 3.07 / 0.97, strided(64)
# 2.20 / 0.43, fixed(128, 8) 6.55 / 4.98 (H = 8 over 2, D = 64: 0.28 / 0.15, 0.28 / 0.24,
# 0.19 / 0.12, 0.78 / 0.93). Prefills measured alike either way (Lq = Lk = 512 .. 4096).
GQA_VIEW_ROW_FRACTION = 1 / 8


def run_heads(q, k, v, pattern: PatternBase, *, causal: bool, scale: float):
    """Run each group of heads that shares a pattern on its plan, on views of q, k and v (in runs
    of heads that allow them, `_view_runs`, or on the CPU as blocks of them, `_head_blocks`; in
    runs, for large grouped-query problems, unless the plan takes grouped key/value heads as they
    are); the query heads find their key/value heads by H / Hkv."""
    b, h, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[3]
    device = kernel_device(q.device)
    runs = []  # (plan, query heads, their key/value heads when the plan takes them unrepeated, or their HeadBlocks)
    for single, heads in head_groups(pattern, h):
        step = plan(single, lq, lk, causal, device)
        grouped = device == "cpu" or step.grouped_kv_on_cuda
        parts = _view_runs(heads, q, k)
        # On CUDA a run each: views whose batch axis steps over heads are untried on its kernels.
        blocks = _head_blocks(heads, q, k) if len(parts) > 1 and device == "cpu" and step.reads_head_blocks else None
        if blocks is not None:
            runs.append((step, heads, blocks))
            continue
        for part in parts:
            kv = _grouped_range(part, q, k) if grouped else None
            runs += [(step, part, kv)] if kv is not None else [(step, run, None) for run in _head_runs(part, q, k)]
    if len(runs) > 1:  # the runs' results are gathered here; a single run's are returned as they are
        out = torch.empty(b, h, lq, dv, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    for step, heads, kv in runs:
        if isinstance(kv, HeadBlocks):  # several runs of heads in one call: every batch item's, or each one's
            together = kv.spans_batch(q, k, v) and not step.converts_whole(q, k, v)
            for first, items in [(0, b)] if together else [(i, 1) for i in range(b)]:
                o, l = step(kv.query_view(q, first, items), kv.key_view(k, first, items),
                            kv.key_view(v, first, items), scale)
                kv.query_view(out, first, items).copy_(o)
                kv.query_view(lse, first, items).copy_(l)
                del o, l
            continue
        if kv is not None:
            idx = slice(heads[0], heads[-1] + 1)
            qs, ks, vs = (q, k, v) if len(heads) == h else (q[:, idx], k[:, kv], v[:, kv])
        else:
            qs, ks, vs, idx = _heads_of(heads, q, k, v)
        if len(runs) == 1:
            return step(qs, ks, vs, scale)
        # Some heads of several batch items: a view whose B and H axes no one stride spans. Plans that
        # read such views in place (`Plan.reads_head_blocks`, on the CPU) take every item at once;
        # others would copy it whole (all of K and V for a decode step: per_head(sliding_window(256),
        # strided(64)), B = 4, one row after 65536 keys, 35 ms), so they take one batch item at a time,
        # as do plans that convert their inputs whole: an item's conversion stays in cache for its
        # call (per_head(dense, sliding 256), bfloat16, B = 8, one row after 4096 keys: 1.74x the time
        # converted all at once).
        every_item = b == 1 or device == "cpu" and step.reads_head_blocks and not step.converts_whole(q, k, v)
        for item in [slice(None)] if every_item else (slice(i, i + 1) for i in range(b)):
            o, l = step(qs[item], ks[item], vs[item], scale)
            out[item, idx], lse[item, idx] = o.float(), l
            del o, l  # before the next call allocates its own
    return out, lse


class HeadBlocks(NamedTuple):
    """A per_head group's query heads as `blocks` blocks of `count` consecutive heads, every
    `period` heads from `start` (its patterns repeat: [a, b, a, b] over 8 heads gives a heads 0, 1
    and 4, 5), and their key/value heads likewise: each block's a range of `kv_count` heads, whole
    groups, or one head for all its query heads (`kv_count` 0), every `kv_period` heads from
    `kv_start`. A batch item's blocks are one view [blocks, count, L, D] (its batch axis steps
    `period` heads): one call of the plan, not one per block; so are every item's where the blocks
    span each item's heads (`spans_batch`)."""

    blocks: int
    start: int
    count: int
    period: int
    kv_start: int
    kv_count: int
    kv_period: int

    def spans_batch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether every batch item's blocks are one view [B * blocks, count, L, D]: one item, or
        blocks that span each item's query and key/value heads (per_head's patterns repeated
        evenly) in tensors whose items follow each other (and the gathered out and lse)."""
        spans = self.blocks * self.period == q.shape[1] and self.blocks * self.kv_period == k.shape[1]
        return q.shape[0] == 1 or spans and all(batch_and_heads_merge(x) for x in (q, k, v))

    def query_view(self, x: torch.Tensor, first: int, items: int) -> torch.Tensor:
        """Batch items first .. first + items - 1's blocks of x [B, H, L, *] (q, or the gathered
        out and lse)."""
        return _blocks_of(x, first, items * self.blocks, self.start, self.count, self.period, 1)

    def key_view(self, x: torch.Tensor, first: int, items: int) -> torch.Tensor:
        """Batch items first .. first + items - 1's blocks of x [B, Hkv, L, D] (k or v): one head
        repeated by stride 0 where a block's query heads share one."""
        if self.kv_count:
            return _blocks_of(x, first, items * self.blocks, self.kv_start, self.kv_count, self.kv_period, 1)
        return _blocks_of(x, first, items * self.blocks, self.kv_start, self.count, self.kv_period, 0)


def _blocks_of(x: torch.Tensor, first: int, blocks: int, start: int, count: int, period: int, step: int
               ) -> torch.Tensor:
    """x [B, H, L, *] from batch item `first` on as the view [blocks, count, L, *] of heads
    start + block * period + i * step (past an item's heads: the next item's, `spans_batch`)."""
    item_stride, head_stride, *rest = x.stride()
    return x.as_strided((blocks, count, *x.shape[2:]), (period * head_stride, step * head_stride, *rest),
                        x.storage_offset() + first * item_stride + start * head_stride)


def _head_blocks(heads: list[int], q: torch.Tensor, k: torch.Tensor) -> HeadBlocks | None:
    """These query heads as HeadBlocks (two or more), or None where they are not equal blocks at
    one period, or a block's heads split a key/value head's group, or the blocks' key/value heads
    are not at one period."""
    count = next((i for i in range(1, len(heads)) if heads[i] != heads[0] + i), len(heads))
    blocks, start = len(heads) // count, heads[0]
    if blocks < 2 or len(heads) % count:
        return None
    period = heads[count] - start
    if heads != [start + block * period + i for block in range(blocks) for i in range(count)]:
        return None
    group = q.shape[1] // k.shape[1]
    whole_groups = start % group == 0 and count % group == 0
    if not whole_groups and start // group != (start + count - 1) // group:
        return None
    kv_start = start // group
    kv_period = (start + period) // group - kv_start
    if any((start + block * period + i) // group != kv_start + block * kv_period + (i // group if whole_groups else 0)
           for block in range(blocks) for i in range(count)):
        return None
    return HeadBlocks(blocks, start, count, period, kv_start, count // group if whole_groups else 0, kv_period)


def _head_runs(heads: list[int], q: torch.Tensor, k: torch.Tensor) -> list[list[int]]:
    """The query heads of one pattern, cut at key/value head boundaries when repeating the
    key/value heads for all of them at once would take more than GQA_REPEAT_BYTES, or the query
    rows are a short run (GQA_VIEW_ROW_FRACTION)."""
    group = q.shape[1] // k.shape[1]
    repeat = len(heads) * k[:, :1].numel() * k.element_size() * 2
    if group == 1 or repeat <= GQA_REPEAT_BYTES and q.shape[2] > GQA_VIEW_ROW_FRACTION * k.shape[2]:
        return [heads]
    runs: dict[int, list[int]] = {}
    for head in heads:
        runs.setdefault(head // group, []).append(head)
    return list(runs.values())


def _grouped_range(heads: list[int], q: torch.Tensor, k: torch.Tensor) -> slice | None:
    """The key/value heads of these query heads when they are a range of whole groups (every
    head, or per_head's usual groups), each key/value head with all its H / Hkv query heads."""
    group = q.shape[1] // k.shape[1]
    if heads[-1] - heads[0] != len(heads) - 1 or heads[0] % group or len(heads) % group:
        return None
    return slice(heads[0] // group, (heads[-1] + 1) // group)


def _view_runs(heads: list[int], q: torch.Tensor, k: torch.Tensor) -> list[list[int]]:
    """Query heads as runs that read q, k and v as views, a call each rather than copies by index:
    the heads whole where they allow it, else as few runs of consecutive ones as do (per_head's
    groups when its patterns repeat: [a, b, a, b] over 8 heads gives a heads 0, 1, 4 and 5). A run
    allows it where its heads are evenly spaced and their key/value heads one, evenly spaced too,
    or whole groups (`_grouped_range`: the plans take them as they are)."""
    if len(heads) == q.shape[1]:  # every head: a range of whole groups
        return [heads]
    group = q.shape[1] // k.shape[1]

    def viewable(run: list[int]) -> bool:
        kv_heads = [head // group for head in run]
        return bool(_evenly_spaced(run)) and (kv_heads[0] == kv_heads[-1] or bool(_evenly_spaced(kv_heads))
                                              or _grouped_range(run, q, k) is not None)

    if viewable(heads):
        return [heads]
    runs = [[heads[0]]]
    for head in heads[1:]:
        if viewable(runs[-1] + [head]):
            runs[-1].append(head)
        else:
            runs.append([head])
    return runs


def _evenly_spaced(heads: list[int]) -> slice | None:
    """These heads as a slice where they are evenly spaced: a range, or every s-th head (per_head's
    groups when its patterns alternate)."""
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    spaced = slice(heads[0], heads[-1] + 1, step) if step > 0 else None
    return spaced if spaced and heads == list(range(spaced.start, spaced.stop, step)) else None


def _heads_of(heads: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q, k, v, index) for these query heads: views where the heads and their key/value heads are
    evenly spaced (per_head's groups usually are) or share one key/value head, copies by index
    otherwise."""
    h, hkv = q.shape[1], k.shape[1]
    if len(heads) == h == hkv:  # every head, each its own key/value head: the tensors themselves
        return q, k, v, slice(None)
    group = h // hkv
    idx = _evenly_spaced(heads) or torch.tensor(heads, device=q.device)
    kv_heads = [head // group for head in heads]  # query head i reads key/value head i // (H / Hkv)
    kv_idx = _evenly_spaced(kv_heads) or torch.tensor(kv_heads, device=q.device)
    qs = q[:, idx] if isinstance(idx, slice) else q.index_select(1, idx)
    if group > 1 and kv_heads[0] == kv_heads[-1]:  # one key/value head for all: a stride-0 view
        ks, vs = (repeated_operand(x[:, kv_heads[0] : kv_heads[0] + 1].expand(-1, len(heads), -1, -1)) for x in (k, v))
    else:
        ks, vs = (x[:, kv_idx] if isinstance(kv_idx, slice) else x.index_select(1, kv_idx) for x in (k, v))
    return qs, ks, vs, idx
