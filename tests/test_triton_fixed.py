"""fixed's Triton kernel (engine/kernels/triton_fixed.py) against the float64 reference, in Triton's
interpreter on the CPU (TRITON_INTERPRET=1, set by conftest.py without a GPU), and the engine's
choice of it on CUDA's branches; the fused-SDPA plan it replaces stays checked as CUDA's fallback."""

from __future__ import annotations

import math

import pytest
import torch

import reference
from cuda_emulation import counted_call, cuda_kernels_on_cpu, seeded_variants_failing
from engine import attention
from engine.kernels import merge, triton_fixed
from engine.kernels.merge import merge_to
from engine.kernels.fixed import fused_fixed_attention
from engine.kernels.device import runs_on_triton
from layouts import far_apart_rows
from engine.kernels.triton_fixed import (BUSY_PROGRAMS, MAX_HEAD_DIM, MAX_SKIP_STRIDES, key_splits, matches_contract,
                                         triton_fixed_attention)

pytestmark = pytest.mark.skipif(triton_fixed.triton is None, reason="Triton is not installed")


# (B, H, Hkv, Lq, Lk, D, Dv, block, summary): n off every tile size, Lq < Lk, GQA, one head, a block
# longer than the keys, every column a summary column, one summary column, blocks of 1, head dims
# off a power of two (and Dv != D), a decode row, a tile spanning several blocks.
SHAPES = [
    (1, 1, 1, 37, 37, 16, 16, 8, 2),
    (2, 4, 2, 100, 100, 16, 8, 16, 4),
    (1, 2, 1, 10, 130, 12, 20, 16, 2),
    (1, 2, 2, 70, 70, 16, 16, 128, 8),
    (1, 2, 2, 70, 70, 16, 16, 5, 5),
    (1, 3, 1, 65, 200, 8, 8, 7, 1),
    (1, 2, 2, 50, 50, 16, 16, 1, 1),
    (1, 2, 1, 1, 300, 16, 16, 16, 3),
    (1, 1, 1, 150, 150, 64, 64, 64, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}H{s[1]}/{s[2]}_{s[3]}x{s[4]}_D{s[5]}/{s[6]}_fixed{s[7]},{s[8]}"
                                               for s in SHAPES])
def test_the_kernel_matches_the_reference(shape, causal, dtype):
    b, h, hkv, lq, lk, d, dv, block, summary = shape
    g = torch.Generator().manual_seed(lq * lk + block)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
    out, lse = triton_fixed_attention(q, k, v, block=block, summary=summary, scale=1 / math.sqrt(d), causal=causal)
    ref_out, ref_lse = reference.fixed_step_reference(q, k, v, block=block, summary=summary, causal=causal,
                                                      min_distance=0, skip_strides=(), scale=1 / math.sqrt(d))
    assert out.dtype == dtype and out.shape == (b, h, lq, dv) and lse.dtype == torch.float32
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


# (keys, Hkv, block, summary): rows 20..119 of fixed(16, 4), most of their summary keys in their
# own blocks' range; rows 600..699 of fixed(20, 3), 90 summary keys of the blocks before theirs,
# in float32's tiles of 32 keys two full tiles (fewer with a distance past a block).
STEP_KEYS = {"few_summary_keys": (120, 2, 16, 4), "full_summary_tiles": (700, 1, 20, 3)}


