"""Hypothesis strategies for the contract's patterns, shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

leaf = st.one_of(
    st.just({"type": "dense"}),
    st.builds(lambda w: {"type": "sliding_window", "window": w}, st.integers(1, 80)),
    st.builds(lambda s: {"type": "strided", "stride": s}, st.integers(1, 40)),
    st.integers(1, 24).flatmap(
        lambda l: st.builds(lambda c: {"type": "fixed", "block": l, "summary": c}, st.integers(1, l))
    ),
)
single = st.recursive(
    leaf, lambda inner: st.builds(lambda ps: {"type": "union", "patterns": ps}, st.lists(inner, min_size=1, max_size=3)),
    max_leaves=4,
)


@st.composite
def for_heads(draw, heads: int):
    """A single-head pattern, or per_head over a number of groups that divides `heads`."""
    pattern = draw(single)
    if draw(st.booleans()):
        groups = draw(st.sampled_from([n for n in (1, 2, 3, 6) if heads % n == 0]))
        pattern = {"type": "per_head", "patterns": draw(st.lists(single, min_size=groups, max_size=groups))}
    return pattern
