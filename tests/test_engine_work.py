"""Work: a few query rows score about the pairs they attend, not whole classes or padded blocks.

Counted, not timed: a dispatch mode adds up the (query, key) pairs each call of torch's CPU
attention kernel scores."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import attention
from engine.kernels import span_kernel
from engine.patterns import attended_pairs, parse_pattern


class _ScoredPairs(TorchDispatchMode):
    """The (query, key) pairs torch's CPU flash kernel scores, and those the span kernel's rows see
    (each row its span of keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs = 0
        self._span = span_kernel.span_attention

    def __enter__(self):
        def counted(q, k, v, out, lse, *, first, last, row_shift=0, rows_per_step=1, keys_per_step=1, causal=False,
                    **kwargs):
            position = torch.arange(q.shape[-2]) + row_shift
            anchor = position // rows_per_step * keys_per_step
            to = torch.minimum(anchor + last + 1, position + 1) if causal else anchor + last + 1
            key_rows = k.shape[2] * k.shape[3] if k.dim() == 5 else k.shape[2]  # rows in groups: fixed's summary keys
            seen = to.clamp(0, key_rows) - (anchor + first).clamp(0, key_rows)
            self.pairs += q.shape[:-2].numel() * int(seen.clamp_min(0).sum())
            return self._span(q, k, v, out, lse, first=first, last=last, row_shift=row_shift,
                              rows_per_step=rows_per_step, keys_per_step=keys_per_step, causal=causal, **kwargs)

        span_kernel.span_attention = counted
        return super().__enter__()

    def __exit__(self, *exc):
        span_kernel.span_attention = self._span
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            q, k = args[0], args[1]
            self.pairs += q.shape[:-1].numel() * k.shape[-2]
        return func(*args, **(kwargs or {}))


FEW_ROWS = {  # (pattern, causal, Lq, Lk): a few rows at the end of long keys
    "strided_non_causal": ({"type": "strided", "stride": 1000}, False, 1, 65536),  # none of its class after it
    "union_non_causal": ({"type": "union", "patterns": [{"type": "sliding_window", "window": 128},
                                                         {"type": "strided", "stride": 128}]}, False, 1, 65536),
    "fixed_big_block": ({"type": "fixed", "block": 4096, "summary": 64}, True, 24, 65536),  # past the 16-row run
    "fixed_non_causal_mid_block": ({"type": "fixed", "block": 1000, "summary": 10}, False, 200, 4096),
    "fixed_non_causal_long": ({"type": "fixed", "block": 1000, "summary": 10}, False, 2500, 4096),
}


@pytest.mark.parametrize("pattern,causal,lq,lk", FEW_ROWS.values(), ids=FEW_ROWS.keys())
def test_a_few_rows_score_about_the_pairs_they_attend(pattern, causal, lq, lk):
    """Each row against the keys it attends, plus up to a block's worth: non-causal strided(1000)
    at one row scored every class (27 ms, 0.2 now, H = 8), fixed(4096, 64) at 24 rows two whole
    padded 4096 x 4096 blocks (138 ms, 15 now), non-causal fixed(1000, 10) a first block padded
    with up to 999 dummy rows (17-30 ms, 4 now)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, lq, 64, generator=g)
    k, v = (torch.randn(1, 2, lk, 64, generator=g) for _ in range(2))
    with _ScoredPairs() as work:
        out = attention(q, k, v, pattern, causal=causal)
    assert out.shape == (1, 2, lq, 64)
    attended = attended_pairs(parse_pattern(pattern), 1, 2, lq, lk, causal)
    assert attended <= work.pairs <= 1.5 * attended + 2 * lq * pattern.get("block", 0), (work.pairs, attended)
