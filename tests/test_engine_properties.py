"""Property-based: random shapes, random (nested) patterns and scales (zero and negative too)
against the float64 reference, in float32 and half precision."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import attention
from pattern_strategies import for_heads, leaf, single
from reference import assert_matches_reference, reference_attention

pytestmark = pytest.mark.usefixtures("engine_passes")  # small shapes: every kernel, CPU and CUDA

@st.composite
def problems(draw):
    hkv = draw(st.integers(1, 2))
    h = hkv * draw(st.integers(1, 3))
    lk = draw(st.integers(1, 160))
    lq = draw(st.integers(1, lk))
    d = draw(st.sampled_from([4, 8, 16]))
    dv = draw(st.sampled_from([d, 8]))
    pattern = draw(for_heads(h))
    causal = draw(st.booleans())
    scale = draw(st.one_of(st.none(), st.sampled_from([0.0, -0.5]), st.floats(-3, 3)))
    return (draw(st.integers(1, 2)), h, hkv, lq, lk, d, dv), pattern, causal, draw(st.integers(0, 2**31 - 1)), scale


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_engine_matches_reference_on_random_problems(problem):
    check_against_reference(problem)


def check_against_reference(problem):
    (b, h, hkv, lq, lk, d, dv), pattern, causal, seed, scale = problem
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
               torch.randn(b, hkv, lk, dv, generator=g))
    out, lse = attention(q, k, v, pattern, causal=causal, scale=scale, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal, scale=scale)
    assert_matches_reference(out, lse, ref_out, ref_lse, tol=3e-5)


@st.composite
def half_precision_problems(draw):
    """Wider head dims (the span kernel's 16-feature chunks, several and a remainder), longer keys
    and half precision: the float32 partials that a union's steps hand on, rounded once."""
    hkv = draw(st.integers(1, 2))
    h = hkv * draw(st.integers(1, 2))
    lk = draw(st.integers(1, 600))
    lq = draw(st.sampled_from([1, draw(st.integers(1, 16)), draw(st.integers(1, lk)), lk]))
    d = draw(st.sampled_from([16, 40, 64, 128]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    return (draw(st.integers(1, 2)), h, hkv, min(lq, lk), lk, d, draw(st.sampled_from([d, 24]))), \
        draw(for_heads(h)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)), dtype


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(half_precision_problems())
def test_engine_matches_reference_in_half_precision_on_random_problems(problem):
    (b, h, hkv, lq, lk, d, dv), pattern, causal, seed, dtype = problem
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, lq, d, generator=g).to(dtype), torch.randn(b, hkv, lk, d, generator=g).to(dtype),
               torch.randn(b, hkv, lk, dv, generator=g).to(dtype))
    out, lse = attention(q, k, v, pattern, causal=causal, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal)
    assert out.dtype == dtype
    assert_matches_reference(out, lse, ref_out, ref_lse, tol=3e-2 if dtype == torch.bfloat16 else 5e-3)


@st.composite
def short_runs(draw):
    """A few query rows at the end of long keys (decoding, small chunks): the structured kernels'
    short-run paths and the masked kernel's key copies."""
    hkv = draw(st.integers(1, 2))
    h = hkv * draw(st.integers(1, 2))
    lk = draw(st.integers(200, 3000))
    lq = draw(st.integers(1, 70))
    return (1, h, hkv, lq, lk, 8, 8), draw(single), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)), None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(short_runs())
def test_short_runs_after_long_keys_match_reference(problem):
    check_against_reference(problem)


LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "overlapping", "tied", "reversed"]


def laid_out(shape, layout: str, row_stride: int, g: torch.Generator) -> torch.Tensor:
    """Random values of `shape` [B, H, L, D] held in one of the memory layouts callers hand in: a
    [B, L, H, D] transpose, a slice of a packed qkv, heads expanded at stride 0, rows overlapping
    `row_stride` apart (as `unfold` makes), batches and heads also 1 apart (`tied`), or every axis in
    reverse order."""
    b, h, length, d = shape
    if layout == "transposed":
        return torch.randn(b, length, h, d, generator=g).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(b, h, length, 3 * d, generator=g)[..., d : 2 * d]
    if layout == "expanded":
        return torch.randn(b, 1, length, d, generator=g).expand(shape)
    if layout == "overlapping":
        head = row_stride * (length - 1) + d
        return torch.randn(b * h * head, generator=g).as_strided(shape, (h * head, head, row_stride, 1))
    if layout == "tied":
        return torch.randn(b + h + row_stride * length + d, generator=g).as_strided(shape, (1, 1, row_stride, 1))
    if layout == "reversed":
        return torch.randn(d, length, h, b, generator=g).permute(3, 2, 1, 0)
    return torch.randn(shape, generator=g)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 9), st.integers(0, 8),
       st.integers(1, 4), st.integers(1, 4), st.tuples(*[st.sampled_from(LAYOUTS)] * 3), st.integers(1, 4),
       leaf, st.booleans(), st.integers(0, 2**31 - 1))
def test_engine_reads_inputs_in_any_memory_layout(b, hkv, group, lk, lq_less, d, dv, layouts, row_stride, pattern,
                                                  causal, seed):
    """The kernels get views as they come, or copies where torch's kernels would misread them."""
    g = torch.Generator().manual_seed(seed)
    h, lq = hkv * group, max(1, lk - lq_less)
    q, k, v = (laid_out(shape, layout, min(row_stride, shape[3]), g) for shape, layout in
               zip([(b, h, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv)], layouts))
    out, lse = attention(q, k, v, pattern, causal=causal, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal)
    assert_matches_reference(out, lse, ref_out, ref_lse, tol=3e-5)
