"""`per_head(patterns=[...])`: head h uses `patterns[h // (H / len)]` (factorized heads,
Child et al. 2019); the list's length must divide the head count H.

    H = 4, per_head(sliding_window 2, strided 2): heads 0-1 slide, heads 2-3 stride.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from .base import PatternBase

if TYPE_CHECKING:
    from . import Pattern

MAX_HEAD_PATTERNS = 1024


class PerHead(PatternBase):
    type: Literal["per_head"] = "per_head"
    patterns: tuple["Pattern", ...] = Field(min_length=1, max_length=MAX_HEAD_PATTERNS)

    @model_validator(mode="after")
    def _bounded_depth(self) -> "PerHead":
        from .union import MAX_DEPTH

        if self.depth() > MAX_DEPTH:
            raise ValueError(f"patterns nest {self.depth()} levels deep; at most {MAX_DEPTH} are allowed")
        return self

    def depth(self) -> int:
        return 1 + max(p.depth() for p in self.patterns)

    def leaf_count(self) -> int:
        return max(p.leaf_count() for p in self.patterns)

    def check_heads(self, heads: int, field: str = "pattern") -> None:
        if heads % len(self.patterns):
            raise ValueError(
                f"{field}.patterns: per_head has {len(self.patterns)} patterns, which does not divide the {heads} heads"
            )
        for n, member in enumerate(self.patterns):
            member.check_heads(heads, f"{field}.patterns[{n}]")

    def resolve(self, head: int, heads: int) -> PatternBase:
        if heads % len(self.patterns):  # O(1): resolve runs once per head, check_heads walks every member
            self.check_heads(heads)
        return self.patterns[head // (heads // len(self.patterns))].resolve(head, heads)

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise TypeError("per_head has no single rule: resolve(head, heads) first")

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        raise TypeError("per_head has no single rule: resolve(head, heads) first")
