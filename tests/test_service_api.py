"""POST /attention and the rest of the surface, in process: every contract field, every error row."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

from engine import attention
from engine.attention import backend_for
from engine.patterns import PATTERN_CATALOG
from reference import mask, reference_attention
from service_support import Gate, as_json, from_json, qkv, request_body, sample, serve, settings, wait_ready

SW = {"type": "sliding_window", "window": 8}


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def client():
    async with serve(settings(max_tokens_per_request=4096, max_body_bytes=1 << 20)) as c:
        yield c


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["status"] == status
    assert response.headers["X-Request-ID"]
    return body


# --- the response: every field of CONTRACT §2 ------------------------------------------------


@pytest.mark.anyio
async def test_every_response_field_matches_the_engine_and_the_contract(client):
    q, k, v = qkv(b=2, h=4, hkv=2, lq=24, lk=80, d=16, dv=8)  # past the planner's small problems
    body = request_body(q, k, v, pattern=SW, return_lse=True)
    r = await client.post("/attention", json=body, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-ID"] == "req-42"
    got = r.json()
    out, lse = attention(q, k, v, SW, return_lse=True)
    assert got["output"]["shape"] == [2, 4, 24, 8] and got["output"]["dtype"] == "float32"
    assert torch.allclose(from_json(got["output"]), out, atol=1e-6)
    assert got["lse"]["shape"] == [2, 4, 24] and got["lse"]["dtype"] == "float32"
    assert torch.allclose(from_json(got["lse"]), lse, atol=1e-6)
    ref_out, ref_lse = reference_attention(q, k, v, SW)
    assert torch.allclose(from_json(got["output"]).double(), ref_out, atol=1e-5)
    meta = got["meta"]
    assert meta["request_id"] == "req-42"
    assert meta["device"] == "cpu"
    assert meta["backend"] == "band"  # the sliding window's kernel, at any query length
    assert meta["pattern"] == SW
    assert meta["batch"] == {"requests": 1}
    timing = meta["timing_ms"]
    assert 0 <= timing["queue"] and 0 < timing["compute"] and timing["total"] >= timing["queue"] + timing["compute"]
    assert meta["memory"]["peak_bytes"] > 0
    assert meta["memory"]["dense_scores_bytes"] == 2 * 4 * 24 * 80 * 4
    pairs = 2 * sum(int(mask(SW, 24, 80, h, 4).sum()) for h in range(4))
    assert meta["attended_pairs"] == pairs
    assert meta["density"] == pytest.approx(pairs / (2 * 4 * 24 * 80))


@pytest.mark.anyio
async def test_defaults_dense_causal_scale_and_no_lse(client):
    q, k, v = qkv(h=2, hkv=2, lq=16, lk=16, d=8, dv=8, seed=1)
    got = (await client.post("/attention", json=request_body(q, k, v))).json()
    assert got["lse"] is None
    assert got["meta"]["pattern"] == {"type": "dense"}
    assert got["meta"]["backend"] == "sdpa"
    ref, _ = reference_attention(q, k, v, None, causal=True, scale=1 / math.sqrt(8))
    assert torch.allclose(from_json(got["output"]).double(), ref, atol=1e-5)
    assert got["meta"]["attended_pairs"] == 2 * 16 * 17 // 2
    nulls = {"pattern": None, "scale": None, "timeout_ms": None, "encoding": None}  # null: the default
    again = (await client.post("/attention", json={**request_body(q, k, v), **nulls})).json()
    assert again["meta"]["pattern"] == {"type": "dense"} and again["output"] == got["output"]


@pytest.mark.anyio
async def test_non_causal_and_explicit_scale(client):
    q, k, v = qkv(h=2, hkv=1, lq=8, lk=20, d=8, dv=4, seed=2)
    pattern = {"type": "strided", "stride": 3}
    body = request_body(q, k, v, pattern=pattern, causal=False, scale=0.3)
    got = (await client.post("/attention", json=body)).json()
    ref, _ = reference_attention(q, k, v, pattern, causal=False, scale=0.3)
    assert torch.allclose(from_json(got["output"]).double(), ref, atol=1e-5)


@pytest.mark.anyio
@pytest.mark.parametrize("scale", [0, -0.5, 5e-324])
async def test_zero_and_negative_scales_are_answered(client, scale):
    """Any finite scale is an answer (0: uniform over the allowed keys), as in torch's own SDPA."""
    q, k, v = qkv(h=2, hkv=1, lq=8, lk=20, d=8, dv=4, seed=2)
    body = request_body(q, k, v, pattern=SW, scale=scale, return_lse=True)
    response = await client.post("/attention", json=body)
    assert response.status_code == 200, response.text
    ref_out, ref_lse = reference_attention(q, k, v, SW, scale=scale)
    assert torch.allclose(from_json(response.json()["output"]).double(), ref_out, atol=1e-5)
    assert torch.allclose(from_json(response.json()["lse"]).double(), ref_lse, atol=1e-4)


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["b64", "data"])
@pytest.mark.parametrize("pattern", [None, SW, {"type": "strided", "stride": 3}, {"type": "fixed", "block": 4, "summary": 1}])
async def test_one_query_row_with_lse(client, pattern, encoding):
    """A decode step's lse [B, H, 1] may come out of a kernel with a last stride other than 1."""
    q, k, v = qkv(b=2, h=4, hkv=2, lq=1, lk=13, d=8, dv=8, seed=7)
    body = request_body(q, k, v, encoding, pattern=pattern, return_lse=True)
    response = await client.post("/attention", json=body)
    assert response.status_code == 200, response.text
    ref_out, ref_lse = reference_attention(q, k, v, pattern)
    assert torch.allclose(from_json(response.json()["output"]).double(), ref_out, atol=1e-5)
    assert torch.allclose(from_json(response.json()["lse"]).double(), ref_lse, atol=1e-4)


