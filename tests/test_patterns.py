"""Pattern models: validation errors name the field; pair counts match the reference mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.patterns import MAX_LEAVES, PATTERN_CATALOG, attended_pairs, attended_pairs_bound, parse_pattern
from pattern_strategies import single
from reference import allowed, mask

SW = lambda w: {"type": "sliding_window", "window": w}  # noqa: E731
ST = lambda s: {"type": "strided", "stride": s}  # noqa: E731
FX = lambda l, c: {"type": "fixed", "block": l, "summary": c}  # noqa: E731

COUNTED = [
    {"type": "dense"},
    SW(1), SW(5), SW(64), SW(500),
    ST(1), ST(3), ST(16), ST(300),
    FX(1, 1), FX(7, 2), FX(16, 16), FX(10, 3),
    {"type": "union", "patterns": [SW(5), ST(8)]},
    {"type": "union", "patterns": [SW(5), ST(8), {"type": "dense"}]},
    {"type": "union", "patterns": [SW(9), FX(8, 2)]},
    {"type": "union", "patterns": [{"type": "union", "patterns": [ST(3), ST(5)]}, FX(6, 1), SW(2)]},
    {"type": "per_head", "patterns": [SW(4), ST(3), FX(5, 2), {"type": "dense"}]},
]


@pytest.mark.parametrize("pattern", COUNTED, ids=[str(i) for i in range(len(COUNTED))])
@pytest.mark.parametrize("lq,lk", [(1, 1), (37, 37), (100, 100), (1, 93), (29, 130)])
@pytest.mark.parametrize("causal", [True, False])
def test_attended_pairs_match_the_reference_mask(pattern, lq, lk, causal):
    heads = 4
    expected = sum(int(mask(pattern, lq, lk, h, heads, causal).sum()) for h in range(heads))
    assert attended_pairs(parse_pattern(pattern), 1, heads, lq, lk, causal) == expected
    assert attended_pairs(parse_pattern(pattern), 3, heads, lq, lk, causal) == 3 * expected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=single, lk=st.integers(1, 160), lq_fraction=st.floats(0, 1), causal=st.booleans())
def test_each_rows_count_matches_the_reference_mask(pattern, lk, lq_fraction, causal):
    """Per row, not only in total: any nesting of windows, strides, fixed and dense, so that a
    union's arithmetic (its ranges, and strides meeting summary columns, either way it counts
    them) meets every overlap of its members."""
    lq = max(1, round(lq_fraction * lk))
    counts = parse_pattern(pattern).row_counts(torch.arange(lk - lq, lk), lk, causal)
    assert torch.equal(counts, mask(pattern, lq, lk, 0, 1, causal).sum(-1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=single, i=st.integers(0, 400))
def test_a_rows_keys_by_arithmetic_are_the_reference_masks(pattern, i):
    """`row_keys` lists, ascending and once each, exactly the keys j <= i the contract's rule
    allows query i: what a decode step's copy of its keys holds."""
    keys = torch.arange(i + 1)
    expected = allowed(pattern, torch.tensor(i), keys, 0, 1).nonzero().flatten()
    assert torch.equal(parse_pattern(pattern).row_keys(i), expected)


def test_a_rows_keys_at_long_sequences():
    """Far out (i = 131071) the keys still match the rule: a window, every 128th key and fixed's
    summary columns, each once where they meet."""
    i = 131071
    pattern = {"type": "union", "patterns": [SW(128), ST(128), FX(128, 8)]}
    keys = torch.arange(i + 1)
    assert torch.equal(parse_pattern(pattern).row_keys(i), allowed(pattern, torch.tensor(i), keys, 0, 1).nonzero().flatten())
    with pytest.raises(TypeError, match="resolve"):
        parse_pattern({"type": "per_head", "patterns": [SW(4), ST(3)]}).row_keys(i)


