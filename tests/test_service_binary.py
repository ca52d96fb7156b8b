"""Binary tensors (`service.binary`): JSON header + raw bytes in, and out when asked; every
malformed binary body answers 422 naming its field; JSON requests are unaffected."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from engine import attention
from reference import reference_attention
from service import binary
from service.client import AttentionClient, raw_bytes
from service_support import as_json, live_server, qkv, request_body, serve, settings

SW = {"type": "sliding_window", "window": 5}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def header_for(tensors: dict, **extra) -> bytes:
    """A JSON header giving each of `tensors` as binary_data_size (or as the dict given)."""
    fields = {
        name: t if isinstance(t, dict) else {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                             "binary_data_size": t.numel() * t.element_size()}
        for name, t in tensors.items()
    }
    return json.dumps({**fields, **extra}).encode()


async def post_binary(client, header: bytes, *payloads, header_length: str | None = "auto") -> httpx.Response:
    headers = {"Content-Type": binary.MEDIA_TYPE}
    if header_length is not None:
        headers[binary.HEADER] = str(len(header)) if header_length == "auto" else header_length
    return await client.post("/attention", content=b"".join([header, *(bytes(raw_bytes(p)) for p in payloads)]),
                             headers=headers)


def read_binary(response: httpx.Response) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON header and the output (and lse) tensors of a binary answer."""
    assert response.headers["content-type"] == binary.MEDIA_TYPE
    header, rest = binary.split(response.content, response.headers[binary.HEADER])
    assert len(header) % binary.ALIGN == 0
    body, tensors, at = json.loads(bytes(header)), {}, 0
    for name in ("output", "lse"):
        if body[name] is not None:
            size = body[name]["binary_data_size"]
            dtype = getattr(torch, body[name]["dtype"])
            tensors[name] = torch.frombuffer(bytearray(rest[at : at + size]), dtype=dtype).reshape(body[name]["shape"])
            at += size
    assert at == len(rest)
    return body, tensors


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_binary_in_and_out_matches_the_reference(dtype):
    q, k, v = qkv(b=2, h=4, hkv=2, lq=37, lk=50, d=16, dv=8, dtype=dtype, seed=3)  # GQA, Lq < Lk, ragged
    async with serve(settings()) as client:
        r = await post_binary(client, header_for({"q": q, "k": k, "v": v}, pattern=SW, return_lse=True), q, k, v)
        assert r.status_code == 200, r.text
        body, got = read_binary(r)
    assert body["meta"]["pattern"] == SW and body["output"]["shape"] == [2, 4, 37, 8]
    ref_out, ref_lse = reference_attention(q, k, v, SW)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got["output"].double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(got["lse"].double(), ref_lse, atol=1e-4, rtol=1e-4)
    assert torch.equal(got["output"], attention(q, k, v, SW))  # the same computation as in-process


@pytest.mark.anyio
async def test_mixed_encodings_odd_header_length_and_3d():
    q, k, v = (t[0] for t in qkv(b=1, h=2, hkv=2, lq=20, lk=20, d=8, dv=8, seed=4))  # [H, L, D]
    # k as b64 inside the header; q and v binary; a header of odd length (unaligned tensors).
    header = header_for({"q": q, "k": as_json(k), "v": v}, encoding="data")
    header += b" " * ((1 - len(header)) % 4)  # trailing whitespace: still the same JSON
    assert len(header) % 4 == 1
    async with serve(settings()) as client:
        r = await post_binary(client, header, q, v)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["output"]["shape"] == [1, 2, 20, 8]
    out = torch.tensor(r.json()["output"]["data"]).reshape(1, 2, 20, 8)
    torch.testing.assert_close(out, attention(q, k, v).unsqueeze(0), atol=1e-6, rtol=1e-6)


@pytest.mark.anyio
async def test_json_requests_may_ask_for_a_binary_answer():
    q, k, v = qkv(seed=5)
    decode = qkv(b=2, h=4, hkv=2, lq=1, lk=13, seed=5)  # an lse [B, H, 1] whose last stride is not 1
    async with serve(settings()) as client:
        r = await client.post("/attention", json={**request_body(q, k, v), "encoding": "binary"})
        r_decode = await client.post("/attention", json={**request_body(*decode, pattern=SW), "encoding": "binary",
                                                         "return_lse": True})
    assert r.status_code == 200, r.text
    _, got = read_binary(r)
    assert torch.equal(got["output"], attention(q, k, v))
    assert r_decode.status_code == 200, r_decode.text
    _, got = read_binary(r_decode)
    out, lse = attention(*decode, SW, return_lse=True)
    assert torch.equal(got["output"], out) and torch.equal(got["lse"], lse)


def _bad_bodies():
    q, k, v = qkv(b=1, h=2, hkv=2, lq=8, lk=8, d=4, dv=4, seed=6)
    good = header_for({"q": q, "k": k, "v": v})
    nan_q = q.clone()
    nan_q[0, 0, 0, 0] = float("nan")
    wrong_size = header_for({"q": {**json.loads(header_for({"q": q}))["q"], "binary_data_size": 4}, "k": k, "v": v})
    return [
        ("no header length", (good, q, k, v), None, binary.HEADER),
        ("header length not a number", (good, q, k, v), "12abc", binary.HEADER),
        ("header length past the body", (good, q, k, v), "999999", binary.HEADER),
        ("header length in superscript digits", (good, q, k, v), b"\xb2", binary.HEADER),  # Latin-1 "²"
        ("header length of 5000 digits", (good, q, k, v), "0" * 4990 + str(len(good)), binary.HEADER),
        ("header length cutting the JSON", (good, q, k, v), "10", "body"),
        ("bytes missing", (good, q, k), "auto", "body"),
        ("bytes left over", (good, q, k, v, v), "auto", "body"),
        ("size not the shape's", (wrong_size, q, k, v), "auto", "q.binary_data_size"),
        ("non-finite value", (good, nan_q, k, v), "auto", "q.binary_data_size"),
        ("bytes but no binary tensor", (json.dumps(request_body(q, k, v)).encode(), q), "auto", "body"),
    ]


@pytest.mark.anyio
async def test_malformed_binary_bodies_answer_422_naming_the_field():
    async with serve(settings()) as client:
        for case, (header, *payloads), header_length, field in _bad_bodies():
            r = await post_binary(client, header, *payloads, header_length=header_length)
            assert r.status_code == 422, (case, r.text)
            assert r.json()["error"]["field"] == field, (case, r.json())
        # binary_data_size in a JSON body: there are no bytes to take it from
        q, k, v = qkv(seed=7)
        r = await client.post("/attention", content=header_for({"q": q, "k": k, "v": v}),
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "q.binary_data_size"
        # and the service is still answering correctly
        r = await client.post("/attention", json=request_body(q, k, v))
        assert r.status_code == 200


def test_client_binary_against_a_real_uvicorn():
    q, k, v = qkv(b=2, h=4, hkv=1, lq=300, lk=300, d=32, dv=32, seed=8)  # MQA, large enough to stream in chunks
    pattern = {"type": "union", "patterns": [SW, {"type": "strided", "stride": 7}]}
    with live_server(settings()) as url, AttentionClient(url, encoding="binary") as client:
        result = client.attention(q, k, v, pattern, return_lse=True)
    out, lse = attention(q, k, v, pattern, return_lse=True)
    assert torch.equal(result.output, out) and torch.equal(result.lse, lse)
