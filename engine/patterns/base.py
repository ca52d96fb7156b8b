"""What every pattern is: a pure rule on (query position i, key position j), plus exact counts.

A pattern's own rule never sees the causal mask: `allows` is the table's rule from CONTRACT §1
without causality, and `attends` intersects it with `j <= i` when the request is causal. Each pattern
also answers how many keys each query row attends, by arithmetic over rows (never an Lq x Lk
mask), so the service can report `attended_pairs` for sequences in the hundreds of thousands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, model_validator

# The largest window, stride, block or summary a pattern takes (a larger one is refused, naming
# the field; GET /patterns shows the bound): far beyond any sequence length, where a window or
# stride acts as any larger one would, and small enough that position arithmetic stays in int64.
MAX_PARAMETER = 2**31 - 1
# Levels of nested patterns, counting the leaf: recursion over a pattern stays shallow.
MAX_DEPTH = 16


class PatternBase(BaseModel):
    """A frozen, validated pattern; subclasses add a `type` literal and their parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rule: ClassVar[str]  # CONTRACT §1's rule for key j and query i, in the parameters' symbols

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Boolean tensor: key j allowed for query i by the pattern alone (no causal mask)."""
        raise NotImplementedError

    def attends(self, i: torch.Tensor, j: torch.Tensor, causal: bool) -> torch.Tensor:
        """Boolean tensor: key j attended by query i, the rule intersected with j <= i under causal."""
        allowed = self.allows(i, j)
        return allowed & (j <= i) if causal else allowed

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        """Number of allowed keys in [0, lk) for each query position in `i` (int64)."""
        raise NotImplementedError

    def key_span(self, i_lo: int, i_hi: int, lk: int, causal: bool) -> tuple[int, int]:
        """A key range [lo, hi) holding every key that queries i_lo..i_hi-1 may attend."""
        return 0, (min(lk, i_hi) if causal else lk)

    def row_keys(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        """The keys j <= i that query i attends under causality, ascending (int64), by arithmetic
        over the parameters: a decode step's keys (the last row, whose causal and non-causal keys
        agree), in time that grows with how many there are, not with i."""
        raise NotImplementedError

    def resolve(self, head: int, heads: int) -> "PatternBase":
        """The single-head pattern head `head` of `heads` uses (only per_head differs)."""
        return self

    def depth(self) -> int:
        """Nesting depth: 1 for a leaf pattern."""
        return 1

    def leaf_count(self) -> int:
        """The most leaf patterns any head's pattern holds once nested unions are flattened."""
        return 1

    def check_heads(self, heads: int, field: str = "pattern") -> None:
        """Raise ValueError naming the field if this pattern cannot serve `heads` heads."""

    def describe(self) -> dict:
        """The pattern as the JSON the contract uses."""
        return self.model_dump(mode="json")


class Composite(PatternBase):
    """A pattern of member patterns, `patterns` (union, per_head), nested at most MAX_DEPTH levels."""

    if TYPE_CHECKING:  # each subclass declares it with its own bounds, after its `type`
        patterns: tuple[PatternBase, ...]

    @model_validator(mode="after")
    def _bounded_depth(self) -> "Composite":
        if self.depth() > MAX_DEPTH:
            raise ValueError(f"patterns nest {self.depth()} levels deep; at most {MAX_DEPTH} are allowed")
        return self

    def depth(self) -> int:
        return 1 + max(p.depth() for p in self.patterns)

    def check_heads(self, heads: int, field: str = "pattern") -> None:
        for n, member in enumerate(self.patterns):
            member.check_heads(heads, f"{field}.patterns[{n}]")


def causal_limit(i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
    """One past the last key a query may see: i + 1 under causal, lk otherwise (clamped to lk)."""
    return torch.clamp(i + 1, max=lk) if causal else torch.full_like(i, lk)


def count_multiples_below(limit: torch.Tensor, residue: torch.Tensor, modulus: int) -> torch.Tensor:
    """How many j in [0, limit) have j % modulus == residue (residue in [0, modulus))."""
    return torch.clamp(limit - residue + modulus - 1, min=0) // modulus
