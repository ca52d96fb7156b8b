"""The exact fallback for any single-head pattern: query chunks against each chunk's key span,
masked by the pattern's own rule. Memory is chunk x span, never Lq x Lk, so it is safe at any
n; it is the slowest kernel and the planner uses it only where no structured kernel applies."""

from __future__ import annotations

import torch

from ..patterns import PatternBase
from .dense import NEG_INF, _fused, empty_partial

# Mask elements per chunk (float32): bounds the fallback's extra memory to ~64 MiB.
MASK_BUDGET = 1 << 24


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: PatternBase,
    *,
    scale: float,
    causal: bool,
    exclude: PatternBase | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for `pattern` over [B, H, L, D] (equal heads), queries bottom-right aligned.

    `exclude` drops the keys another kernel already covers (so a union counts each key once).
    """
    lq, lk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    offset = lk - lq
    out = q.new_empty(*q.shape[:-1], dv, dtype=torch.float32)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    start = 0
    while start < lq:
        chunk = max(1, min(lq - start, MASK_BUDGET // max(1, lk)))
        lo, hi = pattern.key_span(offset + start, offset + start + chunk, lk, causal)
        # The span of the real chunk is narrower than lk: grow the chunk to fill the budget.
        chunk = max(1, min(lq - start, MASK_BUDGET // max(1, hi - lo)))
        lo, hi = pattern.key_span(offset + start, offset + start + chunk, lk, causal)
        rows = slice(start, start + chunk)
        i = torch.arange(offset + start, offset + start + chunk, device=q.device)[:, None]
        j = torch.arange(lo, hi, device=q.device)[None, :]
        allowed = pattern.allows(i, j)
        if causal:
            allowed = allowed & (j <= i)
        if exclude is not None:
            allowed = allowed & ~exclude.allows(i, j)
        if hi <= lo:
            part = empty_partial(q[..., rows, :], dv)
        else:
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, NEG_INF)
            part = _fused(q[..., rows, :], k[..., lo:hi, :], v[..., lo:hi, :], scale=scale, is_causal=False, mask=mask)
            empty = ~allowed.any(-1)
            if bool(empty.any()):
                part = (part[0].masked_fill(empty[:, None], 0.0), part[1].masked_fill(empty, NEG_INF))
        out[..., rows, :] = part[0]
        lse[..., rows] = part[1]
        start += chunk
    return out, lse
