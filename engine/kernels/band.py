"""Sliding window as one fused call over overlapping key windows.

Query tiles of T rows each attend a window of the T + w - 1 keys ending at the tile's last
position (without causal, the w - 1 keys after it too); an `as_strided` view gives every tile its
window without copying K or V, and one shared additive band mask (row r keeps window keys
r .. r + w - 1, or r .. r + 2w - 2) makes the call exact. Work is n * (T + w - 1) against the ideal
n * w, memory O(n * D). The first rows, whose window would start before key 0, see every earlier
key (a small dense call up to their diagonal), the last rows that do not fill a tile form one
shorter tile, and without causal the last w - 1 rows, whose window would end past the last key,
are the first rows' problem reversed (copies of those rows and their keys, flipped). Keys
before the first row's window are cropped off first (the rule depends on i - j alone), and on a
CPU where half precision is slow the rest is converted to float32 once, here: a chunk at the end
of long keys converts and pads only its window's keys (25 bfloat16 rows after 65536 keys, H = 8:
14.4 ms converting all of K and V, 0.6 ms so).

On CUDA in half precision the band is one Triton launch (triton_band.py), which walks each query
tile's band of keys alone: 2.5x faster than flash's local window at n = 131072, w = 256 on an
H200. Where Triton does not run it, the flash kernel has the band built in (its local-window
arguments, bottom-right aligned like the contract): one call, no mask.
"""

from __future__ import annotations

import functools

import torch

from . import span_kernel, triton_band
from .dense import (additive_mask, as_computed, cuda_operand, dense_attention, flash_supported, fused,
                    fused_under, kept_when_small, math_attention, repeated_operand, same_head_dim, without_padding)
from .device import kernel_device
from .merge import join_rows


# Query rows per tile: a row computes T + w - 1 keys for its w, but tiny tiles make tiny
# matrix products. On the CPU flash kernel 16 and 32 were the fastest of 8..256 for windows
# 64..256; 24 then beat both at n = 16384, H = 8, D = 64 (two rounds, ms for 16 / 24 / 32 rows:
# w = 64 35.1-35.5 / 32.5-32.8 / 36.5-37.3, 128 47.7-47.8 / 45.2-46.9 / 47.7-48.8, 256
# 75.7-76.6 / 71.7-73.2 / 73.0-74.2; 512 within noise). `python -m bench.kernels --tiles`.
# Later 20 rows beat 24 on the CPU for windows up to 256 (engine.attention, n = 16384, H = 8,
# D = 64, the tile sizes taking turns in one process, ms for 24 / 20: w = 32 31.7 / 28.8, 64
# 39.3 / 35.8, 128 55.2 / 53.2, 192 71.7 / 69.0, 256 85.7 / 83.8; at n = 4096 alike; 18 rows
# tied with 20 up to 128 and 16 lost everywhere), tied at 384 and with D = 128, and lost by 1-2%
# from 512 (152.3 / 154.1), whose rows waste fewer keys in proportion (T - 1 of w + T - 1).
TILE_ROWS = 24
SMALL_WINDOW, SMALL_WINDOW_TILE_ROWS = 256, 20
# Query rows per strip on the CPU span kernel: a strip packs the keys its rows see (its rows and
# the w - 1 before) once.
BAND_STRIP_ROWS = 256


def tile_rows(window: int, device: torch.device) -> int:
    """Query rows per band tile for this window: fewer for a small window on the CPU."""
    return SMALL_WINDOW_TILE_ROWS if window <= SMALL_WINDOW and kernel_device(device) == "cpu" else TILE_ROWS


