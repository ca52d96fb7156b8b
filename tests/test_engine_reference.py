"""engine.attention against the float64 reference on shapes that hit every edge."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy
import pytest
import torch

from engine import attention
from engine.planner import Plan
from reference import assert_matches_reference, reference_attention

pytestmark = pytest.mark.usefixtures("engine_passes")  # small shapes: every kernel, CPU and CUDA

SW = lambda w: {"type": "sliding_window", "window": w}  # noqa: E731
ST = lambda s: {"type": "strided", "stride": s}  # noqa: E731
FX = lambda l, c: {"type": "fixed", "block": l, "summary": c}  # noqa: E731

PATTERNS = {
    "dense": {"type": "dense"},
    "sliding": SW(16),
    "sliding_small": SW(3),
    "sliding_1": SW(1),
    "sliding_wider_than_n": SW(1000),
    "strided": ST(8),
    "strided_odd": ST(7),
    "strided_1": ST(1),
    "strided_wider_than_n": ST(500),
    "fixed": FX(16, 4),
    "fixed_odd": FX(10, 3),
    "fixed_summary_is_block": FX(10, 10),
    "fixed_summary_1": FX(7, 1),
    "union_paper": {"type": "union", "patterns": [SW(12), ST(8)]},
    "union_odd": {"type": "union", "patterns": [ST(5), SW(12)]},
    "union_window_fixed": {"type": "union", "patterns": [FX(16, 4), SW(5)]},
    "union_window_over_block": {"type": "union", "patterns": [SW(20), FX(10, 3)]},
    "union_three": {"type": "union", "patterns": [SW(12), ST(5), FX(9, 2)]},
    "union_stride_fixed": {"type": "union", "patterns": [FX(8, 3), ST(6)]},
    "union_two_strides": {"type": "union", "patterns": [SW(3), ST(5), ST(7)]},
    "union_strides_fixed": {"type": "union", "patterns": [ST(4), FX(9, 2), ST(6)]},  # strides sharing a factor
    "union_two_fixed": {"type": "union", "patterns": [SW(3), FX(9, 2), FX(6, 1)]},  # no structured kernel
    "union_nested": {"type": "union", "patterns": [{"type": "union", "patterns": [SW(4), SW(9)]}, ST(11)]},
    "union_nested_wide": {"type": "union", "patterns": [  # 9 leaves, more than one union lists
        {"type": "union", "patterns": [SW(3), ST(5), ST(7), ST(9), ST(11)]},
        {"type": "union", "patterns": [ST(13), ST(17), ST(19), FX(9, 2)]}]},
    "union_covered": {"type": "union", "patterns": [ST(8), SW(1), ST(4), FX(10, 10)]},  # -> dense
    "union_strides": {"type": "union", "patterns": [ST(6), SW(1), ST(4), ST(12)]},  # -> strided 6 or 4
    "per_head": {"type": "per_head", "patterns": [SW(12), ST(5)]},
    "per_head_nested": {"type": "per_head", "patterns": [{"type": "union", "patterns": [SW(4), ST(6)]}, FX(8, 2)]},
}

# (B, H, Hkv, Lq, Lk, D, Dv)
SHAPES = {
    "square_ragged": (1, 2, 2, 133, 133, 16, 16),
    "lq_lt_lk": (1, 2, 2, 90, 103, 16, 16),
    "lq_much_lt_lk": (2, 2, 1, 70, 300, 8, 8),
    "decode": (1, 2, 2, 1, 77, 16, 16),
    "decode_gqa": (2, 4, 2, 3, 200, 16, 16),  # short runs: fewer rows than most strides
    "decode_row_gqa": (2, 4, 2, 1, 2100, 16, 16),  # query heads folded into rows of their key/value head
    "decode_mqa": (1, 4, 1, 5, 300, 16, 8),
    "one": (1, 1, 1, 1, 1, 8, 8),
    "one_head": (1, 1, 1, 77, 133, 16, 16),
    "gqa_dv": (2, 4, 2, 100, 100, 16, 24),
    "mqa": (1, 4, 1, 97, 120, 16, 8),
}


def test_each_pass_runs_the_kernels_it_names(engine_passes):
    """The module's passes differ: a union of a window, a stride and fixed over 100 keys runs
    masked as shipped, else on its structured plan; the last on CUDA's branches."""
    from engine.attention import backend_for
    from engine.kernels.device import kernel_device
    from engine.patterns import parse_pattern

    structured = "band+strided+fixed"
    expected = {"as_shipped": "masked", "structured_at_every_size": structured, "cuda_kernels_on_cpu": structured}
    device = kernel_device(torch.device("cpu"))
    pattern = parse_pattern(PATTERNS["union_three"])
    assert backend_for(pattern, 2, 100, 100, True, device) == expected[engine_passes]
    assert kernel_device(torch.device("cpu")) == ("cuda" if engine_passes == "cuda_kernels_on_cpu" else "cpu")


