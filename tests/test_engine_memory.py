"""Memory safety: a sparse pattern never builds an Lq x Lk tensor."""

from __future__ import annotations

import importlib

import pytest
import torch

from engine import attention
from engine.attention import backend_for
from engine.patterns import parse_pattern
from engine.memory import PeakMemory

GIB = 1 << 30


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_over_131072_tokens_stays_far_below_2_gib(capsys, causal):
    n, d = 131072, 64
    q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
    with PeakMemory("cpu") as mem:
        out = attention(q, k, v, {"type": "sliding_window", "window": 256}, causal=causal)
    with capsys.disabled():
        print(f"\nsliding_window(256), n={n}, H=1, D={d}, causal={causal}: "
              f"peak extra memory {mem.peak_bytes / 2**20:.1f} MiB")
    assert out.shape == (1, 1, n, d)
    # the output alone is n*d*4 bytes: the tracker must see at least that, and far less than n^2
    assert n * d * 4 <= mem.peak_bytes < 2 * GIB
    # spot-check rows against direct softmax over their window (both ways without causal)
    for row in (0, 255, 256, 70000, n - 256, n - 1):
        keys = slice(max(0, row - 255), row + 1 if causal else row + 256)
        probs = torch.softmax((q[0, 0, row] @ k[0, 0, keys].T) / d**0.5, -1)
        torch.testing.assert_close(out[0, 0, row], probs @ v[0, 0, keys], atol=1e-5, rtol=1e-5)


def test_strided_memory_grows_with_keys_per_query_not_n_squared():
    n, d = 16384, 32
    q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
    with PeakMemory("cpu") as mem:
        attention(q, k, v, {"type": "strided", "stride": 64})
    assert mem.peak_bytes < n * n * 4 / 8  # far below a dense score matrix


def test_peak_memory_counts_new_storages_only():
    x = torch.randn(1000, 1000)
    with PeakMemory("cpu") as mem:
        y = x * 2  # 4 MB new
        view = y[:10]  # a view: nothing new
        x.add_(1)  # in place: nothing new
        del y, view
        torch.empty(10)  # after y freed: the peak stays at y's size
    assert mem.peak_bytes == 1000 * 1000 * 4


