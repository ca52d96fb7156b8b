"""Exact merge of attention over disjoint key sets by their log-sum-exp (as FlashAttention's
split-KV combine does). Two partials: out = lerp(out_a, out_b, w) with w = sigmoid(lse_b - lse_a)
= e^lse_b / (e^lse_a + e^lse_b), and lse = logaddexp(lse_a, lse_b): the weight depends on the
difference alone, so it stays exact where lse is so large that log 2 vanishes in its float32
rounding (|lse| >= 2^25; exp(lse_k - lse) gave two tied partials weight 1 each, their sum instead
of their mean), and it is five elementwise passes, one over the outputs (the weights relative to
the largest lse, normalised by their sum, took seventeen, two over the outputs: 4.6 -> 2.6 ms for
H = 8, n = 16384, D = 64 on the CPU, 35 -> 9 us for one row); on the CPU the span kernel's
library does it in one pass (`span_kernel.merge`). Many stacked partials: their softmax over the
lse (relative to the largest, so exact at any magnitude too) weighs the outputs."""

from __future__ import annotations

import torch

from . import span_kernel, triton_merge
from .device import kernel_device

# A half-precision output merges on the CPU this many elements at a time, so that the float32
# copies of both partials and their lerp stay in cache (whole, each goes out to memory and is read
# back): bfloat16, H = 8, D = 64, ms, whole / so: n = 16384 8.3 / 4.8, 65536 39.9 / 23-25; H = 32,
# n = 4096 8.6 / 4.7 (2^15 .. 2^19 elements: 2^17 and 2^18 the fastest).
HALF_MERGE_ELEMENTS = 1 << 17


def merge_to(out: torch.Tensor, lse: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor],
             b: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Write the merge of partials a and b into (out, lse), out in any float dtype (computed in
    float32, rounded once), lse float32; they may be a itself (an in-place fold, no new output
    tensor). Rows where both are -inf keep a's output (a row with no key has zeros) and -inf. On
    CUDA one Triton launch that reads a and b in their own dtypes (`triton_merge`); on the CPU one
    pass of the span kernel's library (`span_kernel.merge`), which rounds each row alike whatever
    the tensors' sizes and threads (torch's vectorized loops compute a loop's tail apart, rounding
    sigmoid otherwise: a request's merge differed alone and batched); elsewhere `torch_merge_to`."""
    if triton_merge.takes(out, lse, a, b):
        triton_merge.triton_merge_to(out, lse, a, b)
    elif kernel_device(out.device) == "cpu" and span_kernel.merges(out, lse, a, b):
        span_kernel.merge(out, lse, a, b)
    else:
        torch_merge_to(out, lse, a, b)


def torch_merge_to(out: torch.Tensor, lse: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor],
                   b: tuple[torch.Tensor, torch.Tensor]) -> None:
    """`merge_to` in torch ops: five elementwise passes (seven launches on CUDA, with the float32
    copies of half-precision outputs; on the CPU those go HALF_MERGE_ELEMENTS at a time)."""
    (a_out, a_lse), (b_out, b_lse) = a, b
    b_weight = torch.sigmoid_(b_lse - a_lse).nan_to_num_(0.0).unsqueeze(-1)  # NaN only where both are -inf
    torch.logaddexp(a_lse, b_lse, out=lse)
    if out.dtype == torch.float32:
        torch.lerp(a_out.float(), b_out.float(), b_weight, out=out)
        return
    rows = max(1, out.shape[-2])
    if kernel_device(out.device) == "cpu":
        rows = max(1, HALF_MERGE_ELEMENTS // max(1, out[..., :1, :].numel()))
    for start in range(0, out.shape[-2], rows):
        at = slice(start, start + rows)
        out[..., at, :].copy_(torch.lerp(a_out[..., at, :].float(), b_out[..., at, :].float(), b_weight[..., at, :]))


def merge_stacked(out: torch.Tensor, lse: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials over disjoint key sets stacked along `dim` of out (before its features) and lse,
    merged into one: (out float32, lse) without that axis."""
    weights = torch.softmax(lse, dim).nan_to_num_(0.0)  # NaN only for a row with no key in any partial
    return (out.float() * weights.unsqueeze(-1)).sum(dim), torch.logsumexp(lse, dim)


def join_rows(parts: list[tuple[torch.Tensor, torch.Tensor]],
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials of consecutive query-row ranges as one (out, lse): a copy, unless there is one.
    With `dtype` (the result's, where some parts were computed in float32) the copy converts as it
    joins: one pass over the outputs, not a float32 join and a conversion after it."""
    if len(parts) == 1:
        return parts[0]
    if dtype is None or all(out.dtype == dtype for out, _ in parts):
        return torch.cat([out for out, _ in parts], dim=-2), torch.cat([lse for _, lse in parts], dim=-1)
    first = parts[0][0]
    out = first.new_empty((*first.shape[:-2], sum(o.shape[-2] for o, _ in parts), first.shape[-1]), dtype=dtype)
    row = 0
    for part, _ in parts:
        out[..., row : row + part.shape[-2], :].copy_(part)
        row += part.shape[-2]
    return out, torch.cat([lse for _, lse in parts], dim=-1)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]],
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (out, lse) partials over disjoint key sets into an output of `dtype`, float32 unless
    said (a plan's result takes its inputs' dtype: two partials merge straight into it, rounded
    once, so on CUDA no float32 output is left to convert after; more fold in float32 first). One
    partial is returned as it is (a CUDA plan of one call then hands its half-precision output
    straight back, not converted to float32 and back, two launches); rows with no key stay zero
    with lse -inf."""
    first_out, first_lse = parts[0]
    if len(parts) == 1:
        return parts[0]
    out = torch.empty(first_out.shape, dtype=dtype if len(parts) == 2 else torch.float32, device=first_out.device)
    lse = torch.empty_like(first_lse)
    merge_to(out, lse, parts[0], parts[1])
    for part in parts[2:]:
        merge_to(out, lse, (out, lse), part)
    return out.to(dtype), lse