def _check(pattern, shape, causal, dtype, seed=0):
    b, h, hkv, lq, lk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
    if pattern["type"] == "per_head" and h % len(pattern["patterns"]):
        with pytest.raises(ValueError, match="pattern.patterns"):
            attention(q, k, v, pattern, causal=causal)
        return
    out, lse = attention(q, k, v, pattern, causal=causal, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal)
    assert out.dtype == dtype and out.shape == (b, h, lq, dv)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, lq)
    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert_matches_reference(out, lse, ref_out, ref_lse, tol=tol)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_matches_reference_float32(pattern, shape, causal):
    _check(pattern, shape, causal, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
@pytest.mark.parametrize("shape", ["gqa_dv", "decode_gqa", "decode_mqa"])  # long runs and short runs
def test_matches_reference_half(pattern, dtype, shape):
    _check(pattern, SHAPES[shape], True, dtype)


def test_three_dimensional_inputs_give_three_dimensional_results():
    q, k, v = torch.randn(2, 50, 8), torch.randn(1, 60, 8), torch.randn(1, 60, 4)
    out, lse = attention(q, k, v, SW(5), return_lse=True)
    ref_out, ref_lse = reference_attention(q[None], k[None], v[None], SW(5))
    assert out.shape == (2, 50, 4) and lse.shape == (2, 50)
    torch.testing.assert_close(out.double(), ref_out[0], atol=2e-5, rtol=2e-5)


def test_custom_scale():
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    out = attention(q, k, v, ST(3), scale=0.7)
    ref_out, _ = reference_attention(q, k, v, ST(3), scale=0.7)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scale", [0.0, -0.0, -0.7, -3.0, 5e-324, -5e-324, 1e-40])
@pytest.mark.parametrize("pattern", ["dense", "sliding", "strided", "fixed", "union_three", "union_two_fixed"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_zero_negative_and_underflowing_scales(pattern, scale, causal):
    """torch's fused kernels scale scores after masking them (a masked key times 0 is NaN, times a
    negative scale +inf); the engine hands them a positive scale with the same scores."""
    q, k, v = torch.randn(2, 4, 23, 8), torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    out, lse = attention(q, k, v, PATTERNS[pattern], causal=causal, scale=scale, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, PATTERNS[pattern], causal=causal, scale=scale)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["dense", "sliding", "strided", "fixed", "union_three"])
@pytest.mark.parametrize("q_shape, kv_shape", [((1, 2, 0, 8), (1, 2, 9, 8)), ((0, 2, 3, 8), (0, 1, 9, 8)),
                                               ((1, 0, 3, 8), (1, 2, 9, 8)), ((1, 2, 0, 8), (1, 2, 0, 8))])
def test_no_query_rows_give_empty_results(pattern, q_shape, kv_shape):
    out, lse = attention(torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape), PATTERNS[pattern],
                         return_lse=True)
    assert out.shape == q_shape and lse.shape == q_shape[:3] and lse.dtype == torch.float32


@pytest.mark.parametrize("pattern", ["dense", "sliding", "strided", "fixed", "union_three", "union_two_fixed"])
def test_inputs_whose_features_are_not_adjacent(pattern):
    """Transposed views (last stride not 1), as `x.mT` of a [B, H, D, L] tensor gives."""
    q, k, v = (torch.randn(2, h, 16, n).mT for h, n in ((4, 45), (2, 60), (2, 60)))
    out, lse = attention(q, k, v, PATTERNS[pattern], return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, PATTERNS[pattern])
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


def _layouts(shape: tuple[int, int, int, int]):
    """Tensors of `shape` in every memory order of its axes: a head dim of 1 may then have any stride."""
    for order in itertools.permutations(range(4)):
        base = torch.randn([shape[axis] for axis in order])
        yield base.permute([order.index(axis) for axis in range(4)])


@pytest.mark.parametrize("scale", [None, -0.5], ids=["default", "negative"])
@pytest.mark.parametrize("pattern", ["dense", "strided_wider_than_n", "fixed", "union_stride_fixed", "union_two_fixed",
                                     "sliding", "union_paper"])
def test_a_head_dim_of_1_in_any_layout(pattern, scale):
    """torch calls a tensor whose last dim has size 1 contiguous whatever that dim's stride; its CPU
    kernel reads such a stride as is (a permuted q gave errors up to 1e31 once padded to Dv = 3)."""
    k, v = torch.randn(1, 2, 40, 1), torch.randn(1, 2, 40, 3)
    for q in _layouts((1, 2, 6, 1)):
        out, lse = attention(q, k, v, PATTERNS[pattern], scale=scale, return_lse=True)
        ref_out, ref_lse = reference_attention(q, k, v, PATTERNS[pattern], scale=scale)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5, msg=lambda m: f"{q.stride()}: {m}")
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


