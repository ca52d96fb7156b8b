"""The exact fallback for any single-head pattern: query chunks against each chunk's key span,
masked by the pattern's own rule. Memory is chunk x span, never Lq x Lk, so it is safe at any
n; on long sequences it is the slowest kernel, and the planner uses it where no structured kernel
applies, for small problems (`planner.SMALL_KEYS`), for chunks of one or two class rows of small
strides (`planner.TINY_STRIDE`, `TINY_UNION_STRIDE`) and, where the span kernel is not built, for a
few rows of fixed and of a union with fixed (`planner.SHORT_RUN_MASKED_KEYS`), where its one call
beats their many.
A chunk is about as many rows as one row's key span is wide (more would only widen the span
with masked keys) and at most MASK_BUDGET mask elements. A chunk whose rows attend few of its
span's keys (a window and fixed's summary columns without causality, a few decode rows) runs on a
copy of just those: non-causal union(sliding 256, fixed(128, 8)) at n = 16384, H = 8 took 6.9 s
on whole spans, 1.4 s so (measured when that union still ran here; it has a structured kernel now).
A single row (a decode step) whose keys are that few runs on a copy of exactly them, which the
pattern lists by arithmetic (`row_keys`, no mask over the span), in one call without a mask.
On the CPU each call runs on the span kernel where it takes the inputs (`span_kernel`: the mask
as its rows' keys), which rounds a row alike whatever the call's batch and threads, else on
torch's fused kernel."""

from __future__ import annotations

import torch

from ..patterns import PatternBase
from . import span_kernel
from .dense import as_computed, fused, fused_masked, kept_when_small

# Mask elements per chunk: the mask, the rule's int64 temporaries and the kernel's scores are each
# a few times this in bytes. union(sliding 256, strided 128, fixed(128, 8)) at n = 16384, one head,
# when it ran here: peak 92 MiB, 1.72 s (2^24: 339 MiB, 1.66 s; before chunks were capped by the
# budget, 4.3 GiB).
MASK_BUDGET = 1 << 22
# A chunk whose rows attend fewer than this fraction of its key span between them runs on a copy
# of just those keys (fixed's summary columns and a window, say, out of the whole prefix).
COMPACT_FRACTION = 0.5
# Fewest query rows per call (unless the budget allows fewer): a tiny reach would otherwise make
# thousands of tiny calls.
MIN_CHUNK_ROWS = 128


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: PatternBase,
    *,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for `pattern` over [B, H, L, D], queries bottom-right aligned; on the CPU K and V
    may have fewer heads (H a multiple of theirs), which either CPU kernel reads as they are."""
    lq, lk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    on_span_kernel = span_kernel.takes(q, k, v)
    if lq == 1:  # the last position, with no key after it (causal or not): its keys by arithmetic
        keys = pattern.row_keys(lk - 1, q.device)
        if len(keys) < COMPACT_FRACTION * lk:
            if on_span_kernel:  # read in their dtype, as they are
                out, lse = _float32_result(q, dv)
                _every_key(q, k.index_select(-2, keys), v.index_select(-2, keys), out, lse, scale=scale)
                return out, lse
            # K's copy converted (where half precision is computed in float32) before V's is made:
            # one half-precision copy alive at a time
            k_rows, v_rows = (as_computed(x.index_select(-2, keys))[0] for x in (k, v))
            return fused(q, k_rows, v_rows, scale=scale, is_causal=False)
    offset = lk - lq
    out, lse = _float32_result(q, dv)
    start = 0
    while start < lq:
        chunk = _chunk_rows(pattern, offset + start, lq - start, lk, causal)
        lo, hi = pattern.key_span(offset + start, offset + start + chunk, lk, causal)
        rows = slice(start, start + chunk)
        allowed, columns = chunk_mask(pattern, offset + start, chunk, lo, hi, causal, q.device)
        keys_k, keys_v = k[..., lo:hi, :], v[..., lo:hi, :]
        if columns is not None:
            keys_k, keys_v = keys_k.index_select(-2, columns), keys_v.index_select(-2, columns)
        if on_span_kernel:
            _every_key(q[..., rows, :], keys_k, keys_v, out[..., rows, :], lse[..., rows], scale=scale, mask=allowed)
        else:
            out[..., rows, :], lse[..., rows] = fused_masked(q[..., rows, :], keys_k, keys_v, allowed, scale=scale)
        start += chunk
    return out, lse


def _float32_result(q: torch.Tensor, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialised (out, lse) for q's rows, both float32."""
    return q.new_empty(*q.shape[:-1], dv, dtype=torch.float32), torch.empty(q.shape[:-1], dtype=torch.float32,
                                                                            device=q.device)


def _every_key(q, k, v, out, lse, *, scale: float, mask: torch.Tensor | None = None) -> None:
    """Each row over every key that `mask` ([rows, keys], shared by every batch item and head; None:
    all) keeps, on the span kernel, into out and lse."""
    span_kernel.span_attention(q, k, v, out, lse, first=-span_kernel.UNBOUNDED, last=span_kernel.UNBOUNDED,
                               scale=scale, mask=mask)


@kept_when_small(lambda pattern, first, rows, lo, hi, causal, device: rows * (hi - lo))
def chunk_mask(pattern: PatternBase, first: int, rows: int, lo: int, hi: int, causal: bool,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(which keys each of the rows at first.. attends, [rows, keys]; the keys' columns in lo..hi
    when they are under COMPACT_FRACTION of the span, and the mask just those, or None where every
    row attends every one of them, as a single row does, else None); a small problem's is kept
    for its next call."""
    i = torch.arange(first, first + rows, device=device)[:, None]
    j = torch.arange(lo, hi, device=device)[None, :]
    allowed = pattern.attends(i, j, causal)
    used = allowed.any(0)  # keys some row of the chunk attends
    if int(used.sum()) < COMPACT_FRACTION * (hi - lo):
        columns = used.nonzero().squeeze(1)
        allowed = allowed[:, columns]
        return (None if bool(allowed.all()) else allowed), columns
    return allowed, None


def one_chunk(lq: int, lk: int) -> bool:
    """Whether Lq query rows over Lk keys take one call whatever the pattern (a decode step, a
    short chunk): each key is then read once at most."""
    return lq <= MIN_CHUNK_ROWS and lq * lk <= MASK_BUDGET


def _chunk_rows(pattern: PatternBase, first: int, rows_left: int, lk: int, causal: bool) -> int:
    """Query rows for the call starting at position `first`: about the pattern's reach from one
    row (its key span's width; more rows only widen the span with keys that are mostly masked, as
    a non-causal window's are), and no more than MASK_BUDGET mask elements."""
    lo, hi = pattern.key_span(first, first + 1, lk, causal)
    chunk = min(rows_left, max(MIN_CHUNK_ROWS, hi - lo))
    while chunk > 1:
        lo, hi = pattern.key_span(first, first + chunk, lk, causal)
        if chunk * (hi - lo) <= MASK_BUDGET:
            break
        chunk = max(1, MASK_BUDGET // (hi - lo))
    return chunk