@kept_when_small(lambda rows, window, dtype, device: rows * (rows + window - 1))
def band_mask(rows: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, rows + window - 1] additive mask: row r keeps keys r .. r + window - 1 (a small one
    kept for the next call: a decode step's was a quarter of its time)."""
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(rows + window - 1, device=device)[None, :]
    keep = (c >= r) & (c < r + window)
    return additive_mask(keep, dtype)


def row_grid(x: torch.Tensor, first: int, outer: tuple[int, int], inner: tuple[int, int]) -> torch.Tensor:
    """[B*H, n_outer, n_inner, D] view of a `row_major` x whose element (a, r) is row
    first + a * outer_step + r * inner_step, for (n_outer, outer_step) and (n_inner, inner_step)."""
    b, h, _, d = x.shape
    merged = x.stride(0) if h == 1 else x.stride(1)  # B and H as one axis: `row_major` makes it one stride
    (n_outer, outer_step), (n_inner, inner_step) = outer, inner
    return x.as_strided((b * h, n_outer, n_inner, d), (merged, outer_step * d, inner_step * d, 1),
                        x.storage_offset() + first * d)


def heads_last(x: torch.Tensor, swap: bool) -> torch.Tensor:
    """x with its first two axes swapped where `swap`: a `row_grid` [B*H, n_outer, ...] view as
    [n_outer, B*H, ...], the heads on the head axis, where torch's CPU kernel maps fewer key/value
    heads to their query heads (query head i of the B*H reads key/value head i // (H / Hkv) of the
    B*Hkv: the right one in every batch item), and a result back. Equal heads keep B*H on the
    batch axis, as fast or faster (band tiles at B = 4: 76 against 82-87 ms)."""
    return x.transpose(0, 1) if swap else x


def grid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   empty_rows: torch.Tensor | None, *, scale: float, is_causal: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused call over `row_grid` views, q [B*H, n, rows, D] and K, V [B*Hkv, n, keys, D]:
    causal squares, or under a shared [rows, keys] additive mask and its rows that keep no key
    (`fused_under`; both None: every key); (out, lse) laid out as q. Fewer key/value heads (on the
    CPU) go to the kernel on the head axis as they are (`heads_last`), a mask 4-D so that `fused`
    does not fold the query heads into rows (copies of q and the output; with no mask and no
    causal diagonal it folds them)."""
    grouped = k.shape[0] != q.shape[0]
    q, k, v = (heads_last(x, grouped) for x in (q, k, v))
    if grouped and mask is not None:
        mask = mask.expand(1, q.shape[1], -1, -1)
    if is_causal:
        out, lse = fused(q, k, v, scale=scale, is_causal=True)
    else:
        out, lse = fused_under(q, k, v, mask, empty_rows, scale=scale)
    return heads_last(out, grouped), heads_last(lse, grouped)


def row_range(x: torch.Tensor, start: int, rows: int, dim: int = -2) -> torch.Tensor:
    """Rows start .. start + rows - 1 of x along `dim` (-1 for a log-sum-exp): x itself when they
    are all of its rows (a decode step's window is the whole cropped key range, its pieces whole
    rows), as each view costs host time, which is most of a decode step's."""
    return x if start == 0 and rows == x.shape[dim] else x.narrow(dim, start, rows)


def batch_and_heads_merge(x: torch.Tensor) -> bool:
    """Whether x's B and H axes are one axis of one stride (as in a contiguous tensor, or a
    grouped-query view repeating one key/value head with stride 0; not in per_head's blocks of
    heads, `attention.HeadBlocks`)."""
    b, h = x.shape[:2]
    return b == 1 or h == 1 or x.stride(0) == h * x.stride(1)


def row_major(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows are contiguous and its B and H merge (`batch_and_heads_merge`), else
    a contiguous copy."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] and batch_and_heads_merge(x) else x.contiguous()


def key_head_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """A decode row's x [B, H, 1, *] (q, out, or lse [B, H, 1]) as [B, Hkv, H / Hkv, *]: each
    key/value head's `group` query heads as rows of it at one position, which the span kernel
    computes together, reading each key once for them (a view where x allows it)."""
    return x.reshape(x.shape[0], -1, group, *x.shape[3:])


def span_band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, causal: bool = True,
    out_dtype: torch.dtype | None = None, seed: tuple[int, torch.Tensor, torch.Tensor] | None = None,
    joined: tuple[tuple[span_kernel.SpanArguments, ...], torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The band on the CPU span kernel, queries bottom-right aligned: every row's window in one call,
    heads on the kernel's second axis (grouped ones read as they are); (out in `out_dtype`, q's
    unless said, lse). `seed`: (first row, out, lse), a partial over other keys of rows first row
    .. Lq - 1 (a union's strides; its output read in its own dtype), which those rows continue in a
    second call: the union's result written once, no merge pass. `joined` (no seed then): a decode
    row's other keys as calls of the kernel and the out and lse they write (a union's strides',
    `strided.decode_row_calls`), computed with the window's in one library call, the row's result
    over all their keys written into that out and lse (returned). A decode row of grouped heads
    goes as a key/value head's query heads, rows of it at one position (views), which read its
    window's keys once between them, where that leaves enough units of work
    (`span_kernel.folding_pays`; sliding_window(256), H = 32 over 8, D = 128, one row after 4096
    keys: 0.93-0.94 of the time)."""
    b, h, lq, _ = q.shape
    offset = k.shape[-2] - lq
    span = dict(first=offset - window + 1, last=offset + (0 if causal else window - 1), scale=scale,
                strip_rows=BAND_STRIP_ROWS)
    if joined is None:
        out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=out_dtype or q.dtype)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    else:
        assert seed is None and lq == 1, "a call joins a decode row's window without a seed"
        span["joined"], out, lse = joined
    seeded = seed[0] if seed is not None else lq  # the first row that continues the seed
    continued = seed[1:] if seed is not None else None
    group = h // k.shape[1]
    row_keys = min(k.shape[-2], window if causal else 2 * window - 1)  # the most keys a row sees
    if lq == 1 and group > 1 and span_kernel.folding_pays(k.shape[1], 1, group, row_keys):
        folded_seed = None if continued is None or seeded else tuple(key_head_rows(x, group) for x in continued)
        span_kernel.span_attention(key_head_rows(q, group), k, v, key_head_rows(out, group), key_head_rows(lse, group),
                                   rows_per_step=group, seed=folded_seed, **span)
        return out, lse
    for start, stop, partial in ((0, seeded, None), (seeded, lq, continued)):
        if stop > start:
            rows = stop - start
            span_kernel.span_attention(row_range(q, start, rows), k, v, row_range(out, start, rows),
                                       row_range(lse, start, rows, -1), row_shift=start, seed=partial, **span)
    return out, lse


def band_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, causal: bool = True,
    tile: int | None = None, out_dtype: torch.dtype | None = None,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Sliding-window attention as (first row, out, lse) pieces covering rows 0..Lq-1 in order,
    queries bottom-right aligned: a consumer that writes a new tensor anyway (a union's merge)
    can take them without first joining them, and asks for the span kernel's piece in `out_dtype`
    (float32 where it merges, so that the result is rounded once; q's dtype unless said)."""
    # The span kernel wherever it takes q, k and v, bfloat16 too where AMX runs it natively
    # (sliding_window(128) at n = 16384, H = 8, D = 64, ms: 24.6 against torch's tiles' 30.4, 49.5 /
    # 60.1 at 32768; w = 256 42.8 / 43.8). It reads the windows' keys alone.
    if span_kernel.takes(q, k, v):
        return [(0, *span_band_attention(q, k, v, window=window, scale=scale, causal=causal, out_dtype=out_dtype))]
    lo = max(0, k.shape[-2] - q.shape[-2] - window + 1)  # no row attends a key before its window
    k, v = row_range(k, lo, k.shape[-2] - lo), row_range(v, lo, v.shape[-2] - lo)  # the rule depends on i - j alone
    if triton_band.takes(q, v, causal):  # it reads key/value head h // (H / Hkv) itself
        return [(0, *triton_band.triton_band_attention(q, k, v, window=window, scale=scale, causal=causal))]
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h and kernel_device(q.device) != "cpu":  # CUDA's fused kernels take equal heads only
        group = h // hkv  # (the CPU's short runs read them as they are): a key/value head at a time,
        # its window's keys repeated for its query heads
        parts = [band_attention(q[:, j * group : (j + 1) * group], *(repeated_operand(x[:, j : j + 1].expand(
            -1, group, -1, -1)) for x in (k, v)), window=window, scale=scale, causal=causal, tile=tile)
            for j in range(hkv)]
        return [(0, torch.cat([out for out, _ in parts], 1), torch.cat([lse for _, lse in parts], 1))]
    if flash_supported(q, v) and flash_window_supported(q.device, causal):
        return [(0, *_flash_window(q, k, v, window=window, scale=scale, causal=causal))]
    q, k, v = as_computed(q, k, v)  # once: the tiles' windows overlap
    b, h, lq, _ = q.shape
    lk, dv, w = k.shape[-2], v.shape[-1], window
    after = 0 if causal else w - 1  # keys a row sees after its own position
    offset = lk - lq
    q, k, v = same_head_dim(q, k, v)
    pieces = []
    # Rows whose position is below w - 1 see every key up to themselves (plus `after`).
    head = min(lq, max(0, w - 1 - offset))
    if head:
        o, l = dense_attention(q[..., :head, :], k[..., : offset + head + after, :],
                               v[..., : offset + head + after, :], scale=scale, diagonal=offset + after)
        pieces.append((0, o[..., :dv], l))
    # Rows from `stop` on would see keys past the last one (without causal): below.
    stop = max(head, lq - after)
    tile = tile or tile_rows(w, q.device)
    row = head
    while row < stop:
        size = min(tile, stop - row)
        tiles = (stop - row) // size
        width = size + w - 1 + after
        start = offset + row - w + 1  # first key of the first tile's window
        mask = band_mask(size, w + after, q.dtype, q.device)
        if tiles == 1:  # a short run: its window is a slice (grouped key/value heads as they are)
            o, l = fused(row_range(q, row, size), row_range(k, start, width), row_range(v, start, width),
                         scale=scale, is_causal=False, mask=mask)
            pieces.append((row, without_padding(o, dv), l))
        else:  # tile t: its rows and its window (grouped key/value heads as they are: `grid_attention`)
            qt = row_grid(row_major(q), row, (tiles, size), (size, 1))
            kt, vt = (row_grid(row_major(x), start, (tiles, size), (width, 1)) for x in (k, v))
            o, l = grid_attention(qt, kt, vt, mask, None, scale=scale)
            pieces.append((row, o.reshape(b, h, tiles * size, -1)[..., :dv], l.reshape(b, h, tiles * size)))
        row += tiles * size
    if stop < lq:  # keys i - w + 1 .. Lk - 1: reversed, the first rows' problem (a dense diagonal)
        lo = max(0, offset + stop - w + 1)
        o, l = dense_attention(q[..., stop:, :].flip(-2), k[..., lo:, :].flip(-2), v[..., lo:, :].flip(-2),
                               scale=scale, diagonal=w - 1)
        pieces.append((stop, o.flip(-2)[..., :dv], l.flip(-1)))
    return pieces


def band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, causal: bool = True,
    tile: int | None = None, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window attention, queries bottom-right aligned; (out, lse) over [B, H, Lq, *], out in
    `out_dtype` (q's unless said: float32 for a partial that a union's fixed step continues)."""
    pieces = band_pieces(q, k, v, window=window, scale=scale, causal=causal, tile=tile, out_dtype=out_dtype)
    return join_rows([(out, lse) for _, out, lse in pieces], out_dtype or q.dtype)


@functools.cache
def flash_window_supported(device: torch.device, causal: bool = True) -> bool:
    """Whether this torch build's CUDA flash kernel takes a local window and computes the
    contract's band with it, queries bottom-right aligned (probed once per device and causality on
    a tiny problem against the masked math kernel); otherwise the band runs as tiles as on the CPU."""
    g = torch.Generator().manual_seed(0)
    lq, lk, w = 5, 12, 3
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).to(device, torch.bfloat16) for n in (lq, lk, lk))
    try:
        out, lse = _flash_window(q, k, v, window=w, scale=0.25, causal=causal)
    except (RuntimeError, TypeError):  # an op or an argument this build lacks
        return False
    i = torch.arange(lk - lq, lk, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    keep = (i - j < w) & (j - i < (1 if causal else w))
    mask = additive_mask(keep, torch.float32)
    ref_out, ref_lse = math_attention(q.float(), k.float(), v.float(), scale=0.25, mask=mask)
    return torch.allclose(out.float(), ref_out, atol=2e-2, rtol=2e-2) and torch.allclose(lse, ref_lse, atol=2e-2)


def _flash_window(q, k, v, *, window: int, scale: float, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA flash attention with a local window: query i sees keys i - (w - 1) .. i (.. i + w - 1
    without causal)."""
    dv = v.shape[-1]
    q, k, v = (cuda_operand(x).transpose(1, 2) for x in same_head_dim(q, k, v))  # [B, L, H, D]
    # Returns (output [B, Lq, H, D], logsumexp [B, H, Lq], rng_state, unused, debug_mask).
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal, False, scale=scale,
        window_size_left=window - 1, window_size_right=0 if causal else window - 1,
    )[:2]
    return out.transpose(1, 2)[..., :dv], lse.float()