def _overlapping(shape, row_stride: int, seed: int) -> torch.Tensor:
    """A view whose rows overlap, `row_stride` apart (as `unfold` makes), each head after the last."""
    b, h, length, d = shape
    head_stride = row_stride * (length - 1) + d
    base = torch.randn(b * h * head_stride, generator=torch.Generator().manual_seed(seed))
    return base.as_strided(shape, (h * head_stride, head_stride, row_stride, 1))


@pytest.mark.parametrize("overlapping, d, dv", [("q", 3, 3), ("k", 3, 1), ("v", 1, 3)])
@pytest.mark.parametrize("pattern", ["dense", "sliding_small", "fixed_summary_1", "union_paper", "union_two_fixed"])
def test_inputs_whose_rows_overlap_in_memory(pattern, overlapping, d, dv):
    """torch's CPU kernel lays its output out like q: two rows 1 apart (a tie with the features'
    stride) gave an output with features 2 apart, read as if adjacent (errors up to 4e19); k and v
    views alike, once padded to one head dim, were misread too (engine fuzz: 150 of 3000 layouts)."""
    shapes = {"q": (1, 2, 2, d), "k": (1, 2, 2, d), "v": (1, 2, 2, dv)}
    q, k, v = (_overlapping(shape, 1, seed) if name == overlapping else
               torch.randn(shape, generator=torch.Generator().manual_seed(seed))
               for seed, (name, shape) in enumerate(shapes.items()))
    out, lse = attention(q, k, v, PATTERNS[pattern], return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, PATTERNS[pattern])
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("score", [1e3, 4e7, 1e12])
def test_tied_keys_of_huge_scores_stay_a_weighted_mean(monkeypatch, score):
    """Every key alike: a union's partials over equally many keys have equal lse, where past 2^25 log 2
    vanishes in float32's rounding; merged by exp(lse_k - lse) each got weight 1, their sum (up to
    twice the largest value). By weights relative to the largest lse, normalised, every row is a
    weighted mean of its values, and the last row (2 keys in each part) their exact mean. Partials
    over unequal counts keep float32's limit: lse resolves log(count) only to ulp(|lse|). Merged
    partials are torch's plan's (no span kernel): on it the band continues the stride's partial, whose
    lse has lost its count (test_span_kernel_huge_scores_give_weighted_means)."""
    monkeypatch.setattr(importlib.import_module("engine.kernels.span_kernel"), "library", lambda: None)
    length, d = 8, 4
    q = k = torch.full((1, 1, length, d), math.sqrt(score / d))
    v = torch.arange(1.0, length + 1).reshape(1, 1, length, 1)
    pattern = {"type": "union", "patterns": [SW(2), ST(3)]}  # last row: keys 6, 7 and 1, 4
    out = attention(q, k, v, pattern, scale=1.0)
    assert out[0, 0, -1, 0].item() == pytest.approx((2 + 5 + 7 + 8) / 4, rel=1e-6)
    allowed = reference_attention(q, k, v, pattern, scale=1.0)[0]  # exact (float64 softmax)
    assert torch.allclose(allowed[0, 0, -1], out[0, 0, -1].double())
    assert bool((out >= 1).all() and (out <= torch.arange(1.0, length + 1).reshape(1, 1, length, 1)).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_size_one_dims_with_any_strides_under_grouped_heads(dtype):
    """torch calls [1, 1, 1, 3] contiguous whatever its strides; repeated for two query heads and
    converted to float32, a v of strides (1, 1, 1, 1) came out with features 2 apart: those heads read wrong."""
    q = torch.randn(1, 6, 1, 3).to(dtype)
    k, v = (torch.randn(3, 1, 1, 1).permute(3, 2, 1, 0).to(dtype) for _ in range(2))  # strides (1, 1, 1, 1)
    pattern = {"type": "per_head", "patterns": [SW(3)] * 4 + [ST(1)] * 2}  # heads 4, 5: one run on a view of k, v
    out = attention(q, k, v, pattern, causal=False, scale=1e-8)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern, causal=False, scale=1e-8)[0],
                               atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("patterns", [[SW(3), ST(2)] * 2, [SW(3), ST(2), FX(4, 2), SW(5)] * 2,
                                      [SW(3), SW(3), ST(2), SW(3)], [SW(3), ST(2)] * 4])
