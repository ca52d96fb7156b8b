"""A catalogue of bad inputs: each gets its status and an error naming the field, and after all of
them the service still answers a valid request correctly. In process for what the app decides;
against a real uvicorn socket for what only the wire shows (a body trickled in, oversize headers)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import select
import socket
import time
import weakref

import httpx
import numpy as np
import pytest
import torch

from engine import attention
from engine.patterns import MAX_DEPTH
from reference import reference_attention
from service_support import from_json, live_server, qkv, request_body, sample, serve, settings

SW = {"type": "sliding_window", "window": 4}
LIMITS = dict(max_tokens_per_request=4096, max_tensor_elements=1 << 16, max_heads=64, max_body_bytes=1 << 20)


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def client():
    async with serve(settings(**LIMITS)) as c:
        yield c


def _valid() -> dict:
    q, k, v = qkv(h=4, hkv=2, lq=8, lk=8, d=4, dv=4)
    return request_body(q, k, v, pattern=SW)


def _set(path: str, value) -> str:
    """A valid body as JSON text with one field replaced (None deletes it) or, for a str value
    starting with '<raw>', replaced by raw JSON text (what json.dumps cannot write)."""
    body = _valid()
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
        return json.dumps(body)
    if isinstance(value, str) and value.startswith("<raw>"):
        node[last] = "__RAW__"
        return json.dumps(body).replace('"__RAW__"', value[len("<raw>"):])
    node[last] = value
    return json.dumps(body)


def _b64(values, dtype=np.float32) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


def _with_nonfinite(value: float, dtype=np.float32, n: int = 1 * 2 * 8 * 4) -> str:
    values = np.zeros(n, dtype=dtype)
    values[5] = value
    return _b64(values, dtype)


def _nested(levels: int) -> str:
    return '{"type": "union", "patterns": [' * levels + '{"type": "dense"}' + "]}" * levels


def _members(kind: str, n: int) -> str:
    return json.dumps({"type": kind, "patterns": [SW] * n})


# name: (field path to change, new value, status, the `field` the error names)
CATALOGUE = {
    # malformed JSON and wrong types
    "truncated JSON": ("<body>", '{"q": {"shape": [1, ', 422, "body"),
    "not JSON at all": ("<body>", "q=1&k=2", 422, "body"),
    "JSON array, not an object": ("<body>", "[]", 422, "body"),
    "invalid UTF-8": ("<body>", b'{"q": "\xff\xfe"}', 422, "body"),
    "q a string": ("q", "tensor", 422, "q"),
    "shape of strings": ("q.shape", ["1", "x", "8", "4"], 422, "q.shape[0]"),
    "shape a number": ("q.shape", 4, 422, "q.shape"),
    "dtype a number": ("q.dtype", 32, 422, "q.dtype"),
    "dtype unknown": ("q.dtype", "float64", 422, "q.dtype"),
    "b64 a number": ("q.b64", 12, 422, "q.b64"),
    "data of strings": ("q.data", ["a"] * 4, 422, "q.data"),
    "data with true among numbers": ("q.data", [True, 1, 0, 0], 422, "q.data"),  # numpy would read it as 1
    "data with false among floats, nested": ("k.data", [[[[0.5, False], [1.5, 2.5]]]], 422, "k.data"),
    "causal a string": ("causal", "maybe", 422, "causal"),
    # JSON types as they are: no string, number or bool stands in for another
    "causal the string false": ("causal", "false", 422, "causal"),
    "causal a number": ("causal", 0, 422, "causal"),
    "return_lse a string": ("return_lse", "yes", 422, "return_lse"),
    "window true": ("pattern", {"type": "sliding_window", "window": True}, 422, "pattern.window"),
    "window a numeric string": ("pattern", {"type": "sliding_window", "window": "3"}, 422, "pattern.window"),
    "window 3.0": ("pattern", {"type": "sliding_window", "window": 3.0}, 422, "pattern.window"),
    "scale a numeric string": ("scale", "0.5", 422, "scale"),
    "scale true": ("scale", True, 422, "scale"),
    "shape of numeric strings": ("q.shape", ["1", "4", "8", "4"], 422, "q.shape[0]"),
    "scale a string": ("scale", "big", 422, "scale"),
    "timeout_ms negative": ("timeout_ms", -5, 422, "timeout_ms"),
    "encoding unknown": ("encoding", "hex", 422, "encoding"),
    "pattern a list": ("pattern", [SW], 422, "pattern"),
    "unknown top-level field": ("mask", [1, 0], 422, "mask"),
    "unknown tensor field": ("q.strides", [1, 1, 1, 1], 422, "q.strides"),
    # missing fields
    "missing q": ("q", None, 422, "q"),
    "missing k": ("k", None, 422, "k"),
    "missing v": ("v", None, 422, "v"),
    "missing shape": ("q.shape", None, 422, "q.shape"),
    "missing dtype": ("k.dtype", None, 422, "k.dtype"),
    "missing data and b64": ("v.b64", None, 422, "v.data"),
    "both data and b64": ("q", {**_valid()["q"], "data": [0.0] * 128}, 422, "q.data"),
    "pattern without type": ("pattern", {"window": 4}, 422, "pattern"),
    "sliding_window without window": ("pattern", {"type": "sliding_window"}, 422, "pattern.window"),
    # every shape mismatch
    "shape of 2 dims": ("q.shape", [4, 8], 422, "q.shape"),
    "shape of 5 dims": ("q.shape", [1, 1, 4, 8, 4], 422, "q.shape"),
    "batch of k differs": ("k.shape", [2, 2, 8, 4], 422, "k.shape"),
    "batch of v differs": ("v.shape", [2, 2, 8, 4], 422, "v.shape"),
    "head dim of k differs": ("k.shape", [1, 2, 8, 3], 422, "k.shape"),
    "kv heads do not divide": ("k.shape", [1, 3, 8, 4], 422, "k.shape"),
    "v heads differ from k": ("v.shape", [1, 1, 8, 4], 422, "v.shape"),
    "v length differs from k": ("v.shape", [1, 2, 7, 4], 422, "v.shape"),
    "Lq over Lk": ("q.shape", [1, 4, 16, 4], 422, "q.shape"),
    "dtype of k differs": ("k.dtype", "float16", 422, "k.dtype"),
    "negative dimension": ("q.shape", [1, -4, 8, 4], 422, "q.shape"),
    "data nested to another shape": ("q.data", [[1.0, 2.0], [3.0]], 422, "q.data"),
    "data one value short": ("q.data", [0.5] * 3, 422, "q.data"),
    "data with a list among numbers": ("q.data", [1.0, [2.0], 3.0, 4.0], 422, "q.data"),
    # huge declared shapes with tiny data, and products past 64 bits
    "tokens over the limit": ("<all>", {"shape": [1, 1, 8192, 4], "dtype": "float32", "b64": "AAAA"}, 413, "k.shape"),
    "elements over the limit": ("<all>", {"shape": [1, 64, 1024, 4], "dtype": "float32", "b64": "AAAA"}, 413, "q.shape"),
    "heads over the limit": ("<all>", {"shape": [1, 65, 1, 1], "dtype": "float32", "b64": "AAAA"}, 413, "q.shape"),
    "product over 2**64": ("<all>", {"shape": [2**62, 2**62, 2**62, 2**62], "dtype": "float32", "b64": "AA=="}, 413, "k.shape"),
    "dimension over 2**64": ("q.shape", [2**70, 4, 8, 4], 413, "q.shape"),
    "dimension of 400 digits": ("q.shape", "<raw>[1" + "0" * 400 + ", 4, 8, 4]", 413, "q.shape"),
    # b64 of the wrong length or not base64
    "b64 too short": ("k.b64", _b64(np.zeros(32)), 422, "k.b64"),
    "b64 too long": ("k.b64", _b64(np.zeros(128)), 422, "k.b64"),
    "b64 empty": ("k.b64", "", 422, "k.b64"),
    # the right number of characters (344 for k's 256 bytes), so that only the decoding can refuse them
    "b64 not base64": ("k.b64", "!" * 344, 422, "k.b64"),
    "b64 with whitespace": ("k.b64", " " * 344, 422, "k.b64"),
    "b64 right length, decoding short": ("k.b64", "A" * 344, 422, "k.b64"),
    # NaN and Inf
    "NaN in b64": ("v.b64", _with_nonfinite(np.nan), 422, "v.b64"),
    "Inf in b64": ("v.b64", _with_nonfinite(np.inf), 422, "v.b64"),
    "-Inf in b64": ("q.b64", _with_nonfinite(-np.inf, n=1 * 4 * 8 * 4), 422, "q.b64"),
    "NaN literal in data": ("q.data", [float("nan"), 0.0, 0.0, 0.0], 422, "q.data"),
    "Infinity literal in data": ("k.data", [0.0, float("inf"), 0.0, 0.0], 422, "k.data"),
    "1e39 overflows float32": ("v.data", [0.0, 0.0, 1e39, 0.0], 422, "v.data"),
    "scale NaN": ("scale", "<raw>NaN", 422, "scale"),
    "scale Infinity": ("scale", "<raw>Infinity", 422, "scale"),
    "scale overflowing the scores": ("scale", 1e308, 422, "scale"),
    "scale past float32, inputs tiny": ("scale", 1e39, 422, "scale"),
    "timeout_ms Infinity": ("timeout_ms", "<raw>Infinity", 422, "timeout_ms"),
    # zero-length sequences
    "zero-length keys": ("k.shape", [1, 2, 0, 4], 422, "k.shape"),
    "zero-length queries": ("q.shape", [1, 4, 0, 4], 422, "q.shape"),
    "zero heads": ("q.shape", [1, 0, 8, 4], 422, "q.shape"),
    # zero, negative and oversized pattern parameters
    "window 0": ("pattern", {"type": "sliding_window", "window": 0}, 422, "pattern.window"),
    "window -3": ("pattern", {"type": "sliding_window", "window": -3}, 422, "pattern.window"),
    "window 2**70": ("pattern", {"type": "sliding_window", "window": 2**70}, 422, "pattern.window"),
    "window 2.5": ("pattern", {"type": "sliding_window", "window": 2.5}, 422, "pattern.window"),
    "stride 0": ("pattern", {"type": "strided", "stride": 0}, 422, "pattern.stride"),
    "stride -1": ("pattern", {"type": "strided", "stride": -1}, 422, "pattern.stride"),
    "stride 2**63": ("pattern", {"type": "strided", "stride": 2**63}, 422, "pattern.stride"),
    "block 0": ("pattern", {"type": "fixed", "block": 0, "summary": 1}, 422, "pattern.block"),
    "block 2**64": ("pattern", {"type": "fixed", "block": 2**64, "summary": 1}, 422, "pattern.block"),
    "summary 0": ("pattern", {"type": "fixed", "block": 4, "summary": 0}, 422, "pattern.summary"),
    "summary over block": ("pattern", {"type": "fixed", "block": 4, "summary": 5}, 422, "pattern.summary"),
    "empty union": ("pattern", {"type": "union", "patterns": []}, 422, "pattern.patterns"),
    "per_head not dividing H": ("pattern", {"type": "per_head", "patterns": [SW] * 3}, 422, "pattern.patterns"),
    "union of 9 members": ("pattern", {"type": "union", "patterns": [SW] * 9}, 422, "pattern.patterns"),
    # deep nesting and huge unions
    "unions nested 10 000 deep": ("pattern", "<raw>" + _nested(10_000), 422, "body"),
    "data nested 10 000 deep": ("q.b64", "<raw>" + "[" * 10_000 + "]" * 10_000, 422, "body"),
    "unions nested past the depth limit": ("pattern", "<raw>" + _nested(MAX_DEPTH), 422, "pattern"),
    "nested unions of more leaves than allowed": ("pattern", {"type": "union", "patterns": [{"type": "union", "patterns": [
        {"type": "union", "patterns": [{"type": "strided", "stride": 2 + 8 * n + m} for m in range(8)]}
        for n in range(8)]}, SW]}, 422, "pattern"),
    "union of 10 000 members": ("pattern", "<raw>" + _members("union", 10_000), 422, "pattern.patterns"),
    "per_head of 10 000 members": ("pattern", "<raw>" + _members("per_head", 10_000), 422, "pattern.patterns"),
}


def _body(case: str) -> str | bytes:
    path, value, _, _ = CATALOGUE[case]
    if path.endswith(".data"):  # a body in `data` encoding, q, k and v of shape [1, 1, 2, 2]
        body = request_body(*qkv(h=1, hkv=1, lq=2, lk=2, d=2, dv=2), encoding="data")
        body[path.split(".")[0]]["data"] = value
        return json.dumps(body)  # writes NaN and Infinity as the JSON5 literals a client might send
    if path == "<body>":
        return value
    if path == "<all>":
        return json.dumps({"q": value, "k": value, "v": value})
    return _set(path, value)


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(CATALOGUE), ids=list(CATALOGUE))
async def test_bad_input_gets_its_status_and_names_the_field(client, case):
    _, _, status, field = CATALOGUE[case]
    r = await client.post("/attention", content=_body(case), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and error["message"]
    assert error["field"] == field and error["message"].startswith(field + ": "), error


@pytest.mark.anyio
@pytest.mark.parametrize("dtype, value, shown", [
    (torch.float32, 1e39, "values must be finite in float32 (no NaN or Inf, no magnitude over 3.40282e+38)"),
    (torch.float16, -1e6, "values must be finite in float16 (no NaN or Inf, no magnitude over 65504)"),
    (torch.float32, 10**400, "values must be finite in float32"),  # past float64 too
])
async def test_a_finite_number_past_its_dtypes_range_is_named_so(client, dtype, value, shown):
    body = request_body(*qkv(h=1, hkv=1, lq=2, lk=2, d=2, dv=2, dtype=dtype), encoding="data")
    body["k"]["data"][1] = value
    r = await client.post("/attention", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "k.data" and error["message"].startswith(f"k.data: {shown}"), error


@pytest.mark.anyio
async def test_inputs_whose_scores_may_overflow_float32_are_refused_others_exact(client):
    """Each term of q.k at 1e40 is past float32: every score of the row is NaN and the kernels
    return zeros (no NaN for an output check to see), so the inputs' magnitudes decide, before the engine."""
    def body(q, k, v, dtype=torch.float32, **extra):
        tensors = (torch.tensor(x, dtype=torch.float32).reshape(1, 1, -1, 2).to(dtype) for x in (q, k, v))
        return request_body(*tensors, **extra)

    cases = [(body([1e20, 1e20], [1e20, -1e20], [1.0, 2.0]), "q"),  # the exact answer is v: its one score is 0
             (body([3e19, 1.0], [3e19, 1.0], [1.0, 2.0], torch.bfloat16), "q"),
             (body([1e18, 1.0], [1e18, 1.0], [1.0, 2.0], scale=1e5), "scale"),
             (body([1.0, 1.0], [1e38, 1.0], [1.0, 2.0]), "k"),  # the larger of q and k
             (body([0.0, 0.0], [0.0] * 4, [3e38] * 4), "v")]  # two keys' weighted sum: [3e38, inf] came back
    for request, field in cases:
        r = await client.post("/attention", json=request)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["field"] == field and error["message"].startswith(f"{field}: "), error
        assert "may overflow float32" in error["message"]
    for v_peak, dtype in ((3e38, torch.bfloat16), (3.4e38, torch.float32)):  # one key: its own value, however large
        r = await client.post("/attention", json=body([1.0, 1.0], [1.0, 1.0], [v_peak, 1.0], dtype))
        assert r.status_code == 200 and from_json(r.json()["output"]).float()[0, 0, 0, 0] == torch.tensor(v_peak, dtype=dtype).float()
    q, k, v = (torch.tensor(x).reshape(1, 1, 2, 2) for x in ([1e18, 1.0, -1e18, 2.0], [1e18, 1.0, 5e17, 3.0], [1.0, 2.0, 3.0, 4.0]))
    r = await client.post("/attention", json=request_body(q, k, v, return_lse=True))  # 2e36: within the limit
    assert r.status_code == 200, r.text
    expected, expected_lse = reference_attention(q, k, v)
    assert torch.allclose(from_json(r.json()["output"]).double(), expected, rtol=1e-5)
    assert torch.allclose(from_json(r.json()["lse"]).double(), expected_lse, rtol=1e-5)
    q, k = q * 1e12, k * 1e12  # q.k past float32, but a scale below it goes into q (as the engine does)
    r = await client.post("/attention", json=request_body(q, k, v, scale=-1e-60))
    assert r.status_code == 200, r.text
    assert torch.allclose(from_json(r.json()["output"]).double(), reference_attention(q, k, v, scale=-1e-60)[0], rtol=1e-5)