@pytest.mark.parametrize("members", [
    [SW(128), FX(128, 8)], [ST(128), FX(128, 8)], [SW(128), ST(128), FX(128, 8)], [ST(96), ST(160), FX(100, 7), SW(64)],
], ids=["window_fixed", "strided_fixed", "window_strided_fixed", "two_strides_fixed_window"])
def test_union_counts_with_fixed_stay_arithmetic_at_long_sequences(members):
    """n = 131072: sampled rows counted exactly (against the contract's rule), and the whole
    prefill counted without evaluating the rule over its Lq x Lk pairs (that took 4.6 s at
    n = 16384 and would not finish here within the test's timeout)."""
    n = 131072
    pattern = {"type": "union", "patterns": members}
    parsed = parse_pattern(pattern)
    rows = torch.tensor([0, 1, 127, 128, 129, 8191, 8192, 65535, 65600, 99999, n - 129, n - 128, n - 2, n - 1])
    keys = torch.arange(n)
    expected = (allowed(pattern, rows[:, None], keys[None, :], 0, 1) & (keys[None, :] <= rows[:, None])).sum(-1)
    assert torch.equal(parsed.row_counts(rows, n, True), expected)
    assert attended_pairs(parsed, 2, 3, 1, n) == 6 * int(expected[-1])  # a decode step, through the public count
    assert attended_pairs(parsed, 1, 1, n, n) > 0  # every row of a long prefill, in arithmetic time


