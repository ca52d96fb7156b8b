"""Causal strided attention as s independent dense causal attentions.

Positions with the same residue mod s attend only each other, causally: a reshape of the
sequence into [L/s, s] and a transpose turn `strided(s)` into one batched dense causal call
over s classes of length L/s: n^2/s work on the fused kernel. A minimum distance (for a union
with a sliding window, whose keys it then skips) only shifts that call's diagonal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense import dense_attention


def _classes(x: torch.Tensor, start: int, stop: int, stride: int) -> torch.Tensor:
    """Rows [start, stop) (start, stop multiples of stride; zero rows past L) as
    [B, H*stride, (stop-start)/stride, D]: class c holds positions start + c, start + c + s, ..."""
    b, h, length, d = x.shape
    if stop > length:
        x = F.pad(x, (0, 0, 0, stop - length))
    x = x[..., start:stop, :].reshape(b, h, (stop - start) // stride, stride, d)
    return x.transpose(2, 3).reshape(b, h * stride, (stop - start) // stride, d)


def strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stride: int, scale: float, min_distance: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal `(i - j) mod stride == 0` attention with i - j >= min_distance, queries
    bottom-right aligned; (out, lse) over [B, H, Lq, *]."""
    b, h, lq, _ = q.shape
    lk, dv, s = k.shape[-2], v.shape[-1], stride
    offset = lk - lq
    total = -(-lk // s) * s  # keys padded to whole classes: pads are in everyone's future
    first = (offset // s) * s  # queries start at a class boundary: up to s - 1 dummy rows
    qc = _classes(F.pad(q, (0, 0, offset - first, 0)), 0, total - first, s)
    kc, vc = _classes(k, 0, total, s), _classes(v, 0, total, s)
    skip = -(-min_distance // s)
    out, lse = dense_attention(qc, kc, vc, scale=scale, diagonal=first // s - skip)
    rows = (total - first) // s
    out = out.reshape(b, h, s, rows, dv).transpose(2, 3).reshape(b, h, rows * s, dv)
    lse = lse.reshape(b, h, s, rows).transpose(2, 3).reshape(b, h, rows * s)
    keep = slice(offset - first, offset - first + lq)
    return out[..., keep, :], lse[..., keep]