@pytest.mark.anyio
async def test_three_dimensional_tensors_mean_batch_one(client):
    """Each 3-D tensor [H, L, D] is [1, H, L, D]; the answer is [B, H, Lq, Dv] and [B, H, Lq] as
    CONTRACT §2 has it, whatever the inputs' rank (a 3-D q beside 4-D k and v too)."""
    q, k, v = qkv(b=1, h=2, hkv=2, lq=12, lk=12, d=8, dv=8, seed=3)
    out, lse = attention(q, k, v, return_lse=True)
    for body in ({"q": as_json(q[0]), "k": as_json(k[0]), "v": as_json(v[0])},
                 {"q": as_json(q[0]), "k": as_json(k), "v": as_json(v)}):
        got = (await client.post("/attention", json={**body, "return_lse": True})).json()
        assert got["output"]["shape"] == [1, 2, 12, 8] and got["lse"]["shape"] == [1, 2, 12]
        assert torch.allclose(from_json(got["output"]), out, atol=1e-6)
        assert torch.allclose(from_json(got["lse"]), lse, atol=1e-5)


@pytest.mark.anyio
async def test_data_encoding_flat_and_nested_and_the_encoding_field(client):
    q, k, v = qkv(h=2, hkv=2, lq=6, lk=6, d=4, dv=4, seed=4)
    body = request_body(q, k, v, encoding="data")
    body["q"]["data"] = q.tolist()  # nested to the shape is accepted too
    got = (await client.post("/attention", json=body)).json()
    assert "data" in got["output"] and got["output"].get("b64") is None  # q's encoding by default
    assert torch.allclose(from_json(got["output"]), attention(q, k, v), atol=1e-6)
    got = (await client.post("/attention", json={**body, "encoding": "b64", "return_lse": True})).json()
    assert got["output"]["b64"] and got["lse"]["b64"]
    assert torch.allclose(from_json(got["output"]), attention(q, k, v), atol=1e-6)


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
async def test_half_precision_in_b64_comes_back_in_q_dtype(client, dtype):
    q, k, v = qkv(h=2, hkv=2, lq=16, lk=16, d=8, dv=8, dtype=dtype, seed=5)
    got = (await client.post("/attention", json=request_body(q, k, v, pattern=SW, return_lse=True))).json()
    assert got["output"]["dtype"] == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    assert got["lse"]["dtype"] == "float32"
    assert torch.equal(from_json(got["output"]), attention(q, k, v, SW))


@pytest.mark.anyio
async def test_request_id_is_the_clients_or_made_when_absent_or_unusable(client):
    made = [(await client.get("/healthz", headers=headers)).headers["X-Request-ID"] for headers in (
        {}, {"X-Request-ID": "x" * 1025}, {"X-Request-ID": "caf\u00e9".encode("latin-1")})]
    assert all(len(made_id) == 32 for made_id in made) and len(set(made)) == 3
    for given in ("trace 42 from gateway", "x" * 1024, "a\tb", "0"):
        assert (await client.get("/healthz", headers={"X-Request-ID": given})).headers["X-Request-ID"] == given
    r = await client.get("/healthz", headers={"X-Request-ID": "padded \t "})  # a field value's edges are not its value
    assert r.headers["X-Request-ID"] == "padded"


