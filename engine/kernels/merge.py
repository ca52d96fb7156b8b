"""Exact merge of attention over disjoint key sets by their log-sum-exp (as FlashAttention's
split-KV combine does): out = sum_k exp(lse_k - lse) out_k, lse = log sum_k exp(lse_k)."""

from __future__ import annotations

import torch


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (out, lse) partials over disjoint key sets into a float32 output; rows with no
    key stay zero with lse -inf."""
    if len(parts) == 1:
        return parts[0][0].float(), parts[0][1]
    lses = torch.stack([lse for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = None
    for (o, part_lse) in parts:
        weight = torch.exp(part_lse - safe).unsqueeze(-1)
        term = o.float() * weight
        out = term if out is None else out.add_(term)
    return out, lse
