"""Causal sliding window as one fused call over overlapping key windows.

Query tiles of T rows each attend a window of the T + w - 1 keys ending at the tile's last
position; an `as_strided` view gives every tile its window without copying K or V, and one
shared [T, T + w - 1] additive band mask (row r keeps window keys r .. r + w - 1) makes the
call exact. Work is n * (T + w - 1) against the ideal n * w, memory O(n * D). The first rows,
whose window would start before key 0, see every earlier key (a small dense causal call), and
the last rows that do not fill a tile form one shorter tile.
"""

from __future__ import annotations

import torch

from .dense import NEG_INF, _fused, _same_head_dim, dense_attention


def tile_rows(window: int) -> int:
    """Query rows per tile: small tiles waste fewer keys (T - 1 per row); 32 was the fastest
    of 16..256 for w = 256 on the CPU flash kernel (bench/kernels.py --tiles)."""
    return 32


def band_mask(rows: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, rows + window - 1] additive mask: row r keeps keys r .. r + window - 1."""
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(rows + window - 1, device=device)[None, :]
    keep = (c >= r) & (c < r + window)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, NEG_INF)


def _windows(x: torch.Tensor, start: int, tiles: int, tile: int, width: int) -> torch.Tensor:
    """[B*H, tiles, width, D] view: window t is rows start + t*tile .. + width of contiguous x."""
    b, h, length, d = x.shape
    return x.as_strided((b * h, tiles, width, d), (length * d, tile * d, d, 1), x.storage_offset() + start * d)


def band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, tile: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention, queries bottom-right aligned; (out, lse) over [B, H, Lq, *]."""
    b, h, lq, _ = q.shape
    lk, dv, w = k.shape[-2], v.shape[-1], window
    offset = lk - lq
    q, k, v = (x.contiguous() for x in _same_head_dim(q, k, v))
    # Rows whose position is below w - 1 see every key up to themselves.
    head = min(lq, max(0, w - 1 - offset))
    outs, lses = [], []
    if head:
        o, l = dense_attention(q[..., :head, :], k[..., : offset + head, :], v[..., : offset + head, :],
                               scale=scale, diagonal=offset)
        outs.append(o)
        lses.append(l)
    tile = tile or tile_rows(w)
    row = head
    while row < lq:
        size = min(tile, lq - row)
        tiles = (lq - row) // size
        width = size + w - 1
        start = offset + row - w + 1  # first key of the first tile's window
        qt = q[..., row : row + tiles * size, :].reshape(b * h, tiles, size, -1)
        mask = band_mask(size, w, q.dtype, q.device)
        o, l = _fused(qt, _windows(k, start, tiles, size, width), _windows(v, start, tiles, size, width),
                      scale=scale, is_causal=False, mask=mask)
        outs.append(o.reshape(b, h, tiles * size, -1))
        lses.append(l.reshape(b, h, tiles * size))
        row += tiles * size
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)
    return out[..., :dv], lse
