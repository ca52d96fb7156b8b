"""The paper's `union(sliding_window(w), strided(s))`: the band, then the strided keys at
distance >= w folded into it in place (each key counted once, no new output tensor)."""

from __future__ import annotations

import torch

from .band import band_attention
from .merge import merge_into
from .strided import strided_rows


def band_strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, stride: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal union of a sliding window and a stride, queries bottom-right aligned; (out float32, lse)."""
    out, lse = band_attention(q, k, v, window=window, scale=scale)
    out = out.float()
    first, s_out, s_lse = strided_rows(q, k, v, stride=stride, scale=scale, min_distance=window)
    if s_out.shape[-2]:
        merge_into(out[..., first:, :], lse[..., first:], s_out, s_lse)
    return out, lse
