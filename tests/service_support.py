"""Helpers for the service tests: tensors to and from the contract's JSON, and in-process apps."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import IO, AsyncIterator, Iterator, Sequence

import httpx
import torch
import uvicorn

from engine import attention
from engine.batcher import Compute
from service.__main__ import uvicorn_config
from service.app import create_app
from service.loadtest import free_port
from service.settings import Settings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}


def as_json(t: torch.Tensor, encoding: str = "b64") -> dict:
    """A tensor as the contract's {shape, dtype, b64 | data}."""
    body = {"shape": list(t.shape), "dtype": NAMES[t.dtype]}
    if encoding == "b64":
        body["b64"] = base64.b64encode(t.contiguous().view(torch.uint8).numpy().tobytes()).decode()
    else:
        body["data"] = t.flatten().tolist()
    return body


def from_json(d: dict) -> torch.Tensor:
    """The tensor a response's {shape, dtype, b64 | data} describes."""
    dtype = DTYPES[d["dtype"]]
    if d.get("b64") is not None:
        return torch.frombuffer(bytearray(base64.b64decode(d["b64"])), dtype=dtype).reshape(d["shape"])
    return torch.tensor(d["data"], dtype=torch.float32).to(dtype).reshape(d["shape"])


def qkv(b=1, h=4, hkv=2, lq=32, lk=32, d=16, dv=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g).to(dtype), torch.randn(b, hkv, lk, d, generator=g).to(dtype),
            torch.randn(b, hkv, lk, dv, generator=g).to(dtype))


def request_body(q, k, v, encoding="b64", **extra) -> dict:
    return {"q": as_json(q, encoding), "k": as_json(k, encoding), "v": as_json(v, encoding), **extra}


def settings(**overrides) -> Settings:
    """Settings for tests: the CPU, unless a test says otherwise."""
    return Settings(**{"device": "cpu", **overrides})


async def wait_ready(app, timeout_s: float = 60.0) -> None:
    async def poll() -> None:
        while not app.state.service.ready:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


@asynccontextmanager
async def serve(
    config: Settings | None = None, *, compute: Compute | None = None, ready: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process app with its lifespan running, and a client talking to it over ASGI."""
    app = create_app(config or settings(), compute=compute)
    async with app.router.lifespan_context(app):
        if ready:
            await wait_ready(app)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 is an answer here
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@contextmanager
def live_server(config: Settings, compute: Compute | None = None) -> Iterator[str]:
    """The service under a real uvicorn on a free loopback port, in a thread of this process
    (configured as `python -m service` configures it); yields its URL once the engine is warm."""
    port = free_port()
    server = uvicorn.Server(uvicorn_config(config.model_copy(update={"port": port, "log_level": "warning"}), compute))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (server.started and server.config.app.state.service.ready):
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def service_process(log: IO[bytes] | None = None, flags: Sequence[str] = (),
                    **env: object) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m service` on a free loopback port with ATTN_* variables from `env` (e.g.
    drain_s=2) and command-line `flags`; yields its URL (the port of a `--port` flag if given) and
    process once /readyz is 200, and stops it after the block."""
    port = free_port()
    variables = {"ATTN_DEVICE": "cpu", "ATTN_LOG_LEVEL": "warning", **{f"ATTN_{k.upper()}": str(v) for k, v in env.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "service", *flags], env={**os.environ, **variables, "ATTN_PORT": str(port)},
                            stdout=log, stderr=subprocess.STDOUT if log else None)
    if "--port" in flags:
        port = int(flags[list(flags).index("--port") + 1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready within 120 s"
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


class Gate:
    """An engine call that can be held: after `close()`, calls wait in the worker until `open()`."""

    def __init__(self, compute: Compute = attention) -> None:
        self._compute = compute
        self._open = threading.Event()
        self._open.set()
        self._entered = threading.Event()

    def close(self) -> None:
        self._entered.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def __call__(self, *args, **kwargs):
        self._entered.set()
        self._open.wait(60)
        return self._compute(*args, **kwargs)

    async def holding(self) -> None:
        """Wait until a call is held at the gate (the worker is busy)."""
        while not self._entered.is_set():
            await asyncio.sleep(0.005)


def sample(metrics_text: str, series: str) -> float:
    """The value of one series (name with its labels) in Prometheus text; 0 when absent."""
    for line in metrics_text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def post_in_one_wave(client, gate: Gate, bodies: list[dict]) -> list:
    """Post the first body while holding the worker, queue all the others behind it, then release:
    the others are all waiting when the batcher next collects, whatever the machine's speed."""
    gate.close()
    first = asyncio.create_task(client.post("/attention", json=bodies[0]))
    await gate.holding()
    rest = [asyncio.create_task(client.post("/attention", json=body)) for body in bodies[1:]]
    while client.app.state.service.batcher.queue_depth < len(rest):
        await asyncio.sleep(0.005)
    gate.open()
    return [await first] + list(await asyncio.gather(*rest))
