"""Causal strided attention as s independent dense causal attentions.

Positions with the same residue mod s attend only each other, causally. Viewing [L, D] as
[L/s, s, D] and swapping the first two axes turns `strided(s)` into one batched dense causal
call over s classes of length L/s: n^2/s work on the fused kernel, with no copy of Q, K or V
when s divides L (the view's strides go straight to the kernel) and no copy of the output (the
kernel writes it in the query's memory order, which is the natural one). A minimum distance
m (for a union with a sliding window, whose keys it then skips) drops the first ceil(m/s)
class rows of queries and the last ones of keys: still one square causal call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense import _fused, empty_partial
from .merge import merge_partials


def _classes(x: torch.Tensor, start: int, stop: int, stride: int) -> torch.Tensor:
    """Rows [start, stop) (a multiple of stride long; zero rows past L) as the view
    [B*H, stride, (stop-start)/stride, D]: class c holds positions start + c, start + c + s, ..."""
    b, h, length, d = x.shape
    if stop > length or not x.is_contiguous():
        x = F.pad(x, (0, 0, 0, max(0, stop - length)))
    rows = (stop - start) // stride
    return x[..., start:stop, :].reshape(b * h, rows, stride, d).transpose(1, 2)


def strided_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stride: int, scale: float, min_distance: int = 0
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(first, out, lse): strided attention for query rows first .. Lq-1 (earlier rows see no
    key), with i - j >= min_distance; queries bottom-right aligned."""
    b, h, lq, _ = q.shape
    lk, dv, s = k.shape[-2], v.shape[-1], stride
    offset = lk - lq
    total = -(-lk // s) * s  # keys padded to whole classes: pads are in everyone's future
    lead = offset % s  # queries start at a class boundary: up to s - 1 dummy rows
    if lead:
        q = F.pad(q, (0, 0, lead, 0))
    # Query class row r (position offset - lead + r*s + c) sees key class rows 0 .. r + diag.
    diag = (offset - lead) // s - (-(-min_distance // s))
    skip = max(0, -diag)  # leading query class rows that see no key
    rows = (total - offset + lead) // s - skip
    first = skip * s - lead
    if rows <= 0 or first >= lq:
        return lq, *empty_partial(q[..., :0, :], dv)
    qc = _classes(q, skip * s, skip * s + rows * s, s)
    # Keys: the `diag + skip` class rows every query row sees, then a causal square.
    seen = diag + skip
    kc, vc = _classes(k, 0, (seen + rows) * s, s), _classes(v, 0, (seen + rows) * s, s)
    out, lse = _fused(qc, kc[:, :, seen:], vc[:, :, seen:], scale=scale, is_causal=True)
    if seen:
        prefix = _fused(qc, kc[:, :, :seen], vc[:, :, :seen], scale=scale, is_causal=False)
        out, lse = merge_partials([(out, lse), prefix])
    out = out.transpose(1, 2).reshape(b, h, rows * s, dv)
    lse = lse.transpose(1, 2).reshape(b, h, rows * s)
    if first < 0:  # drop the dummy rows
        out, lse = out[..., -first:, :], lse[..., -first:]
        first = 0
    return first, out[..., : lq - first, :], lse[..., : lq - first]


def strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stride: int, scale: float, min_distance: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal `(i - j) mod stride == 0` attention with i - j >= min_distance, queries
    bottom-right aligned; (out, lse) over [B, H, Lq, *]."""
    first, out, lse = strided_rows(q, k, v, stride=stride, scale=scale, min_distance=min_distance)
    if first == 0:
        return out, lse
    head_out, head_lse = empty_partial(q[..., :first, :], v.shape[-1])
    return torch.cat([head_out, out], dim=-2), torch.cat([head_lse, lse], dim=-1)
