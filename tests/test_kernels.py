"""The structured kernels on medium shapes that reach their inner cases (many tiles, summary
row ranges, class padding, minimum distances), each against the float64 reference."""

from __future__ import annotations

import contextlib
import itertools
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import kernels
from engine.kernels import span_kernel
from engine.kernels.device import kernel_device
from engine.kernels.fixed import fused_fixed_attention
from reference import (allowed, assert_matches_far, assert_matches_reference, mask, merged_in_float64,
                       reference_attention)

SW = lambda w: {"type": "sliding_window", "window": w}  # noqa: E731
ST = lambda s: {"type": "strided", "stride": s}  # noqa: E731


def _qkv(h, lq, lk, d=16, dv=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, lq, d, generator=g).to(dtype), torch.randn(1, h, lk, d, generator=g).to(dtype),
            torch.randn(1, h, lk, dv, generator=g).to(dtype))


def _assert_matches(result, q, k, v, pattern, tol=2e-5):
    out, lse = result
    ref_out, ref_lse = reference_attention(q, k, v, pattern)
    assert_matches_reference(out, lse, ref_out, ref_lse, tol=tol)


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (300, 1000), (640, 640)])
@pytest.mark.parametrize("window,tile", [(64, 32), (64, None), (5, 7), (100, 1), (33, 300)])
def test_band_tiles(lq, lk, window, tile):
    q, k, v = _qkv(2, lq, lk)
    result = kernels.band_attention(q, k, v, window=window, scale=0.25, tile=tile)
    _assert_matches(result, q, k, v, SW(window))


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (300, 1000), (1, 1000), (40, 50), (5, 5)])
@pytest.mark.parametrize("window,tile", [(64, 32), (64, None), (5, 7), (1, None), (100, 1), (33, 300), (700, None)])
def test_band_non_causal(lq, lk, window, tile):
    """|i - j| < w: tiles whose windows reach w - 1 keys ahead, first rows on a dense diagonal,
    last w - 1 rows as the first rows' problem reversed; a window spanning the keys: every row
    among the first."""
    q, k, v = _qkv(2, lq, lk, dv=24)
    out, lse = kernels.band_attention(q, k, v, window=window, scale=0.25, causal=False, tile=tile)
    ref_out, ref_lse = reference_attention(q, k, v, SW(window), causal=False, scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("on_span_kernel", [True, False], ids=["span_kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,lq,lk", [(2, 2, 600, 600), (4, 1, 1, 700), (6, 3, 1, 300), (4, 2, 37, 700),
                                                  (8, 2, 100, 300), (1, 1, 300, 1003), (3, 3, 1, 1)])
def test_dense_attention_at_every_diagonal(monkeypatch, on_span_kernel, dtype, heads, kv_heads, lq, lk):
    """`dense_attention` with row m attending keys 0 .. m + d for d from none of them to all (below
    zero, as fixed's own blocks ask; None: every key), on the span kernel (`_span_dense`: a short
    run's query heads as rows of their key/value head, strips of DENSE_STRIP_ROWS) and on torch's
    fused calls, against float64."""
    calls = []
    if on_span_kernel:
        real = span_kernel.span_attention
        monkeypatch.setattr(span_kernel, "span_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    else:
        monkeypatch.setattr(span_kernel, "library", lambda: None)
    g = torch.Generator().manual_seed(heads + lq)
    q = torch.randn(2, heads, lq, 24, generator=g).to(dtype)
    k, v = (torch.randn(2, kv_heads, lk, 24, generator=g).to(dtype) for _ in range(2))
    scores = q.double() @ k.double().repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * 0.3
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    for diagonal in (None, -lq - 1, -5, 0, 3, lk - lq, lk):
        calls.clear()
        out, lse = kernels.dense_attention(q, k, v, scale=0.3, diagonal=diagonal)
        keep = torch.ones(lq, lk, dtype=torch.bool)
        masked = scores if diagonal is None else scores.masked_fill(~keep.tril(diagonal), -math.inf)
        ref_lse = torch.logsumexp(masked, -1)
        ref_out = (torch.softmax(masked, -1).nan_to_num(0) @ v.double().repeat_interleave(heads // kv_heads, 1))
        torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
        assert len(calls) == on_span_kernel


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (300, 1003), (640, 640)])
@pytest.mark.parametrize("stride", [8, 13, 64])
def test_strided_views(lq, lk, stride):
    q, k, v = _qkv(2, lq, lk, dv=24)
    _assert_matches(kernels.strided_attention(q, k, v, stride=stride, scale=0.25), q, k, v, ST(stride))


@pytest.mark.parametrize("lq,lk", [(133, 133), (90, 217), (1, 77)])
@pytest.mark.parametrize("causal", [True, False])
def test_one_head_and_parameters_past_the_keys(lq, lk, causal):
    """The kernels called directly (the planner would send these to dense) with one head: a window
    wider than the keys, stride 1, a stride past the keys, a block past the keys."""
    q, k, v = _qkv(1, lq, lk, dv=24)
    calls = {
        "band": (lambda: kernels.band_attention(q, k, v, window=lk + 50, scale=0.25, causal=causal), SW(lk + 50)),
        "stride_1": (lambda: kernels.strided_attention(q, k, v, stride=1, scale=0.25, causal=causal), ST(1)),
        "stride_past": (lambda: kernels.strided_attention(q, k, v, stride=lk + 3, scale=0.25, causal=causal), ST(lk + 3)),
        "block_past": (lambda: kernels.fixed_attention(q, k, v, block=lk + 9, summary=2, scale=0.25, causal=causal),
                       {"type": "fixed", "block": lk + 9, "summary": 2}),
    }
    for name, (call, pattern) in calls.items():
        out, lse = call()
        ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal, scale=0.25)
        assert_matches_reference(out, lse, ref_out, ref_lse, tol=2e-5)


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (300, 1003), (70, 300), (1, 500)])
@pytest.mark.parametrize("window,strides", [(16, (16,)), (40, (16,)), (16, (40,)), (3, (64,)), (400, (7,)),
                                            (5, (4, 6)), (3, (7, 64, 9)), (40, (13, 26 * 3))])
@pytest.mark.parametrize("causal", [True, False])
def test_band_strided_union(lq, lk, window, strides, causal):
    """A window with one stride, or several (each skipping the keys at an earlier one's multiples;
    strides sharing factors, a stride wider than the short runs' rows)."""
    q, k, v = _qkv(2, lq, lk)
    out, lse = kernels.band_strided_attention(q, k, v, window=window, strides=strides, scale=0.25, causal=causal)
    pattern = {"type": "union", "patterns": [SW(window), *map(ST, strides)]}
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal, scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("lq,lk", [(1000, 1000), (517, 700), (300, 1003), (1024, 1024), (1, 1003), (16, 1000)])
@pytest.mark.parametrize("block,summary", [(16, 4), (32, 32), (10, 1), (64, 8)])
@pytest.mark.parametrize("ranges", [None, 1, 7])  # the kernel's choice (per block at l >= 64); ranges: one, ragged
def test_fixed_summary_ranges(lq, lk, block, summary, ranges):
    q, k, v = _qkv(2, lq, lk, dv=8)
    result = fused_fixed_attention(q, k, v, block=block, summary=summary, scale=1 / math.sqrt(16), ranges=ranges)
    _assert_matches(result, q, k, v, {"type": "fixed", "block": block, "summary": summary})


@pytest.mark.parametrize("lq,lk,block,heads,budget,path", [
    (600, 65536, 16, (2, 2), None, "shared"), (256, 4096, 16, (2, 2), None, "shared"),  # after many keys
    (2048, 2048, 64, (2, 2), None, "shared"), (2048, 2048, 64, (8, 2), None, "per block"),  # grouped: folded
    (4096, 4096, 256, (1, 1), None, "per block"),  # a block's call of 256 rows: 64 at a time
    (3072, 3072, 16, (4, 2), None, "shared"), (3072, 3072, 16, (2, 2), 2000, "ranges"),  # a mask over budget
    (512, 512, 16, (2, 2), None, "ranges"), (300, 1003, 16, (2, 2), None, "ranges"),  # the mask would not pay
    (1536, 1536, 16, (2, 2), None, "ranges"), (3072, 3072, 16, (2, 2), None, "shared"),  # calls' rows against keys
    (300, 1003, 64, (2, 2), None, "per block"), (40, 1003, 16, (2, 2), None, "per block")])  # 3 blocks