def test_attended_pairs_scale_to_long_sequences_without_a_mask():
    n = 262144
    assert attended_pairs(parse_pattern(SW(256)), 1, 1, n, n) == 256 * n - 256 * 255 // 2
    assert attended_pairs(parse_pattern(ST(n)), 1, 1, n, n) == n
    paper = parse_pattern({"type": "union", "patterns": [SW(128), ST(128)]})
    # window keys, plus strided keys at distances 128, 256, ... (the window holds distance 0 only)
    strided_beyond = sum(i // 128 for i in range(n))
    assert attended_pairs(paper, 1, 1, n, n) == 128 * n - 128 * 127 // 2 + strided_beyond


@pytest.mark.parametrize(
    "pattern,field",
    [
        (SW(0), "window"),
        (SW(-3), "window"),
        (ST(0), "stride"),
        (FX(0, 1), "block"),
        (FX(4, 5), "summary"),
        (FX(4, 0), "summary"),
        ({"type": "union", "patterns": []}, "patterns"),
        ({"type": "union", "patterns": [SW(1)] * 9}, "patterns"),
        ({"type": "union", "patterns": [SW(1), {"type": "union", "patterns": [ST(0)]}]}, "patterns[1].patterns[0].stride"),
        ({"type": "per_head", "patterns": []}, "patterns"),
        ({"type": "circle"}, "type"),
        ({"window": 4}, "type"),
        ({"type": "sliding_window"}, "window"),
        ({"type": "sliding_window", "window": 4, "stride": 2}, "stride"),
    ],
)
def test_invalid_patterns_name_the_field(pattern, field):
    """A ValueError that starts with the field's JSON path, without pydantic's type names."""
    with pytest.raises(ValueError) as err:
        parse_pattern(pattern)
    text = str(err.value)
    assert text.startswith(f"pattern.{field}: ") or text.startswith("pattern: ") and field == "type", text
    assert "tagged-union" not in text and "sliding_window.window" not in text, text
    if pattern.get("patterns"):  # members given: their own errors, no echo that the list came out empty
        assert "at least 1 item after validation" not in text, text


def test_nested_unions_may_hold_up_to_max_leaves_in_all():
    """Each union lists at most MAX_MEMBERS, nested ones flattened at most MAX_LEAVES."""
    eight = lambda first: {"type": "union", "patterns": [ST(first + n) for n in range(8)]}  # noqa: E731
    full = {"type": "union", "patterns": [eight(2 + 8 * n) for n in range(8)]}
    assert parse_pattern(full).leaf_count() == MAX_LEAVES == 64
    per_head = {"type": "per_head", "patterns": [full, SW(3)]}  # a head's pattern, not the sum over heads
    assert parse_pattern({"type": "union", "patterns": [per_head]}).leaf_count() == 64
    with pytest.raises(ValueError, match=r"^pattern: patterns hold 65 patterns once nested unions are flattened"):
        parse_pattern({"type": "union", "patterns": [full, SW(3)]})


def test_per_head_length_must_divide_heads():
    pattern = parse_pattern({"type": "per_head", "patterns": [SW(2), SW(3), SW(4)]})
    with pytest.raises(ValueError, match=r"pattern\.patterns.*3 patterns.*4 heads"):
        attended_pairs(pattern, 1, 4, 8, 8)
    assert attended_pairs(pattern, 1, 6, 8, 8) > 0


def test_nesting_depth_is_bounded():
    deep: dict = SW(2)
    for _ in range(20):
        deep = {"type": "union", "patterns": [deep]}
    with pytest.raises(ValueError, match="nest"):
        parse_pattern(deep)


def test_patterns_are_hashable_values():
    a = parse_pattern({"type": "union", "patterns": [SW(4), ST(3)]})
    b = parse_pattern('{"type": "union", "patterns": [{"type": "sliding_window", "window": 4}, {"type": "strided", "stride": 3}]}')
    assert a == b and hash(a) == hash(b)
    assert parse_pattern(None).type == "dense"
    assert parse_pattern(a) is a
    assert torch.equal(a.allows(torch.tensor([10]), torch.tensor([7])), torch.tensor([True]))


def test_a_dict_parsed_again_gives_the_same_object_and_a_changed_one_its_new_pattern():
    """parse_pattern keeps a valid dict's pattern by the dict's exact form: the same dict (or an
    equal one) gives the same object; one changed in place, its new pattern; values that == calls
    equal but validation refuses (True, 4.0 for 4) are refused after 4 was kept; a mapping of
    another type is validated at every call."""
    from collections.abc import Mapping

    window = SW(4)
    first = parse_pattern(window)
    assert parse_pattern(window) is first and parse_pattern(SW(4)) is first
    window["window"] = 5
    assert parse_pattern(window) == parse_pattern(SW(5)) and parse_pattern(window).window == 5
    for bad in (True, 4.0):
        for _ in range(2):
            with pytest.raises(ValueError, match=r"^pattern\.window: "):
                parse_pattern(SW(bad))
    union = {"type": "union", "patterns": [SW(4), ST(3)]}
    assert parse_pattern(union) is parse_pattern(union)
    union["patterns"].append(ST(5))
    assert parse_pattern(union).leaf_count() == 3
    assert parse_pattern(tuple_members := {"type": "union", "patterns": (SW(4), ST(3))}).leaf_count() == 2
    assert parse_pattern(tuple_members) is parse_pattern(tuple_members)

    class Window(Mapping):  # its contents may change unseen: never kept
        def __init__(self):
            self.window = 4

        def __getitem__(self, key):
            return {"type": "sliding_window", "window": self.window}[key]

        def __iter__(self):
            return iter(("type", "window"))

        def __len__(self):
            return 2

    custom = Window()
    assert parse_pattern(custom) == first
    custom.window = 6
    assert parse_pattern(custom).window == 6


@pytest.mark.parametrize("pattern", COUNTED, ids=[str(i) for i in range(len(COUNTED))])
@pytest.mark.parametrize("causal", [True, False])
def test_attended_pairs_bound_is_an_upper_bound_and_exact_without_unions(pattern, causal):
    parsed = parse_pattern(pattern)
    for lq, lk in [(1, 1), (50, 50), (33, 120), (128, 128)]:
        exact = attended_pairs(parsed, 2, 4, lq, lk, causal)
        bound = attended_pairs_bound(parsed, 2, 4, lq, lk, causal)
        assert exact <= bound <= 2 * 4 * lq * lk, (lq, lk)
        if "union" not in str(pattern):
            assert bound == exact, (lq, lk)


def _with(entry: dict, name: str, value) -> dict:
    """A valid pattern of the catalog entry's type with parameter `name` set to `value`."""
    valid = {"sliding_window": {"window": 3}, "strided": {"stride": 3}, "fixed": {"block": 2**31 - 1, "summary": 1},
             "union": {"patterns": [{"type": "dense"}]}, "per_head": {"patterns": [{"type": "dense"}]}}
    return {"type": entry["type"], **valid[entry["type"]], name: value}


@pytest.mark.parametrize("entry", PATTERN_CATALOG, ids=lambda entry: entry["type"])
def test_the_catalog_shows_every_type_of_the_contract_with_the_bounds_validation_enforces(entry):
    """GET /patterns: each bound it states is where validation starts refusing, no more, no less."""
    contract = {"dense": [], "sliding_window": ["window"], "strided": ["stride"], "fixed": ["block", "summary"],
                "union": ["patterns"], "per_head": ["patterns"]}
    assert list(entry["parameters"]) == contract[entry["type"]] and entry["rule"]
    for name, spec in entry["parameters"].items():
        if spec["type"] == "integer":
            low, high = spec["minimum"], spec["maximum"]
        else:
            low, high = spec["minItems"], spec["maxItems"]
        values = {low: True, high: True, low - 1: False, high + 1: False}
        for n, accepted in values.items():
            value = n if spec["type"] == "integer" else [{"type": "dense"}] * n
            if accepted:
                parse_pattern(_with(entry, name, value))
            else:
                with pytest.raises(ValueError, match=rf"^pattern\.{name}: "):
                    parse_pattern(_with(entry, name, value))
