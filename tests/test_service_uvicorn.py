"""`python -m service` under a real uvicorn on a loopback port: settings from the environment and flags,
readiness, concurrent requests answered correctly and batched, limits enforced on the wire."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest
import torch

from engine import attention
from service.loadtest import free_port
from service.settings import Settings, unknown_variables
from service_support import from_json, qkv, request_body, service_process


@pytest.fixture(scope="module")
def server():
    with service_process(max_batch_delay_ms=20, max_body_bytes=200000, api_keys="secret", log_level="warning") as (url, _):
        yield url


def test_concurrent_requests_over_loopback(server):
    requests = [qkv(h=4, hkv=2, lq=32, lk=32, d=16, dv=16, seed=400 + i) for i in range(24)]
    pattern = {"type": "sliding_window", "window": 8}

    async def run():
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": "Bearer secret"}, timeout=60) as c:
            return await asyncio.gather(*(
                c.post("/attention", json=request_body(q, k, v, pattern=pattern), headers={"X-Request-ID": f"r{i}"})
                for i, (q, k, v) in enumerate(requests)
            ))

    responses = asyncio.run(run())
    for i, ((q, k, v), r) in enumerate(zip(requests, responses)):
        assert r.status_code == 200, r.text
        assert r.headers["X-Request-ID"] == f"r{i}" and r.json()["meta"]["request_id"] == f"r{i}"
        assert torch.allclose(from_json(r.json()["output"]), attention(q, k, v, pattern), atol=1e-6)
    assert max(r.json()["meta"]["batch"]["requests"] for r in responses) > 1


def test_limits_and_auth_on_the_wire(server):
    q, k, v = qkv(h=4, hkv=2, lq=32, lk=32, d=16, dv=16)
    r = httpx.post(f"{server}/attention", json=request_body(q, k, v))
    assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
    big = request_body(*qkv(h=8, hkv=8, lq=256, lk=256, d=16, dv=16))  # ~520 kB of b64, limit 200 kB
    r = httpx.post(f"{server}/attention", json=big, headers={"Authorization": "Bearer secret"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    assert "attention_http_requests_total" in httpx.get(f"{server}/metrics").text


@pytest.mark.parametrize("variable, shown", [
    ("ATTN_PORT=abc", "ATTN_PORT='abc': Input should be a valid integer"),
    ("ATTN_MAX_BATCH_DELAY_MS=inf", "ATTN_MAX_BATCH_DELAY_MS='inf': Input should be a finite number"),  # never ready
    ("ATTN_API_KEYS=,,", "ATTN_API_KEYS=',,': ',,' lists nothing"),  # not a silent "no authentication"
    ("ATTN_DEVICE=tpu", "ATTN_DEVICE='tpu'"),
    ("ATTN_CORS_ORIGINS=http://a.com/", "'http://a.com/' is not an origin"),  # never matches a browser's Origin
    ("ATTN_CORS_ORIGINS=https://a.com,*", "'*' allows every origin"),
])
def test_a_bad_setting_exits_with_one_line_naming_its_variable(variable, shown):
    name, _, value = variable.partition("=")
    done = subprocess.run([sys.executable, "-m", "service"], env={**os.environ, name: value}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and shown in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_settings_as_flags_win_over_the_environment():
    port = free_port()  # ATTN_PORT names another free port: the flag's is the one served
    with service_process(flags=("--port", str(port))) as (url, _):
        assert url == f"http://127.0.0.1:{port}"
        q, k, v = qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4)
        r = httpx.post(f"{url}/attention", json=request_body(q, k, v))
        assert r.status_code == 200 and torch.allclose(from_json(r.json()["output"]), attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("flags, code, shown", [
    (["--help"], 0, "--max-batch-size int"),
    (["--port", "abc"], 1, "--port / ATTN_PORT='abc': Input should be a valid integer"),
    (["--max-batch-sise", "4"], 2, "unrecognized arguments: --max-batch-sise 4"),
])
def test_flags_are_checked_before_anything_starts(flags, code, shown):
    done = subprocess.run([sys.executable, "-m", "service", *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == code and shown in done.stdout + done.stderr, done.stdout + done.stderr
    assert "Uvicorn running" not in done.stderr and "Traceback" not in done.stderr


def test_origins_as_browsers_send_them(monkeypatch):
    monkeypatch.setenv("ATTN_CORS_ORIGINS", "https://app.example.com, http://localhost:3000,http://[::1]:8080")
    assert Settings().cors_origins == ("https://app.example.com", "http://localhost:3000", "http://[::1]:8080")
    monkeypatch.setenv("ATTN_CORS_ORIGINS", "*")
    assert Settings().cors_origins == ("*",)


def test_unknown_attn_variables_are_named():
    environ = {"ATTN_API_KEY": "secret", "ATTN_PORT": "1", "ATTN_REPLICAS": "2", "PATH": "/bin"}
    assert unknown_variables(environ) == ["ATTN_API_KEY"]  # a typo of ATTN_API_KEYS; compose's own are fine
