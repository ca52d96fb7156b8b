"""The service against the in-process engine, as ratios measured in one run (issue 4).

(a) A medium request (B=1, H=8, n=4096, D=64, b64, sliding_window(256)): the service's p50
    latency over loopback HTTP against the in-process engine's p50 on the same tensors
    (target <= 1.25).
(b) Tiny requests (n=64, H=4, D=32, sliding_window(16)) from 32 concurrent clients: throughput
    with batching on (the default settings) against batching off (ATTN_MAX_BATCH_SIZE=1)
    (target >= 2).
(c) The cost of `data` (JSON lists) against `b64`: both encodings' p50 for the medium and the
    tiny request, and their body sizes.

Each service runs as `python -m service` in a subprocess on a free loopback port. Latency is from
sending the request to the whole response received (the client does not decode it).

    python -m bench.service [--out results.json] [--seconds 5] [--repeats 15]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import torch

from engine import attention

MEDIUM = {"b": 1, "h": 8, "n": 4096, "d": 64, "pattern": {"type": "sliding_window", "window": 256}}
TINY = {"b": 1, "h": 4, "n": 64, "d": 32, "pattern": {"type": "sliding_window", "window": 16}}


def tensors(spec: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (spec["b"], spec["h"], spec["n"], spec["d"])
    return tuple(torch.randn(shape, generator=g) for _ in range(3))  # type: ignore[return-value]


def body(spec: dict, encoding: str, seed: int = 0) -> bytes:
    def enc(t: torch.Tensor) -> dict:
        out = {"shape": list(t.shape), "dtype": "float32"}
        if encoding == "b64":
            out["b64"] = base64.b64encode(t.numpy().tobytes()).decode()
        else:
            out["data"] = t.flatten().tolist()
        return out

    q, k, v = tensors(spec, seed)
    return json.dumps({"q": enc(q), "k": enc(k), "v": enc(v), "pattern": spec["pattern"]}).encode()


@contextmanager
def service(**env: str) -> Iterator[str]:
    """`python -m service` on a free loopback port with ATTN_* overrides; yields its URL once ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {"ATTN_PORT": str(port), "ATTN_DEVICE": "cpu", "ATTN_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen([sys.executable, "-m", "service"], env={**os.environ, **settings})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the service exited during start-up")
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service was not ready within 120 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def p50_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def service_p50_ms(url: str, payload: bytes, repeats: int) -> float:
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=120) as client:
        def call() -> None:
            r = client.post("/attention", content=payload, headers=headers)
            r.raise_for_status()

        return p50_ms(call, repeats)


def engine_p50_ms(spec: dict, repeats: int) -> float:
    q, k, v = tensors(spec)
    return p50_ms(lambda: attention(q, k, v, spec["pattern"]), repeats)


def throughput(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` clients each send, wait, send again, for `seconds`."""

    async def run() -> dict:
        done, batch_sizes = 0, []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            stop = time.perf_counter() + seconds

            async def worker(i: int) -> None:
                nonlocal done
                n = 0
                while time.perf_counter() < stop:
                    r = await client.post("/attention", content=payloads[(i + n) % len(payloads)],
                                          headers={"Content-Type": "application/json"})
                    r.raise_for_status()
                    batch_sizes.append(r.json()["meta"]["batch"]["requests"])
                    done += 1
                    n += 1

            await asyncio.gather(*(worker(i) for i in range(concurrency)))  # warm the connections
            done, batch_sizes = 0, []
            stop = time.perf_counter() + seconds
            start = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = time.perf_counter() - start
        return {"requests_per_s": done / elapsed, "mean_batch": statistics.fmean(batch_sizes)}

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed medium requests per measurement")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results: dict = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}

    medium_b64, medium_data = body(MEDIUM, "b64"), body(MEDIUM, "data")
    tiny_payloads = {enc: [body(TINY, enc, seed) for seed in range(64)] for enc in ("b64", "data")}
    with service() as url:
        results["medium_service_p50_ms"] = service_p50_ms(url, medium_b64, args.repeats)
        results["medium_engine_p50_ms"] = engine_p50_ms(MEDIUM, args.repeats)
        results["medium_data_service_p50_ms"] = service_p50_ms(url, medium_data, max(3, args.repeats // 5))
        results["tiny_b64_service_p50_ms"] = service_p50_ms(url, tiny_payloads["b64"][0], 50)
        results["tiny_data_service_p50_ms"] = service_p50_ms(url, tiny_payloads["data"][0], 50)
        results["batching_on"] = throughput(url, tiny_payloads["b64"], args.concurrency, args.seconds)
    with service(ATTN_MAX_BATCH_SIZE="1") as url:
        results["batching_off"] = throughput(url, tiny_payloads["b64"], args.concurrency, args.seconds)
    results["body_bytes"] = {"medium_b64": len(medium_b64), "medium_data": len(medium_data),
                             "tiny_b64": len(tiny_payloads["b64"][0]), "tiny_data": len(tiny_payloads["data"][0])}
    results["medium_ratio"] = results["medium_service_p50_ms"] / results["medium_engine_p50_ms"]
    results["batching_ratio"] = results["batching_on"]["requests_per_s"] / results["batching_off"]["requests_per_s"]

    print(f"medium  service p50 {results['medium_service_p50_ms']:.1f} ms / engine p50 "
          f"{results['medium_engine_p50_ms']:.1f} ms = {results['medium_ratio']:.3f}  (target <= 1.25)")
    print(f"tiny    batching on {results['batching_on']['requests_per_s']:.0f} req/s (mean batch "
          f"{results['batching_on']['mean_batch']:.1f}) / off {results['batching_off']['requests_per_s']:.0f} req/s"
          f" = {results['batching_ratio']:.2f}x  (target >= 2)")
    print(f"data vs b64: medium {results['medium_data_service_p50_ms']:.0f} ms vs "
          f"{results['medium_service_p50_ms']:.0f} ms ({results['body_bytes']['medium_data'] / 1e6:.1f} MB vs "
          f"{results['body_bytes']['medium_b64'] / 1e6:.1f} MB); tiny {results['tiny_data_service_p50_ms']:.2f} ms vs "
          f"{results['tiny_b64_service_p50_ms']:.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
