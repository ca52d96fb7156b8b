"""service.client: encoding round trips, and results and typed errors from the real app in-process."""

from __future__ import annotations

import asyncio
import base64
import struct
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from service.app import app, create_app
from service.settings import Settings

from engine import attention
from service.client import (
    AsyncAttentionClient,
    AttentionClient,
    AttentionResult,
    AuthenticationError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    TransportError,
    build_request,
    decode_tensor,
    encode_tensor,
    raw_bytes,
    retry_after_seconds,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", ["b64", "data"])
def test_tensor_round_trip_is_exact(dtype, encoding):
    x = torch.randn(2, 3, 5, 4).to(dtype)[:, :, ::2]  # non-contiguous on purpose
    if dtype == torch.bfloat16 and encoding == "data":
        with pytest.raises(ValueError, match="q: bfloat16 travels only as b64"):
            encode_tensor("q", x, encoding)
        return
    wire = encode_tensor("q", x, encoding)
    assert wire["shape"] == [2, 3, 3, 4] and wire["dtype"] == str(dtype).removeprefix("torch.")
    back = decode_tensor("q", wire)
    assert back.dtype == dtype and torch.equal(back, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_tensor_round_trip_is_exact(dtype):
    x = torch.randn(2, 3, 5, 4).to(dtype)[:, :, ::2]
    wire = encode_tensor("q", x, "binary")
    assert wire == {"shape": [2, 3, 3, 4], "dtype": str(dtype).removeprefix("torch."),
                    "binary_data_size": x.numel() * x.element_size()}
    raw = raw_bytes(x)
    assert len(raw) == wire["binary_data_size"]
    back = decode_tensor("q", wire, raw)
    assert back.dtype == dtype and torch.equal(back, x)


def test_b64_is_little_endian_c_order_bytes():
    wire = encode_tensor("q", np.array([[1.0, -2.0]], dtype=np.float32), "b64")
    assert base64.b64decode(wire["b64"]) == struct.pack("<2f", 1.0, -2.0)
    bf16 = encode_tensor("q", torch.tensor([1.0], dtype=torch.bfloat16), "b64")
    assert base64.b64decode(bf16["b64"]) == bytes([0x80, 0x3F])  # top half of float32 1.0 (0x3F800000)


def test_numpy_inputs_and_rejected_dtypes():
    arr = np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float16)
    assert torch.equal(decode_tensor("k", encode_tensor("k", arr)), torch.from_numpy(arr))
    with pytest.raises(ValueError, match="v: dtype torch.float64 is not one of"):
        encode_tensor("v", np.zeros((1, 2, 3)), "b64")
    with pytest.raises(TypeError, match="q: expected a numpy array or torch tensor"):
        encode_tensor("q", [[1.0]], "b64")


def test_null_in_data_reads_as_minus_infinity():
    lse = decode_tensor("lse", {"shape": [1, 1, 2], "dtype": "float32", "data": [0.5, None]})
    assert lse.tolist() == [[[0.5, float("-inf")]]]


def test_retry_after_in_every_form():
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "2"})) == 2.0
    later = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 < retry_after_seconds(httpx.Response(503, headers={"Retry-After": format_datetime(later, usegmt=True)})) <= 30
    # asctime's form (RFC 9110's third) names no zone: GMT, as every HTTP date
    assert 25 < retry_after_seconds(httpx.Response(503, headers={"Retry-After": later.strftime("%a %b %d %H:%M:%S %Y")})) <= 30
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "Sun Nov  6 08:49:37 1994"})) == 0.0
    assert retry_after_seconds(httpx.Response(429)) is None


def test_inputs_the_wire_cannot_carry_are_refused_by_name():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="^k: values must be finite"):
        encode_tensor("k", torch.tensor([1.0, float("nan")]), "data")
    with AttentionClient("http://127.0.0.1:9") as offline:  # refused before anything is sent
        for request_id in ("jöb", " job", "x" * 1025):
            with pytest.raises(ValueError, match="^request_id: "):
                offline.attention(q, q, q, request_id=request_id)
    assert build_request(q, q, q, scale=np.float32(0.5))["scale"] == 0.5


# --------------------------------------------------------------- against the real app, in-process


@pytest.fixture(scope="module")
def client():
    with TestClient(app) as http, AttentionClient(http=http) as attention_client:
        attention_client.wait_ready()
        yield attention_client


def inputs(dtype, hkv=2, lq=24, lk=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, lq, 16, generator=gen).to(dtype)
    k = torch.randn(2, hkv, lk, 16, generator=gen).to(dtype)
    v = torch.randn(2, hkv, lk, 8, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "dtype, encoding",
    [(dt, enc) for dt in DTYPES for enc in ("b64", "data", "binary") if (dt, enc) != (torch.bfloat16, "data")],
)
def test_result_matches_engine(client, dtype, encoding):
    q, k, v = inputs(dtype)
    pattern = {"type": "union", "patterns": [{"type": "sliding_window", "window": 8}, {"type": "strided", "stride": 5}]}
    result = client.attention(q, k, v, pattern, return_lse=True, encoding=encoding, request_id=f"rt-{encoding}")
    out, lse = attention(q, k, v, pattern, return_lse=True)
    assert result.output.dtype == dtype and result.output.shape == (2, 4, 24, 8)
    torch.testing.assert_close(result.output, out, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(result.lse, lse, atol=1e-4, rtol=1e-4)
    assert result.request_id == f"rt-{encoding}" == result.meta["request_id"]
    assert result.meta["batch"]["requests"] >= 1 and result.meta["pattern"]["type"] == "union"


def test_numpy_in_torch_out_and_response_encoding(client):
    q, k, v = (t.numpy() for t in inputs(torch.float32, lq=40))
    result = client.attention(q, k, v, causal=False, scale=0.5, response_encoding="data")
    expected = attention(*(torch.from_numpy(t) for t in (q, k, v)), causal=False, scale=0.5)
    torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)
    assert result.lse is None and result.request_id  # the client made one