@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1])
@pytest.mark.parametrize("lq", [40, 1])
def test_per_head_groups_read_their_heads_as_views(monkeypatch, patterns, kv_heads, lq):
    """per_head's groups whose heads are not one range (its patterns repeat: [a, b, a, b] over 8
    heads gives a heads 0, 1, 4 and 5; over 4, every other head) read q, k and v as views, never
    copies by index: heads evenly spaced as one strided view, others as blocks of them in one call
    or a call per range of them; grouped key/value heads, a decode row, against float64."""
    selected = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda x, dim, index: selected.append(dim % x.dim())
                        or real(x, dim, index))
    g = torch.Generator().manual_seed(len(patterns) + kv_heads)
    q = torch.randn(1, 8, lq, 8, generator=g)
    k, v = (torch.randn(1, kv_heads, 40, 8, generator=g) for _ in range(2))
    pattern = {"type": "per_head", "patterns": patterns}
    for causal in (True, False):
        out, lse = attention(q, k, v, pattern, causal=causal, return_lse=True)
        assert_matches_reference(out, lse, *reference_attention(q, k, v, pattern, causal=causal), tol=2e-5)
    assert 1 not in selected, "heads were copied by index"


HEAD_BLOCK_PATTERNS = {  # over 16 heads
    "blocks": [SW(3), FX(4, 2), ST(50), {"type": "dense"}] * 2,  # a's heads 0, 1 and 8, 9
    "blocks_of_unions": [{"type": "union", "patterns": [SW(3), ST(50)]},
                         {"type": "union", "patterns": [SW(3), FX(4, 2)]},
                         {"type": "union", "patterns": [ST(50), FX(4, 2)]}, SW(200)] * 2,
    "ranges": [SW(3), FX(4, 2), ST(50), {"type": "dense"}],  # a's heads 0 .. 3
}


