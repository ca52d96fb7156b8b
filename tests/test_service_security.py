"""Security: API keys compared in constant time and never logged, CORS closed unless configured,
no code path that unpickles or evaluates client data, and every setting (each limit on what a
client controls among them) documented in the README."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import httpx
import pytest

import service.app
from service.settings import Settings
from service_support import qkv, request_body, serve, service_process, settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_every_configured_key_is_compared_in_constant_time(monkeypatch):
    """hmac.compare_digest against every key, a match or not: no early exit that timing could reveal."""
    compared: list[tuple[bytes, bytes]] = []
    real = service.app.hmac.compare_digest
    monkeypatch.setattr(service.app.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    async with serve(settings(api_keys="alpha,beta,gamma")) as c:
        body = request_body(*qkv(h=2, hkv=2, lq=4, lk=4, d=2, dv=2))
        for key, status in (("alpha", 200), ("gamma", 200), ("delta", 401), ("alph", 401)):
            compared.clear()
            r = await c.post("/attention", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status, r.text
            assert [b for _, b in compared] == [b"alpha", b"beta", b"gamma"]
            assert all(a == key.encode() for a, _ in compared)


def test_keys_never_appear_in_the_logs():
    """A real server at debug level (access log included) sees a valid key, a wrong key and
    failing requests with each; its whole output holds neither."""
    valid, wrong = "sk-valid-7f3a9c1e5b", "sk-wrong-0d8e2b6a4c"
    body = request_body(*qkv(h=2, hkv=2, lq=4, lk=4, d=2, dv=2))
    with tempfile.TemporaryFile() as log:
        with service_process(log, api_keys=valid, log_level="debug") as (url, _):
            for key in (valid, wrong):
                headers = {"Authorization": f"Bearer {key}", "X-Request-ID": "sec-1"}
                httpx.post(f"{url}/attention", json=body, headers=headers)
                httpx.post(f"{url}/attention", content=b"{bad json", headers={**headers, "Content-Type": "application/json"})
                httpx.post(f"{url}/attention?key={key[:3]}", json={"q": 1}, headers=headers)
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert "POST /attention" in output and " 401" in output and " 200" in output  # the requests were logged
    assert valid not in output and wrong not in output


@pytest.mark.anyio
async def test_cors_is_closed_by_default_and_open_only_to_configured_origins():
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with serve(settings()) as c:
        for r in (await c.options("/attention", headers=preflight),
                  await c.get("/healthz", headers={"Origin": "https://evil.example"})):
            assert not any(h.lower().startswith("access-control-") for h in r.headers), r.headers
    async with serve(settings(cors_origins="https://app.example, https://other.example")) as c:
        r = await c.options("/attention", headers={**preflight, "Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        r = await c.get("/healthz", headers={"Origin": "https://other.example"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://other.example"
        r = await c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in r.headers
        # Every answer has the request's id, a refused preflight the service's error body naming the header.
        r = await c.options("/attention", headers={**preflight, "Access-Control-Request-Method": "PUT",
                                                   "X-Request-ID": "pre-1"})
        assert r.status_code == 400 and r.headers["X-Request-ID"] == "pre-1"
        assert [e["field"] for e in r.json()["error"]["errors"]] == ["Origin", "Access-Control-Request-Method"]
        assert r.json()["error"]["message"] == ("Origin: 'https://evil.example' is not allowed; this service allows an "
                                                "origin of ATTN_CORS_ORIGINS")
        r = await c.options("/attention", headers={**preflight, "Origin": "https://app.example",  # Chrome's, to a private host
                                                   "Access-Control-Request-Private-Network": "true"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "Access-Control-Request-Private-Network"
        r = await c.options("/attention", headers={**preflight, "Origin": "https://app.example", "X-Request-ID": "pre-2"})
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "pre-2"
        # The limits' errors carry CORS headers, so that a browser may read them.
        r = await c.post("/attention", content=b"{}" * 10, headers={"Origin": "https://app.example",
                                                                    "Content-Length": str(1 << 40)})
        assert r.status_code == 413 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"


# Anything that turns bytes into code or arbitrary objects: the service takes only JSON (pydantic)
# and raw little-endian floats (numpy.frombuffer).
_UNSAFE = re.compile(
    r"\b(pickle|cPickle|dill|marshal|shelve|joblib)\b|\beval\(|\bexec\(|(?<![.\w])compile\(|torch\.load|numpy\.load|np\.load"
    r"|yaml\.load\(|yaml\.unsafe_load|allow_pickle|__import__|importlib|shell=True|os\.system"
)


def test_no_code_path_unpickles_or_evaluates_client_data():
    sources = sorted((ROOT / "engine").rglob("*.py")) + sorted((ROOT / "service").rglob("*.py"))
    assert len(sources) > 20
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sources for n, line in enumerate(path.read_text().splitlines(), 1) if _UNSAFE.search(line)]
    assert found == []


def test_every_setting_and_limit_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [f"ATTN_{name.upper()}" for name in Settings.model_fields if f"`ATTN_{name.upper()}`" not in readme]
    assert missing == []
    limits = readme.split("### Limits", 1)[1].split("\n## ", 1)[0]
    for limit in ("ATTN_MAX_BODY_BYTES", "ATTN_MAX_TOKENS_PER_REQUEST", "ATTN_MAX_TENSOR_ELEMENTS", "ATTN_MAX_HEADS",
                  "ATTN_MAX_HEADER_BYTES", "ATTN_BODY_TIMEOUT_S", "ATTN_QUEUE_SIZE", "ATTN_MAX_CONNECTIONS",
                  "nest", "union", "per_head", "window"):
        assert limit in limits, limit