@pytest.mark.anyio
async def test_an_answer_too_large_for_json_numbers_is_413_before_any_work():
    """A 525 kB request asking a 1 GB answer as `data` took 4.5 GB and stalled every client 9 s."""
    def tensor(*shape):
        return {"shape": list(shape), "dtype": "float16", "b64": "AAAA"}  # refused before the lengths are checked

    async with serve(settings()) as c:
        for v_dim, lse, status in ((2**22, False, 200), (2**22, True, 413), (2**22 + 1, False, 413)):
            body = {"q": tensor(1, 1, 1, 1), "k": tensor(1, 1, 1, 1), "v": tensor(1, 1, 1, v_dim), "encoding": "data",
                    "return_lse": lse}
            r = await c.post("/attention", json=body)
            if status == 413:
                assert r.status_code == 413 and r.json()["error"]["field"] == "encoding", r.text
                assert r.json()["error"]["message"].startswith("encoding: 'data' answers at most 4194304 values")
            else:  # within the limit: on to the next check, the b64's length
                assert r.status_code == 422 and r.json()["error"]["field"] == "v.b64", r.text


@pytest.mark.anyio
async def test_wrong_content_type_is_415(client):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = await client.post("/attention", content=json.dumps(_valid()), headers={"Content-Type": content_type})
        assert r.status_code == 415, r.text
        assert r.json()["error"]["field"] == "Content-Type" and content_type in r.json()["error"]["message"]
    for content_type in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        r = await client.post("/attention", content=json.dumps(_valid()), headers={"Content-Type": content_type})
        assert r.status_code == 200, r.text