@pytest.mark.anyio
async def test_unknown_paths_and_methods_are_named(client):
    error = error_of(await client.get("/no/such/path"), 404)
    assert (error["field"], error["message"]) == ("path", "path: '/no/such/path' is not a route of this service (see /docs)")
    r = await client.put("/attention")
    error = error_of(r, 405)
    assert (error["field"], error["message"]) == ("method", "method: PUT is not allowed on /attention; it takes POST")
    assert r.headers["Allow"] == "POST"
    r = await client.put("/healthz")  # every method of the path, HEAD too
    assert error_of(r, 405)["message"].endswith("it takes GET, HEAD") and r.headers["Allow"] == "GET, HEAD"


# --- errors: CONTRACT §3 -------------------------------------------------------------------


def _valid(**extra):
    q, k, v = qkv(h=4, hkv=2, lq=8, lk=8, d=4, dv=4)
    return request_body(q, k, v, **extra)


def _with(body: dict, path: str, value) -> dict:
    body = json.loads(json.dumps(body))
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    node[last] = value
    return body


@pytest.mark.anyio
async def test_a_bad_union_member_is_the_one_error_listed(client):
    """Not also pydantic's echo that the member list is empty 'after validation'."""
    bad = {"type": "union", "patterns": [{"type": "strided", "stride": "2"}]}
    err = error_of(await client.post("/attention", json={**_valid(), "pattern": bad}), 422)
    assert err["errors"] == [{"field": "pattern.patterns[0].stride",
                              "message": "pattern.patterns[0].stride: Input should be a valid integer"}]
    empty = error_of(await client.post("/attention", json={**_valid(), "pattern": {"type": "union", "patterns": []}}), 422)
    assert empty["field"] == "pattern.patterns" and "at least 1 item" in empty["message"]  # really too short


@pytest.mark.anyio
async def test_bfloat16_as_json_numbers_is_refused_both_ways(client):
    body = request_body(*qkv(h=2, hkv=2, lq=4, lk=4, d=2, dv=2), encoding="data")
    bf16 = _with(_with(_with(body, "q.dtype", "bfloat16"), "k.dtype", "bfloat16"), "v.dtype", "bfloat16")
    err = error_of(await client.post("/attention", json=bf16), 422)
    assert err["field"] == "q.data" and "b64" in err["message"]
    answer_as_data = request_body(*qkv(h=2, hkv=2, lq=4, lk=4, d=2, dv=2, dtype=torch.bfloat16), encoding="b64")
    err = error_of(await client.post("/attention", json={**answer_as_data, "encoding": "data"}), 422)
    assert err["field"] == "encoding" and "bfloat16 travels only as b64 or binary" in err["message"]


@pytest.mark.anyio
async def test_integers_past_64_bits_in_data_are_numbers(client):
    q, k, v = qkv(h=1, hkv=1, lq=2, lk=2, d=2, dv=2)
    body = request_body(q, k, v, encoding="data")
    body["q"]["data"] = [10**20, 1, 2, 3]  # JSON's integers have no bound; 1e20 as a float was taken already
    r = await client.post("/attention", json=body)
    assert r.status_code == 200, r.text
    expected = attention(torch.tensor([1e20, 1.0, 2.0, 3.0]).reshape(1, 1, 2, 2), k, v)
    assert torch.allclose(from_json(r.json()["output"]), expected)
    body["q"]["data"] = [10**20, 1.5, 2, 3]  # beside fractions, as JavaScript writes 1e20
    assert (await client.post("/attention", json=body)).status_code == 200
    for other in ("1.5", True, None):  # beside them, still no string, bool or null stands in for a number
        body["q"]["data"] = [10**20, other, 2, 3]
        assert error_of(await client.post("/attention", json=body), 422)["message"].startswith("q.data: must hold only numbers")


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
async def test_422_for_non_finite_half_precision(client, dtype):
    q, k, v = qkv(h=2, hkv=2, lq=4, lk=4, d=2, dv=2, dtype=dtype)
    k[0, 1, 2, 1] = float("nan")
    err = error_of(await client.post("/attention", json=request_body(q, k, v)), 422)
    assert err["field"] == "k.b64" and "finite" in err["message"]
    big = request_body(*qkv(h=2, hkv=2, lq=4, lk=4, d=2, dv=2, dtype=torch.float16), encoding="data")
    big["v"]["data"][5] = 70000.0  # beyond float16's range: it would become Inf
    assert error_of(await client.post("/attention", json=big), 422)["field"] == "v.data"


