"""A few query rows, each against exactly its own keys: decoding and short chunks of patterns
with no structured kernel (a union of three members, say).

Such a pattern's keys may spread thinly over the whole prefix; the masked kernel would read and
score every key of the span. Here each row's keys come from the pattern (`keys_of`, ascending,
each key once) and are taken from K and V: a strided view when they are evenly spaced, a copy
otherwise. Consecutive rows whose key lists extend each other (as fixed's rows in one block do)
share one fused call and one copy under a [rows, keys] prefix mask; other rows take a call each,
without a mask. Work and reads grow with the attended pairs, plus a fixed cost per call.
"""

from __future__ import annotations

import torch

from ..patterns import PatternBase
from .dense import NEG_INF, _fused


def gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: PatternBase, *, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for `pattern` over [B, H, L, D] (equal heads), queries bottom-right aligned;
    (out float32, lse). Rows with no key get zeros and -inf."""
    lq, lk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    out = torch.zeros(*q.shape[:-1], dv, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], NEG_INF, dtype=torch.float32, device=q.device)
    for first, keys, counts in _prefix_groups(pattern, lq, lk, causal):
        rows = slice(first, first + len(counts))
        keys = keys.to(q.device)
        mask = None
        if len(counts) > 1:  # row t keeps the first counts[t] keys
            seen = torch.arange(len(keys))[None, :] < torch.tensor(counts)[:, None]
            mask = torch.zeros(seen.shape, dtype=q.dtype).masked_fill_(~seen, NEG_INF).to(q.device)
        o, l = _fused(q[..., rows, :], _rows(k, keys), _rows(v, keys), scale=scale, is_causal=False, mask=mask)
        out[..., rows, :], lse[..., rows] = o, l
    return out, lse


def _prefix_groups(pattern: PatternBase, lq: int, lk: int, causal: bool):
    """(first row, keys of the group's last row, each row's key count) for runs of consecutive
    rows whose key lists are prefixes of the next row's; rows with no key are left out."""
    offset = lk - lq
    groups: list[tuple[int, torch.Tensor, list[int]]] = []
    previous = None
    for row in range(lq):
        keys = pattern.keys_of(offset + row, lk, causal)
        if not len(keys):
            previous = None
            continue
        if previous is not None and len(keys) >= len(previous) and torch.equal(keys[: len(previous)], previous):
            first, _, counts = groups[-1]
            groups[-1] = (first, keys, [*counts, len(keys)])
        else:
            groups.append((row, keys, [len(keys)]))
        previous = keys
    return groups


def _rows(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """x[..., keys, :]: a view when the keys are evenly spaced, a copy otherwise."""
    first, count = int(keys[0]), len(keys)
    step = int(keys[1] - keys[0]) if count > 1 else 1
    if count == 1 or bool((keys.diff() == step).all()):
        return x[..., first : first + step * (count - 1) + 1 : step, :]
    return x.index_select(-2, keys)
