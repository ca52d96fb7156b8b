"""The band's Triton kernel (engine/kernels/triton_band.py) against the float64 reference, in Triton's
interpreter on the CPU (TRITON_INTERPRET=1, set by conftest.py without a GPU), and the engine's
choice of it on CUDA's branches; flash's local window and the band's tiles stay checked as
CUDA's fallbacks (tests/test_cuda_emulation.py, tests/test_kernels.py)."""

from __future__ import annotations

import math

import pytest
import torch

import reference
from cuda_emulation import cuda_kernels_on_cpu, seeded_variants_failing
from engine import attention
from engine.kernels import triton_band, union
from engine.kernels.merge import merge_to
from engine.kernels.strided import strided_pieces
from engine.kernels.triton_band import kernel_variant, matches_contract, triton_band_attention
from engine.kernels.triton_tiles import wide_offsets
from layouts import far_apart_rows

pytestmark = pytest.mark.skipif(triton_band.triton is None, reason="Triton is not installed")

# (B, H, Hkv, Lq, Lk, D, Dv, window): n off every tile size, Lq < Lk, GQA, one head, a window past
# n, a window of 1 (the diagonal alone), head dims off a power of two (and Dv != D), a decode row,
# a window narrower than a query tile (no key all its rows attend) and wider than several key tiles.
SHAPES = [
    (1, 1, 1, 37, 37, 16, 16, 5),
    (2, 4, 2, 100, 130, 16, 8, 33),
    (1, 2, 1, 1, 300, 16, 16, 70),
    (1, 2, 2, 150, 150, 16, 16, 1),
    (1, 1, 1, 90, 90, 32, 32, 500),
    (1, 3, 1, 130, 200, 24, 40, 64),
    (1, 2, 2, 200, 260, 16, 16, 150),
]


def _window_reference(q, k, v, window, causal, scale):
    return reference.reference_attention(q, k, v, {"type": "sliding_window", "window": window}, causal=causal,
                                         scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}H{s[1]}/{s[2]}_{s[3]}x{s[4]}_D{s[5]}/{s[6]}_w{s[7]}"
                                               for s in SHAPES])
def test_the_kernel_matches_the_reference(shape, causal, dtype):
    b, h, hkv, lq, lk, d, dv, window = shape
    g = torch.Generator().manual_seed(lq * lk + window)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
    out, lse = triton_band_attention(q, k, v, window=window, scale=1 / math.sqrt(d), causal=causal)
    ref_out, ref_lse = _window_reference(q, k, v, window, causal, 1 / math.sqrt(d))
    assert out.dtype == dtype and out.shape == (b, h, lq, dv) and lse.dtype == torch.float32
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 16), (16, 64)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_every_tile_size_splits_the_band_into_edges_and_full_tiles_exactly(block_m, block_n, causal):
    """Windows from 1 to past several tiles at each query offset: the edge tiles, the full tiles
    between them and the last short tile cover every key of the band once, whatever the tiles
    (a key counted twice or missed moves lse)."""
    g = torch.Generator().manual_seed(block_m * block_n)
    q = torch.randn(1, 1, 45, 16, generator=g)
    k, v = (torch.randn(1, 1, 70, 16, generator=g) for _ in range(2))
    for window in (1, 2, 15, 16, 17, 40, 69):
        out, lse = triton_band_attention(q, k, v, window=window, scale=0.25, causal=causal,
                                         variant={"BLOCK_M": block_m, "BLOCK_N": block_n})
        ref_out, ref_lse = _window_reference(q, k, v, window, causal, 0.25)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def _partial(q, k, v, keep, scale):
    """float64 (out, lse) of q's rows over the keys `keep` [Lq, Lk] marks (zeros and -inf for a row
    that keeps none): a seed built straight from masks."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1))
    scores = (scores * scale).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.double().repeat_interleave(q.shape[1] // k.shape[1], 1)), lse


# (B, H, Hkv, Lq, Lk, D, Dv, window, stride, seeded rows): the seed a union's stride brings (its keys at
# distance >= w), for every row to the last, or for a run of rows inside Lq (the others start empty).
SEEDED = [
    (1, 1, 1, 37, 37, 16, 16, 5, 3, (0, 37)),
    (2, 4, 2, 100, 130, 16, 8, 33, 7, (0, 100)),
    (1, 2, 1, 1, 300, 16, 16, 70, 64, (0, 1)),
    (1, 3, 1, 130, 200, 24, 40, 20, 9, (17, 90)),
    (1, 2, 2, 200, 260, 16, 16, 150, 24, (60, 140)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SEEDED, ids=[f"B{s[0]}H{s[1]}/{s[2]}_{s[3]}x{s[4]}_D{s[5]}/{s[6]}_w{s[7]}_s{s[8]}"
                                               f"_rows{s[9][0]}-{s[9][1]}" for s in SEEDED])
def test_a_seed_comes_out_merged_with_the_band(shape, causal, dtype):
    """A seed (a partial over the stride's keys outside the band, in the inputs' dtype) is continued
    by the kernel: its rows come out as the union's attention, the other rows as the band's, and a
    seeded row without keys of its own (lse -inf: causal, the first w rows) as the band's too."""
    b, h, hkv, lq, lk, d, dv, window, stride, (first, stop) = shape
    g = torch.Generator().manual_seed(lq * lk + stride)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
    sw, st = {"type": "sliding_window", "window": window}, {"type": "strided", "stride": stride}
    union = {"type": "union", "patterns": [sw, st]}
    keys = reference.mask(st, lq, lk, 0, 1, causal) & ~reference.mask(sw, lq, lk, 0, 1, causal)
    seed_out, seed_lse = _partial(q[:, :, first:stop], k, v, keys[first:stop], 0.25)
    out, lse = triton_band_attention(q, k, v, window=window, scale=0.25, causal=causal,
                                     seed=(first, seed_out.to(dtype), seed_lse.float()))
    band_out, band_lse = _window_reference(q, k, v, window, causal, 0.25)
    ref_out, ref_lse = reference.reference_attention(q, k, v, union, causal=causal, scale=0.25)
    ref_out[:, :, :first], ref_lse[:, :, :first] = band_out[:, :, :first], band_lse[:, :, :first]
    ref_out[:, :, stop:], ref_lse[:, :, stop:] = band_out[:, :, stop:], band_lse[:, :, stop:]
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