@pytest.mark.parametrize("patterns", HEAD_BLOCK_PATTERNS)
@pytest.mark.parametrize("kv_heads", [16, 8, 4, 1])
@pytest.mark.parametrize("batch, lq", [(1, 40), (2, 1), (3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_per_head_groups_run_in_one_call(monkeypatch, patterns, kv_heads, batch, lq, dtype):
    """On the CPU a per_head group runs as one call of its plan for every batch item (a stride
    with fewer rows than s: its short runs take them an item at a time): a range of heads as a
    view of them, a repeated pattern's blocks of heads ([a, b, c, d] x 2 over 16 heads: a's heads
    0, 1 and 8, 9) as a view [B * blocks, heads, L, D] (`attention.HeadBlocks`), a batch item's
    each where its blocks share one key/value head; against float64, causal or not. Plans that
    convert half precision whole before their steps take an item at a time (`Plan.converts_whole`)."""
    calls = []
    real = Plan.__call__
    monkeypatch.setattr(Plan, "__call__",
                        lambda self, q, *rest: calls.append(tuple(q.shape[:2])) or real(self, q, *rest))
    g = torch.Generator().manual_seed(kv_heads + lq)
    q = torch.randn(batch, 16, lq, 8, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, 120, 8, generator=g).to(dtype) for _ in range(2))
    pattern = {"type": "per_head", "patterns": HEAD_BLOCK_PATTERNS[patterns]}
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    if patterns == "ranges":
        expected = [(batch, 4)] * 4
    else:  # blocks of 2 heads, every item's in one view unless they share one key/value head (Hkv = 1)
        expected = [(2 * batch, 2)] * 4 if kv_heads > 1 else [(2, 2)] * 4 * batch
    for causal in (True, False):
        calls.clear()
        out, lse = attention(q, k, v, pattern, causal=causal, return_lse=True)
        assert_matches_reference(out, lse, *reference_attention(q, k, v, pattern, causal=causal), tol=tol)
        if importlib.import_module("engine.attention").kernel_device(q.device) != "cpu":  # CUDA's emulation
            continue
        if dtype == torch.float32:
            assert calls == expected
        else:  # each group in a call per item at most
            assert len(calls) <= 4 * batch and {shape[1] for shape in calls} == {expected[0][1]}, calls


def test_inputs_that_require_grad_are_computed_forward_only():
    q, k, v = (torch.randn(1, 2, 32, 8, requires_grad=True) for _ in range(3))
    for pattern in ("strided", "fixed", "union_paper", "sliding"):
        out = attention(q, k, v, PATTERNS[pattern], causal=False)
        assert not out.requires_grad
        torch.testing.assert_close(out.double(), reference_attention(q.detach(), k.detach(), v.detach(),
                                                                     PATTERNS[pattern], causal=False)[0],
                                   atol=2e-5, rtol=2e-5)


def test_an_argument_of_the_wrong_type_is_refused_by_name():
    q = torch.randn(1, 1, 4, 8)
    for scale in ("abc", "2", b"2", True, [1.0]):
        with pytest.raises(TypeError, match="^scale: expected a number"):
            attention(q, q, q, scale=scale)
    for scale in (2, 0.5, numpy.float32(0.5), torch.tensor(0.5)):  # numbers of any kind
        torch.testing.assert_close(attention(q, q, q, scale=scale), attention(q, q, q, scale=float(scale)))
    with pytest.raises(TypeError, match="^causal: expected a bool, got str"):
        attention(q, q, q, causal="false")
    with pytest.raises(TypeError, match="^return_lse: expected a bool, got int"):
        attention(q, q, q, return_lse=1)
    for pattern in (["dense"], 3):
        with pytest.raises(TypeError, match="^pattern: expected a dict, a JSON string, a pattern object or None"):
            attention(q, q, q, pattern)
    for window in ("3", True, 3.0):  # as strict as the service: a dict's JSON types as they are
        with pytest.raises(ValueError, match="^pattern.window: Input should be a valid integer"):
            attention(q, q, q, SW(window))
    for scale in (10**400, -(2**1024)):  # numbers past float's range
        with pytest.raises(ValueError, match="^scale: must be finite"):
            attention(q, q, q, scale=scale)
    for sparse in (q.to_sparse(), torch.nested.nested_tensor([q[0, 0], q[0, 0]])):
        with pytest.raises(TypeError, match="^k: expected a dense tensor"):
            attention(q, sparse, q)


def test_no_query_row_still_checks_the_pattern_against_the_heads():
    q, k = torch.randn(1, 4, 0, 8), torch.randn(1, 2, 7, 8)
    with pytest.raises(ValueError, match="^pattern.patterns: per_head has 3 patterns, which does not divide the 4 heads"):
        attention(q, k, k, {"type": "per_head", "patterns": [SW(2)] * 3})
    assert attention(q, k, k, {"type": "per_head", "patterns": [SW(2)] * 2}).shape == (1, 4, 0, 8)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", ["dense", "sliding", "strided", "fixed", "fixed_odd", "union_paper", "union_two_fixed"])
def test_values_of_head_dim_zero_give_an_empty_output(pattern, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((1, 2, 21, 8), (1, 2, 37, 8), (1, 2, 37, 0)))
    out, lse = attention(q, k, v, PATTERNS[pattern], causal=causal, return_lse=True)
    assert out.shape == (1, 2, 21, 0)
    torch.testing.assert_close(lse.double(), reference_attention(q, k, v, PATTERNS[pattern], causal=causal)[1],
                               atol=2e-5, rtol=2e-5)  # float32's, as elsewhere (float64's 1e-7 failed at random)


def test_a_non_tensor_is_refused_by_name():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="^k: expected a torch.Tensor, got list"):
        attention(q, q.tolist(), q)
    with pytest.raises(TypeError, match="^q: expected a torch.Tensor, got ndarray"):
        attention(q.numpy(), q, q)


def test_head_dim_zero_is_refused():
    q = torch.randn(1, 1, 4, 0)
    with pytest.raises(ValueError, match="^q: head dim 0"):
        attention(q, q, torch.randn(1, 1, 4, 8))


def test_a_scale_below_float32_with_huge_inputs():
    """scale * q.k of order 1 although the scale is 0 in float32 (and q.k past its range)."""
    q, k, v = torch.randn(1, 2, 9, 8) * 1e30, torch.randn(1, 2, 9, 8) * 1e30, torch.randn(1, 2, 9, 8)
    out, lse = attention(q, k, v, scale=-1e-60, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, scale=-1e-60)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_is_refused(scale):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="scale: must be finite"):
        attention(q, q, q, scale=scale)


