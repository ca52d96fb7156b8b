"""The paper's `union(sliding_window(w), strided(s))`, and a window with several strides: the
band's pieces and each stride's keys at distance >= w (each key counted once: a stride skips the
keys at an earlier stride's multiples), merged straight into the output, the band and the first
stride in one write pass. Where the band runs on its Triton kernel (CUDA, half precision) and one
stride's keys are one run of rows to the last (a prefill's one causal call), the kernel continues
that partial instead (`triton_band_attention`'s seed): no merge launch, no second pass over the
outputs. Without causal the band reaches both ways and the strided keys are those at
|i - j| >= w."""

from __future__ import annotations

import torch

from . import triton_band
from .band import band_pieces
from .merge import merge_to
from .strided import strided_attention, strided_pieces


def band_strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, strides: tuple[int, ...], scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of a sliding window and one or more strides, queries bottom-right aligned; (out, lse).
    With one stride each row's result is written once, so in q's dtype (on CUDA in half precision:
    no float32 output to convert after); more strides fold into a float32 one."""
    b, h, lq, _ = q.shape

    def pieces(n: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Stride n's pieces over consecutive rows: its keys at distance >= w off strides[:n]."""
        kwargs = dict(stride=strides[n], scale=scale, min_distance=window, skip_strides=strides[:n])
        if causal:
            return strided_pieces(q, k, v, **kwargs)
        return [(0, *strided_attention(q, k, v, causal=False, **kwargs))]

    # The band covers every row; the first stride's pieces cover consecutive rows from some row on.
    others = pieces(0)
    if len(strides) == 1 and len(others) == 1 and others[0][0] + others[0][1].shape[-2] == lq \
            and triton_band.takes(q, v, causal, seeded=True):
        return triton_band.triton_band_attention(q, k, v, window=window, scale=scale, causal=causal, seed=others[0])
    out = torch.empty(b, h, lq, v.shape[-1], dtype=q.dtype if len(strides) == 1 else torch.float32, device=q.device)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
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
    for n in range(1, len(strides)):  # the other strides, folded in place
        for row, o_out, o_lse in pieces(n):
            rows = slice(row, row + o_out.shape[-2])
            merge_to(out[..., rows, :], lse[..., rows], (out[..., rows, :], lse[..., rows]), (o_out, o_lse))
    return out, lse
