"""The service on a CUDA device (skipped where torch sees none): answers match the float64
reference in every dtype, batches form, and the peak memory comes from the device allocator."""

from __future__ import annotations

import asyncio

import pytest
import torch

from reference import reference_attention
from service_support import from_json, qkv, request_body, serve, settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
SW = lambda w: {"type": "sliding_window", "window": w}  # noqa: E731
FX = {"type": "fixed", "block": 48, "summary": 5}  # fixed's Triton kernel, with blocks ragged at both lengths
PATTERNS = [{"type": "dense"}, SW(32), {"type": "strided", "stride": 16},
            {"type": "union", "patterns": [SW(16), {"type": "strided", "stride": 16}]},
            FX, {"type": "union", "patterns": [SW(20), FX]}]
LENGTHS = [(256, 256), (201, 250)]  # (Lq, Lk): square, and the last 201 of 250 positions


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
async def test_answers_on_the_gpu_match_the_reference(dtype):
    async with serve(settings(device="cuda", max_batch_delay_ms=5)) as c:
        # each (pattern, lengths) twice, so that batches can form
        cases = [(qkv(b=1 + i % 2, h=8, hkv=2, lq=LENGTHS[i // 6 % 2][0], lk=LENGTHS[i // 6 % 2][1], d=64, dv=64,
                      dtype=dtype, seed=i), PATTERNS[i % 6]) for i in range(24)]
        responses = await asyncio.gather(*(
            c.post("/attention", json=request_body(q, k, v, pattern=p, return_lse=True)) for (q, k, v), p in cases
        ))
    for ((q, k, v), p), r in zip(cases, responses):
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["meta"]["device"] == "cuda" and got["output"]["dtype"] == str(dtype).removeprefix("torch.")
        assert got["meta"]["memory"]["peak_bytes"] > 0
        ref, ref_lse = reference_attention(q, k, v, p)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(from_json(got["output"]).double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(from_json(got["lse"]).double(), ref_lse, atol=tol, rtol=tol)
    assert max(r.json()["meta"]["batch"]["requests"] for r in responses) > 1
