"""The float64 reference: the mask built straight from CONTRACT §1, then softmax attention.

Deliberately independent of engine.patterns: it reads the pattern as the contract's JSON.
"""

from __future__ import annotations

import math

import torch


def allowed(pattern: dict, i: torch.Tensor, j: torch.Tensor, h: int, heads: int) -> torch.Tensor:
    """The contract table's rule for key j and query i (no causal mask), for head h of heads."""
    kind = pattern.get("type", "dense")
    if kind == "dense":
        return torch.ones_like(i - j, dtype=torch.bool)
    if kind == "sliding_window":
        return (i - j).abs() < pattern["window"]
    if kind == "strided":
        return (i - j) % pattern["stride"] == 0
    if kind == "fixed":
        l, c = pattern["block"], pattern["summary"]
        return (j // l == i // l) | (j % l >= l - c)
    if kind == "union":
        out = torch.zeros_like(i - j, dtype=torch.bool)
        for member in pattern["patterns"]:
            out = out | allowed(member, i, j, h, heads)
        return out
    if kind == "per_head":
        members = pattern["patterns"]
        return allowed(members[h // (heads // len(members))], i, j, h, heads)
    raise ValueError(kind)


def mask(pattern: dict | None, lq: int, lk: int, h: int, heads: int, causal: bool = True) -> torch.Tensor:
    """[Lq, Lk] boolean mask; query row r is position i = Lk - Lq + r (bottom-right)."""
    i = torch.arange(lk - lq, lk)[:, None]
    j = torch.arange(lk)[None, :]
    m = allowed(pattern or {"type": "dense"}, i, j, h, heads)
    return m & (j <= i) if causal else m


def reference_attention(q, k, v, pattern=None, *, causal=True, scale=None):
    """(out float64 [B, H, Lq, Dv], lse float64 [B, H, Lq]) for 4-D inputs, GQA by head index."""
    b, heads, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs, lses = [], []
    for h in range(heads):
        kh, vh = k[:, h // (heads // hkv)].double(), v[:, h // (heads // hkv)].double()
        scores = torch.einsum("bqd,bkd->bqk", q[:, h].double(), kh) * scale
        scores = scores.masked_fill(~mask(pattern, lq, lk, h, heads, causal), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # relative to the row's max: exact for huge scores
        outs.append(torch.einsum("bqk,bkd->bqd", probs, vh))
        lses.append(lse)
    return torch.stack(outs, 1), torch.stack(lses, 1)


def fixed_step_reference(q, k, v, *, block, summary, causal, min_distance, skip_strides, scale):
    """(out, lse) float64 of a fixed step: the contract's fixed rule, causal or not, at distance
    >= min_distance, off the skipped strides' multiples; GQA by head index."""
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    i = torch.arange(lk - lq, lk)[:, None]
    j = torch.arange(lk)[None, :]
    keep = allowed({"type": "fixed", "block": block, "summary": summary}, i, j, 0, 1)
    keep &= (i - j >= min_distance) if causal else ((i - j).abs() >= min_distance)
    for s in skip_strides:
        keep &= (i - j) % s != 0
    kv = torch.arange(h) // (h // hkv)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()[:, kv]) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, -1).nan_to_num(0.0), v.double()[:, kv]), lse


def assert_matches_reference(out, lse, ref_out, ref_lse, *, tol: float, lse_tol: float | None = None) -> None:
    """An (out, lse) against the reference's: the output within `tol`; the same rows with no key,
    which have lse -inf and output zeros (CONTRACT §1); the other rows' lse within `lse_tol` (`tol`
    unless said: a half-precision output's rounding leaves the float32 lse exact)."""
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), "rows with no key, and only those, must have lse -inf"
    lse_tol = tol if lse_tol is None else lse_tol
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], atol=lse_tol, rtol=lse_tol)
    assert (out[empty] == 0).all(), "rows with no key must output zeros"


def assert_matches_far(result, q, k, v, pattern, min_distance, causal=True, skip_strides=(), tol=2e-5):
    """An (out, lse) at scale 0.25 against a float64 reference of `pattern` without the keys nearer
    than min_distance (nor those at (i - j) mod s == 0 for s in skip_strides): a union's stride,
    which leaves the window's keys to the band."""
    lq, lk = q.shape[-2], k.shape[-2]
    delta = torch.arange(lk - lq, lk)[:, None] - torch.arange(lk)[None, :]
    keep = mask(pattern, lq, lk, 0, 1, causal) & (delta.abs() >= min_distance)
    for stride in skip_strides:
        keep &= delta % stride != 0
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * 0.25
    scores = scores.masked_fill(~keep, float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    ref_out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - ref_lse[..., None]).nan_to_num(0.0), v.double())
    out, lse = result
    assert_matches_reference(out, lse, ref_out, ref_lse, tol=tol)


def merged_in_float64(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """The merge of partials straight from its definition, in float64: weights e^lse_k / sum."""
    lse = torch.stack(lses).double()
    weights = torch.softmax(lse, 0).nan_to_num(0.0)
    return (torch.stack(outs).double() * weights[..., None]).sum(0), torch.logsumexp(lse, 0)
