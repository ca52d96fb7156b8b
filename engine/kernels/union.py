"""The paper's `union(sliding_window(w), strided(s))`, and a window with several strides: the
band's pieces and each stride's keys at distance >= w (each key counted once: a stride skips the
keys at an earlier stride's multiples), merged straight into the output, the band and the first
stride in one write pass. Where the band runs on its Triton kernel (CUDA, half precision) and each
of one or two strides' keys are one run of rows to the last (a prefill's one call, a decode
step's), the kernel continues those partials instead (`triton_band_attention`'s seed; two strides
merged into one first, in place): no merge launch after it, no float32 output to convert. So does
the CPU's span kernel (`span_band_attention`'s seed): no merge pass (union(sliding 128, strided
128), n = 16384, H = 8, D = 64, ms, seeded / merged: float32 48.6-54.3 / 51.3-55.1, float16 45.0 /
48.5, native bfloat16 48.9 / 50.3). A causal decode row goes further: its strides' keys and the
window's in one call of the span kernel (`strided.decode_row_calls`, joined to the band's), no
partial between them. Without causal the band reaches both ways and the strided keys
are those at |i - j| >= w."""

from __future__ import annotations

import torch

from . import span_kernel, triton_band
from .band import band_pieces, row_range, span_band_attention
from .dense import computed_dtype
from .merge import merge_to
from .strided import decode_row_calls, strided_attention, strided_pieces


def band_strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, strides: tuple[int, ...], scale: float,
    causal: bool = True, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of a sliding window and one or more strides, queries bottom-right aligned; (out, lse).
    With one stride each row's result is written once, so in q's dtype (on CUDA in half precision:
    no float32 output to convert after); more strides fold into a float32 one. `out_dtype`, where
    given, is the output's either way (on the CPU float32 for a partial that a fixed step continues)."""
    b, h, lq, _ = q.shape
    ready: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    merged = computed_dtype(q)  # the partials' dtype: each row's result is rounded once, in the merge

    def pieces(n: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Stride n's pieces over consecutive rows from some row to the last: its keys at distance
        >= w off strides[:n] (computed once: those the seed's attempt made are handed on)."""
        if n in ready:
            return ready.pop(n)
        kwargs = dict(stride=strides[n], scale=scale, min_distance=window, skip_strides=strides[:n])
        if causal:
            return strided_pieces(q, k, v, out_dtype=merged, **kwargs)
        return [(0, *strided_attention(q, k, v, causal=False, out_dtype=merged, **kwargs))]

    seeded_band = _seeded_band(q, k, v, causal)
    if seeded_band is span_band_attention and causal and lq == 1 and len(strides) < span_kernel.MOST_JOINED:
        # a decode row: the strides' keys and the window's in one call of the span kernel
        joined = decode_row_calls(q, k, v, strides=strides, min_distance=window, out_dtype=out_dtype)
        if joined is not None:
            return span_band_attention(q, k, v, window=window, scale=scale, joined=joined)
    if len(strides) <= 2 and seeded_band is not None:
        ready.update(enumerate(pieces(n) for n in range(len(strides))))
        seed = _one_run(list(ready.values()))
        if seed is not None:
            dtype = {"out_dtype": out_dtype} if out_dtype else {}  # the span kernel's band only: the CPU's
            return seeded_band(q, k, v, window=window, scale=scale, causal=causal, seed=seed, **dtype)
    # The band covers every row; the first stride's pieces cover consecutive rows from some row on.
    others = pieces(0)
    out_dtype = out_dtype or (q.dtype if len(strides) == 1 else torch.float32)
    out = torch.empty(b, h, lq, v.shape[-1], dtype=out_dtype, device=q.device)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    for row, p_out, p_lse in band_pieces(q, k, v, window=window, scale=scale, causal=causal, out_dtype=merged):
        end = row + p_out.shape[-2]
        at = row
        for o_row, o_out, o_lse in others:
            lo, hi = max(at, o_row), min(end, o_row + o_out.shape[-2])
            if hi <= lo:
                continue
            if lo > at:  # rows with no strided key: the band alone
                out[..., at:lo, :], lse[..., at:lo] = p_out[..., at - row : lo - row, :], p_lse[..., at - row : lo - row]
            merge_to(*_rows((out, lse), lo, hi - lo), _rows((p_out, p_lse), lo - row, hi - lo),
                     _rows((o_out, o_lse), lo - o_row, hi - lo))
            at = hi
        if end > at:
            out[..., at:end, :], lse[..., at:end] = p_out[..., at - row :, :], p_lse[..., at - row :]
    for n in range(1, len(strides)):  # the other strides, folded in place
        for row, o_out, o_lse in pieces(n):
            rows = slice(row, row + o_out.shape[-2])
            merge_to(out[..., rows, :], lse[..., rows], (out[..., rows, :], lse[..., rows]), (o_out, o_lse))
    return out, lse


def _seeded_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """The band's kernel that continues a seed here: the Triton band (CUDA, half precision), the
    CPU's span kernel, or None."""
    if triton_band.takes(q, v, causal, seeded=True):
        return triton_band.triton_band_attention
    return span_band_attention if span_kernel.takes(q, k, v) else None


def _rows(partial: tuple[torch.Tensor, torch.Tensor], start: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start .. start + rows - 1 of a partial (out, lse)."""
    out, lse = partial
    return row_range(out, start, rows), row_range(lse, start, rows, dim=-1)


def _one_run(partials: list[list[tuple[int, torch.Tensor, torch.Tensor]]]) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """The strides' partials, each one piece to the last row (or none: no row sees its keys), as
    one (first row, out, lse) to continue: the later-starting one merged into the other in place,
    rounded once in its dtype. None where a stride's keys come in several pieces (the merge after
    the band then) or no stride has a key (the band alone)."""
    if any(len(pieces) > 1 for pieces in partials):
        return None
    runs = sorted((pieces[0] for pieces in partials if pieces), key=lambda piece: piece[0])
    if len({row + out.shape[-2] for row, out, _ in runs}) != 1:  # none, or runs ending apart
        return None
    (first, out, lse), *later = runs
    for row, other_out, other_lse in later:
        rows = slice(row - first, None)
        merge_to(out[..., rows, :], lse[..., rows], (out[..., rows, :], lse[..., rows]), (other_out, other_lse))
    return first, out, lse