def test_fixed_summary_paths_on_the_cpu(monkeypatch, lq, lk, block, heads, budget, path):
    """On the CPU causal fixed's summary keys go under one shared mask where the calls compute at
    least SHARED_MASK_WORK times its elements within MASK_BUDGET and it beats the other paths
    (`_shared_mask_beats_plain`: not for blocks of CALL_ROWS rows and more whose calls have
    CPU_SMALL_CALL_ROWS rows, grouped heads folded into rows; for smaller blocks only where a call
    has fewer rows than an average row's positions); else small blocks in row ranges, larger or
    few ones per block unmasked."""
    from engine.kernels import fixed

    _without_span_kernel(monkeypatch)
    if budget:
        monkeypatch.setattr(fixed, "MASK_BUDGET", budget)
    taken, per_block = [], fixed._summary_per_block
    monkeypatch.setattr(fixed, "_summary_per_block", lambda *a, **kw: taken.append(
        "shared" if kw["shared"] else "per block") or per_block(*a, **kw))
    h, hkv = heads
    q, k, v = _qkv(h, lq, lk, d=16, dv=8)
    k, v = k[:, :hkv], v[:, :hkv]
    result = kernels.fixed_attention(q, k, v, block=block, summary=block // 8, scale=0.25)
    assert (taken or ["ranges"]) == [path]
    _assert_matches(result, q, k, v, {"type": "fixed", "block": block, "summary": block // 8})


def _each_structured_kernel(q, k, v, *, window):
    """(result, pattern) of the band, strided, fixed and band+strided kernels on the same inputs."""
    fixed = {"type": "fixed", "block": 32, "summary": 4}
    yield kernels.band_attention(q, k, v, window=window, scale=0.25), SW(window)
    yield kernels.strided_attention(q, k, v, stride=16, scale=0.25), ST(16)
    yield kernels.fixed_attention(q, k, v, block=32, summary=4, scale=0.25), fixed
    yield (kernels.band_strided_attention(q, k, v, window=32, strides=(32,), scale=0.25),
           {"type": "union", "patterns": [SW(32), ST(32)]})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_half_precision(dtype):
    q, k, v = _qkv(2, 600, 600, dtype=dtype)
    for result, pattern in _each_structured_kernel(q, k, v, window=64):
        _assert_matches(result, q, k, v, pattern, tol=3e-2)


@pytest.mark.parametrize("elements", [7, 200, 1 << 17])
def test_half_precision_merges_in_row_chunks(monkeypatch, elements):
    """On the CPU a half-precision output merges HALF_MERGE_ELEMENTS at a time (a row, two rows,
    all rows here): the same bits as one float32 lerp rounded once, in place (out is a's) too, and
    the float64 merge within bfloat16's rounding; a row with no key in either stays zero, -inf."""
    from engine.kernels import merge

    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 37, 16)
    a_out, b_out = (torch.randn(shape, generator=g).bfloat16() for _ in range(2))
    a_lse, b_lse = (torch.randn(shape[:-1], generator=g) * 4 for _ in range(2))
    a_lse[..., 0] = b_lse[..., 0] = float("-inf")
    a_out[..., 0, :] = b_out[..., 0, :] = 0
    weight = torch.sigmoid(b_lse - a_lse).nan_to_num(0.0)[..., None]
    expected = torch.lerp(a_out.float(), b_out.float(), weight).bfloat16()
    top = torch.maximum(a_lse, b_lse).double()[..., None]
    wa, wb = ((x.double()[..., None] - top).exp().nan_to_num(0.0) for x in (a_lse, b_lse))
    exact = (a_out.double() * wa + b_out.double() * wb) / (wa + wb).clamp_min(1e-300)
    monkeypatch.setattr(merge, "HALF_MERGE_ELEMENTS", elements)
    out, lse = torch.empty_like(a_out), torch.empty_like(a_lse)
    merge.torch_merge_to(out, lse, (a_out, a_lse), (b_out, b_lse))
    assert torch.equal(out, expected) and torch.equal(lse, torch.logaddexp(a_lse, b_lse))
    torch.testing.assert_close(out.double(), exact, atol=1e-2, rtol=1e-2)
    assert (out[..., 0, :] == 0).all() and (lse[..., 0] == float("-inf")).all()
    merge.torch_merge_to(a_out, a_lse, (a_out, a_lse), (b_out, b_lse))
    assert torch.equal(a_out, expected) and torch.equal(a_lse, lse)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_half_precision_merge_of_no_rows(monkeypatch, device):
    """A half-precision merge of no query rows writes nothing, on either device's rule."""
    from engine.kernels import merge

    monkeypatch.setattr(merge, "kernel_device", lambda _: device)
    part = (torch.zeros(2, 3, 0, 8, dtype=torch.bfloat16), torch.zeros(2, 3, 0))
    out, lse = torch.empty(2, 3, 0, 8, dtype=torch.bfloat16), torch.empty(2, 3, 0)
    merge.torch_merge_to(out, lse, part, part)
    assert out.shape == (2, 3, 0, 8) and lse.shape == (2, 3, 0)


def test_row_pieces_join_straight_into_the_results_dtype():
    """Pieces computed in float32 join into a half-precision output in one converting copy: each
    row rounded once, exactly as a float32 join converted after, and the log-sum-exp stays float32.
    The band and strided kernels hand such a join back in q's dtype."""
    from engine.kernels.merge import join_rows

    g = torch.Generator().manual_seed(5)
    parts = [(torch.randn(2, 3, rows, 8, generator=g), torch.randn(2, 3, rows, generator=g)) for rows in (5, 24, 7)]
    out, lse = join_rows(parts, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(out, torch.cat([o for o, _ in parts], -2).bfloat16())
    assert torch.equal(lse, torch.cat([l for _, l in parts], -1))
    q, k, v = _qkv(1, 300, 300, dtype=torch.bfloat16)
    band_out, _ = kernels.band_attention(q, k, v, window=64, scale=0.25)  # first rows, then tiles
    strided_out, _ = kernels.strided_attention(q, k, v, stride=4, scale=0.25)  # chunks (one if native)
    assert band_out.dtype == strided_out.dtype == torch.bfloat16


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (300, 1003)])
@pytest.mark.parametrize("min_distance", [0, 1, 20, 64])
def test_strided_many_chunks(monkeypatch, lq, lk, min_distance):
    """Tiny chunks on torch's kernel: every chunk boundary, dummy lead row and skipped class row is
    crossed."""
    _without_span_kernel(monkeypatch)
    monkeypatch.setattr("engine.kernels.strided.chunk_rows", lambda rows, dtype: 4)
    monkeypatch.setattr("engine.kernels.strided.MAX_CHUNKS", 30)
    q, k, v = _qkv(2, lq, lk)
    result = kernels.strided_attention(q, k, v, stride=13, scale=0.25, min_distance=min_distance)
    assert_matches_far(result, q, k, v, ST(13), min_distance)


def test_masked_class_chunks_read_key_rows_in_multiples_of_16(monkeypatch):
    """torch's CPU kernel runs key lengths of multiples of 16 faster than those just below: a
    union's stride, which skips the window's keys, reads 128 key class rows where it sees 127 (the
    extra one masked), never past the last whole class row."""
    seen = _strided_calls(monkeypatch, lambda q, k, v, causal: k.shape[-2])
    for lk in (2048, 2047):  # 128 whole class rows of 16, then 127
        q, k, v = _qkv(2, lk, lk)
        seen.clear()
        result = kernels.strided_attention(q, k, v, stride=16, scale=0.25, min_distance=16)
        assert_matches_far(result, q, k, v, ST(16), 16)
        assert seen[-1] == (128 if lk == 2048 else 127) and all(width % 16 == 0 for width in seen[:-1])


@pytest.mark.parametrize("native_half,dtype,stride,n,min_distance,calls", [
    (True, torch.bfloat16, 4, 1200, 0, [(256, True), (44, False)]),  # natively: chunks of 256 rows
    (False, torch.bfloat16, 4, 1200, 0, [(64, True)] + [(64, False)] * 3 + [(44, False)]),  # in float32: of 64
    (False, torch.float32, 2, 1600, 0, [(800, True)]),  # a square of 768 rows or more: one causal call
    (False, torch.float32, 2, 1601, 0, [(800, True), (1, False)]),  # its whole class rows' square, then the last
    (False, torch.float32, 2, 2048, 2, [(1023, True)]),  # also where a mask could read 1024 keys
    (True, torch.bfloat16, 16, 2048, 16, [(127, False)]),  # 127 rows, 128 keys read: masked
    (True, torch.bfloat16, 4, 500, 0, [(125, True)]),  # 125 rows, 125 keys: no multiple of 16 to read
])
def test_strided_chunks_by_dtype_and_square(monkeypatch, native_half, dtype, stride, n, min_distance, calls):
    """Where half precision runs natively (AMX) class rows go in chunks of NATIVE_HALF_CHUNK_ROWS;
    a square's first chunk is a causal call, unmasked; a causal square of CPU_CAUSAL_SKIP_ROWS rows
    and more is one call (a partial last class row apart); a smaller square that can read its keys
    to a multiple of 16 goes under a mask. Each against the reference."""
    seen = _strided_calls(monkeypatch, lambda q, k, v, causal: (q.shape[-2], causal))
    _bfloat16_native(monkeypatch, native_half)
    q, k, v = _qkv(1, n, n, dtype=dtype)
    result = kernels.strided_attention(q, k, v, stride=stride, scale=0.25, min_distance=min_distance)
    assert seen == calls
    if dtype == torch.float32:
        assert_matches_far(result, q, k, v, ST(stride), min_distance)
    else:
        assert_matches_far(result, *(x.float() for x in (q, k, v)), ST(stride), min_distance, tol=2e-2)


@pytest.mark.parametrize("native_half,dtype,stride,lq,lk,causal,min_distance,max_bytes,class_major", [
    (False, torch.float32, 4, 96, 96, True, 0, 24576, True),  # 24 query class rows: K and V copied class by class
    (False, torch.float32, 4, 96, 96, True, 0, 24575, False),  # copies over the byte budget: views
    (False, torch.float32, 4, 92, 92, True, 0, 1 << 30, False),  # 23 rows: views
    (False, torch.float32, 4, 97, 130, True, 4, 1 << 30, True),  # Lq < Lk, a partial last class row, a union's distance
    (False, torch.float32, 4, 40, 130, True, 0, 1 << 30, True),  # 10 query class rows after 32 key class rows: copied
    (False, torch.float32, 4, 14, 130, True, 0, 1 << 30, False),  # 4 query class rows, read once: views
    (False, torch.float32, 4, 96, 96, False, 0, 1 << 30, True),  # without causal: every class key, in one call
    (False, torch.float32, 4, 92, 92, False, 4, 1 << 30, False),
    (False, torch.bfloat16, 4, 96, 96, True, 0, 1 << 30, True),  # half precision computed in float32: copied too
    (True, torch.bfloat16, 4, 96, 96, True, 0, 1 << 30, False),  # natively: views (its chunks are few)
])
def test_strided_reads_keys_class_major_from_many_rows(monkeypatch, native_half, dtype, stride, lq, lk, causal,
                                                      min_distance, max_bytes, class_major):
    """From CLASS_MAJOR_KEY_ROWS key class rows read (here 24), where the calls read each key more
    than once (more query class rows than CPU_QUERY_BLOCK_ROWS, here 4), each kernel call reads K
    and V from class-by-class copies, whose class rows are adjacent, where they are not computed
    natively in half precision and fit CLASS_MAJOR_MAX_BYTES (2 heads x 96 rows x 16 features x 4
    bytes, twice, is 24576); else the views, whose class rows lie s rows apart. Each against the
    reference."""
    from engine.kernels import strided

    layouts = _strided_calls(monkeypatch, lambda q, k, v, causal: {x.stride(-2) == x.shape[-1] for x in (k, v)})
    monkeypatch.setattr(strided, "CLASS_MAJOR_KEY_ROWS", 24)
    monkeypatch.setattr(strided, "CPU_QUERY_BLOCK_ROWS", 4)
    monkeypatch.setattr(strided, "CLASS_MAJOR_MAX_BYTES", max_bytes)
    _bfloat16_native(monkeypatch, native_half)
    q, k, v = _qkv(2, lq, lk, dtype=dtype)
    result = kernels.strided_attention(q, k, v, stride=stride, scale=0.25, causal=causal, min_distance=min_distance)
    assert layouts and all(layout == {class_major} for layout in layouts)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_matches_far(result, *(x.float() for x in (q, k, v)), ST(stride), min_distance, causal=causal, tol=tol)


@pytest.mark.parametrize("causal", [True, False])
def test_strided_copies_a_repeated_key_head_once(monkeypatch, causal):
    """One key/value head repeated for several query heads (stride 0, as `attention` passes a
    per-head run's) is copied class by class once, and stays repeated."""
    from engine.kernels import strided

    layouts = _strided_calls(monkeypatch,
                             lambda q, k, v, causal: {(x.stride(0), x.stride(-2) == x.shape[-1]) for x in (k, v)})
    monkeypatch.setattr(strided, "CLASS_MAJOR_KEY_ROWS", 24)
    monkeypatch.setattr(strided, "CPU_QUERY_BLOCK_ROWS", 4)
    q, k, v = _qkv(3, 100, 100)
    k, v = (x[:, :1].expand(-1, 3, -1, -1) for x in (k, v))
    result = kernels.strided_attention(q, k, v, stride=4, scale=0.25, causal=causal)
    assert layouts and all(layout == {(0, True)} for layout in layouts)
    assert_matches_far(result, q, k, v, ST(4), 0, causal=causal)


@pytest.mark.parametrize("heads,key_heads,lq,lk,min_distance,dtype,native_half,group_bytes,chunk,classes", [
    (2, 2, 320, 320, 0, torch.float32, False, 30720, 8, [3] * 5 + [3] * 5 + [2] * 5),  # 3 classes fit 30720
    (2, 2, 320, 320, 0, torch.float32, False, 1 << 30, 8, [8] * 5),  # every class fits: no groups
    (2, 2, 320, 320, 0, torch.float32, False, 30720, 64, [8]),  # one chunk: no groups
    (2, 2, 200, 323, 0, torch.float32, False, 30720, 8, [3] * 4 + [3] * 4 + [2] * 4),  # Lq < Lk, a partial row
    (2, 2, 320, 320, 9, torch.float32, False, 30720, 8, [3] * 5 + [3] * 5 + [2] * 5),  # a union's distance
    (4, 2, 320, 320, 0, torch.float32, False, 30720, 8, [3] * 5 + [3] * 5 + [2] * 5),  # 4 query heads on 2
    (2, "repeated", 320, 320, 0, torch.float32, False, 30720, 8, [4] * 5 + [4] * 5),  # a stride-0 head: counted once
    (2, 2, 320, 320, 0, torch.bfloat16, False, 30720, 8, [3] * 5 + [3] * 5 + [2] * 5),  # computed in float32
    (2, 2, 320, 320, 0, torch.bfloat16, True, 30720, 8, [4] * 5 + [4] * 5),  # natively: half the bytes
])
def test_strided_goes_a_class_group_at_a_time(monkeypatch, heads, key_heads, lq, lk, min_distance, dtype, native_half,
                                              group_bytes, chunk, classes):
    """Several chunks over classes whose keys and values outgrow CLASS_GROUP_BYTES go a group of
    consecutive classes at a time, each group's chunks in turn, into one result; one chunk, or keys
    within the budget, take every class in each call. Here stride 8 and 40 key class rows of 16
    features: 5120 bytes a class and key/value head in float32, K and V twice that. Each against
    the reference."""
    from engine.kernels import strided

    calls = _strided_calls(monkeypatch, lambda q, k, v, causal: q.shape[1])
    monkeypatch.setattr(strided, "CLASS_GROUP_BYTES", group_bytes)
    monkeypatch.setattr(strided, "chunk_rows", lambda rows, dtype: chunk)
    _bfloat16_native(monkeypatch, native_half)
    q, k, v = _qkv(heads, lq, lk, dtype=dtype)
    k, v = (x[:, :1].expand(-1, heads, -1, -1) if key_heads == "repeated" else x[:, :key_heads] for x in (k, v))
    result = kernels.strided_attention(q, k, v, stride=8, scale=0.25, min_distance=min_distance)
    assert calls == classes
    k, v = (x.repeat_interleave(heads // x.shape[1], 1) for x in (k, v))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_matches_far(result, *(x.float() for x in (q, k, v)), ST(8), min_distance, tol=tol)


@pytest.mark.parametrize("lq,lk,group_bytes,chunk,converted,classes", [
    (320, 320, 30720, 8, [3] * 3 + [3] * 3 + [2] * 3, [3] * 5 + [3] * 5 + [2] * 5),  # several chunks
    (320, 320, 30720, 64, [3] * 3 + [3] * 3 + [2] * 3, [3, 3, 2]),  # one chunk: in groups too, to convert in cache
    (200, 323, 30720, 8, [3] * 3 + [3] * 3 + [2] * 3, [3] * 4 + [3] * 4 + [2] * 4),  # Lq < Lk, own keys merged after
    (320, 320, 1 << 30, 8, [2] * 3, [8] * 5),  # every class fits: q, K and V converted whole, once
])
def test_strided_converts_half_precision_a_class_group_at_a_time(monkeypatch, lq, lk, group_bytes, chunk, converted,
                                                                 classes):
    """Where bfloat16 is computed in float32 and its classes' keys and values (in float32) outgrow
    CLASS_GROUP_BYTES, a long run's K, V and q are converted a group of classes at a time, just
    before the group's calls, none of them whole beforehand; the calls read float32, and the result
    comes back in bfloat16, rounded once (in float32 where the keys of a partial last class row,
    each seen by its own position alone, merge into it after). Classes within the budget are
    converted whole (2 heads). Stride 8 and 40 key class rows of 16 features: 5120 bytes a class
    and head in float32."""
    from engine.kernels import strided

    calls = _strided_calls(monkeypatch, lambda q, k, v, causal: (q.shape[1], q.dtype, k.dtype, v.dtype))
    seen = []
    real = strided.as_computed

    def spy(*tensors):
        seen.extend(x.shape[1] for x in tensors if x.dtype == torch.bfloat16)
        return real(*tensors)

    monkeypatch.setattr(strided, "as_computed", spy)
    monkeypatch.setattr(strided, "CLASS_GROUP_BYTES", group_bytes)
    monkeypatch.setattr(strided, "chunk_rows", lambda rows, dtype: chunk)
    _bfloat16_native(monkeypatch, False)
    q, k, v = _qkv(2, lq, lk, dtype=torch.bfloat16)
    out, lse = kernels.strided_attention(q, k, v, stride=8, scale=0.25)
    assert calls == [(n, torch.float32, torch.float32, torch.float32) for n in classes]
    assert seen == converted
    assert out.dtype == (torch.bfloat16 if lk % 8 == 0 else torch.float32)
    assert_matches_far((out, lse), *(x.float() for x in (q, k, v)), ST(8), 0, tol=2e-2)


def _bfloat16_native(monkeypatch, native: bool) -> None:
    """Run bfloat16 as a CPU with AMX does (natively) or as one without (computed in float32, its
    inputs converted once): every rule that asks `dense.cpu_upcast_dtypes` sees the same CPU."""
    from engine.kernels import dense

    monkeypatch.setattr(dense, "cpu_upcast_dtypes", lambda: frozenset() if native else frozenset({torch.bfloat16}))


def _strided_calls(monkeypatch, describe) -> list:
    """The torch kernel calls strided makes from now on, each recorded as `describe(q, k, v,
    is_causal)` of its `grid_attention` arguments (the call itself still made); the span kernel is
    off, as where it cannot be built (`_without_span_kernel`)."""
    from engine.kernels import strided

    _without_span_kernel(monkeypatch)
    calls = []
    real = strided.grid_attention

    def spy(q, k, v, mask, empty, **kwargs):
        calls.append(describe(q, k, v, kwargs.get("is_causal", False)))
        return real(q, k, v, mask, empty, **kwargs)

    monkeypatch.setattr(strided, "grid_attention", spy)
    return calls


def _without_span_kernel(monkeypatch) -> None:
    """Long strided and fixed runs and bands on torch's kernel, as on a host where the span kernel
    cannot be built (`span_kernel.library` None)."""

    monkeypatch.setattr(span_kernel, "library", lambda: None)


def test_freed_cpu_memory_is_kept_for_reuse_on_glibc():
    assert kernels.KEEPS_FREED_MEMORY is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


# In a fresh process: a worker thread (as the service's engine worker) allocates 48 MB, then glibc
# reports its heaps. Without one shared arena the thread's block lives in a heap of its own.
_WORKER_HEAPS = """
import ctypes, os, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
import torch
import engine.kernels
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
def heaps_while_holding():
    block = torch.ones(12_000_000)
    fd, path = tempfile.mkstemp()
    os.close(fd)
    stream = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    with open(path) as f:
        report = f.read()
    os.unlink(path)
    return report.count("<heap nr=")
print(ThreadPoolExecutor(1).submit(heaps_while_holding).result())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's arenas")
def test_worker_threads_allocate_from_the_one_reused_arena():
    """A worker thread's large blocks come from the main arena, whose freed memory is kept: in an
    arena of its own they were unmapped when freed and page-faulted again at every call."""
    run = subprocess.run([sys.executable, "-c", _WORKER_HEAPS], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert int(run.stdout) == 1, run.stdout


def test_kernels_take_non_contiguous_inputs():
    """[B, L, H, D] tensors viewed as [B, H, L, D] (as a model's projections give them), batch of 2."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 300, 2, 16, generator=g).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    for result, pattern in _each_structured_kernel(q, k, v, window=40):
        _assert_matches(result, q, k, v, pattern)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_slow_half_precision_is_computed_in_float32_on_the_cpu(dtype):
    """A plan converts q, k, v whole, unless its steps convert what they read (fused does)."""
    from engine.kernels.dense import cpu_upcast_dtypes, fused
    from engine.planner import Plan

    seen = []

    def step(q, k, v, *, scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        return kernels.dense_attention(q, k, v, scale=scale)

    q = torch.randn(1, 2, 8, 4).to(dtype)
    Plan("test", (step,))(q, q, q, 0.5)
    Plan("test", (step,), converts_in_steps=True)(q, q, q, 0.5)
    converted = torch.float32 if dtype in cpu_upcast_dtypes() else dtype
    assert seen == [(converted,) * 3, (dtype,) * 3]
    out, _ = fused(q, q, q, scale=0.5, is_causal=False, mask=torch.zeros(8, 8, dtype=dtype))
    assert out.dtype == converted


def test_a_union_short_run_takes_grouped_heads_whatever_it_converts():
    """12 rows of strided(20) beside a window: more than half the classes, so the plan converts K
    and V whole, and still fewer rows than the stride, so the steps take grouped heads as they are
    on CUDA too."""
    from engine.patterns import parse_pattern
    from engine.planner import plan

    union = plan(parse_pattern({"type": "union", "patterns": [SW(16), ST(20)]}), 12, 4096, True, "cuda")
    assert union.grouped_kv_on_cuda and not union.converts_in_steps


FX = lambda l, c: {"type": "fixed", "block": l, "summary": c}  # noqa: E731
SHORT_RUN_PATTERNS = [ST(64), ST(7), FX(128, 8), FX(10, 3), {"type": "union", "patterns": [SW(128), ST(128)]},
                      {"type": "union", "patterns": [SW(5), FX(16, 2), ST(33)]},
                      {"type": "union", "patterns": [SW(9), ST(33), ST(20)]},
                      {"type": "union", "patterns": [FX(16, 2), FX(24, 3)]}]  # the masked kernel


@pytest.mark.parametrize("pattern", SHORT_RUN_PATTERNS, ids=[str(i) for i in range(len(SHORT_RUN_PATTERNS))])
@pytest.mark.parametrize("lq,lk", [(1, 2001), (3, 2001), (64, 2048), (17, 300)])
@pytest.mark.parametrize("causal", [True, False])
def test_short_runs_in_model_memory_order(pattern, lq, lk, causal):
    """Decode and small chunks over long keys; inputs in a model's [B, L, H, D] memory order."""
    from engine import attention

    g = torch.Generator().manual_seed(lq)
    q = torch.randn(1, lq, 2, 16, generator=g).transpose(1, 2)
    k, v = (torch.randn(1, lk, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    out, lse = attention(q, k, v, pattern, scale=0.25, causal=causal, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal, scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


THREE = {"type": "union", "patterns": [SW(256), ST(128), FX(128, 8)]}
NO_KERNEL = {"type": "union", "patterns": [SW(256), FX(128, 2), FX(192, 2)]}  # two fixed members
STRIDES = {"type": "union", "patterns": [SW(256), ST(128), ST(96)]}


@pytest.mark.parametrize("pattern,lq,lk,causal,backend", [
    (ST(64), 1, 65536, True, "strided"),  # structured kernels take short runs too
    (FX(128, 8), 64, 65536, True, "fixed"),
    ({"type": "union", "patterns": [SW(128), ST(128)]}, 1, 65536, True, "band+strided"),
    ({"type": "union", "patterns": [FX(128, 8), SW(256)]}, 16384, 16384, True, "band+fixed"),
    (THREE, 16384, 16384, True, "band+strided+fixed"),  # fixed's keys off the stride's
    (THREE, 1, 65536, True, "band+strided+fixed"),
    ({"type": "union", "patterns": [FX(128, 8), ST(128)]}, 4096, 4096, True, "strided+fixed"),
    ({"type": "union", "patterns": [FX(128, 8), ST(128)]}, 4096, 4096, False, "strided+fixed"),
    (ST(64), 16, 65536, False, "strided"),  # non-causal: each class attends all of itself
    (STRIDES, 1, 65536, True, "band+strided"),  # each stride skips an earlier one's multiples
    (STRIDES, 16384, 16384, False, "band+strided"),
    ({"type": "union", "patterns": [ST(3), ST(5)]}, 64, 65536, True, "strided"),
    ({"type": "union", "patterns": [ST(3), FX(64, 4), ST(5)]}, 4096, 4096, True, "strided+fixed"),
    (SW(256), 16384, 16384, False, "band"),  # reaching both ways
    ({"type": "union", "patterns": [ST(128), SW(128)]}, 16384, 16384, False, "band+strided"),
    ({"type": "union", "patterns": [SW(256), FX(128, 8)]}, 16384, 16384, False, "band+fixed"),
    (NO_KERNEL, 1, 65536, True, "masked"),
    (NO_KERNEL, 16384, 16384, False, "masked"),
    # Small problems of unions (at most SMALL_KEYS = 128 keys; a union with fixed and a stride 256
    # over at most SMALL_KEYS^2 mask elements): one masked call, a stride on its own kernel. Fixed
    # alone, windows and a window with fixed: test_small_problems_and_short_runs_on_the_span_kernel,
    # and without it test_small_problems_and_short_runs_without_the_span_kernel.
    ({"type": "union", "patterns": [SW(16), ST(16)]}, 1, 128, False, "masked"),
    ({"type": "union", "patterns": [SW(16), ST(16)]}, 1, 129, False, "band+strided"),
    ({"type": "union", "patterns": [SW(32), ST(32), FX(64, 4)]}, 100, 100, True, "masked"),
    ({"type": "union", "patterns": [ST(8), FX(32, 4)]}, 16, 256, False, "masked"),
    (ST(8), 128, 128, False, "strided"),
    ({"type": "union", "patterns": [SW(128), ST(128)]}, 1, 4096, True, "band+strided"),  # no fixed member
    ({"type": "union", "patterns": [SW(128), ST(128)]}, 1, 512, True, "band+strided"),
    # A causal chunk of strides alone, the smallest at most TINY_STRIDE = 3, on the CPU: one or two
    # class rows of one stride, 2 to 2s rows of a union of strides, take one masked call.
    (ST(3), 3, 65536, True, "masked"),
    (ST(3), 6, 512, True, "masked"),
    (ST(2), 2, 4096, True, "masked"),
    ({"type": "union", "patterns": [ST(3), ST(5)]}, 2, 16384, True, "masked"),
    ({"type": "union", "patterns": [ST(3), ST(5)]}, 6, 16384, True, "masked"),
    ({"type": "union", "patterns": [ST(3), ST(5)]}, 1, 16384, True, "strided"),
    ({"type": "union", "patterns": [ST(3), ST(5)]}, 7, 16384, True, "strided"),
    (ST(3), 2, 65536, True, "strided"),  # fewer rows than the stride: a short run of its own
    (ST(3), 7, 65536, True, "strided"),  # past two class rows
    (ST(3), 3, 65536, False, "strided"),  # causal only
    (ST(4), 4, 65536, True, "strided"),
    # A union of strides whose smallest s is 4 or 5 (TINY_UNION_STRIDE): s to 2s rows.
    ({"type": "union", "patterns": [ST(4), ST(6)]}, 4, 65536, True, "masked"),
    ({"type": "union", "patterns": [ST(5), ST(64)]}, 10, 4096, True, "masked"),
    ({"type": "union", "patterns": [ST(4), ST(6)]}, 3, 65536, True, "strided"),  # fewer rows than s: mixed
    ({"type": "union", "patterns": [ST(5), ST(7)]}, 11, 65536, True, "strided"),
    ({"type": "union", "patterns": [ST(6), ST(9)]}, 6, 65536, True, "strided"),
    ({"type": "union", "patterns": [ST(4), ST(6)]}, 4, 65536, False, "masked"),  # a union: causal or not
    ({"type": "union", "patterns": [ST(3), ST(64)]}, 2, 16384, False, "masked"),
    ({"type": "union", "patterns": [ST(5), ST(64)]}, 2, 16384, False, "strided"),
    (ST(5), 5, 65536, True, "strided"),  # a stride alone: mixed
    ({"type": "union", "patterns": [ST(3), SW(8)]}, 3, 65536, True, "band+strided"),  # strides alone only
])
def test_planner_kernel_choice(pattern, lq, lk, causal, backend):
    from engine.patterns import parse_pattern
    from engine.planner import plan

    assert plan(parse_pattern(pattern), lq, lk, causal, "cpu").backend == backend


@pytest.mark.parametrize("pattern,lq,lk,backend", [
    (FX(16, 2), 64, 64, "masked"),  # fixed alone over at most SMALL_KEYS / 2 = 64 keys
    (FX(16, 2), 65, 65, "fixed"),
    (FX(16, 2), 128, 128, "fixed"),
    (SW(16), 32, 32, "band"),  # a window keeps the band at any size
    (SW(16), 128, 128, "band"),
    (FX(128, 8), 2, 2048, "fixed"),  # a few rows of fixed alone keep its plan
    (FX(16, 2), 16, 1024, "fixed"),
    # a few rows of a union with fixed past its small problems, and one row: structured
    ({"type": "union", "patterns": [ST(128), FX(128, 8)]}, 2, 1024, "strided+fixed"),
    ({"type": "union", "patterns": [ST(128), FX(128, 8)]}, 16, 1024, "strided+fixed"),
    ({"type": "union", "patterns": [ST(8), FX(32, 4)]}, 16, 257, "strided+fixed"),
    (THREE, 2, 768, "band+strided+fixed"),
    ({"type": "union", "patterns": [ST(128), FX(128, 8)]}, 1, 768, "strided+fixed"),
    (THREE, 1, 768, "band+strided+fixed"),
    (THREE, 1, 16384, "band+strided+fixed"),
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 1, 300, "band+fixed"),  # no stride
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 16, 1024, "band+fixed"),
    ({"type": "union", "patterns": [SW(128), ST(128)]}, 16, 1024, "band+strided"),  # no fixed member
    # a small union with fixed: with a window and a stride, masked over at most 2 * SMALL_KEYS = 256
    # keys; with a stride alone, 256 keys and SMALL_KEYS^2 mask elements; a window and fixed over at
    # most SMALL_KEYS / 2 = 64, one row never
    ({"type": "union", "patterns": [SW(16), ST(16), FX(32, 4)]}, 256, 256, "masked"),
    ({"type": "union", "patterns": [SW(16), ST(16), FX(32, 4)]}, 1, 256, "masked"),
    ({"type": "union", "patterns": [SW(16), ST(16), FX(32, 4)]}, 257, 257, "band+strided+fixed"),
    ({"type": "union", "patterns": [ST(16), FX(16, 2)]}, 128, 128, "masked"),
    ({"type": "union", "patterns": [ST(16), FX(16, 2)]}, 129, 129, "strided+fixed"),
    ({"type": "union", "patterns": [ST(16), FX(16, 2)]}, 64, 256, "masked"),
    ({"type": "union", "patterns": [ST(16), FX(16, 2)]}, 65, 256, "strided+fixed"),
    ({"type": "union", "patterns": [SW(16), FX(16, 2)]}, 64, 64, "masked"),
    ({"type": "union", "patterns": [SW(16), FX(16, 2)]}, 2, 64, "masked"),
    ({"type": "union", "patterns": [SW(16), FX(16, 2)]}, 65, 65, "band+fixed"),
    ({"type": "union", "patterns": [SW(16), FX(16, 2)]}, 1, 64, "band+fixed"),
])
@pytest.mark.parametrize("causal", [True, False])
def test_small_problems_and_short_runs_on_the_span_kernel(pattern, lq, lk, backend, causal):
    """Where the span kernel is built (the band and fixed's steps on it), causal or not: fixed alone
    takes one masked call over at most SMALL_KEYS / 2 keys and a window never, a union with fixed
    over fewer than elsewhere; short runs and decode rows keep the structured plan."""
    from engine.patterns import parse_pattern
    from engine.planner import plan

    if span_kernel.library() is None:
        pytest.skip("no C++ compiler to build the span kernel")
    assert plan(parse_pattern(pattern), lq, lk, causal, "cpu").backend == backend


@pytest.mark.parametrize("pattern,lq,lk,causal,backend", [
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 1, 1024, True, "masked"),
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 16, 1024, True, "masked"),
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 2, 1025, True, "band+fixed"),
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 17, 1024, True, "band+fixed"),  # past a short run
    ({"type": "union", "patterns": [ST(128), FX(128, 8)]}, 2, 2048, True, "masked"),
    ({"type": "union", "patterns": [ST(128), FX(128, 8)]}, 2, 2049, True, "strided+fixed"),
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 1, 22401, True, "masked"),  # 128 + 175 * 8 + 1 keys
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 1, 22529, True, "band+fixed"),  # 128 + 176 * 8 + 1
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 1, 22401, False, "masked"),  # one row: causal or not
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 1, 22529, False, "band+fixed"),
    ({"type": "union", "patterns": [ST(128), FX(128, 8)]}, 1, 16384, True, "masked"),
    ({"type": "union", "patterns": [ST(128), FX(128, 8)]}, 1, 65536, True, "strided+fixed"),
    (THREE, 1, 16384, True, "masked"),  # 256 + 128 + 127 * 8 + 128
    (THREE, 1, 20480, True, "band+strided+fixed"),
    (THREE, 16, 2048, True, "masked"),
    ({"type": "union", "patterns": [SW(128), FX(128, 8)]}, 2, 1024, False, "band+fixed"),  # a few rows: causal only
    # Small problems: fixed and a non-causal window over at most SMALL_KEYS = 128 keys, a causal
    # window over 64.
    (FX(16, 2), 128, 128, True, "masked"),
    (FX(16, 2), 129, 129, True, "fixed"),
    (SW(16), 128, 128, True, "band"),
    (SW(16), 64, 64, True, "masked"),
    (SW(16), 1, 65, True, "band"),
    (SW(16), 128, 128, False, "masked"),
    (SW(16), 129, 129, False, "band"),
    # Two or more causal rows of fixed alone, after up to 2 * SHORT_RUN_MASKED_KEYS = 2048 keys.
    (FX(128, 8), 1, 2048, True, "fixed"),  # fixed alone keeps its plan for one row
    (FX(128, 8), 2, 2048, True, "masked"),  # from two rows on, up to twice as many keys
    (FX(16, 2), 16, 2048, True, "masked"),
    (FX(128, 8), 2, 2049, True, "fixed"),
    (FX(128, 8), 17, 1024, True, "fixed"),  # past a short run
    (FX(128, 8), 16, 1024, False, "fixed"),  # causal only
])
def test_small_problems_and_short_runs_without_the_span_kernel(monkeypatch, pattern, lq, lk, causal, backend):
    """Where the span kernel is not built (torch's calls take the band's, fixed's and the masked
    plan's steps): fixed and a non-causal window over at most SMALL_KEYS keys, a causal window over
    half as many, take one masked call; so do a causal short run of fixed alone from two rows on
    after up to 2 * SHORT_RUN_MASKED_KEYS keys, and of a union with fixed up to
    SHORT_RUN_MASKED_KEYS = 1024 keys (with a stride among its members 2048), and one row of such a
    union, causal or not, while its members' key counts sum to at most ONE_ROW_MASKED_KEYS = 1536."""
    from engine.patterns import parse_pattern
    from engine.planner import plan

    _without_span_kernel(monkeypatch)
    plan.cache_clear()
    try:
        assert plan(parse_pattern(pattern), lq, lk, causal, "cpu").backend == backend
    finally:
        plan.cache_clear()