def test_invalid_request_names_the_field(client):
    q, k, v = inputs(torch.float32, hkv=3)
    with pytest.raises(InvalidRequestError) as info:
        client.attention(q, k, v)
    err = info.value
    assert err.status == 422 and err.field == "k.shape" and "divide" in err.message
    assert type(err) is InvalidRequestError

    q, k, v = inputs(torch.float32)
    with pytest.raises(InvalidRequestError) as info:
        client.attention(q, k, v, {"type": "sliding_window", "window": 0}, request_id="bad-window")
    assert info.value.status == 422 and "window" in info.value.field and info.value.request_id == "bad-window"


def test_payload_too_large_and_authentication(monkeypatch):
    monkeypatch.setenv("ATTN_MAX_TOKENS_PER_REQUEST", "64")
    monkeypatch.setenv("ATTN_API_KEYS", "secret-1,secret-2")
    q, k, v = inputs(torch.float32)  # B * Lk = 80 tokens
    with TestClient(create_app()) as http:
        AttentionClient(http=http).wait_ready()
        with AttentionClient(http=http) as anonymous, pytest.raises(AuthenticationError) as info:
            anonymous.attention(q, k, v)
        assert info.value.status == 401
        with AttentionClient(http=http, api_key="secret-2") as keyed:
            with pytest.raises(PayloadTooLargeError) as info:
                keyed.attention(q, k, v)
            assert info.value.status == 413 and info.value.field == "k.shape" and "80" in info.value.message
            assert keyed.attention(q[:1, :, :8], k[:1, :, :16], v[:1, :, :16]).output.shape == (1, 4, 8, 8)


def test_async_client_in_process():
    q, k, v = inputs(torch.bfloat16)
    pattern = {"type": "fixed", "block": 8, "summary": 2}

    async def call():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                client = AsyncAttentionClient(http=http)
                await client.wait_ready()
                with pytest.raises(InvalidRequestError) as info:
                    await client.attention(q, k[:, :, :10], v)
                assert info.value.field == "v.shape"
                return await client.attention(q, k, v, pattern, request_id="async-1")

    result = asyncio.run(call())
    torch.testing.assert_close(result.output, attention(q, k, v, pattern), atol=2e-2, rtol=2e-2)
    assert result.request_id == "async-1"


def test_503_is_retried_after_retry_after_a_bounded_number_of_times():
    attempts = []
    not_started = create_app(Settings())  # outside `with`, its lifespan never runs: not ready, 503
    http = TestClient(not_started)
    http.event_hooks["request"] = [attempts.append]
    with (
        AttentionClient(http=http, max_retries=2, max_backoff_s=0.01) as client,
        pytest.raises(OverloadedError) as info,
    ):
        client.attention(*inputs(torch.float32), request_id="early")
    err = info.value
    assert (err.status, err.retry_after, err.request_id, len(attempts)) == (503, 1.0, "early", 3)
    assert "not ready" in err.message
    attempts.clear()
    with AttentionClient(http=http, max_retries=1, max_backoff_s=0.01) as client, pytest.raises(OverloadedError):
        client.attention(*inputs(torch.float32))  # no id given: the client makes one for all attempts
    ids = {request.headers["X-Request-ID"] for request in attempts}
    assert len(attempts) == 2 and len(ids) == 1 and ids.pop()


def test_queue_full_answers_429_and_retries_get_through():
    """A one-slot queue before a one-request batcher: a burst overflows it."""
    busy = create_app(Settings(queue_size=1, max_batch_size=1))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, 512, 64, generator=gen) for _ in range(3))

    async def burst(client):
        return await asyncio.gather(*(client.attention(q, k, v) for _ in range(12)), return_exceptions=True)

    async def both():
        async with busy.router.lifespan_context(busy):
            transport = httpx.ASGITransport(app=busy)
            async with httpx.AsyncClient(transport=transport, base_url="http://busy") as http:
                await AsyncAttentionClient(http=http).wait_ready()
                once = await burst(AsyncAttentionClient(http=http, max_retries=0))
                patient = await burst(AsyncAttentionClient(http=http, max_retries=100, max_backoff_s=0.05))
        return once, patient

    once, patient = asyncio.run(both())
    refused = [r for r in once if isinstance(r, OverloadedError)]
    assert refused and all(e.status == 429 and e.retry_after == 1.0 for e in refused)
    assert all(isinstance(r, AttentionResult) for r in once if r not in refused)
    expected = attention(q, k, v)
    assert all(isinstance(r, AttentionResult) and torch.allclose(r.output, expected, atol=1e-5) for r in patient)


def test_transport_error_carries_the_request_id_the_client_made():
    """No answer at all: the error still names the X-Request-ID every attempt was sent with."""
    sent = []

    def refuse(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["X-Request-ID"])
        raise httpx.ConnectError("refused", request=request)

    http = httpx.Client(transport=httpx.MockTransport(refuse), base_url="http://attention")
    with AttentionClient(http=http) as client, pytest.raises(TransportError) as info:
        client.attention(*inputs(torch.float32))
    assert info.value.request_id == sent[0] and info.value.status is None