@pytest.mark.anyio
async def test_413_when_the_pattern_asks_for_more_pairs_than_the_limit():
    # 2 heads x 64 rows: dense causal attends 2 * 64 * 65 / 2 = 4160 pairs, sliding_window(8) 2 * (28 + 57 * 8) = 968.
    q, k, v = qkv(b=1, h=2, hkv=2, lq=64, lk=64, d=4, dv=4)
    async with serve(settings(max_pairs_per_request=1000)) as c:
        err = error_of(await c.post("/attention", json=request_body(q, k, v)), 413)
        assert err["field"] == "pattern" and "4160" in err["message"] and "1000" in err["message"]
        # refused before its tensors are decoded: a NaN in q is never looked at
        nan_q = q.clone()
        nan_q[0, 0, 0, 0] = float("nan")
        assert error_of(await c.post("/attention", json=request_body(nan_q, k, v)), 413)["field"] == "pattern"
        r = await c.post("/attention", json=request_body(q, k, v, pattern={"type": "sliding_window", "window": 8}))
        assert r.status_code == 200 and r.json()["meta"]["attended_pairs"] == 968
        # a union whose members, counted apart, pass the limit, while together they attend 968
        nested = {"type": "union", "patterns": [{"type": "sliding_window", "window": 8},
                                                {"type": "sliding_window", "window": 4}]}
        r = await c.post("/attention", json=request_body(q, k, v, pattern=nested))
        assert r.status_code == 200 and r.json()["meta"]["attended_pairs"] == 968
    assert settings().pairs_limit == 1 << 35  # the CPU's default: ~50 s of dense attention on 2 cores


@pytest.mark.anyio
async def test_401_without_a_valid_bearer_key():
    async with serve(settings(api_keys="k1,k2")) as c:
        body = _valid()
        r = await c.post("/attention", json=body)
        assert error_of(r, 401)["field"] == "Authorization" and r.headers["WWW-Authenticate"] == "Bearer"
        assert error_of(r, 401)["message"].startswith("Authorization: ")
        error_of(await c.post("/attention", json=body, headers={"Authorization": "Bearer nope"}), 401)
        error_of(await c.post("/attention", json=body, headers={"Authorization": "Basic k1"}), 401)
        assert (await c.post("/attention", json=body, headers={"Authorization": "Bearer k2"})).status_code == 200
        assert (await c.get("/healthz")).status_code == 200  # probes stay open


@pytest.mark.anyio
async def test_503_with_retry_after_until_warm():
    gate = Gate()
    gate.close()  # the warm-up's first engine call waits here
    async with serve(compute=gate, ready=False) as c:
        await gate.holding()
        r = await c.get("/readyz")
        assert error_of(r, 503) and r.headers["Retry-After"] == "1"
        assert (await c.head("/readyz")).status_code == 503
        r = await c.post("/attention", json=_valid())
        assert error_of(r, 503) and r.headers["Retry-After"] == "1"
        assert (await c.get("/healthz")).status_code == 200
        gate.open()
        await wait_ready(c.app)
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.post("/attention", json=_valid())).status_code == 200


@pytest.mark.anyio
async def test_429_with_retry_after_when_the_queue_is_full():
    gate = Gate()
    async with serve(settings(queue_size=1, max_batch_size=1, max_batch_delay_ms=0), compute=gate) as c:
        gate.close()
        running = asyncio.create_task(c.post("/attention", json=_valid()))
        await gate.holding()
        queued = asyncio.create_task(c.post("/attention", json=_valid()))
        while c.app.state.service.batcher.queue_depth < 1:
            await asyncio.sleep(0.005)
        r = await c.post("/attention", json=_valid())
        assert "waiting" in error_of(r, 429)["message"] and r.headers["Retry-After"] == "1"
        gate.open()
        assert (await running).status_code == 200 and (await queued).status_code == 200


