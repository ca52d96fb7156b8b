"""The service against the in-process engine, as ratios measured in one run (issue 4).

(a) A medium request (B=1, H=8, n=4096, D=64, b64, sliding_window(256)): the service's p50
    latency over loopback HTTP against the in-process engine's p50 on the same tensors
    (target <= 1.25).
(b) Tiny requests (n=64, H=4, D=32, sliding_window(16)) from 32 concurrent clients: throughput
    with batching on (the default settings) against batching off (ATTN_MAX_BATCH_SIZE=1)
    (target >= 2).
(c) The cost of `data` (JSON lists) against `b64`: both encodings' p50 for the medium and the
    tiny request, and their body sizes.

Each service runs as `python -m service` in a subprocess on a free loopback port (local_service). The client is a
minimal keep-alive HTTP/1.1 client on asyncio streams, so that on a small machine the figures
measure the service rather than a client library's overhead (httpx costs about as much CPU per
tiny request as the service does). Latency is from sending the request to the whole response
received (the client does not decode it).

    python -m bench.service [--out results.json] [--seconds 5] [--repeats 15]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time

import torch

from engine import attention
from service.loadtest import local_service
from service.settings import Settings

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


def p50_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class Connection:
    """One keep-alive HTTP/1.1 connection that posts prepared bodies to /attention."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> "Connection":
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, payload: bytes) -> bytes:
        """The response body of POST /attention; raises unless the status is 200."""
        head = (f"POST /attention HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        self.writer.write(head)
        self.writer.write(payload)
        await self.writer.drain()
        status_line, *headers = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        length = next(int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:"))
        body = await self.reader.readexactly(length)
        if status_line.split()[1] != "200":
            raise RuntimeError(f"{status_line}: {body[:300]!r}")
        return body

    def close(self) -> None:
        self.writer.close()


def service_p50_ms(url: str, payload: bytes, repeats: int, warmup: int = 2) -> tuple[float, dict[str, float]]:
    """The client's p50 latency, and the p50 of each `meta.timing_ms` part the service reported."""

    async def run() -> tuple[float, dict[str, float]]:
        conn = await Connection.open(url)
        try:
            times, parts = [], []
            for i in range(warmup + repeats):
                start = time.perf_counter()
                answer = await conn.post(payload)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
                    parts.append(json.loads(answer)["meta"]["timing_ms"])
            return statistics.median(times), {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        finally:
            conn.close()

    return asyncio.run(run())


def engine_p50_ms(spec: dict, repeats: int, threads: int, device: str = "cpu") -> float:
    q, k, v = (t.to(device) for t in tensors(spec))
    default = torch.get_num_threads()
    torch.set_num_threads(threads)

    def call() -> None:
        attention(q, k, v, spec["pattern"])
        if q.device.type == "cuda":
            torch.cuda.synchronize()

    try:
        return p50_ms(call, repeats)
    finally:
        torch.set_num_threads(default)


def throughput(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` connections each send, wait for the answer, send again."""

    async def run() -> dict:
        conns = [await Connection.open(url) for _ in range(concurrency)]
        done, batch_sizes = 0, []

        async def worker(i: int, conn: Connection, stop: float, record: bool) -> None:
            nonlocal done
            n = 0
            while time.perf_counter() < stop:
                answer = await conn.post(payloads[(i + n) % len(payloads)])
                n += 1
                if record:
                    batch_sizes.append(json.loads(answer)["meta"]["batch"]["requests"])
                    done += 1

        try:
            warm_stop = time.perf_counter() + min(1.0, seconds / 4)
            await asyncio.gather(*(worker(i, c, warm_stop, False) for i, c in enumerate(conns)))
            start = time.perf_counter()
            await asyncio.gather(*(worker(i, c, start + seconds, True) for i, c in enumerate(conns)))
            elapsed = time.perf_counter() - start
        finally:
            for conn in conns:
                conn.close()
        return {"requests_per_s": done / elapsed, "mean_batch": statistics.fmean(batch_sizes)}

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed medium requests per measurement")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--device", default="cpu", help="the service's and the in-process engine's device")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results: dict = {"engine_threads_in_process": torch.get_num_threads(),
                     "engine_threads_in_service": Settings().engine_threads, "cpus": os.cpu_count(),
                     "load_average_at_start": os.getloadavg()}

    medium_b64, medium_data = body(MEDIUM, "b64"), body(MEDIUM, "data")
    tiny_payloads = {enc: [body(TINY, enc, seed) for seed in range(64)] for enc in ("b64", "data")}
    results["device"] = args.device
    with local_service(device=args.device, log_level="warning") as url:
        results["medium_service_p50_ms"], results["medium_service_timing_ms"] = service_p50_ms(
            url, medium_b64, args.repeats)
        results["medium_engine_p50_ms"] = engine_p50_ms(MEDIUM, args.repeats, torch.get_num_threads(), args.device)
        results["medium_engine_service_threads_p50_ms"] = engine_p50_ms(
            MEDIUM, args.repeats, Settings().engine_threads, args.device)
        results["medium_data_service_p50_ms"] = service_p50_ms(url, medium_data, max(3, args.repeats // 5))[0]
        results["tiny_b64_service_p50_ms"] = service_p50_ms(url, tiny_payloads["b64"][0], 50)[0]
        results["tiny_data_service_p50_ms"] = service_p50_ms(url, tiny_payloads["data"][0], 50)[0]
        results["batching_on"] = throughput(url, tiny_payloads["b64"], args.concurrency, args.seconds)
    with local_service(device=args.device, log_level="warning", max_batch_size=1) as url:
        results["batching_off"] = throughput(url, tiny_payloads["b64"], args.concurrency, args.seconds)
    results["body_bytes"] = {"medium_b64": len(medium_b64), "medium_data": len(medium_data),
                             "tiny_b64": len(tiny_payloads["b64"][0]), "tiny_data": len(tiny_payloads["data"][0])}
    results["medium_ratio"] = results["medium_service_p50_ms"] / results["medium_engine_p50_ms"]
    results["batching_ratio"] = results["batching_on"]["requests_per_s"] / results["batching_off"]["requests_per_s"]

    print(f"medium  service p50 {results['medium_service_p50_ms']:.1f} ms / engine p50 "
          f"{results['medium_engine_p50_ms']:.1f} ms = {results['medium_ratio']:.3f}  (target <= 1.25); engine on the "
          f"service's {results['engine_threads_in_service']} thread(s): {results['medium_engine_service_threads_p50_ms']:.1f} ms")
    timing = results["medium_service_timing_ms"]
    print(f"        where the medium request's time goes (p50s): engine call {timing['compute']:.1f} ms, queue "
          f"{timing['queue']:.1f} ms, rest of the service (body read, parse, decode, encode) "
          f"{timing['total'] - timing['compute'] - timing['queue']:.1f} ms, outside the service's total (transfer, "
          f"response write) {results['medium_service_p50_ms'] - timing['total']:.1f} ms")
    print(f"tiny    batching on {results['batching_on']['requests_per_s']:.0f} req/s (mean batch "
          f"{results['batching_on']['mean_batch']:.1f}) / off {results['batching_off']['requests_per_s']:.0f} req/s"
          f" = {results['batching_ratio']:.2f}x  (target >= 2)")
    print(f"data vs b64: medium {results['medium_data_service_p50_ms']:.0f} ms vs "
          f"{results['medium_service_p50_ms']:.0f} ms ({results['body_bytes']['medium_data'] / 1e6:.1f} MB vs "
          f"{results['body_bytes']['medium_b64'] / 1e6:.1f} MB); tiny {results['tiny_data_service_p50_ms']:.2f} ms vs "
          f"{results['tiny_b64_service_p50_ms']:.2f} ms")
    print(f"load average at start {results['load_average_at_start']}, at end {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
