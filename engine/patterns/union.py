"""`union(patterns=[...])`: a key is allowed if any member allows it (1 to 8 members; nested unions
flattened, at most 64 leaf patterns).

    n = 8, union(sliding_window 2, strided 4), causal
    #.......
    ##......
    .##.....
    ..##....
    #..##...
    .#..##..
    ..#..##.
    ...#..##
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from .base import Composite, PatternBase, causal_limit
from .dense import Dense
from .fixed import Fixed
from .sliding_window import SlidingWindow
from .strided import Strided

if TYPE_CHECKING:
    from . import Pattern

MAX_MEMBERS = 8
# Leaf patterns in a union once nested unions are flattened (a union of 8 unions of 8): the
# planner's work grows with them (a kernel step per stride, a rule per leaf in the masked kernel).
MAX_LEAVES = 64
# Rows x summary columns evaluated at once where a stride meets a fixed member (bounds memory).
_EVALUATED_ELEMENTS = 1 << 22


class Union(Composite):
    type: Literal["union"] = "union"
    patterns: tuple["Pattern", ...] = Field(
        min_length=1, max_length=MAX_MEMBERS,
        description=f"the member patterns; at most {MAX_LEAVES} leaf patterns once nested unions are flattened")
    rule: ClassVar[str] = "any member allows it"

    @model_validator(mode="after")
    def _bounded_leaves(self) -> "Union":
        if self.leaf_count() > MAX_LEAVES:
            raise ValueError(f"patterns hold {self.leaf_count()} patterns once nested unions are flattened; "
                             f"at most {MAX_LEAVES} are allowed")
        return self

    def leaf_count(self) -> int:
        return sum(p.leaf_count() for p in self.patterns)

    def resolve(self, head: int, heads: int) -> PatternBase:
        members = tuple(p.resolve(head, heads) for p in self.patterns)
        return self if all(a is b for a, b in zip(members, self.patterns)) else Union(patterns=members)

    def leaves(self) -> list[PatternBase]:
        """Members with nested unions flattened (a union of unions is one union)."""
        out: list[PatternBase] = []
        for p in self.patterns:
            out.extend(p.leaves() if isinstance(p, Union) else [p])
        return out

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        allowed = self.patterns[0].allows(i, j)
        for p in self.patterns[1:]:
            allowed = allowed | p.allows(i, j)
        return allowed

    def row_keys(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.unique(torch.cat([p.row_keys(i, device) for p in self.patterns]))  # sorted, each key once

    def key_span(self, i_lo: int, i_hi: int, lk: int, causal: bool) -> tuple[int, int]:
        spans = [p.key_span(i_lo, i_hi, lk, causal) for p in self.patterns]
        return min(lo for lo, _ in spans), max(hi for _, hi in spans)

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        """Keys j < hi (the causal limit) that some member allows, by arithmetic over rows. A
        window's keys (dense's: all) are one range around i, the widest window's; a fixed member's
        own block is a range holding i, so the blocks together are one range too, B; the summary
        columns S depend on j alone and the strides' keys on i - j alone. Counted as |B| plus, on
        either side of B, the window's keys, then S's keys outside the window (a prefix over
        keys), then the strides' keys outside the window (a prefix over distances) less those
        in S, which `_strided_summary_keys` counts."""
        leaves = self.leaves()
        hi = causal_limit(i, lk, causal)
        reach = max((lk if isinstance(p, Dense) else p.window for p in leaves if isinstance(p, (Dense, SlidingWindow))),
                    default=0)
        window_start = torch.clamp(i - reach + 1, min=0)
        window = (window_start, torch.maximum(torch.minimum(i + reach, hi), window_start))
        blocks = [p.block for p in leaves if isinstance(p, Fixed)]
        if blocks:
            own = (torch.stack([i // b * b for b in blocks]).amin(0),
                   torch.minimum(torch.stack([(i // b + 1) * b for b in blocks]).amax(0), hi))
        else:
            own = (hi, hi)
        summary = _summary_prefix(leaves, lk, i.device)
        strides = [p for p in leaves if isinstance(p, Strided)]
        stride_prefix = _distance_prefix(strides, lk, i.device)
        counts = own[1] - own[0]
        beyond_window = []  # the key ranges beside B and outside the window
        for side in ((torch.zeros_like(i), own[0]), (own[1], hi)):
            inside = (torch.maximum(side[0], window[0]), torch.minimum(side[1], window[1]))
            counts = counts + torch.clamp(inside[1] - inside[0], min=0)
            counts = counts + _in_range(summary, *side) - _in_range(summary, *inside)
            counts = counts + (_distances_in_range(stride_prefix, i, lk, *side)
                               - _distances_in_range(stride_prefix, i, lk, *inside))
            beyond_window += [(side[0], torch.minimum(side[1], window[0])), (torch.maximum(side[0], window[1]), side[1])]
        if strides and blocks:
            counts = counts - _strided_summary_keys(strides, i, lk, summary, beyond_window)
        return counts


def _summary_prefix(leaves: list[PatternBase], lk: int, device: torch.device) -> torch.Tensor:
    """prefix[x]: keys j < x that are a fixed member's summary column."""
    j = torch.arange(lk, device=device)
    columns = torch.zeros(lk, dtype=torch.bool, device=device)
    for p in leaves:
        if isinstance(p, Fixed):
            columns |= torch.remainder(j, p.block) >= p.block - p.summary
    return torch.cat([torch.zeros(1, dtype=torch.int64, device=device), columns.cumsum(0)])