@pytest.mark.parametrize("splits", [1, 3], ids=["one_program", "keys_split_3_ways"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("min_distance, skip_strides", [(0, ()), (8, ()), (0, (3,)), (8, (3, 5)), (30, (2, 3, 5, 7)),
                                                        (45, (4, 7, 20, 11)), (200, ()), (650, ())])
@pytest.mark.parametrize("keys", list(STEP_KEYS))
def test_a_unions_fixed_step_skips_the_window_and_the_strides(keys, causal, min_distance, skip_strides, splits):
    """A union's fixed step: keys nearer than the window's width and at the strides' multiples are
    another member's (a stride of 20 is every summary key of some rows of fixed(20, 3)); rows left
    with no key (a distance past every key) get zeros and -inf, also where a query tile's keys are
    split between programs (some of which then see none). Full summary tiles take no mask, or only
    the strides'."""
    lk, hkv, block, summary = STEP_KEYS[keys]
    g = torch.Generator().manual_seed(min_distance + splits)
    q = torch.randn(1, 2, 100, 16, generator=g)
    k, v = (torch.randn(1, hkv, lk, 16, generator=g) for _ in range(2))
    kwargs = dict(block=block, summary=summary, causal=causal, min_distance=min_distance, skip_strides=skip_strides)
    out, lse = triton_fixed_attention(q, k, v, scale=0.25, splits=splits, **kwargs)
    ref_out, ref_lse = reference.fixed_step_reference(q, k, v, scale=0.25, **kwargs)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    if min_distance >= lk:
        assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("splits", [1, 3], ids=["one_program", "keys_split_3_ways"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("seeded_rows", [(0, 100), (13, 70)], ids=["every_row", "a_run_inside"])
def test_a_seed_comes_out_merged_with_the_step(seeded_rows, causal, dtype, splits):
    """A union's fixed step continues a seed (the window's keys' partial, in the inputs' dtype): its
    rows come out as union(sliding_window, fixed), the other rows as the fixed step alone, also
    where a query tile's keys are split between programs (the seed counts once)."""
    first, stop = seeded_rows
    window, block, summary = 10, 16, 3
    g = torch.Generator().manual_seed(first + splits)
    q = torch.randn(1, 2, 100, 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 1, 150, 16, generator=g).to(dtype) for _ in range(2))
    i, j = torch.arange(50, 150)[:, None], torch.arange(150)[None, :]
    near = ((i - j >= 0) if causal else torch.ones_like(i - j, dtype=torch.bool)) & ((i - j).abs() < window)
    scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, first:stop].double(), k.double().expand(-1, 2, -1, -1)) * 0.25
    seed_lse = torch.logsumexp(scores.masked_fill(~near[first:stop], float("-inf")), -1)
    seed_out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - seed_lse.unsqueeze(-1)).masked_fill(~near[first:stop], 0),
                            v.double().expand(-1, 2, -1, -1))
    out, lse = triton_fixed_attention(q, k, v, block=block, summary=summary, scale=0.25, causal=causal,
                                      min_distance=window, splits=splits,
                                      seed=(first, seed_out.to(dtype), seed_lse.float()))
    union = {"type": "union", "patterns": [{"type": "sliding_window", "window": window},
                                           {"type": "fixed", "block": block, "summary": summary}]}
    ref_out, ref_lse = reference.reference_attention(q, k, v, union, causal=causal, scale=0.25)
    step_out, step_lse = reference.fixed_step_reference(q, k, v, block=block, summary=summary, causal=causal,
                                                        min_distance=window, skip_strides=(), scale=0.25)
    for rows in (slice(0, first), slice(stop, None)):
        ref_out[:, :, rows], ref_lse[:, :, rows] = step_out[:, :, rows], step_lse[:, :, rows]
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_long_prefill_matches_the_reference(dtype):
    """fixed(8, 4) over 600 tokens: the last query tiles walk up to 9 full summary tiles."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 600, 16, generator=g).to(dtype) for _ in range(3))
    out, lse = triton_fixed_attention(q, k, v, block=8, summary=4, scale=0.25)
    ref_out, ref_lse = reference.fixed_step_reference(q, k, v, block=8, summary=4, causal=True, min_distance=0,
                                                      skip_strides=(), scale=0.25)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [1, 2], ids=["one_program", "keys_split_2_ways"])
@pytest.mark.parametrize("lq", [1, 3, 17])
def test_decode_rows_at_every_offset_in_a_block(lq, splits):
    """Short runs end anywhere in a block: the tile's own-block range and summary count follow its
    last row."""
    g = torch.Generator().manual_seed(lq)
    k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(2))
    for lk in range(lq, 96, 5):
        q = torch.randn(1, 2, lq, 16, generator=g)
        out, lse = triton_fixed_attention(q, k[..., :lk, :], v[..., :lk, :], block=16, summary=3, scale=0.25,
                                          splits=splits)
        ref_out, ref_lse = reference.fixed_step_reference(q, k[..., :lk, :], v[..., :lk, :], block=16, summary=3,
                                                          causal=True, min_distance=0, skip_strides=(), scale=0.25)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_few_programs_split_their_keys_between_more():
    """A decode step is B x H programs, each walking every summary key in turn: its keys go to
    more programs (up to BUSY_PROGRAMS in all, at least MIN_TILES_PER_SPLIT key tiles each), a
    prefill's stay in one."""
    assert key_splits(8, 65536, 128, 8, 64) == 8  # 66 key tiles
    assert key_splits(1, 65536, 128, 8, 64) == 8
    assert key_splits(8, 4096, 128, 8, 64) == 1  # 6 key tiles: too few to split
    assert key_splits(BUSY_PROGRAMS, 65536, 128, 8, 64) == 1  # the GPU is full
    assert key_splits(128, 65536 * 8, 16, 8, 64) == BUSY_PROGRAMS // 128


