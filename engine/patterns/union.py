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

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from .base import Composite, PatternBase, causal_limit
from .dense import Dense
from .sliding_window import SlidingWindow
from .strided import Strided

if TYPE_CHECKING:
    from . import Pattern

MAX_MEMBERS = 8
# Leaf patterns in a union once nested unions are flattened (a union of 8 unions of 8): the
# planner's work grows with them (a kernel step per stride, a rule per leaf in the masked kernel).
MAX_LEAVES = 64
# Rows x keys evaluated at once when a union has no arithmetic count (bounds memory, not time).
_COUNT_CHUNK_ELEMENTS = 1 << 22


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

    def key_span(self, i_lo: int, i_hi: int, lk: int, causal: bool) -> tuple[int, int]:
        spans = [p.key_span(i_lo, i_hi, lk, causal) for p in self.patterns]
        return min(lo for lo, _ in spans), max(hi for _, hi in spans)

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        if all(isinstance(p, (Dense, SlidingWindow, Strided)) for p in self.leaves()):
            return self._distance_row_counts(i, lk, causal)
        return self._evaluated_row_counts(i, lk, causal)

    def _distance_row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        """Members whose rule depends on i - j only: prefix sums over the allowed distances."""
        d = torch.arange(-(lk - 1), lk, device=i.device)
        allowed = self.allows(d, torch.zeros_like(d)).to(torch.int64)
        prefix = torch.cat([torch.zeros(1, dtype=torch.int64, device=i.device), allowed.cumsum(0)])
        hi = causal_limit(i, lk, causal)  # keys j in [0, hi) <=> distances d in (i - hi, i]
        return prefix[i + lk] - prefix[i - hi + lk]

    def _evaluated_row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        """Any other union: evaluate the rule over each row's key span, a chunk of rows at a time."""
        counts = torch.empty_like(i)
        start = 0
        while start < len(i):
            rows = max(1, _COUNT_CHUNK_ELEMENTS // max(1, lk))
            chunk = i[start : start + rows]
            lo, hi = self.key_span(int(chunk.min()), int(chunk.max()) + 1, lk, causal)
            j = torch.arange(lo, hi, device=i.device)
            counts[start : start + len(chunk)] = self.attends(chunk[:, None], j[None, :], causal).sum(-1)
            start += len(chunk)
        return counts
