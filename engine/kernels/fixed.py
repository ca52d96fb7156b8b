"""Causal `fixed(l, c)` as two disjoint pieces merged by log-sum-exp.

(a) the query's own block: a reshape into blocks of l and one batched dense causal call;
(b) the summary columns of earlier blocks: a small gathered key set (c per block) that query
block b sees up to block b-1. Groups of query blocks share a fully visible prefix (no mask) and
a small block-causal mask for the summary keys inside the group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense import NEG_INF, _fused, dense_attention, empty_partial
from .merge import merge_partials

# Query rows per summary call; the group's summary mask is rows x (rows / l * c).
GROUP_ROWS = 1024


def _blocks(x: torch.Tensor, start: int, stop: int, block: int) -> torch.Tensor:
    b, h, length, d = x.shape
    if stop > length:
        x = F.pad(x, (0, 0, 0, stop - length))
    return x[..., start:stop, :].reshape(b, h * ((stop - start) // block), block, d)


def fixed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, summary: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal fixed-pattern attention, queries bottom-right aligned; (out float32, lse)."""
    b, h, lq, _ = q.shape
    lk, dv, l, c = k.shape[-2], v.shape[-1], block, summary
    offset = lk - lq
    first = (offset // l) * l
    total = -(-lk // l) * l
    qp = F.pad(q, (0, 0, offset - first, total - lk))  # rows for positions first .. total-1
    nq = (total - first) // l
    own = dense_attention(qp.reshape(b, h * nq, l, -1), _blocks(k, first, total, l), _blocks(v, first, total, l),
                          scale=scale, diagonal=0)
    own_out = own[0].reshape(b, h, nq * l, dv)
    own_lse = own[1].reshape(b, h, nq * l)

    # Summary keys of every block that lies wholly before the last query block.
    last_block = (lk - 1) // l
    cols = torch.arange(l - c, l, device=k.device)
    idx = (torch.arange(last_block, device=k.device)[:, None] * l + cols[None, :]).reshape(-1)
    ks, vs = k.index_select(-2, idx), v.index_select(-2, idx)
    group_blocks = max(1, GROUP_ROWS // l)
    sum_out = torch.empty_like(own_out, dtype=torch.float32)
    sum_lse = torch.empty_like(own_lse)
    for g0 in range(first // l, total // l, group_blocks):
        g1 = min(g0 + group_blocks, total // l)
        rows = slice(g0 * l - first, g1 * l - first)
        qg = qp[..., rows, :]
        parts = []
        if g0 > 0:  # summary keys of blocks before the group: every row sees them
            parts.append(_fused(qg, ks[..., : g0 * c, :], vs[..., : g0 * c, :], scale=scale, is_causal=False))
        inner_hi = min(g1 - 1, last_block) * c  # summary keys of blocks g0 .. g1-2, block-causal
        if inner_hi > g0 * c:
            qb = torch.arange(g0, g1, device=q.device).repeat_interleave(l)[:, None]
            kb = torch.arange(g0 * c, inner_hi, device=q.device)[None, :] // c
            mask = torch.zeros(qb.shape[0], kb.shape[1], dtype=q.dtype, device=q.device).masked_fill_(kb >= qb, NEG_INF)
            o, s_lse = _fused(qg, ks[..., g0 * c : inner_hi, :], vs[..., g0 * c : inner_hi, :], scale=scale,
                              is_causal=False, mask=mask)
            no_key = (qb == g0).squeeze(-1)  # the group's first block sees no inner summary key
            parts.append((o.masked_fill(no_key[:, None], 0.0), s_lse.masked_fill(no_key, NEG_INF)))
        part = merge_partials(parts) if parts else empty_partial(qg, dv)
        sum_out[..., rows, :], sum_lse[..., rows] = part
    out, lse = merge_partials([(own_out, own_lse), (sum_out, sum_lse)])
    keep = slice(offset - first, offset - first + lq)
    return out[..., keep, :], lse[..., keep]