def test_short_runs_of_unions_with_fixed_keep_their_structured_plan_on_cuda(monkeypatch):
    """On CUDA the structured plans read no device value and fixed is one Triton launch: a short run
    keeps them there, where the CPU without the span kernel takes the masked call."""
    from engine.patterns import parse_pattern
    from engine.planner import plan

    _without_span_kernel(monkeypatch)
    plan.cache_clear()
    try:
        for pattern, backend in (({"type": "union", "patterns": [ST(128), FX(128, 8)]}, "strided+fixed"),
                                 (THREE, "band+strided+fixed")):
            assert plan(parse_pattern(pattern), 2, 768, True, "cpu").backend == "masked"
            assert plan(parse_pattern(pattern), 2, 768, True, "cuda").backend == backend
    finally:
        plan.cache_clear()


def test_chunks_of_tiny_strides_keep_their_kernel_on_cuda():
    """On CUDA a class view's rows are whole memory transactions, and strided is one flash call."""
    from engine.patterns import parse_pattern
    from engine.planner import plan

    assert plan(parse_pattern(ST(3)), 3, 65536, True, "cpu").backend == "masked"
    assert plan(parse_pattern(ST(3)), 3, 65536, True, "cuda").backend == "strided"


@pytest.mark.parametrize("pattern,simplest", [
    (FX(8, 8), {"type": "dense"}),  # every column a summary column
    ({"type": "union", "patterns": [ST(8), SW(1), ST(4)]}, ST(4)),  # j = i and multiples of 8 are on stride 4
    ({"type": "union", "patterns": [SW(1), FX(8, 2)]}, FX(8, 2)),
    ({"type": "union", "patterns": [ST(6), ST(4), ST(12), SW(3), SW(5)]},
     {"type": "union", "patterns": [ST(6), ST(4), SW(5)]}),
    ({"type": "union", "patterns": [FX(128, 2), SW(16), FX(128, 8)]},  # the same blocks, more summary keys
     {"type": "union", "patterns": [SW(16), FX(128, 8)]}),
    ({"type": "union", "patterns": [FX(4, 2), FX(8, 6)]}, FX(8, 6)),  # residues 2, 3, 6, 7 of 8 among 2..7
    ({"type": "union", "patterns": [FX(4, 1), FX(8, 2)]},  # residue 3 of 8 is fixed(4, 1)'s alone
     {"type": "union", "patterns": [FX(4, 1), FX(8, 2)]}),
])
def test_simplify_drops_what_another_member_covers(pattern, simplest):
    from engine.patterns import parse_pattern
    from engine.planner import simplify

    assert simplify(parse_pattern(pattern), 1000) == parse_pattern(simplest)