@pytest.mark.anyio
async def test_oversize_body_is_413_by_length_and_by_stream(client):
    r = await client.post("/attention", content=b"{" * ((1 << 20) + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"

    async def chunks():
        for _ in range(40):
            yield b" " * 32768

    r = await client.post("/attention", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


@pytest.mark.anyio
async def test_after_the_catalogue_a_valid_request_is_answered_correctly(client):
    """Runs after the cases above in this module: the service is still up and still right."""
    q, k, v = qkv(b=2, h=4, hkv=2, lq=24, lk=40, d=16, dv=8, seed=7)
    r = await client.post("/attention", json=request_body(q, k, v, pattern=SW, return_lse=True))
    assert r.status_code == 200, r.text
    out, lse = attention(q, k, v, SW, return_lse=True)
    assert torch.allclose(from_json(r.json()["output"]), out, atol=1e-6)
    assert torch.allclose(from_json(r.json()["lse"]), lse, atol=1e-6)
    assert (await client.get("/readyz")).status_code == 200


# --- on the wire: a real uvicorn socket -------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with live_server(settings(**LIMITS, body_timeout_s=1.0)) as url:
        yield url


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


_UNREAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bytes read past a socket's last response


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of the next HTTP/1.1 response (by its Content-Length, else to the connection's end)."""
    data = _UNREAD.pop(sock, b"")
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while (length is None or len(body) < int(length.group(1))) and (chunk := sock.recv(65536)):
        body += chunk
    if length is not None and len(body) > int(length.group(1)):  # the start of the next response
        body, _UNREAD[sock] = body[: int(length.group(1))], body[int(length.group(1)):]
    return int(head.split(b" ", 2)[1]), body


def test_a_body_trickled_in_gets_408_while_other_clients_are_served(server):
    """Slowloris: a body sent byte by byte is cut off at ATTN_BODY_TIMEOUT_S (1 s here) with 408;
    meanwhile the service answers other clients as usual."""
    body = json.dumps(_valid()).encode()
    q, k, v = qkv(h=4, hkv=2, lq=16, lk=16, d=8, dv=8, seed=3)
    expected = attention(q, k, v, SW)
    served: list[int] = []

    async def others(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=server, timeout=30) as c:
            while not stop.is_set():
                r = await c.post("/attention", json=request_body(q, k, v, pattern=SW))
                assert r.status_code == 200 and torch.allclose(from_json(r.json()["output"]), expected, atol=1e-6)
                served.append(r.status_code)

    def trickle() -> tuple[int, bytes, float, int]:
        """Send the headers, then the body one byte every 20 ms (the whole would take ~1 minute),
        stopping as soon as the server answers."""
        with socket.create_connection(_address(server), timeout=30) as sock:
            sock.sendall(b"POST /attention HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            started, sent = time.monotonic(), 0
            while sent < len(body) and not select.select([sock], [], [], 0.02)[0]:
                sock.sendall(body[sent:sent + 1])
                sent += 1
            status, response = _read_response(sock)
            return status, response, time.monotonic() - started, sent

    async def run():
        stop = asyncio.Event()
        load = asyncio.create_task(others(stop))
        try:
            return await asyncio.wait_for(asyncio.to_thread(trickle), 30)
        finally:
            stop.set()
            await load

    status, response_body, took_s, sent = asyncio.run(run())
    assert status == 408, response_body
    assert json.loads(response_body)["error"]["field"] == "body"
    assert sent < len(body)  # cut off before the body was complete
    assert len(served) > 0  # other clients were answered while the slow body was trickling in
    print(f"slowloris: 408 after {took_s:.1f} s and {sent} of {len(body)} bytes; {len(served)} other requests served")


def test_oversize_headers_are_refused_and_the_service_goes_on(server):
    # Over ATTN_MAX_HEADER_BYTES (16 KiB) in one header, or in many: 431 in the service's error shape.
    for headers in ([("X-Padding", "a" * 20000)], [(f"X-Pad-{i}", "a" * 100) for i in range(200)]):
        r = httpx.get(f"{server}/healthz", headers=headers, timeout=10)
        assert r.status_code == 431 and r.json()["error"]["field"] == "headers", r.text
    r = httpx.get(f"{server}/healthz?pad={'a' * 20000}", timeout=10)  # the request line counts too
    assert r.status_code == 431 and r.json()["error"]["field"] == "headers", r.text
    # A head that never ends stops being buffered at the limit: 431 before it is complete.
    with socket.create_connection(_address(server), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: ")
        for sent in range(1, 101):
            sock.sendall(b"a" * 1000)  # up to 100 kB, never ending; stop once the server answers
            if select.select([sock], [], [], 0.005)[0]:
                break
        status, body = _read_response(sock)
    assert status == 431 and json.loads(body)["error"]["field"] == "headers"
    assert sent * 1000 < 16384 + 2000  # refused at the limit, not after buffering the whole
    # Bytes that are not HTTP (a control byte in a header value): 400 in the service's shape too.
    with socket.create_connection(_address(server), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc\x01\r\n\r\n")
        status, body = _read_response(sock)
    error = json.loads(body)["error"]
    assert status == 400 and error["field"] == "request" and error["message"].startswith("request: not valid HTTP")
    metrics = httpx.get(f"{server}/metrics", timeout=10).text  # the protocol's refusals are counted too
    for status in (400, 431):
        assert sample(metrics, f'attention_http_requests_total{{method="other",path="other",status="{status}"}}') >= 1
    with socket.create_connection(_address(server), timeout=10) as sock:  # within the limit: fine
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Padding: " + b"a" * 8000 + b"\r\n\r\n")
        status, body = _read_response(sock)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_a_head_that_never_arrives_gets_408_and_frees_its_connection():
    """uvicorn waits for a request head forever: sockets that opened and sent nothing, or half a
    head, held ATTN_MAX_CONNECTIONS (and every other client out) until they chose to leave."""
    with live_server(settings(body_timeout_s=1, max_connections=2)) as url:
        with socket.create_connection(_address(url), timeout=10) as silent, \
                socket.create_connection(_address(url), timeout=10) as half:
            half.sendall(b"POST /attention HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            for sock in (silent, half):
                status, body = _read_response(sock)
                assert status == 408 and json.loads(body)["error"]["field"] == "headers", body
                assert sock.recv(1) == b""  # closed after the answer
            assert time.monotonic() - started < 5
        deadline = time.monotonic() + 10
        while (r := httpx.get(f"{url}/patterns", timeout=10)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the server has seen both connections close
        assert r.status_code == 200


def _slow_for(lq: int, seconds: float):
    """The engine, taking `seconds` longer on requests of `lq` query rows (not the warm-up's)."""
    def compute(*args, **kwargs):
        if args[0].shape[2] == lq:
            time.sleep(seconds)
        return attention(*args, **kwargs)

    return compute


def _post(lq: int, pad: int = 0) -> bytes:
    """A POST /attention of `lq` rows on the wire, its JSON body padded with `pad` spaces."""
    body = json.dumps(request_body(*qkv(h=2, hkv=2, lq=lq, lk=lq, d=4, dv=4))).encode() + b" " * pad
    return (b"POST /attention HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_a_pipelined_head_is_timed_only_once_the_answers_before_it_are_written():
    """uvicorn reads nothing more while an answer is due, so a pipelined head cannot finish then:
    timed from its first byte it got 408, read by the client as the answer to the running request
    (whose 200 was lost); and uvicorn's 5 s keep-alive timer, armed at that answer, closed it silently."""
    with live_server(settings(body_timeout_s=1), compute=_slow_for(7, 2.0)) as url:
        with socket.create_connection(_address(url), timeout=10) as sock:
            sock.sendall(_post(7) + b"GET /healthz HTTP/1.1\r\nHo")  # half a head behind a 2 s request
            time.sleep(1.5)
            sock.sendall(b"st: x\r\n\r\n")
            assert _read_response(sock)[0] == 200
            assert _read_response(sock) == (200, b'{"status":"ok"}')
        with socket.create_connection(_address(url), timeout=10) as sock:  # never finished: 408 after the answer
            sock.sendall(_post(7) + b"GET /healthz HTTP/1.1\r\nHo")
            assert _read_response(sock)[0] == 200
            answered = time.monotonic()
            status, _ = _read_response(sock)
            assert status == 408 and 0.5 < time.monotonic() - answered < 5
    with live_server(settings(body_timeout_s=10), compute=_slow_for(7, 0.5)) as url:
        with socket.create_connection(_address(url), timeout=20) as sock:  # finished 6 s after the answer
            sock.sendall(_post(7) + b"GET /he")
            assert _read_response(sock)[0] == 200
            time.sleep(6)
            sock.sendall(b"althz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock) == (200, b'{"status":"ok"}')


def test_the_protocols_refusals_come_after_the_answers_due_before_them():
    """A read holding a pipelined request and the start of the next counted the first one's bytes as
    the next head's (431 past 16 KiB of them); a refusal was written ahead of the running request's answer."""
    with live_server(settings(body_timeout_s=5), compute=_slow_for(6, 1.0)) as server, \
            socket.create_connection(_address(server), timeout=10) as sock:
        sock.sendall(_post(6, pad=17000) + b"GET /healt")  # one read of 17 kB ending in a head's start
        time.sleep(0.1)
        sock.sendall(b"hz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 200
        assert _read_response(sock) == (200, b'{"status":"ok"}')
        for tail, refusal in ((b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 20000, 431),
                              (b"\x01\x02 not http\r\n\r\n", 400)):
            with socket.create_connection(_address(server), timeout=10) as pipelined:
                pipelined.sendall(_post(6))
                time.sleep(0.05)  # the tail in reads of its own, while the request runs (1 s)
                pipelined.sendall(tail)
                assert _read_response(pipelined)[0] == 200  # the valid request's answer first
                assert _read_response(pipelined)[0] == refusal


def test_connections_over_the_limit_get_the_services_503_but_probes_and_metrics_answer():
    """Past ATTN_MAX_CONNECTIONS open connections a request gets 503 in the service's error shape,
    with Retry-After and its X-Request-ID, except the probes and the metrics scrape (an overloaded
    replica is alive, and its metrics are wanted most then); once a connection closes, requests are
    served again."""
    with live_server(settings(max_connections=1)) as url:
        with socket.create_connection(_address(url), timeout=10) as held:  # one keep-alive connection
            held.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(held)[0] == 200
            r = httpx.get(f"{url}/patterns", headers={"X-Request-ID": "over"}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["field"] == "connections", r.text
            assert r.headers["Retry-After"] and r.headers["X-Request-ID"] == "over"
            for path in ("/healthz", "/readyz", "/metrics"):  # answered, and their connection closed after
                r = httpx.get(f"{url}{path}", timeout=10)
                assert r.status_code == 200 and r.headers["Connection"] == "close", path
        deadline = time.monotonic() + 10
        while (r := httpx.get(f"{url}/patterns", timeout=10)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the server has seen the held connection close
        assert r.status_code == 200


def test_oversize_body_on_the_wire_is_413_without_reading_it_and_closed(server):
    """Kept alive, a client trickling the refused body in held the connection (and a slot) for good."""
    with socket.create_connection(_address(server), timeout=10) as sock:
        sock.sendall(b"POST /attention HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{" % (1 << 30))  # 1 GiB declared, 1 byte sent
        status, body = _read_response(sock)
        assert status == 413 and json.loads(body)["error"]["field"] == "body"
        sock.settimeout(1)  # closed at once, not at uvicorn's 5 s keep-alive (which each trickled byte restarted)
        assert sock.recv(1) == b""


def test_after_the_wire_cases_a_valid_request_is_answered_correctly(server):
    q, k, v = qkv(h=4, hkv=2, lq=16, lk=16, d=8, dv=8, seed=11)
    r = httpx.post(f"{server}/attention", json=request_body(q, k, v, pattern=SW), timeout=30)
    assert r.status_code == 200
    assert torch.allclose(from_json(r.json()["output"]), attention(q, k, v, SW), atol=1e-6)


@pytest.mark.anyio
@pytest.mark.parametrize("pattern", [
    {"type": "strided", "stride": 2**31 - 1},
    {"type": "strided", "stride": 2**29},
    {"type": "sliding_window", "window": 2**31 - 1},
    {"type": "fixed", "block": 2**31 - 1, "summary": 2**31 - 1},
    {"type": "union", "patterns": [{"type": "strided", "stride": 2**30}, {"type": "sliding_window", "window": 3}]},
], ids=["stride max", "stride 2**29", "window max", "block max", "window + stride 2**30"])
@pytest.mark.parametrize("causal", [True, False])
async def test_the_largest_pattern_parameters_are_computed_in_bounded_memory(client, pattern, causal):
    """Parameters at the top of their range are valid, and cheap: a stride of 2**29 once made the
    strided kernel pad to whole classes of 2**29 rows (16 GiB for 100 tokens; the fuzz run found it)."""
    q, k, v = qkv(h=2, hkv=2, lq=100, lk=100, d=4, dv=4, seed=13)
    r = await client.post("/attention", json=request_body(q, k, v, pattern=pattern, causal=causal))
    assert r.status_code == 200, r.text
    expected, _ = reference_attention(q, k, v, pattern, causal=causal)
    assert torch.allclose(from_json(r.json()["output"]).double(), expected, atol=1e-5)
    assert r.json()["meta"]["memory"]["peak_bytes"] < 1 << 20