def test_it_reads_any_layout():
    """Strided views (transposed heads, a sliced feature axis, key/value heads repeated by stride 0)
    go to the kernel as they are."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 70, 2, 24, generator=g).transpose(1, 2)[..., :16].to(torch.bfloat16)
    k, v = (torch.randn(1, 90, 1, 16, generator=g).transpose(1, 2).expand(-1, 2, -1, -1).to(torch.bfloat16)
            for _ in range(2))
    out, lse = triton_band_attention(q, k, v, window=20, scale=0.25)
    ref_out, ref_lse = _window_reference(q, k, v, 20, True, 0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-2)


def test_half_precision_takes_thin_key_tiles():
    """The measured tiles (HALF_KEY_TILE): 64 x 32 in half precision up to D = 128; float32 and
    D = 256 keep fixed's."""
    assert (kernel_variant(torch.bfloat16, 64, 64)["BLOCK_M"], kernel_variant(torch.bfloat16, 64, 64)["BLOCK_N"]) \
        == (64, triton_band.HALF_KEY_TILE)
    assert kernel_variant(torch.float16, 128, 128)["BLOCK_N"] == triton_band.HALF_KEY_TILE
    assert kernel_variant(torch.bfloat16, 256, 256)["BLOCK_N"] == 32 and kernel_variant(torch.float32, 64, 64)["BLOCK_N"] == 32


def _kernel_calls(monkeypatch, q, k, v, pattern, causal=True):
    """(output, the kernel's calls) of one engine call on CUDA's branches, probed before."""
    calls = []
    with cuda_kernels_on_cpu():
        if q.dtype != torch.float32:  # both variants, before the count
            assert all(matches_contract(q.device, q.dtype, q.shape[-1], v.shape[-1], causal, seeded)
                       for seeded in (False, True))
        monkeypatch.setattr(triton_band, "triton_band_attention",
                            lambda *a, **kw: calls.append(kw) or triton_band_attention(*a, **kw))
        out = attention(q, k, v, pattern, causal=causal)
    return out, calls


