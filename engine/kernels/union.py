"""The paper's `union(sliding_window(w), strided(s))`: the band's pieces and the strided keys at
distance >= w (each key counted once), merged straight into the output in one write pass. Without
causal the band reaches both ways and the strided keys are those at |i - j| >= w."""

from __future__ import annotations

import torch

from .band import band_pieces
from .merge import merge_to
from .strided import strided_attention, strided_pieces


def band_strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, stride: int, scale: float, causal: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of a sliding window and a stride, queries bottom-right aligned; (out float32, lse)."""
    b, h, lq, _ = q.shape
    out = torch.empty(b, h, lq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    # The band covers every row; the strided pieces cover consecutive rows from some row on.
    if causal:
        others = strided_pieces(q, k, v, stride=stride, scale=scale, min_distance=window)
    else:
        others = [(0, *strided_attention(q, k, v, stride=stride, scale=scale, causal=False, min_distance=window))]
    for row, p_out, p_lse in band_pieces(q, k, v, window=window, scale=scale, causal=causal):
        end = row + p_out.shape[-2]
        at = row
        for o_row, o_out, o_lse in others:
            lo, hi = max(at, o_row), min(end, o_row + o_out.shape[-2])
            if hi <= lo:
                continue
            if lo > at:  # rows with no strided key: the band alone
                out[..., at:lo, :], lse[..., at:lo] = p_out[..., at - row : lo - row, :], p_lse[..., at - row : lo - row]
            merge_to(out[..., lo:hi, :], lse[..., lo:hi],
                     (p_out[..., lo - row : hi - row, :], p_lse[..., lo - row : hi - row]),
                     (o_out[..., lo - o_row : hi - o_row, :], o_lse[..., lo - o_row : hi - o_row]))
            at = hi
        if end > at:
            out[..., at:end, :], lse[..., at:end] = p_out[..., at - row :, :], p_lse[..., at - row :]
    return out, lse
