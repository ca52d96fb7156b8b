"""`fixed(block=l, summary=c)`: the query's own block, plus the last c "summary" keys of every
block, `floor(j / l) == floor(i / l) or j mod l >= l - c` (Child et al. 2019, "fixed").

    n = 12, l = 4, c = 1, causal
    #...........
    ##..........
    ###.........
    ####........
    ...##.......
    ...###......
    ...####.....
    ...#####....
    ...#...##...
    ...#...###..
    ...#...####.
    ...#...#####
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from .base import MAX_PARAMETER, PatternBase, causal_limit


def summary_keys_below(limit: torch.Tensor | int, block: int, summary: int) -> torch.Tensor | int:
    """How many j in [0, limit) are summary columns (j mod block >= block - summary), for an int64
    tensor of limits or one int (a decode row's, on the host)."""
    full, rest = limit // block, limit % block
    past_first = rest - (block - summary)  # the columns of a partial last block, where positive
    return full * summary + past_first * (past_first > 0)


def summary_columns(stop: int, block: int, summary: int, device: torch.device | None = None) -> torch.Tensor:
    """The summary positions (j mod block >= block - summary) in [0, stop), ascending, made on
    `device` and cut by count (neither a copy to a GPU nor a boolean index waits for it)."""
    columns = (torch.arange(0, stop, block, device=device)[:, None]
               + torch.arange(block - summary, block, device=device)).flatten()
    full, rest = divmod(stop, block)
    return columns[: full * summary + max(0, rest - (block - summary))]


class Fixed(PatternBase):
    type: Literal["fixed"] = "fixed"
    block: int = Field(ge=1, le=MAX_PARAMETER, strict=True, description="l: the block's length")
    summary: int = Field(ge=1, le=MAX_PARAMETER, strict=True, description="c <= l: the summary columns at the end of each block")
    rule: ClassVar[str] = "floor(j / l) == floor(i / l) or j mod l >= l - c"

    @field_validator("summary")
    @classmethod
    def _summary_fits_block(cls, summary: int, info: ValidationInfo) -> int:
        block = info.data.get("block")
        if block is not None and summary > block:
            raise ValueError(f"summary ({summary}) must be <= block ({block})")
        return summary

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        same_block = torch.div(i, self.block, rounding_mode="floor") == torch.div(j, self.block, rounding_mode="floor")
        return same_block | (torch.remainder(j, self.block) >= self.block - self.summary)

    def row_counts(self, i: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
        limit = causal_limit(i, lk, causal)
        start = (i // self.block) * self.block
        end = torch.minimum(limit, start + self.block)
        own_summary = summary_keys_below(end, self.block, self.summary) - summary_keys_below(
            start, self.block, self.summary
        )
        return (end - start) + summary_keys_below(limit, self.block, self.summary) - own_summary

    def row_keys(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        start = i // self.block * self.block  # the summary columns before the row's block, then the block
        return torch.cat([summary_columns(start, self.block, self.summary, device),
                          torch.arange(start, i + 1, device=device)])