@pytest.mark.parametrize("scale", [1e39, -1e300])
def test_a_scale_past_float32_is_refused(scale):
    """The kernels' float32 scale would be inf: zeros with lse 0 came back."""
    q = torch.randn(1, 1, 4, 8) * 1e-30
    with pytest.raises(ValueError, match="^scale: .scale. must be at most 8.5"):
        attention(q, q, q, scale=scale)


@pytest.mark.parametrize("shape", ["gqa_dv", "mqa", "lq_much_lt_lk", "decode_gqa", "decode_mqa"])
@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
def test_grouped_query_heads_one_key_value_head_at_a_time(monkeypatch, pattern, shape):
    """Past GQA_REPEAT_BYTES (0 here) the query heads of a plan that takes equal heads only run per
    key/value head on stride-0 views: on the CPU per_head groups that split a key/value head's query
    heads (mqa); the other plans take the grouped heads as they are either way."""
    monkeypatch.setattr(importlib.import_module("engine.attention"), "GQA_REPEAT_BYTES", 0)
    _check(pattern, SHAPES[shape], True, torch.float32)


def _sparse_cases():
    """(pattern, shape) pairs whose heads are not all dense once simplified (the rest run on the
    dense kernel whatever the planner prefers) and whose per_head fits the heads."""
    from engine.patterns import head_groups, parse_pattern
    from engine.planner import simplify

    for pname, pattern in PATTERNS.items():
        parsed = parse_pattern(pattern)
        for sname, shape in SHAPES.items():
            heads, lk = shape[1], shape[4]
            if pattern["type"] == "per_head" and heads % len(pattern["patterns"]):
                continue
            if any(simplify(single, lk).type != "dense" for single, _ in head_groups(parsed, heads)):
                yield pytest.param(pattern, shape, id=f"{pname}-{sname}")


@pytest.mark.parametrize("pattern,shape", list(_sparse_cases()))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_masked_fallback_matches_reference(monkeypatch, pattern, shape, causal):
    """Every sparse pattern on the masked fallback (forced, as if none had a structured kernel):
    GQA, Lq < Lk, Dv != D, a single query row."""
    planner = importlib.import_module("engine.planner")
    kernels = importlib.import_module("engine.kernels")
    calls = []
    masked = kernels.masked_attention
    monkeypatch.setattr(planner, "structured_plan", lambda *args: None)
    monkeypatch.setattr(kernels, "masked_attention", lambda *args, **kw: calls.append(1) or masked(*args, **kw))
    planner.plan.cache_clear()  # plans are cached: none made before, none kept after
    try:
        _check(pattern, shape, causal, torch.float32)
    finally:
        planner.plan.cache_clear()
    assert calls, "the masked kernel did not run"