@pytest.mark.parametrize("pattern", [{"type": "dense"}, {"type": "sliding_window", "window": 64},
                                     {"type": "fixed", "block": 64, "summary": 4}, {"type": "strided", "stride": 64}])
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_heads_do_not_repeat_every_key_value_head_at_once(monkeypatch, pattern, causal):
    """H = 8 over Hkv = 2, with the key/value heads repeated for all query heads allowed and one
    key/value head at a time forced: dense, the band, fixed and strided repeat none either way
    (they hand torch's CPU kernel the grouped heads as they are), so neither takes more than the
    same call over key/value heads repeated beforehand. Causal strided took 24.1 against 12.2 MiB
    when it still repeated them."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 4096, 64, generator=g) for h in (8, 2, 2))
    peaks, outs = [], []
    for limit in (1 << 62, 0):
        monkeypatch.setattr(importlib.import_module("engine.attention"), "GQA_REPEAT_BYTES", limit)
        with PeakMemory("cpu") as mem:
            outs.append(attention(q, k, v, pattern, causal=causal))
        peaks.append(mem.peak_bytes)
    torch.testing.assert_close(outs[0], outs[1])
    output = 8 * 4096 * 64 * 4
    k8, v8 = (x.repeat_interleave(4, dim=1) for x in (k, v))
    with PeakMemory("cpu") as mem:
        attention(q, k8, v8, pattern, causal=causal)
    assert max(peaks) <= mem.peak_bytes + output / 16, (peaks, mem.peak_bytes)


def test_multi_query_dense_and_band_never_repeat_the_key_value_head():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 4096, 64, generator=g) for h in (8, 1, 1))
    output = 8 * 4096 * 64 * 4
    repeated = 2 * output  # k and v repeated for the 8 query heads
    for pattern in ({"type": "dense"}, {"type": "sliding_window", "window": 64}):
        with PeakMemory("cpu") as mem:
            out = attention(q, k, v, pattern)
        # the band's pieces and their concatenation take two outputs; a repeat would add `repeated`
        assert mem.peak_bytes < 2 * output + repeated / 2, (pattern, mem.peak_bytes)
        expected = attention(q, k.expand(-1, 8, -1, -1).contiguous(), v.expand(-1, 8, -1, -1).contiguous(), pattern)
        torch.testing.assert_close(out, expected)


SHORT_RUN_PATTERNS = [
    {"type": "strided", "stride": 64},
    {"type": "fixed", "block": 128, "summary": 8},
    {"type": "union", "patterns": [{"type": "sliding_window", "window": 256}, {"type": "fixed", "block": 128, "summary": 8}]},
    {"type": "union", "patterns": [{"type": "sliding_window", "window": 128}, {"type": "strided", "stride": 128}]},
]


@pytest.mark.parametrize("pattern", SHORT_RUN_PATTERNS)
@pytest.mark.parametrize("lk", [8192, 8191])  # whole blocks and classes, and not
@pytest.mark.parametrize("lq", [1, 100])  # a decode step; a chunk longer than the stride
def test_a_short_run_copies_no_more_than_the_keys_it_attends(pattern, lk, lq):
    """A few query rows after lk keys: the kernels read what the rows attend (views of K and V, a
    copy of fixed's summary keys: c/l of them) and never pad or copy all of K and V."""
    q = torch.randn(1, 2, lq, 64)
    k, v = (torch.randn(1, 2, lk, 64) for _ in range(2))
    with PeakMemory("cpu") as mem:
        out = attention(q, k, v, pattern)
    assert out.shape == (1, 2, lq, 64)
    assert mem.peak_bytes < k.numel() * 4 / 4, mem.peak_bytes  # both K and V are 2 * k.numel() * 4 bytes


HALF_SHORT_RUNS = [(pattern, lq) for pattern in ({"type": "sliding_window", "window": 256}, *SHORT_RUN_PATTERNS)
                   for lq in (1, 4)]  # rows of 1 to 4 classes: under 1/8 of the keys; 25: past the 24- and 16-row short runs
HALF_SHORT_RUNS += [(pattern, 25) for pattern in ({"type": "sliding_window", "window": 256}, *SHORT_RUN_PATTERNS[1:3])]
HALF_SHORT_RUNS += [({"type": "fixed", "block": 100, "summary": 2}, 100)]  # a block's rows: blocks and summary converted


@pytest.mark.parametrize("pattern,lq", HALF_SHORT_RUNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_short_run_converts_only_the_keys_it_reads(pattern, dtype, lq):
    """Where torch's CPU kernels are slow in half precision the engine computes in float32; a
    decode step converts the keys it reads, not all of K and V (over 65536 bfloat16 keys that
    took 12 ms, 90x a sliding-window step)."""
    q = torch.randn(1, 2, lq, 64).to(dtype)
    k, v = (torch.randn(1, 2, 8191, 64).to(dtype) for _ in range(2))
    with PeakMemory("cpu") as mem:
        out = attention(q, k, v, pattern)
    assert out.dtype == dtype and out.shape == (1, 2, lq, 64)
    assert mem.peak_bytes < k.numel() * 4 / 4, mem.peak_bytes  # K and V in float32: 8x that


@pytest.mark.parametrize("pattern,causal", [
    ({"type": "union", "patterns": [{"type": "sliding_window", "window": 256}, {"type": "fixed", "block": 128, "summary": 8},
                                    {"type": "fixed", "block": 96, "summary": 4}]}, True),  # no structured kernel
    ({"type": "union", "patterns": [{"type": "fixed", "block": 128, "summary": 8},
                                    {"type": "fixed", "block": 96, "summary": 4}]}, False),  # nor without causal
])
def test_the_masked_fallback_stays_within_its_budget(pattern, causal):
    """The masked kernel's chunks hold about MASK_BUDGET mask elements; a chunk once grew past its
    budget to 8192 x 8192 (over 1 GiB)."""
    n = 8192
    q, k, v = (torch.randn(1, 1, n, 64) for _ in range(3))
    with PeakMemory("cpu") as mem:
        out = attention(q, k, v, pattern, causal=causal)
    assert backend_for(parse_pattern(pattern), 1, n, n, causal, "cpu") == "masked"
    assert out.shape == (1, 1, n, 64)
    assert mem.peak_bytes < 160 * 2**20, mem.peak_bytes


@pytest.mark.parametrize("pattern", [{"type": "sliding_window", "window": 256}, {"type": "fixed", "block": 128, "summary": 8}])
def test_a_short_run_with_another_value_head_dim_pads_only_what_it_reads(pattern):
    """Dv != D: the kernels pad each call's keys or values to one head dim, not all of K or V
    (sliding_window(256), one row after 65536 keys, Dv 32: 20 ms padding V whole, 0.2 ms so)."""
    q, k, v = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 8191, 64), torch.randn(1, 2, 8191, 32)
    with PeakMemory("cpu") as mem:
        out = attention(q, k, v, pattern)
    assert out.shape == (1, 2, 1, 32)
    assert mem.peak_bytes < v.numel() * 4 / 2, mem.peak_bytes  # V padded to 64: 2 * v.numel() * 4 bytes


@pytest.mark.parametrize("pattern,bound", [
    # K and V take 2 * k.numel() * 4 bytes
    ({"type": "per_head", "patterns": [{"type": "sliding_window", "window": 256}, {"type": "strided", "stride": 64}]},
     1 / 4),
    # rows of 4096-row blocks keep buffers of whole blocks (q padded, out): 2 x 1/4 of K here;
    # the whole [4096, 4096] mask's int64 temporaries took 16 times K
    ({"type": "union", "patterns": [{"type": "strided", "stride": 65}, {"type": "fixed", "block": 4096, "summary": 2}]},
     2),
])
def test_a_decode_step_of_several_batch_items_or_a_big_block_copies_little(pattern, bound):
    """per_head's head ranges of B > 1 items are views the kernels copied whole (all of K and V,
    48 ms against 2.2 at B = 4 after 65536 keys); a big fixed block beside a stride built its whole
    [l, l] mask for one row (47 ms against 2.5)."""
    q = torch.randn(2, 4, 1, 64)  # per_head: two heads per pattern, a view no one stride spans
    k, v = (torch.randn(2, 4, 8192, 64) for _ in range(2))
    with PeakMemory("cpu") as mem:
        out = attention(q, k, v, pattern)
    assert out.shape == (2, 4, 1, 64)
    assert mem.peak_bytes < k.numel() * 4 * bound, mem.peak_bytes


def test_grouped_query_rows_past_the_stride_read_the_key_value_head_in_place():
    """24 rows, strided(16), 8 query heads over one key/value head: each query head's stride-0 view
    of it was written out (8 copies of K and V; 56 ms after 65536 keys, 15 now)."""
    q = torch.randn(1, 8, 24, 64)
    k, v = (torch.randn(1, 1, 8192, 64) for _ in range(2))
    with PeakMemory("cpu") as mem:
        out = attention(q, k, v, {"type": "strided", "stride": 16})
    assert out.shape == (1, 8, 24, 64)
    assert mem.peak_bytes < k.numel() * 4, mem.peak_bytes  # the copies: 16 times that