@pytest.mark.parametrize("causal", [True, False])
def test_simplified_unions_of_fixed_keep_every_key(causal):
    """Every union of two fixed patterns with blocks up to 12, simplified, allows exactly the
    reference's keys (over lengths that end inside a block and past several)."""
    from engine.patterns import parse_pattern
    from engine.planner import simplify

    fixed = [FX(block, summary) for block in range(1, 13) for summary in range(1, block + 1)]
    dropped = 0
    for a, b in itertools.combinations(fixed, 2):
        union = {"type": "union", "patterns": [a, b]}
        for lk in (5, 37):
            simplest = simplify(parse_pattern(union), lk)
            dropped += simplest.type != "union"
            assert torch.equal(mask(simplest.model_dump(), lk, lk, 0, 1, causal), mask(union, lk, lk, 0, 1, causal)), \
                (union, lk, simplest)
    assert dropped > 0


@pytest.mark.parametrize("pattern", [SW(8), ST(8), ST(1), FX(8, 2), FX(8, 8), {"type": "union", "patterns": [SW(8), ST(12)]},
                                     {"type": "union", "patterns": [ST(5), FX(6, 1), SW(2)]}])
@pytest.mark.parametrize("causal", [True, False])
def test_simplify_keeps_every_key_at_each_length_around_the_patterns_sizes(pattern, causal):
    """simplify answers for an Lk capped past the pattern's largest size (it keeps its answers, and a
    decode loop asks with a new Lk each step): below, at and past each size the simplified pattern
    allows exactly the pattern's keys."""
    from engine.patterns import parse_pattern
    from engine.planner import simplify

    parsed = parse_pattern(pattern)
    for lk in range(1, 20):
        assert torch.equal(mask(simplify(parsed, lk).model_dump(), lk, lk, 0, 1, causal),
                           mask(pattern, lk, lk, 0, 1, causal)), lk