@pytest.mark.anyio
async def test_a_client_gone_while_its_body_arrives_is_499_not_a_server_error(client):
    messages = [{"type": "http.request", "body": b'{"q": {"shape": [1, ', "more_body": True}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/attention", "raw_path": b"/attention", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"400")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    before = (await client.get("/metrics")).text
    await client.app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    gone = 'attention_http_requests_total{method="POST",path="/attention",status="499"}'
    assert sample((await client.get("/metrics")).text, gone) == sample(before, gone) + 1


@pytest.mark.anyio
async def test_504_when_the_deadline_passes_while_queued():
    gate = Gate()
    async with serve(settings(max_batch_size=1, max_batch_delay_ms=0), compute=gate) as c:
        gate.close()
        running = asyncio.create_task(c.post("/attention", json=_valid()))
        await gate.holding()
        r = await c.post("/attention", json=_valid(timeout_ms=50))
        error = error_of(r, 504)
        assert (error["field"], error["message"]) == ("timeout_ms", "timeout_ms: the deadline passed: no answer within 50 ms")
        assert error["errors"] == [{"field": "timeout_ms", "message": error["message"]}]
        gate.open()
        assert (await running).status_code == 200


# --- the rest of the surface: CONTRACT §4 ----------------------------------------------------


@pytest.mark.anyio
async def test_health_ready_patterns(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json()["status"] == "ready"
    for path in ("/healthz", "/readyz", "/metrics", "/patterns", "/patterns/preview"):  # HEAD wherever GET is
        r = await client.head(path)
        assert r.status_code == 200 and r.content == b"", path
    assert (await client.get("/patterns")).json() == PATTERN_CATALOG


@pytest.mark.anyio
async def test_metrics_count_requests_batches_queue_and_tokens(client):
    q, k, v = qkv(b=3, h=2, hkv=2, lq=10, lk=10, d=4, dv=4)
    before = (await client.get("/metrics")).text
    assert (await client.post("/attention", json=request_body(q, k, v))).status_code == 200
    text = (await client.get("/metrics")).text
    for name in ("attention_http_requests_total", "attention_request_seconds_bucket", "attention_queue_seconds_bucket",
                 "attention_batch_requests_bucket", "attention_queue_depth", "attention_tokens_total"):
        assert name in text
    assert sample(text, "attention_tokens_total") - sample(before, "attention_tokens_total") == 30
    ok = 'attention_http_requests_total{method="POST",path="/attention",status="200"}'
    assert sample(text, ok) == sample(before, ok) + 1
    await client.get("/openapi.json")
    await client.get("/redoc")
    await client.get("/no/such/path/42")  # unknown paths share one label, so the series stay bounded
    text = (await client.get("/metrics")).text
    assert 'attention_http_requests_total{method="GET",path="/openapi.json",status="200"}' in text
    assert 'attention_http_requests_total{method="GET",path="/redoc",status="200"}' in text
    assert 'attention_http_requests_total{method="GET",path="other",status="404"}' in text
    assert "/no/such/path" not in text


@pytest.mark.anyio
async def test_the_warm_up_runs_every_kernel_family():
    seen = []

    def recording(q, k, v, pattern, **options):
        seen.append(backend_for(pattern, q.shape[1], q.shape[2], k.shape[2], options["causal"], "cpu"))
        return attention(q, k, v, pattern, **options)

    async with serve(settings(), compute=recording):
        assert sorted(seen) == sorted({"sdpa", "band", "strided", "fixed", "band+strided", "band+fixed", "strided+fixed",
                                       "band+strided+fixed", "masked"})


@pytest.mark.anyio
async def test_batch_sizes_count_client_requests_only_not_the_warm_up():
    async with serve(settings()) as c:
        assert sample((await c.get("/metrics")).text, "attention_batch_requests_count") == 0  # warm: 9 calls made
        assert (await c.post("/attention", json=request_body(*qkv()))).status_code == 200
        text = (await c.get("/metrics")).text
        assert sample(text, "attention_batch_requests_count") == sample(text, "attention_batch_requests_sum") == 1


@pytest.mark.anyio
async def test_pattern_preview_png_and_its_bounds(client):
    pattern = json.dumps({"type": "per_head", "patterns": [SW, {"type": "strided", "stride": 4}]})
    r = await client.get("/patterns/preview", params={"pattern": pattern, "n": 32, "heads": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert error_of(await client.get("/patterns/preview", params={"n": 100000}), 422)["field"] == "query.n"
    err = error_of(await client.get("/patterns/preview", params={"pattern": '{"type": "sliding_window"}'}), 422)
    assert err["field"] == "pattern.window" and err["message"].startswith("pattern.window: ")
    err = error_of(await client.get("/patterns/preview", params={"pattern": '{"type": "strided", "stride": "3"}'}), 422)
    assert err["field"] == "pattern.stride"  # JSON types as POST /attention takes them
    err = error_of(await client.get("/patterns/preview", params={"pattern": pattern, "heads": 3}), 422)
    assert err["field"] == "pattern.patterns"
    docs = (await client.get("/openapi.json")).json()
    assert "/patterns/preview?pattern=" in docs["info"]["description"]