def test_a_decode_step_on_cudas_branches_splits_its_keys(monkeypatch):
    """Through the engine: one row after 2048 keys of fixed(16, 8) is 33 key tiles (of 32 keys, in
    float32) for each of 2 programs, split 4 ways, and still the reference's result."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, 2048, 16, generator=g) for _ in range(2))
    pattern = {"type": "fixed", "block": 16, "summary": 8}
    splits = []
    real = triton_fixed.key_splits
    monkeypatch.setattr(triton_fixed, "key_splits", lambda *a: splits.append(real(*a)) or splits[-1])
    out, calls = _kernel_calls(monkeypatch, q, k, v, pattern)
    assert len(calls) == 1 and splits[-1] == 4  # (the first: the probe's tiny problem, unsplit)
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0], atol=2e-5, rtol=2e-5)


def test_it_reads_any_layout():
    """Strided views (transposed heads, a sliced feature axis) go to the kernel as they are."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 70, 2, 24, generator=g).transpose(1, 2)[..., :16]
    k, v = (torch.randn(1, 90, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    out, lse = triton_fixed_attention(q, k, v, block=16, summary=2, scale=0.25)
    ref_out, ref_lse = reference.fixed_step_reference(q, k, v, block=16, summary=2, causal=True, min_distance=0,
                                                      skip_strides=(), scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)


UNIONS = {
    "fixed": {"type": "fixed", "block": 16, "summary": 2},
    "window_fixed": {"type": "union", "patterns": [{"type": "sliding_window", "window": 24},
                                                    {"type": "fixed", "block": 16, "summary": 2}]},
    "strides_fixed": {"type": "union", "patterns": [{"type": "strided", "stride": 12}, {"type": "strided", "stride": 7},
                                                     {"type": "fixed", "block": 32, "summary": 4}]},
    "window_strided_fixed": {"type": "union", "patterns": [{"type": "sliding_window", "window": 24},
                                                            {"type": "strided", "stride": 20},
                                                            {"type": "fixed", "block": 16, "summary": 2}]},
}
# Unions whose fixed step follows one other step (the band's, the band and stride's): it continues
# that step's partial (`Plan.continues`). Two strides are two steps, merged first.
SEEDED_UNIONS = {"window_fixed", "window_strided_fixed"}


def _kernel_calls(monkeypatch, q, k, v, pattern, causal=True):
    """(output, the Triton kernel's calls) of one engine call on CUDA's branches, probed before."""
    calls = []
    skips = sum(member["type"] == "strided" for member in pattern.get("patterns", []))
    with cuda_kernels_on_cpu():
        if skips <= MAX_SKIP_STRIDES and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM:  # its variants' probes,
            assert all(matches_contract(q.device, q.dtype, q.shape[-1], v.shape[-1], causal, skips, seeded)
                       for seeded in (False, True))  # before the count
        monkeypatch.setattr(triton_fixed, "triton_fixed_attention",
                            lambda *a, **kw: calls.append(kw) or triton_fixed_attention(*a, **kw))
        out = attention(q, k, v, pattern, causal=causal)
    return out, calls


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("name", list(UNIONS))
def test_cuda_plans_take_the_kernel_for_their_fixed_step(monkeypatch, name, causal):
    """On CUDA's branches a plan's fixed step is one Triton launch, and the result the reference's;
    after one other step it continues that step's partial, with no merge launch after."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 300, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    pattern = UNIONS[name]
    merges = []
    monkeypatch.setattr(merge, "merge_to", lambda *a: merges.append(a) or merge_to(*a))
    out, calls = _kernel_calls(monkeypatch, q, k, v, pattern, causal)
    assert len(calls) == 1
    assert (calls[0].get("seed") is not None) == (name in SEEDED_UNIONS)
    assert (merges == []) == (name in SEEDED_UNIONS or "patterns" not in pattern)
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern, causal=causal)[0],
                               atol=3e-2, rtol=3e-2)


def test_a_seeded_variant_that_fails_its_probe_leaves_the_kernel_and_a_merge(monkeypatch):
    """Where the seeded variant fails its probe and the plain one passes, a union's fixed step takes
    the plain kernel and merges the other step's partial after it (not the fused plan)."""
    seeded_variants_failing(monkeypatch, triton_fixed)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    merges = []
    monkeypatch.setattr(merge, "merge_to", lambda *a: merges.append(a) or merge_to(*a))
    pattern = UNIONS["window_fixed"]
    out, calls = _kernel_calls(monkeypatch, q, k, v, pattern)
    assert len(calls) == 1 and calls[0].get("seed") is None and len(merges) == 1
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("pattern, d, dv", [
    ({"type": "union", "patterns": [*({"type": "strided", "stride": s} for s in (5, 7, 11, 13, 17)),
                                    {"type": "fixed", "block": 16, "summary": 2}]}, 16, 16),  # 5 strides > 4
    ({"type": "fixed", "block": 16, "summary": 2}, 16, 264),  # v's head dim past the kernel's 256
])
def test_past_the_kernels_limits_fixed_takes_the_fused_plan(monkeypatch, pattern, d, dv):
    assert len(pattern.get("patterns", [])) - 1 > MAX_SKIP_STRIDES or max(d, dv) > MAX_HEAD_DIM  # past a limit
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, 300, d, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 300, dv, generator=g)
    out, calls = _kernel_calls(monkeypatch, q, k, v, pattern)
    assert calls == []
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("lq", [1, 300], ids=["decode", "prefill"])
def test_grouped_key_value_heads_reach_the_kernel_as_they_are(monkeypatch, lq):
    """On CUDA fixed's kernel reads key/value head h // (H / Hkv) itself: one call for all query
    heads, with K and V as given (a decode step used to copy each key/value head H / Hkv times)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 8, lq, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    pattern = UNIONS["fixed"]
    out, calls = _kernel_calls(monkeypatch, q, k, v, pattern)
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0], atol=3e-2, rtol=3e-2)
    _, count = counted_call(q, k, v, pattern)
    assert not {"aten.repeat_interleave.self_int", "aten.index_select.default", "aten.expand.default"} & set(count.ops)


def test_the_fused_plan_repeats_grouped_heads_itself_on_cuda(monkeypatch):
    """Where the kernel does not run, CUDA's fused calls get the heads repeated (they take equal ones)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 20, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    pattern = UNIONS["fixed"]
    with cuda_kernels_on_cpu():
        monkeypatch.setattr(triton_fixed, "runs_on_triton", lambda device: False)
        out = attention(q, k, v, pattern)
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0], atol=3e-2, rtol=3e-2)


