"""`per_head(patterns=[...])`: head h uses `patterns[h // (H / len)]` (factorized heads,
Child et al. 2019); the list's length must divide the head count H.

    H = 4, per_head(sliding_window 2, strided 2): heads 0-1 slide, heads 2-3 stride.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field

from .base import Composite, PatternBase

if TYPE_CHECKING:
    from . import Pattern

MAX_HEAD_PATTERNS = 1024


class PerHead(Composite):
    type: Literal["per_head"] = "per_head"
    patterns: tuple["Pattern", ...] = Field(
        min_length=1, max_length=MAX_HEAD_PATTERNS,
        description="one pattern per group of H / len consecutive heads; len must divide the head count H")
    rule: ClassVar[str] = "head h uses patterns[h // (H / len)]"

    def leaf_count(self) -> int:
        return max(p.leaf_count() for p in self.patterns)

    def check_heads(self, heads: int, field: str = "pattern") -> None:
        if heads % len(self.patterns):
            raise ValueError(
                f"{field}.patterns: per_head has {len(self.patterns)} patterns, which does not divide the {heads} heads"
            )
        super().check_heads(heads, field)

    def resolve(self, head: int, heads: int) -> PatternBase:
        if heads % len(self.patterns):  # O(1): resolve runs once per head, check_heads walks every member
            self.check_heads(heads)
        return self.patterns[head // (heads // len(self.patterns))].resolve(head, heads)

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise TypeError("per_head has no single rule: resolve(head, heads) first")

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        raise TypeError("per_head has no single rule: resolve(head, heads) first")

    def row_keys(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        raise TypeError("per_head has no single rule: resolve(head, heads) first")