def _strided_summary_keys(strides: list[Strided], i: torch.Tensor, lk: int, summary: torch.Tensor,
                          ranges: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per row: the summary columns in `ranges` (disjoint, none holding i) that a stride allows.
    Two exact ways, the cheaper for this call: by inclusion-exclusion over the strides' least
    common multiples L, keys in S with j = i (mod L) counted by a prefix over S within each class
    mod L (cost ~ the number of L times Lk); or each row's stride rule evaluated on every summary
    column (cost ~ Lq times the columns)."""
    terms = _multiple_terms([p.stride for p in strides], lk)
    by_class = sum(lk + modulus + 4 * len(i) for modulus in terms)
    columns = summary[1:] - summary[:-1]
    if by_class <= len(i) * int(summary[-1]) * len(strides):
        counts = torch.zeros_like(i)
        for modulus, sign in terms.items():
            classes = -(-(lk + modulus) // modulus)
            in_class = torch.zeros(classes * modulus, dtype=torch.int64, device=i.device)
            in_class[:lk] = columns
            in_class = in_class.view(classes, modulus)
            prefix = (in_class.cumsum(0) - in_class).flatten()  # prefix[x]: keys of S below x in x's class
            for lo, hi in ranges:
                hi = torch.maximum(lo, hi)
                counts += sign * (prefix[hi + torch.remainder(i - hi, modulus)] - prefix[lo + torch.remainder(i - lo, modulus)])
        return counts
    j = columns.nonzero().flatten()[None, :]
    counts = torch.empty_like(i)
    rows = max(1, _EVALUATED_ELEMENTS // max(1, j.shape[1]))
    for start in range(0, len(i), rows):
        part = slice(start, start + rows)
        in_ranges = torch.zeros(1, dtype=torch.bool, device=i.device)
        for lo, hi in ranges:
            in_ranges = in_ranges | ((j >= lo[part, None]) & (j < hi[part, None]))
        strided = torch.zeros(1, dtype=torch.bool, device=i.device)
        for p in strides:
            strided = strided | p.allows(i[part, None], j)
        counts[part] = (in_ranges & strided).sum(-1)
    return counts


def _multiple_terms(strides: list[int], lk: int) -> dict[int, int]:
    """{L: coefficient} with [some stride divides d] = sum of coefficient * [L divides d] for
    0 < |d| < lk (inclusion-exclusion over the strides' least common multiples, built one stride
    at a time; an L of lk or more divides no such d, so it is dropped)."""
    terms: dict[int, int] = {}
    for stride in sorted(set(strides)):
        joined = dict(terms)
        for modulus, sign in terms.items():
            both = math.lcm(modulus, stride)
            if both < lk:
                joined[both] = joined.get(both, 0) - sign
        if stride < lk:
            joined[stride] = joined.get(stride, 0) + 1
        terms = {modulus: sign for modulus, sign in joined.items() if sign}
    return terms


def _in_range(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Keys in [lo, hi) counted by a prefix over keys (an empty range counts none)."""
    return prefix[torch.maximum(lo, hi)] - prefix[lo]


def _distance_prefix(members: list[PatternBase], lk: int, device: torch.device) -> torch.Tensor:
    """prefix[k]: distances d = i - j below k - (lk - 1) that some member allows, d in (-lk, lk)."""
    d = torch.arange(-(lk - 1), lk, device=device)
    allowed = torch.zeros_like(d, dtype=torch.bool)
    for p in members:
        allowed |= p.allows(d, torch.zeros_like(d))
    return torch.cat([torch.zeros(1, dtype=torch.int64, device=device), allowed.to(torch.int64).cumsum(0)])


def _distances_in_range(prefix: torch.Tensor, i: torch.Tensor, lk: int, lo: torch.Tensor, hi: torch.Tensor):
    """Keys j in [lo, hi) whose distance i - j the prefix's members allow: d in (i - hi, i]."""
    hi = torch.maximum(lo, hi)
    return prefix[i - lo + lk] - prefix[i - hi + lk]