def test_the_kernel_runs_only_on_cudas_branches(monkeypatch):
    cpu = torch.device("cpu")
    assert not runs_on_triton(cpu)  # the CPU's rules: fused SDPA
    with cuda_kernels_on_cpu():
        assert runs_on_triton(cpu)  # emulated CUDA, the interpreter here
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not runs_on_triton(cpu)  # a compiled Triton kernel cannot take CPU tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal, skips, seeded", [(True, 0, False), (False, 4, False), (True, 2, True)],
                         ids=["causal", "noncausal-4-strides", "causal-2-strides-seeded"])
def test_each_variant_is_probed_against_the_contract(dtype, causal, skips, seeded):
    with cuda_kernels_on_cpu():
        assert matches_contract(torch.device("cpu"), dtype, 12, 20, causal, skips, seeded)


def test_a_variant_that_fails_its_probe_leaves_its_calls_on_the_fused_plan(monkeypatch, caplog):
    """A Triton build that cannot compile a variant (too old, over the GPU's shared memory), or
    miscompiles it, must not fail requests or answer wrong: that variant's calls take the fused
    plan, said in the log, and the other variants keep the kernel."""
    launch = triton_fixed.triton_fixed_attention

    def fails_in_float16(q, k, v, **kwargs):
        if q.dtype == torch.float16:
            raise RuntimeError("out of resources: shared memory")
        return launch(q, k, v, **kwargs)

    def wrong_in_float16(q, k, v, **kwargs):
        out, lse = launch(q, k, v, **kwargs)
        return (out * 2, lse) if q.dtype == torch.float16 else (out, lse)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g).half() for _ in range(3))
    pattern = UNIONS["fixed"]
    for fault, said in ((fails_in_float16, "failed to run"), (wrong_in_float16, "differs from the contract")):
        calls = []
        with cuda_kernels_on_cpu():
            monkeypatch.setattr(triton_fixed, "triton_fixed_attention",
                                lambda *a, **kw: calls.append(kw) or fault(*a, **kw))
            caplog.clear()
            assert not triton_fixed.takes(q, v, True, ())
            assert [r.levelname for r in caplog.records] == ["WARNING"] and said in caplog.text
            assert "torch.float16 on cpu, head dims 16 / 16, causal, 0 skipped strides" in caplog.text
            assert triton_fixed.takes(q.bfloat16(), v.bfloat16(), True, ())  # another variant keeps the kernel
            calls.clear()  # the probes' own
            out = attention(q, k, v, pattern)
        assert calls == []
        torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0],
                                   atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("min_distance, skip_strides", [(0, ()), (24, ()), (0, (12,)), (24, (12, 7))])
