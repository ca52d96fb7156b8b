"""`strided(stride=s)`: every s-th key counting back from the query, `(i - j) mod s == 0`.

    n = 8, s = 3, causal
    #.......
    .#......
    ..#.....
    #..#....
    .#..#...
    ..#..#..
    #..#..#.
    .#..#..#
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from .base import MAX_PARAMETER, PatternBase, causal_limit, count_multiples_below


class Strided(PatternBase):
    type: Literal["strided"] = "strided"
    stride: int = Field(ge=1, le=MAX_PARAMETER, strict=True, description="s: the distance between attended keys")
    rule: ClassVar[str] = "(i - j) mod s == 0"

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return torch.remainder(i - j, self.stride) == 0

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        return count_multiples_below(causal_limit(i, lk, causal), torch.remainder(i, self.stride), self.stride)

    def row_keys(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.arange(i % self.stride, i + 1, self.stride, device=device)