def test_a_decode_loop_keeps_one_structured_plan():
    """The structured plans read Lk from their inputs and are kept without it: each step of a decode
    loop (a new Lk) gets the same plan object, not one made anew (a union's took 23 us)."""
    from engine.patterns import parse_pattern
    from engine.planner import plan

    for pattern in ({"type": "union", "patterns": [SW(128), ST(128)]}, SW(256), FX(128, 8), ST(64)):
        plans = {id(plan(parse_pattern(pattern), 1, lk, True, "cpu")) for lk in range(1000, 1010)}
        assert len(plans) == 1, pattern


@pytest.mark.parametrize("lk,simplest", [(1, {"type": "dense"}), (8, SW(1)), (9, ST(8))])
def test_a_stride_past_every_key_is_the_diagonal_or_over_one_key_dense(lk, simplest):
    from engine.patterns import parse_pattern
    from engine.planner import simplify

    assert simplify(parse_pattern(ST(8)), lk) == parse_pattern(simplest)


@pytest.mark.parametrize("lq,lk", [(1, 1003), (5, 300), (37, 1000), (600, 600), (517, 700), (300, 1003)])
@pytest.mark.parametrize("stride,skip_strides,min_distance", [(64, (), 0), (41, (3,), 0), (41, (2, 82), 0),
                                                              (13, (), 20), (8, (), 0)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("budget", [10**9, 50])  # one mask per chunk; chunks cut to the mask budget
def test_strided_takes_grouped_heads(monkeypatch, lq, lk, stride, skip_strides, min_distance, causal, budget):
    """Fewer key/value heads than query heads, two batch items, on the CPU as they are: a short
    run's classes on the batch axis and the heads on the head axis; a long run's class views with
    the batch items' heads on the head axis (`heads_last`), causal squares, masked chunks, the
    non-causal class calls, and the keys of the last partial class row (own keys, and without
    causality the classes' extra key) for each query head. Against the reference on the heads
    repeated."""
    monkeypatch.setattr("engine.kernels.strided.chunk_rows", lambda rows, dtype: 4)
    monkeypatch.setattr("engine.kernels.strided.MASK_BUDGET", budget)
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(2, 6, lq, 16, generator=g)
    k, v = (torch.randn(2, 2, lk, 16, generator=g) for _ in range(2))
    result = kernels.strided_attention(q, k, v, stride=stride, scale=0.25, skip_strides=skip_strides,
                                       min_distance=min_distance, causal=causal)
    k3, v3 = (x.repeat_interleave(3, dim=1) for x in (k, v))
    assert_matches_far(result, q, k3, v3, ST(stride), min_distance, causal=causal, skip_strides=skip_strides)


@pytest.mark.parametrize("lq,lk", [(1, 1003), (5, 300), (16, 700), (70, 700), (517, 700), (640, 640)])
@pytest.mark.parametrize("block,summary,min_distance,strides", [(64, 8, 0, ()), (32, 4, 20, (5,)), (10, 3, 0, (4, 6)),
                                                                (128, 8, 0, ())])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("on_span_kernel", [True, False])
def test_fixed_takes_grouped_heads(monkeypatch, lq, lk, block, summary, min_distance, strides, causal,
                                   on_span_kernel):
    """Fewer key/value heads than query heads, two batch items, on the CPU read as they are. Causal:
    a short run's own block on slices and its summary keys per item (offsets on the batch axis,
    heads on the head axis); longer runs' own blocks in one call (blocks on the batch axis, the
    items' heads on the head axis), their summary keys per block with a key/value head's query
    heads as its rows, or in row ranges repeated for the query heads (small blocks: c/l of K).
    Without causality the summary keys and partial blocks with the query heads as rows, the whole
    blocks with the items' heads on the head axis, and with a distance or strides each call's
    pieces with the query heads as rows. (On CUDA the key/value heads are repeated.) Causal runs
    without a distance or strides go to the CPU span kernel where it is built, so each runs with it
    and without. Against the reference on the heads repeated."""
    if not on_span_kernel:
        _without_span_kernel(monkeypatch)
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(2, 6, lq, 16, generator=g)
    k, v = (torch.randn(2, 2, lk, 16, generator=g) for _ in range(2))
    result = kernels.fixed_attention(q, k, v, block=block, summary=summary, scale=0.25, causal=causal,
                                     min_distance=min_distance, skip_strides=strides)
    k3, v3 = (x.repeat_interleave(3, dim=1) for x in (k, v))
    assert_matches_far(result, q, k3, v3, FX(block, summary), min_distance, causal=causal, skip_strides=strides)


@pytest.mark.parametrize("lq,lk", [(1, 1003), (20, 300), (517, 700), (640, 640)])  # short runs, tiles
@pytest.mark.parametrize("window,tile", [(64, None), (5, 7), (33, 300)])
@pytest.mark.parametrize("causal", [True, False])
def test_band_takes_grouped_heads(lq, lk, window, tile, causal):
    """Fewer key/value heads than query heads, two batch items, on the CPU as they are: the tiles
    with the batch items' heads on the head axis (`heads_last`), the first rows, a short run's
    slice and, without causality, the last rows reversed, each call mapping or folding the heads.
    Against the reference on the heads repeated."""
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(2, 6, lq, 16, generator=g)
    k, v = (torch.randn(2, 2, lk, 16, generator=g) for _ in range(2))
    result = kernels.band_attention(q, k, v, window=window, scale=0.25, causal=causal, tile=tile)
    k3, v3 = (x.repeat_interleave(3, dim=1) for x in (k, v))
    assert_matches_far(result, q, k3, v3, SW(window), 0, causal=causal)


# (pattern, causal): fixed's summary keys per block and in row ranges, and both ways; a window and a
# stride either way, unions of a window, strides and fixed.
GROUPED_PREFILLS = [(FX(64, 4), True), (FX(16, 2), True), (FX(64, 4), False), (SW(40), True), (SW(40), False),
                    (ST(16), True), (ST(16), False), ({"type": "union", "patterns": [SW(30), FX(64, 4)]}, True),
                    ({"type": "union", "patterns": [SW(30), ST(24)]}, False),
                    ({"type": "union", "patterns": [ST(12), ST(20)]}, True),
                    ({"type": "union", "patterns": [SW(30), ST(24), FX(64, 4)]}, True),
                    ({"type": "union", "patterns": [SW(30), ST(24), FX(64, 4)]}, False)]


@pytest.mark.parametrize("pattern,causal", GROUPED_PREFILLS)
def test_prefills_read_grouped_heads_in_one_run(monkeypatch, pattern, causal):
    """A prefill of fixed, a window, a stride and their unions, causal or not, over fewer key/value
    heads than query heads runs once for all heads, with the kernel calls (torch's and the span
    kernel's) of equal heads: not once
    per key/value head, as a plan that needs equal heads must where repeating them all would take
    too much memory (forced here for any size). H = 32 over 8, D = 128, n = 4096, ms, a key/value
    head at a time -> now (over 32 key/value heads): fixed(64, 4) 212-216 -> 110-125 (143-144),
    union(sliding 128, fixed(128, 8)) 298-308 -> 204-271 (209-272)."""
    from cuda_emulation import OpCount

    from engine import attention


    monkeypatch.setattr(sys.modules["engine.attention"], "GQA_REPEAT_BYTES", 0)
    span_calls = []
    real = span_kernel.span_attention
    monkeypatch.setattr(span_kernel, "span_attention", lambda *args, **kwargs: span_calls.append(1)
                        or real(*args, **kwargs))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 300, 16, generator=g)
    calls = {}
    for hkv in (8, 2):
        k, v = (torch.randn(2, hkv, 300, 16, generator=g) for _ in range(2))
        span_calls.clear()
        with OpCount() as count:
            out, lse = attention(q, k, v, pattern, scale=0.25, causal=causal, return_lse=True)
        calls[hkv] = count.ops["aten._scaled_dot_product_flash_attention_for_cpu.default"] + len(span_calls)
        ref_out, ref_lse = reference_attention(q, k.repeat_interleave(8 // hkv, 1), v.repeat_interleave(8 // hkv, 1),
                                               pattern, causal=causal, scale=0.25)
        assert_matches_reference(out, lse, ref_out, ref_lse, tol=2e-5)
    assert calls[2] == calls[8] >= 1, calls  # a key/value head at a time: twice the calls


@pytest.mark.parametrize("lq,lk", [(1, 1003), (1, 40), (5, 300), (40, 700), (37, 1000), (2, 2)])
@pytest.mark.parametrize("stride,min_distance", [(64, 0), (64, 100), (41, 0), (41, 3)])
def test_strided_short_runs(lq, lk, stride, min_distance):
    """Fewer query rows than the stride: one or two runs of rows (700 and 1000 cross a class row
    at both strides), each on its own classes' keys; rows with no key at min_distance 100."""
    q, k, v = _qkv(2, lq, lk, dv=24)
    result = kernels.strided_attention(q, k, v, stride=stride, scale=0.25, min_distance=min_distance)
    assert_matches_far(result, q, k, v, ST(stride), min_distance)


@pytest.mark.parametrize("lq,lk", [(1000, 1000), (517, 700), (300, 1003), (1, 1003), (16, 2001), (70, 2001)])
@pytest.mark.parametrize("block,summary,min_distance", [(16, 4, 5), (16, 4, 40), (10, 3, 10), (64, 8, 1), (7, 7, 3)])
@pytest.mark.parametrize("causal,span", [(True, True), (True, False), (False, True)])
def test_fixed_min_distance(monkeypatch, lq, lk, block, summary, min_distance, causal, span):
    """fixed's keys at distance >= m (a union with sliding_window(m)): own-block diagonal shifted
    (without causal: own block masked both ways), a prefix of the summary keys per row (and a
    suffix of those after it), rows near the start with none; causal on the span kernel and on
    torch's (a distance: blocks per call, never row ranges)."""
    if not span:
        _without_span_kernel(monkeypatch)
    q, k, v = _qkv(2, lq, lk)
    result = kernels.fixed_attention(q, k, v, block=block, summary=summary, scale=0.25, min_distance=min_distance,
                                     causal=causal)
    assert_matches_far(result, q, k, v, FX(block, summary), min_distance, causal=causal)


@pytest.mark.parametrize("lq,lk", [(1000, 1000), (517, 700), (300, 1003), (1, 1003), (16, 2001), (70, 2001)])
@pytest.mark.parametrize("block,summary,strides", [(16, 4, (4,)), (16, 4, (5,)), (10, 3, (7,)), (64, 8, (64,)),
                                                   (7, 7, (2,)), (20, 5, (1000,)), (16, 4, (3, 5)), (10, 3, (4, 6, 7))])
@pytest.mark.parametrize("min_distance", [0, 5, 40])
@pytest.mark.parametrize("causal,span", [(True, True), (True, False), (False, True)])
def test_fixed_skip_strides(monkeypatch, lq, lk, block, summary, strides, min_distance, causal, span):
    """fixed's keys less the strides' (a union with strided members, which count them); with a
    window's distance too. Causal on the span kernel (skipped in it) and on torch's (the own-block
    mask shared by every block, every summary key under a mask)."""
    if not span:
        _without_span_kernel(monkeypatch)
    q, k, v = _qkv(2, lq, lk)
    result = kernels.fixed_attention(q, k, v, block=block, summary=summary, scale=0.25, min_distance=min_distance,
                                     skip_strides=strides, causal=causal)
    assert_matches_far(result, q, k, v, FX(block, summary), min_distance, causal=causal, skip_strides=strides)


@pytest.mark.parametrize("min_distance,strides", [(5, ()), (0, (3,)), (20, (4, 7))])
@pytest.mark.parametrize("causal", [True, False])
def test_fixed_union_calls_within_mask_budget(monkeypatch, min_distance, strides, causal):
    """A union's fixed step sends many query blocks to a call (`SHARED_MASK_CALL_ROWS`), fewer where a
    call's mask would pass MASK_BUDGET: every summary mask within a budget of four blocks' rows
    by all the summary keys, and the result the reference's."""
    from engine.kernels import fixed

    _without_span_kernel(monkeypatch)  # which takes causal steps
    q, k, v = _qkv(2, 700, 1003)
    budget = 4 * 10 * len(fixed.summary_columns(1003, 10, 3))
    monkeypatch.setattr(fixed, "MASK_BUDGET", budget)
    sizes = []
    real = fixed.fused_under

    def spy(q, k, v, mask, empty, **kwargs):
        sizes.append(mask.numel())
        return real(q, k, v, mask, empty, **kwargs)

    monkeypatch.setattr(fixed, "fused_under", spy)
    result = kernels.fixed_attention(q, k, v, block=10, summary=3, scale=0.25, min_distance=min_distance,
                                     skip_strides=strides, causal=causal)
    assert_matches_far(result, q, k, v, FX(10, 3), min_distance, causal=causal, skip_strides=strides)
    assert sizes and max(sizes) <= budget and max(sizes) > budget // 2  # every summary key under the shared mask


@pytest.mark.parametrize("lq,lk", [(517, 700), (300, 1003), (3, 5)])
@pytest.mark.parametrize("block,summary,min_distance,strides", [(16, 4, 0, ()), (10, 3, 7, ()), (7, 7, 0, (3,)),
                                                                (64, 8, 20, (5, 8))])
def test_fixed_summary_keys_in_place(monkeypatch, lq, lk, block, summary, min_distance, strides):
    """The causal summary keys read in place (torch's few-rows path) forced for many rows: its mask
    across blocks, distances and strides, rows of the first block with no summary key."""
    monkeypatch.setattr("engine.kernels.fixed.SHORT_RUN_ROWS", 1 << 20)
    _without_span_kernel(monkeypatch)  # which takes fixed alone
    q, k, v = _qkv(2, lq, lk)
    result = kernels.fixed_attention(q, k, v, block=block, summary=summary, scale=0.25, min_distance=min_distance,
                                     skip_strides=strides)
    assert_matches_far(result, q, k, v, FX(block, summary), min_distance, skip_strides=strides)


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (300, 1003), (1, 1003), (37, 1000), (5, 5)])
@pytest.mark.parametrize("stride,skip_strides,min_distance", [(13, (2,), 0), (13, (26,), 0), (6, (4,), 0),
                                                              (9, (4, 6), 20), (64, (3,), 0), (41, (5, 82), 3)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("budget", [10**9, 50])  # one mask per chunk; chunks cut to the mask budget
def test_strided_skip_strides(monkeypatch, lq, lk, stride, skip_strides, min_distance, causal, budget):
    """A stride's keys less an earlier stride's multiples (a union of strides counts each key
    once): the chunk masks, the short runs' shared mask, the non-causal class mask, rows whose
    keys are all skipped."""
    monkeypatch.setattr("engine.kernels.strided.chunk_rows", lambda rows, dtype: 4)
    monkeypatch.setattr("engine.kernels.strided.MASK_BUDGET", budget)
    q, k, v = _qkv(2, lq, lk)
    result = kernels.strided_attention(q, k, v, stride=stride, scale=0.25, min_distance=min_distance,
                                       skip_strides=skip_strides, causal=causal)
    assert_matches_far(result, q, k, v, ST(stride), min_distance, causal=causal, skip_strides=skip_strides)


@pytest.mark.parametrize("pattern", [SW(7), ST(5), FX(10, 3), {"type": "union", "patterns": [SW(4), ST(9), FX(8, 2)]}],
                         ids=["window", "stride", "fixed", "union3"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("budget,min_rows", [(400, 3), (50, 1), (10**9, 128)])
@pytest.mark.parametrize("compact", [0.0, 0.5, 2.0])  # never, where rows attend under half the span, always
def test_masked_chunks(monkeypatch, pattern, causal, budget, min_rows, compact):
    """The masked kernel over many chunks: a row's reach, the budget shrinking a chunk (to single
    rows at 50 elements), one chunk for everything; each on its whole span or on a copy of the
    keys its rows attend."""
    from engine.patterns import parse_pattern

    monkeypatch.setattr("engine.kernels.masked.MASK_BUDGET", budget)
    monkeypatch.setattr("engine.kernels.masked.MIN_CHUNK_ROWS", min_rows)
    monkeypatch.setattr("engine.kernels.masked.COMPACT_FRACTION", compact)
    monkeypatch.setattr("engine.kernels.dense.SMALL_MASK_ELEMENTS", 0)  # none kept: each built under these
    q, k, v = _qkv(2, 150, 230)
    out, lse = kernels.masked_attention(q, k, v, parse_pattern(pattern), scale=0.25, causal=causal)
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal, scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_small_masks_are_kept_and_large_ones_built_each_call(causal):
    """The masked kernel keeps a small chunk's mask (and its compacted columns) for the next call of
    that shape (`kept_when_small`); a chunk over SMALL_MASK_ELEMENTS builds its own each time.
    Results stay exact."""
    import importlib

    from engine.patterns import parse_pattern

    masked = importlib.import_module("engine.kernels.masked")
    spec = {"type": "union", "patterns": [SW(5), FX(8, 2)]}
    pattern = parse_pattern(spec)
    for lq, lk, kept in [(3, 100, True), (40, 40, True), (300, 300, causal)]:  # non-causal 300: one 300 x 300 chunk
        q, k, v = _qkv(2, lq, lk)
        masked.chunk_mask.kept.cache_clear()
        results = [kernels.masked_attention(q, k, v, pattern, scale=0.25, causal=causal) for _ in range(2)]
        info = masked.chunk_mask.kept.cache_info()
        assert (info.hits > 0 and info.hits == info.misses) == kept, (lq, lk, info)
        assert (info.currsize > 0) == kept
        for out, lse in results:
            ref_out, ref_lse = reference_attention(q, k, v, spec, causal=causal, scale=0.25)
            torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    masked.chunk_mask.kept.cache_clear()


@pytest.mark.parametrize("spec,few", [
    ({"type": "union", "patterns": [SW(16), FX(64, 4), FX(48, 2)]}, True),
    ({"type": "union", "patterns": [SW(16), FX(8, 6), FX(12, 9)]}, False),  # most keys: no copy of them
], ids=["few_keys", "most_keys"])
@pytest.mark.parametrize("lq", [1, 3])
def test_a_row_on_exactly_its_keys_takes_an_unmasked_call(monkeypatch, lq, spec, few):
    """A single row (a decode step) attending under COMPACT_FRACTION of the keys runs on a copy of
    exactly them, listed by arithmetic (`row_keys`), no mask built over the span: one unmasked
    call over those keys. A row attending more of them, and several rows, which attend different
    keys, take a masked call. Exact either way. On the CPU both on the span kernel (`_every_key`)."""
    from engine.kernels import masked
    from engine.patterns import parse_pattern

    q, k, v = _qkv(2, lq, 1000)
    calls = []  # each call's (keys, mask)
    every_key = masked._every_key
    monkeypatch.setattr(masked, "_every_key", lambda q, k, *a, **kw: calls.append((k.shape[-2], kw.get("mask")))
                        or every_key(q, k, *a, **kw))
    masked.chunk_mask.kept.cache_clear()
    out, lse = kernels.masked_attention(q, k, v, parse_pattern(spec), scale=0.25, causal=True)
    if lq == 1 and few:
        attended = allowed(spec, torch.tensor(999), torch.arange(1000), 0, 1).sum()
        assert calls == [(int(attended), None)]
        assert masked.chunk_mask.kept.cache_info().currsize == 0
    else:
        assert len(calls) == 1 and calls[0][1] is not None
    ref_out, ref_lse = reference_attention(q, k, v, spec, scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    masked.chunk_mask.kept.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", [
    {"type": "union", "patterns": [SW(128), FX(128, 8)]},
    {"type": "union", "patterns": [ST(128), FX(128, 8)]},
    {"type": "union", "patterns": [SW(100), ST(37), FX(96, 5)]},
    {"type": "union", "patterns": [SW(3), ST(40), ST(60), FX(70, 3)]},
], ids=["window_fixed", "strided_fixed", "window_strided_fixed", "two_strides"])
@pytest.mark.parametrize("lk", [1, 130, 5003])
def test_a_decode_row_of_a_union_with_fixed_on_its_keys(pattern, lk, causal, dtype):
    """One row of a union with fixed (a decode step), with grouped key/value heads, a value head dim
    of its own and half precision, against the float64 reference: on the masked plan on the CPU
    over few keys (a window with fixed, no stride, keeps its two steps where the span kernel is
    built); after 5003 keys, causal or not, on the structured plan where the span kernel is built
    (at head dim 24 fixed's step falls back to torch's calls)."""
    from engine import attention
    from engine.patterns import parse_pattern
    from engine.planner import plan

    with_stride = any(member["type"] == "strided" for member in pattern["patterns"])
    few_keys_backend = "masked" if with_stride or span_kernel.library() is None else "band+fixed"
    assert lk in (1, 5003) or plan(parse_pattern(pattern), 1, lk, causal, "cpu").backend == few_keys_backend
    g = torch.Generator().manual_seed(lk)
    q = torch.randn(2, 4, 1, 24, generator=g).to(dtype)
    k = torch.randn(2, 2, lk, 24, generator=g).to(dtype)
    v = torch.randn(2, 2, lk, 40, generator=g).to(dtype)
    out, lse = attention(q, k, v, pattern, causal=causal, scale=0.3, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal, scale=0.3)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (2, 4, 1, 40)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


def test_small_band_masks_are_kept():
    """The band's mask is kept for the next call of its shape when small (a decode step's [1, w]),
    built afresh when large; either way it keeps keys r .. r + w - 1 of row r."""
    from engine.kernels.band import band_mask

    cpu = torch.device("cpu")
    for rows, window, kept in [(1, 256, True), (24, 128, True), (24, 5000, False)]:
        first, second = (band_mask(rows, window, torch.float32, cpu) for _ in range(2))
        assert (first is second) == kept
        r, c = torch.arange(rows)[:, None], torch.arange(rows + window - 1)[None, :]
        assert torch.equal(first == 0, (c >= r) & (c < r + window))


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (1, 1003), (3, 5), (64, 64)])
@pytest.mark.parametrize("stride", [8, 13, 64])
def test_strided_non_causal(lq, lk, stride):
    """Every key of the query's class, the last partial class row included (all of it when Lk < s)."""
    q, k, v = _qkv(2, lq, lk, dv=24)
    out, lse = kernels.strided_attention(q, k, v, stride=stride, scale=0.25, causal=False)
    ref_out, ref_lse = reference_attention(q, k, v, ST(stride), causal=False, scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (1, 1003), (3, 5), (64, 64), (300, 1003)])
