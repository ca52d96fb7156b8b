"""Exact merge of attention over disjoint key sets by their log-sum-exp (as FlashAttention's
split-KV combine does): out = sum_k exp(lse_k - lse) out_k, lse = log sum_k exp(lse_k)."""

from __future__ import annotations

import torch


def merge_to(out: torch.Tensor, lse: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor],
             b: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Write the merge of partials a and b into float32 (out, lse), which may be a itself (an
    in-place fold, no new output tensor). Rows where both are -inf get zeros and -inf."""
    (a_out, a_lse), (b_out, b_lse) = a, b
    merged = torch.logaddexp(a_lse, b_lse)
    safe = _finite(merged)
    torch.mul(a_out, torch.exp(a_lse - safe).unsqueeze(-1), out=out)
    out.addcmul_(b_out, torch.exp(b_lse - safe).unsqueeze(-1))
    lse.copy_(merged)


def merge_stacked(out: torch.Tensor, lse: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials over disjoint key sets stacked along `dim` of out (before its features) and lse,
    merged into one: (out float32, lse) without that axis."""
    total = torch.logsumexp(lse, dim=dim)
    weights = torch.exp(lse - _finite(total).unsqueeze(dim)).unsqueeze(-1)
    return (out.float() * weights).sum(dim), total


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with its -inf (rows with no key) as 0, to subtract: such a row's weights are then exp(-inf) = 0."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def join_rows(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials of consecutive query-row ranges as one (out, lse): a copy, unless there is one."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([out for out, _ in parts], dim=-2), torch.cat([lse for _, lse in parts], dim=-1)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (out, lse) partials over disjoint key sets into a float32 output; rows with no
    key stay zero with lse -inf."""
    first_out, first_lse = parts[0]
    if len(parts) == 1:
        return first_out.float(), first_lse
    out = torch.empty(first_out.shape, dtype=torch.float32, device=first_out.device)
    lse = torch.empty_like(first_lse)
    merge_to(out, lse, parts[0], parts[1])
    for part in parts[2:]:
        merge_to(out, lse, (out, lse), part)
    return out, lse
