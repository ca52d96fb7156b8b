"""Exact merge of attention over disjoint key sets by their log-sum-exp (as FlashAttention's
split-KV combine does): out = sum_k exp(lse_k - lse) out_k, lse = log sum_k exp(lse_k)."""

from __future__ import annotations

import torch


def _weights(lse_a: torch.Tensor, lse_b: torch.Tensor):
    """(merged lse, weight of a, weight of b); rows where both are -inf get weights 0."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return lse, torch.exp(lse_a - safe).unsqueeze(-1), torch.exp(lse_b - safe).unsqueeze(-1)


def merge_into(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Fold one partial over disjoint keys into (out, lse) in place: no new output tensor."""
    merged, w_acc, w_part = _weights(lse, part_lse)
    out.mul_(w_acc).addcmul_(part_out, w_part)
    lse.copy_(merged)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (out, lse) partials over disjoint key sets into a float32 output; rows with no
    key stay zero with lse -inf."""
    out, lse = parts[0][0].float(), parts[0][1]
    if len(parts) == 1:
        return out, lse
    out = out.clone() if out is parts[0][0] else out
    lse = lse.clone()
    for part_out, part_lse in parts[1:]:
        merge_into(out, lse, part_out, part_lse)
    return out, lse