@pytest.mark.parametrize("stride,min_distance", [(8, 1), (13, 20), (64, 64), (8, 300), (5, 2000)])
@pytest.mark.parametrize("budget", [None, 7])  # 7 mask elements: a call per query class row
def test_strided_non_causal_min_distance(monkeypatch, lq, lk, stride, min_distance, budget):
    """Class keys at |i - j| >= m both ways (a union with a window reaching both ways): key class
    rows nearer than ceil(m/s) dropped, the partial last class row too when near; rows with no
    key left (m = 2000) zero with lse -inf."""
    if budget:
        monkeypatch.setattr("engine.kernels.strided.MASK_BUDGET", budget)
    q, k, v = _qkv(2, lq, lk, dv=24)
    result = kernels.strided_attention(q, k, v, stride=stride, scale=0.25, causal=False, min_distance=min_distance)
    assert_matches_far(result, q, k, v, ST(stride), min_distance, causal=False)


@pytest.mark.parametrize("mask_rows", [None, 1, 3])  # no mask, one shared by all rows, one per row
def test_grouped_query_heads_are_rows_of_their_key_value_head(mask_rows):
    """A fused call whose rows all see the same keys gives torch's kernel each key/value head's
    query heads as its rows (4 heads over 2: [B, 2, 2 * Lq, D] against [B, 2, Lk, D]), not query
    heads it maps to key/value heads and reads them again for; a mask row per query row is
    repeated for each head. Exact against the float64 reference either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from engine.kernels.dense import additive_mask, fused

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "flash_attention" in str(func):
                self.seen.append((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(mask_rows or 0)
    q = torch.randn(2, 4, 3, 16, generator=g)
    k, v = (torch.randn(2, 2, 50, 16, generator=g) for _ in range(2))
    keep = torch.rand(mask_rows, 50, generator=g) < 0.6 if mask_rows else None
    with Shapes() as shapes:
        out, lse = fused(q, k, v, scale=0.25, is_causal=False, mask=None if keep is None else additive_mask(keep, q.dtype))
    assert shapes.seen == [((2, 2, 6, 16), (2, 2, 50, 16))]
    repeated = [x.repeat_interleave(2, dim=1) for x in (k, v)]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), repeated[0].double()) * 0.25
    if keep is not None:
        scores = scores.masked_fill(~keep.expand(3, 50), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), torch.softmax(scores, -1) @ repeated[1].double(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_class_masks_say_on_the_host_when_every_row_keeps_a_key(causal):
    """`class_distance_mask` leaves out its empty rows (None) exactly where every row keeps a key
    (and never with skipped strides, which it does not decide on the host): against the mask's own
    rows, every window of up to 7 rows over up to 7 key rows, starting before and after them."""
    from engine.kernels.strided import class_distance_mask

    for first, rows, key_rows, near in itertools.product(range(-9, 10), range(1, 8), range(1, 8), range(0, 7)):
        mask, empty = class_distance_mask(first, rows, key_rows, near, 5, (), causal, torch.float32, torch.device("cpu"))
        kept = (mask == 0).any(-1)
        assert empty is None if bool(kept.all()) else torch.equal(empty, ~kept), (first, rows, key_rows, near)
        _, skipping = class_distance_mask(first, rows, key_rows, near, 5, (2,), causal, torch.float32,
                                          torch.device("cpu"))
        assert skipping is not None


@pytest.mark.parametrize("lq,lk", [(1000, 1000), (517, 700), (1, 1003), (30, 40), (64, 64)])
@pytest.mark.parametrize("block,summary", [(16, 4), (64, 8), (10, 1), (100, 3), (8, 8), (2000, 5)])
@pytest.mark.parametrize("span", [True, False])
def test_fixed_non_causal(monkeypatch, lq, lk, block, summary, span):
    """Every summary key and the rest of the own block, a partial last block included (every key a
    summary key at (8, 8); one partial block at (2000, 5)); on the span kernel and on torch's."""
    if not span:
        _without_span_kernel(monkeypatch)
    q, k, v = _qkv(2, lq, lk, dv=16 if span else 8)
    out, lse = kernels.fixed_attention(q, k, v, block=block, summary=summary, scale=0.25, causal=False)
    ref_out, ref_lse = reference_attention(q, k, v, FX(block, summary), causal=False, scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_window_probe_accepts_only_the_contract_band(monkeypatch, causal):
    """The CUDA band trusts the flash kernel's local window only when a tiny problem matches the
    contract (both causalities, queries bottom-right aligned); a build that raises, or that
    ignores the right-hand window, sends the band to its tiles. Probed here with stand-ins."""
    from engine.kernels import band

    def contract_window(q, k, v, *, window, scale, causal):
        out, lse = reference_attention(q, k, v, SW(window), causal=causal, scale=scale)
        return out.to(q.dtype), lse.float()

    def left_only(q, k, v, *, window, scale, causal):
        return contract_window(q, k, v, window=window, scale=scale, causal=True)

    def missing(*args, **kwargs):
        raise RuntimeError("_flash_attention_forward() got an unexpected keyword argument 'window_size_left'")

    probe = band.flash_window_supported.__wrapped__  # uncached
    cpu = torch.device("cpu")
    for fake, expected in ((contract_window, True), (left_only, causal), (missing, False)):
        monkeypatch.setattr(band, "_flash_window", fake)
        assert probe(cpu, causal) is expected, fake.__name__


@pytest.mark.parametrize("lq,lk,batch", [(0, 5, 1), (3, 0, 1), (3, 5, 0)])
def test_the_fused_call_answers_empty_problems_instead_of_crashing(lq, lk, batch):
    """torch's CPU flash kernel kills the process (SIGFPE) on no query row or no key; every kernel
    reaches it through `fused`, which answers such problems itself: zeros and lse -inf."""
    from engine.kernels.dense import fused

    q, k, v = torch.randn(batch, 2, lq, 16), torch.randn(batch, 2, lk, 16), torch.randn(batch, 2, lk, 8)
    out, lse = fused(q, k, v, scale=0.25, is_causal=False)
    assert out.shape == (batch, 2, lq, 8) and lse.shape == (batch, 2, lq)
    assert (out == 0).all() and (lse == float("-inf")).all()


ANOTHER_DEVICE_PATTERNS = [
    {"type": "dense"}, SW(9), SW(500), ST(1), ST(7), {"type": "fixed", "block": 10, "summary": 3},
    {"type": "union", "patterns": [SW(12), ST(8)]},
    {"type": "union", "patterns": [SW(5), ST(6), {"type": "fixed", "block": 9, "summary": 2}]},
    {"type": "per_head", "patterns": [SW(4), ST(3)]},
]


@pytest.mark.parametrize("pattern", ANOTHER_DEVICE_PATTERNS, ids=[str(i) for i in range(len(ANOTHER_DEVICE_PATTERNS))])
@pytest.mark.parametrize("b,h,hkv,lq,lk", [(1, 2, 2, 133, 133), (2, 4, 2, 90, 103), (1, 2, 1, 1, 77)],
                         ids=["square_ragged", "gqa_lq_lt_lk", "mqa_decode"])
@pytest.mark.parametrize("causal", [True, False])
def test_a_device_without_kernels_of_its_own_runs_exactly_on_math_attention(pattern, b, h, hkv, lq, lk, causal):
    """Neither the CPU nor CUDA (say MPS): every kernel's fused call is `math_attention`, emulated by
    `kernel_device` answering 'mps' for CPU tensors."""
    from cuda_emulation import kernel_device_answering
    from engine import attention

    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(b, h, lq, 16, generator=g)
    k, v = (torch.randn(b, hkv, lk, 16, generator=g) for _ in range(2))
    with kernel_device_answering("mps"):
        assert kernel_device(q.device) == "cpu"  # this module's own import is left alone
        from engine.kernels import dense
        assert dense.kernel_device(q.device) == "mps"
        out, lse = attention(q, k, v, pattern, causal=causal, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal)
    assert_matches_reference(out, lse, ref_out, ref_lse, tol=2e-5)


@pytest.mark.parametrize("mask_shape", [None, (7, 9), (1, 5, 7, 9), (4, 5, 7, 9)], ids=["none", "2d", "per-head", "4d"])
def test_within_grid_slices_batch_and_heads_and_joins_them(mask_shape):
    """The CUDA grid limit (65535 on the batch and head axes), emulated with a limit of 2."""
    from engine.kernels.dense import math_attention, within_grid

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 5, n, 8, generator=g) for n in (7, 9, 9))
    mask = None if mask_shape is None else torch.randn(mask_shape, generator=g)
    calls = []

    def call(q, k, v, mask):
        calls.append(q.shape[:2])
        return math_attention(q, k, v, scale=0.3, mask=mask)

    out, lse = within_grid(call, q, k, v, mask, limit=2)
    ref_out, ref_lse = math_attention(q, k, v, scale=0.3, mask=mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert all(b <= 2 and h <= 2 for b, h in calls) and sum(b * h for b, h in calls) == 4 * 5


@pytest.mark.parametrize("d, dv", [(12, 20), (20, 12), (5, 5)])
@pytest.mark.parametrize("pattern", [None, {"type": "sliding_window", "window": 6},
                                     {"type": "strided", "stride": 4}, {"type": "fixed", "block": 8, "summary": 2},
                                     {"type": "union", "patterns": [{"type": "sliding_window", "window": 3},
                                                                    {"type": "strided", "stride": 5}]}])
def test_head_dims_padded_once_as_on_cuda(monkeypatch, pattern, d, dv):
    """CUDA's plans pad the head dims once to one multiple of 8 (`padded_head_dims`); the same
    plans with the padding on, here on the CPU's kernels, against the reference."""
    import importlib

    from engine import attention

    monkeypatch.setattr(importlib.import_module("engine.planner"), "pads_head_dims", lambda device: True)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 30, d, generator=g), torch.randn(2, 2, 41, d, generator=g), torch.randn(2, 2, 41, dv, generator=g)
    out, lse = attention(q, k, v, pattern, return_lse=True)
    assert out.shape == (2, 4, 30, dv)
    ref_out, ref_lse = reference_attention(q, k, v, pattern)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