SW = {"type": "sliding_window", "window": 40}
WINDOW_STRIDE = {"type": "union", "patterns": [SW, {"type": "strided", "stride": 24}]}
WINDOW_STRIDES = {"type": "union", "patterns": [SW, *({"type": "strided", "stride": s} for s in (24, 36))]}
WINDOW_3_STRIDES = {"type": "union", "patterns": [SW, *({"type": "strided", "stride": s} for s in (24, 36, 50))]}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("pattern, lq, seeded, merges", [
    (SW, 300, False, 0), (SW, 1, False, 0),
    (WINDOW_STRIDE, 300, True, 0), (WINDOW_STRIDE, 1, True, 0),
    (WINDOW_STRIDES, 300, True, 1), (WINDOW_STRIDES, 1, True, 1),  # the strides merged into one seed
    (WINDOW_3_STRIDES, 300, False, 3),  # folded after the band: band and first stride, then one each
], ids=["window", "decode", "union", "union decode", "two strides", "two strides decode", "three strides"])
def test_cuda_plans_take_the_kernel_for_the_band_in_half_precision(monkeypatch, pattern, lq, seeded, merges, causal):
    """On CUDA's branches the band (alone, a decode row, a union's, seeded with the strides' keys) is
    one Triton launch in half precision, and the result the reference's; grouped key/value heads
    included."""
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(1, 4, lq, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    merged = []
    monkeypatch.setattr(union, "merge_to", lambda *a: merged.append(a) or merge_to(*a))
    out, calls = _kernel_calls(monkeypatch, q, k, v, pattern, causal)
    # One launch (grouped key/value heads read as they are); a union's band continues its strides'
    # partial (one call each, two merged into one first).
    assert len(calls) == 1 and (calls[0].get("seed") is not None) == seeded and len(merged) == merges
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern, causal=causal)[0],
                               atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("pattern, merges", [(WINDOW_STRIDE, 2), (WINDOW_STRIDES, 4)], ids=["one stride", "two strides"])
def test_strides_keys_in_two_pieces_merge_after_the_band(monkeypatch, pattern, merges):
    """16 causal rows across a class-row boundary of both strides (24 and 36, rows 284..299): each
    stride's keys come in two pieces, no one run to seed the band with, so they merge after it,
    from the pieces already computed (one strided call per piece, none repeated)."""
    g = torch.Generator().manual_seed(16)
    q = torch.randn(1, 2, 16, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    merged, strided_calls = [], []
    monkeypatch.setattr(union, "merge_to", lambda *a: merged.append(a) or merge_to(*a))
    monkeypatch.setattr(union, "strided_pieces", lambda *a, **kw: strided_calls.append(kw) or strided_pieces(*a, **kw))
    out, calls = _kernel_calls(monkeypatch, q, k, v, pattern)
    assert len(calls) == 1 and calls[0].get("seed") is None and len(merged) == merges
    assert len(strided_calls) == len(pattern["patterns"]) - 1
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0], atol=3e-2, rtol=3e-2)


def test_a_seeded_variant_that_fails_its_probe_leaves_the_kernel_and_a_merge(monkeypatch):
    """Where the seeded variant fails its probe and the plain one passes, a union's band takes the
    plain kernel and the stride's partial merges after it."""
    seeded_variants_failing(monkeypatch, triton_band)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    merges = []
    monkeypatch.setattr(union, "merge_to", lambda *a: merges.append(a) or merge_to(*a))
    out, calls = _kernel_calls(monkeypatch, q, k, v, WINDOW_STRIDE)
    assert len(calls) == 1 and calls[0].get("seed") is None and merges
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, WINDOW_STRIDE)[0],
                               atol=3e-2, rtol=3e-2)


def test_float32_keeps_the_bands_tiles(monkeypatch):
    """float32 bands stay on the memory-efficient kernel's tiles, as fast there on an H200."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    out, calls = _kernel_calls(monkeypatch, q, k, v, SW)
    assert calls == []
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, SW)[0], atol=2e-5, rtol=2e-5)


def test_a_variant_that_fails_its_probe_leaves_the_band_to_flash_s_window(monkeypatch):
    """A compile or launch error in the probe (an old Triton, a GPU without the shared memory) is
    logged, and the band takes flash's local window instead of failing the request."""
    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    with cuda_kernels_on_cpu():
        monkeypatch.setattr(triton_band, "triton_band_attention", broken)
        assert not matches_contract(q.device, q.dtype, 16, 16, True, False)
        out = attention(q, k, v, SW)
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, SW)[0], atol=3e-2, rtol=3e-2)


def test_offsets_past_2_31_elements_are_taken_in_64_bits():
    """Keys and values whose rows lie 2^21 elements apart (a packed layout of a long context): past
    row 1024 their offsets pass 2^31, which 32-bit offsets wrapped (reading out of bounds; the
    interpreter crashed). `wide_offsets` sends such calls to the 64-bit variant."""
    g = torch.Generator().manual_seed(4)
    lk, d = 1100, 16
    kv = torch.randn(lk, 2 * d, generator=g).to(torch.bfloat16)
    k, v = far_apart_rows(kv[:, :d].contiguous()), far_apart_rows(kv[:, d:].contiguous())
    assert wide_offsets(k) and not wide_offsets(kv[None, None])
    q = torch.randn(1, 1, 70, d, generator=g).to(torch.bfloat16)
    out, lse = triton_band_attention(q, k, v, window=100, scale=0.25)
    ref_out, ref_lse = _window_reference(q, kv[None, None, :, :d], kv[None, None, :, d:], 100, True, 0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-2)
