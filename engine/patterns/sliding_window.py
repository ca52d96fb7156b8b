"""`sliding_window(window=w)`: the last w keys, `i - w < j <= i` (without causal `|i - j| < w`).

    n = 8, w = 3, causal
    #.......
    ##......
    ###.....
    .###....
    ..###...
    ...###..
    ....###.
    .....###
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from .base import MAX_PARAMETER, PatternBase, causal_limit


class SlidingWindow(PatternBase):
    type: Literal["sliding_window"] = "sliding_window"
    window: int = Field(ge=1, le=MAX_PARAMETER, strict=True, description="w: the window's length")
    rule: ClassVar[str] = "i - w < j <= i (without causal: abs(i - j) < w)"

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (i - j).abs() < self.window

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        lo = torch.clamp(i - self.window + 1, min=0)
        hi = torch.minimum(causal_limit(i, lk, causal), torch.clamp(i + self.window, max=lk))
        return torch.clamp(hi - lo, min=0)

    def row_keys(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.arange(max(0, i - self.window + 1), i + 1, device=device)

    def key_span(self, i_lo: int, i_hi: int, lk: int, causal: bool) -> tuple[int, int]:
        hi = i_hi if causal else i_hi - 1 + self.window
        return max(0, i_lo - self.window + 1), max(0, min(lk, hi))