MERGE_LSES = [  # per row: no key in either, in one only, tied far past 2^25, ordinary, far apart
    [-math.inf, -math.inf, 3.0, 2.0**26, 0.5, -40.0],
    [-math.inf, 1.5, -math.inf, 2.0**26, -0.25, 60.0],
    [-math.inf, -2.0, 7.0, 2.0**26, 1.0, -math.inf],
]


def test_merging_two_partials_weighs_them_by_their_lse_in_place():
    from engine.kernels.merge import merge_to

    g = torch.Generator().manual_seed(0)
    (a_lse, b_lse), rows = [torch.tensor(r) for r in MERGE_LSES[:2]], len(MERGE_LSES[0])
    a_out, b_out = torch.randn(rows, 4, generator=g), torch.randn(rows, 4, generator=g).bfloat16()
    a_out[0] = 0.0  # a row with no key has zeros
    expected_out, expected_lse = merged_in_float64([a_out, b_out.float()], [a_lse, b_lse])
    merge_to(a_out, a_lse, (a_out, a_lse), (b_out, b_lse))  # folded into a itself
    torch.testing.assert_close(a_out.double(), expected_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a_lse.double(), expected_lse.float().double())
    assert (a_out[0] == 0).all() and a_lse[0] == -math.inf


def test_merging_stacked_partials_weighs_them_by_their_lse():
    from engine.kernels.merge import merge_stacked

    g = torch.Generator().manual_seed(1)
    lse = torch.tensor(MERGE_LSES)  # [partials, rows]
    out = torch.randn(*lse.shape, 4, generator=g)
    out[:, 0] = 0.0
    merged, merged_lse = merge_stacked(out, lse, 0)
    expected_out, expected_lse = merged_in_float64(list(out), list(lse))
    torch.testing.assert_close(merged.double(), expected_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged_lse.double(), expected_lse.float().double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_decode_row_of_fixed_takes_one_call_on_exactly_its_keys(monkeypatch, dtype):
    """On the CPU without the span kernel one causal row of fixed alone, with at most
    GATHERED_ROW_KEYS summary keys before its block, is one unmasked call on a copy of its keys: the
    summary keys of earlier blocks and its own block up to it; grouped key/value heads as they are.
    Exact at every offset in a block."""
    from engine import attention
    from engine.kernels import dense, fixed, span_kernel

    monkeypatch.setattr(span_kernel, "library", lambda: None)

    l, c = 16, 3
    pattern = {"type": "fixed", "block": l, "summary": c}
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    g = torch.Generator().manual_seed(11)
    k, v = (torch.randn(1, 2, 300, 8, generator=g).to(dtype) for _ in range(2))
    keys, one_row = [], fixed._one_row_gathered
    monkeypatch.setattr(fixed, "fused", lambda *a, **kw: keys.append(a[1].shape[1:3]) or dense.fused(*a, **kw))
    for lk in range(255, 290):
        q = torch.randn(1, 4, 1, 8, generator=g).to(dtype)
        keys.clear()
        out = attention(q, k[:, :, :lk], v[:, :, :lk], pattern)
        i = lk - 1
        assert keys == [(2, i // l * c + i % l + 1)]  # two key/value heads, exactly the row's keys
        torch.testing.assert_close(out.double(), reference_attention(q, k[:, :, :lk], v[:, :, :lk], pattern)[0],
                                   atol=tol, rtol=tol)
    gathered = []
    monkeypatch.setattr(fixed, "_one_row_gathered", lambda *a, **kw: gathered.append(1) or one_row(*a, **kw))
    monkeypatch.setattr(fixed, "GATHERED_ROW_KEYS", 18 * c - 1)  # 18 blocks before the row's: the offsets
    out = attention(q, k, v, pattern)
    assert gathered == []
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern)[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("pattern", [{"type": "fixed", "block": 16, "summary": 3},
                                     {"type": "union", "patterns": [{"type": "sliding_window", "window": 5},
                                                                    {"type": "fixed", "block": 16, "summary": 3}]},
                                     {"type": "union", "patterns": [{"type": "sliding_window", "window": 20},
                                                                    {"type": "fixed", "block": 16, "summary": 3}]}],
                         ids=["fixed", "near_window", "window_past_a_block"])
@pytest.mark.parametrize("kernels", ["cpu", "cuda_emulated", "cpu_rows_on_offsets"])
def test_decode_rows_at_every_offset_in_a_block(monkeypatch, pattern, kernels):
    """fixed's short runs read the summary keys unmasked where every row keeps them all (one block's
    rows, the nearest key at least the window away) and under a mask elsewhere: rows at every
    offset in a block, one and three at a time, against the reference. On the CPU one row of fixed
    alone takes a copy of its keys (`GATHERED_ROW_KEYS`); `cpu_rows_on_offsets` keeps it on the
    summary offsets as longer keys would."""
    from cuda_emulation import cuda_kernels_on_cpu
    from engine import attention
    from engine.attention import backend_for
    from engine.kernels import fixed
    from engine.patterns import parse_pattern
    from planner_support import structured_at_every_size

    if kernels == "cpu_rows_on_offsets":
        monkeypatch.setattr(fixed, "GATHERED_ROW_KEYS", 0)
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(1, 2, 100, 8, generator=g), torch.randn(1, 2, 100, 8, generator=g)
    with structured_at_every_size(), cuda_kernels_on_cpu() if kernels == "cuda_emulated" else contextlib.nullcontext():
        assert "fixed" in backend_for(parse_pattern(pattern), 2, 1, 64, True, kernel_device(k.device))
        for lk in range(64, 100):
            for lq in (1, 3):
                q = torch.randn(1, 2, lq, 8, generator=g)
                out = attention(q, k[:, :, :lk], v[:, :, :lk], pattern)
                torch.testing.assert_close(out.double(), reference_attention(q, k[:, :, :lk], v[:, :, :lk], pattern)[0],
                                           atol=2e-5, rtol=2e-5, msg=lambda m: f"lk {lk}, lq {lq}: {m}")
