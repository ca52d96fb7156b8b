"""`dense`: every key (then the causal mask, if any).

    n = 8, causal
    #.......
    ##......
    ###.....
    ####....
    #####...
    ######..
    #######.
    ########
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from .base import PatternBase, causal_limit


class Dense(PatternBase):
    type: Literal["dense"] = "dense"
    rule: ClassVar[str] = "every j"

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        return causal_limit(i, lk, causal)

    def row_keys(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.arange(i + 1, device=device)