@pytest.mark.parametrize("lq", [300, 20, 1])
def test_the_fused_plan_stays_exact_on_cudas_branches(lq, min_distance, skip_strides, causal):
    """CUDA's fallback (no Triton, a failed probe, more strides than the kernel skips) is the
    fused-SDPA plan on CUDA's kernels: still checked, emulated."""
    g = torch.Generator().manual_seed(lq + min_distance)
    q = torch.randn(1, 2, lq, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    kwargs = dict(block=16, summary=2, causal=causal, min_distance=min_distance, skip_strides=skip_strides)
    with cuda_kernels_on_cpu():
        out, lse = fused_fixed_attention(q, k, v, scale=0.25, **kwargs)
    ref_out, ref_lse = reference.fixed_step_reference(q, k, v, scale=0.25, **kwargs)
    torch.testing.assert_close(out.double(), ref_out, atol=3e-2, rtol=3e-2)
    seen = ref_lse > float("-inf")
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=3e-2, rtol=3e-2)
    assert (lse[~seen] == float("-inf")).all()


def test_an_engine_call_on_cudas_branches_matches_the_reference_with_grouped_heads():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 130, 16, generator=g)
    k, v = (torch.randn(2, 2, 130, 16, generator=g) for _ in range(2))
    pattern = UNIONS["window_fixed"]
    with cuda_kernels_on_cpu():
        out = attention(q, k, v, pattern)
    torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0], atol=2e-5, rtol=2e-5)


def test_offsets_past_2_31_elements_are_taken_in_64_bits():
    """As the band's kernel (tests/test_triton_band.py): keys and values whose rows lie 2^21
    elements apart, past row 1024 offsets beyond 2^31, read in the 64-bit variant."""
    g = torch.Generator().manual_seed(5)
    lk, d = 1100, 16
    kv = torch.randn(lk, 2 * d, generator=g).to(torch.bfloat16)
    k, v = far_apart_rows(kv[:, :d].contiguous()), far_apart_rows(kv[:, d:].contiguous())
    q = torch.randn(1, 1, 70, d, generator=g).to(torch.bfloat16)
    out, lse = triton_fixed_attention(q, k, v, block=16, summary=2, scale=0.25)
    ref_out, ref_lse = reference.fixed_step_reference(q, kv[None, None, :, :d], kv[None, None, :, d:], block=16,
                                                      summary=2, causal=True, min_distance=0, skip_strides=(),
                                                      scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-2)
