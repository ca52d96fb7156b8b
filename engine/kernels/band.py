"""Causal sliding window as a run of small dense tiles on the fused kernel.

With tiles of w queries, tile t attends (a) its own keys under a causal triangle and (b) the w
keys before it, of which row r sees those after position r (a strictly upper triangle, which
reversing both axes turns into a strictly lower one). Both pieces are single batched calls over
all tiles; the two disjoint partials merge by their log-sum-exp. Work is ~n*w, memory O(n*D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..patterns import SlidingWindow
from .dense import dense_attention
from .masked import masked_attention
from .merge import merge_partials


def _tiles(x: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    """Rows [start, start + count*size) of [B, H, L, D] as [B, H*count, size, D], zero-padded past L."""
    b, h, length, d = x.shape
    end = start + count * size
    if end > length:
        x = F.pad(x, (0, 0, 0, end - length))
    return x[..., start:end, :].reshape(b, h * count, size, d)


def band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention, queries bottom-right aligned; (out float32, lse)."""
    b, h, lq, _ = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    offset = lk - lq
    w = window
    count = -(-lq // w)
    # (a) each tile against its own keys: positions offset + t*w + [0, w), causal.
    qt = _tiles(q, 0, count, w)
    own = dense_attention(qt, _tiles(k, offset, count, w), _tiles(v, offset, count, w), scale=scale, diagonal=0)
    # (b) each tile against the w keys before it, where they exist (tile start >= w).
    first = 0 if offset >= w else 1  # tile 0 lacks a full previous tile when offset < w
    flip = lambda x: x.flip(-2)  # noqa: E731 - reverses rows within each tile
    parts_prev = []
    if count > first:
        prev_q = qt.reshape(b, h, count, w, -1)[:, :, first:].reshape(b, h * (count - first), w, -1)
        prev_k = _tiles(k, offset + first * w - w, count - first, w)
        prev_v = _tiles(v, offset + first * w - w, count - first, w)
        o, l = dense_attention(flip(prev_q), flip(prev_k), flip(prev_v), scale=scale, diagonal=-1)
        parts_prev.append((flip(o), flip(l.unsqueeze(-1)).squeeze(-1)))
    out_own, lse_own = own
    out_own = out_own.reshape(b, h, count * w, dv)
    lse_own = lse_own.reshape(b, h, count * w)
    if parts_prev:
        o, l = parts_prev[0]
        o = o.reshape(b, h, (count - first) * w, dv)
        l = l.reshape(b, h, (count - first) * w)
        tail = slice(first * w, count * w)
        merged_o, merged_l = merge_partials([(out_own[..., tail, :], lse_own[..., tail]), (o, l)])
        out_own = out_own.float()
        out_own[..., tail, :] = merged_o
        lse_own = lse_own.clone()
        lse_own[..., tail] = merged_l
    out, lse = out_own[..., :lq, :].float(), lse_own[..., :lq]
    if first == 1 and offset > 0:
        # Tile 0's queries also see keys before `offset` inside their window.
        rows = min(w, lq)
        early = masked_attention(
            q[..., :rows, :], k[..., : offset + rows, :], v[..., : offset + rows, :],
            SlidingWindow(window=w), scale=scale, causal=True,
        )
        out = out.clone()
        lse = lse.clone()
        out[..., :rows, :], lse[..., :rows] = early
    return out, lse
