"""The service on a CUDA device (skipped where torch sees none): answers match the engine on the
CPU in every dtype, batches form, and the peak memory comes from the device allocator."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import attention
from service_support import from_json, qkv, request_body, serve, settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
PATTERNS = [{"type": "dense"}, {"type": "sliding_window", "window": 32}, {"type": "strided", "stride": 16},
            {"type": "union", "patterns": [{"type": "sliding_window", "window": 16}, {"type": "strided", "stride": 16}]}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
async def test_answers_on_the_gpu_match_the_engine_on_the_cpu(dtype):
    async with serve(settings(device="cuda", max_batch_delay_ms=5)) as c:
        cases = [(qkv(b=1 + i % 2, h=8, hkv=2, lq=256, lk=256, d=64, dv=64, dtype=dtype, seed=i), PATTERNS[i % 4])
                 for i in range(16)]
        responses = await asyncio.gather(*(
            c.post("/attention", json=request_body(q, k, v, pattern=p, return_lse=True)) for (q, k, v), p in cases
        ))
    for ((q, k, v), p), r in zip(cases, responses):
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["meta"]["device"] == "cuda" and got["output"]["dtype"] == str(dtype).removeprefix("torch.")
        assert got["meta"]["memory"]["peak_bytes"] > 0
        ref, ref_lse = attention(q.float(), k.float(), v.float(), p, return_lse=True)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(from_json(got["output"]).float(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(from_json(got["lse"]), ref_lse, atol=tol, rtol=tol)
    assert max(r.json()["meta"]["batch"]["requests"] for r in responses) > 1
