"""The service against the in-process engine, as ratios measured in one run (issue 4).

(a) A medium request (B=1, H=8, n=4096, D=64, b64, sliding_window(256)): the service's p50
    latency over loopback HTTP against the in-process engine's p50 on the same tensors
    (target <= 1.25).
(b) Tiny requests (n=64, H=4, D=32, sliding_window(16)) from 32 concurrent clients: throughput
    with batching on (the default settings) against batching off (ATTN_MAX_BATCH_SIZE=1)
    (target >= 2); and the same with 64 different lengths, n = 33..96, which batch by padding.
(c) The cost of `data` (JSON lists) against `b64`: both encodings' p50 for the medium and the
    tiny request, and their body sizes; and the medium request as binary tensors in and out
    (`service.binary`), against the engine like (a).
(d) What measuring `meta.memory.peak_bytes` costs: the in-process engine's p50 with and without
    `engine.memory.PeakMemory` around it, for the medium and the tiny request.
(e) The HTTP floor under (a): the same uvicorn (httptools, uvloop) serving `echo_app`, which
    reads the medium body and answers as many bytes as the service's answer, doing nothing else.
    Service p50 minus this floor is what the service itself adds to the transfer.

Each service runs as `python -m service` in a subprocess on a free loopback port (local_service). The client is a
minimal keep-alive HTTP/1.1 client on asyncio streams, so that on a small machine the figures
measure the service rather than a client library's overhead (httpx costs about as much CPU per
tiny request as the service does). Latency is from sending the request to the whole response
received (the client does not decode it).

    python -m bench.service [--out results.json] [--rounds 5] [--repeats 4] [--seconds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from engine import attention
from engine.memory import PeakMemory
from service import binary
from service.client import build_request, raw_bytes
from service.loadtest import free_port, local_service
from service.settings import Settings

MEDIUM = {"b": 1, "h": 8, "n": 4096, "d": 64, "pattern": {"type": "sliding_window", "window": 256}}
TINY = {"b": 1, "h": 4, "n": 64, "d": 32, "pattern": {"type": "sliding_window", "window": 16}}


def tensors(spec: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (spec["b"], spec["h"], spec["n"], spec["d"])
    return tuple(torch.randn(shape, generator=g) for _ in range(3))  # type: ignore[return-value]


def body(spec: dict, encoding: str, seed: int = 0) -> bytes:
    """The JSON request body with tensors as "b64" or "data" (as the client builds it)."""
    return json.dumps(build_request(*tensors(spec, seed), spec["pattern"], encoding=encoding)).encode()


def binary_body(spec: dict, seed: int = 0) -> tuple[bytes, str]:
    """The request as binary tensors (`service.binary`, as the client builds it), and its extra header lines."""
    qkv = tensors(spec, seed)
    header = json.dumps(build_request(*qkv, spec["pattern"], encoding="binary")).encode()
    payload, headers = binary.join(header, [raw_bytes(t) for t in qkv])
    return payload, f"Content-Type: {binary.MEDIA_TYPE}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())


def timed_ms(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


JSON_HEADERS = "Content-Type: application/json\r\n"


def answer_meta(headers: dict[str, str], body: bytes) -> dict:
    """The `meta` of a JSON or a binary answer."""
    return json.loads(body[: int(headers.get(binary.HEADER.lower(), len(body)))])["meta"]


class Connection:
    """One keep-alive HTTP/1.1 connection that posts prepared bodies to /attention."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> "Connection":
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, payload: bytes, headers: str = JSON_HEADERS) -> tuple[dict[str, str], bytes]:
        """The response headers (lower-case names) and body of POST /attention; raises unless 200."""
        head = (f"POST /attention HTTP/1.1\r\nHost: {self.host}\r\n{headers}"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        self.writer.write(head)
        self.writer.write(payload)
        await self.writer.drain()
        status_line, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        answer = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines if h)}
        body = await self.reader.readexactly(int(answer["content-length"]))
        if status_line.split()[1] != "200":
            raise RuntimeError(f"{status_line}: {body[:300]!r}")
        return answer, body

    def close(self) -> None:
        self.writer.close()


def service_samples(url: str, payload: bytes, n: int, warmup: int = 1,
                    headers: str = JSON_HEADERS) -> tuple[list[float], list[dict], int]:
    """n latencies seen by the client, each answer's `meta.timing_ms`, and the answer's size in bytes."""

    async def run() -> tuple[list[float], list[dict], int]:
        conn = await Connection.open(url)
        try:
            times, parts = [], []
            for i in range(warmup + n):
                start = time.perf_counter()
                answer_headers, answer = await conn.post(payload, headers)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
                    parts.append(answer_meta(answer_headers, answer)["timing_ms"])
            return times, parts, len(answer)
        finally:
            conn.close()

    return asyncio.run(run())


async def echo_app(scope: dict, receive, send) -> None:
    """The transport floor (e): read the whole body, answer `X-Reply-Bytes` bytes, nothing else."""
    assert scope["type"] == "http"
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    size = int(dict(scope["headers"]).get(b"x-reply-bytes", b"0"))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(size).encode())]})
    await send({"type": "http.response.body", "body": b" " * size})


@contextmanager
def echo_service() -> Iterator[str]:
    """`echo_app` on uvicorn, as the service runs it (its own process, httptools, uvloop)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.service:echo_app", "--port", str(port),
                                "--lifespan", "off", "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the echo server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def floor_samples(url: str, payload: bytes, reply_bytes: int, n: int, warmup: int = 1) -> list[float]:
    """n latencies of posting `payload` to `echo_app` for a `reply_bytes` answer."""

    async def run() -> list[float]:
        conn = await Connection.open(url)
        try:
            times = []
            for i in range(warmup + n):
                start = time.perf_counter()
                await conn.post(payload, f"{JSON_HEADERS}X-Reply-Bytes: {reply_bytes}\r\n")
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
            return times
        finally:
            conn.close()

    return asyncio.run(run())


def engine_samples(spec: dict, n: int, threads: int, device: str = "cpu", peak_memory: bool = False) -> list[float]:
    q, k, v = (t.to(device) for t in tensors(spec))
    default = torch.get_num_threads()
    torch.set_num_threads(threads)

    def call() -> None:
        with PeakMemory(device) if peak_memory else nullcontext():
            attention(q, k, v, spec["pattern"])
        if q.device.type == "cuda":
            torch.cuda.synchronize()

    try:
        call()
        return timed_ms(call, n)
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
                answer_headers, answer = await conn.post(payloads[(i + n) % len(payloads)])
                n += 1
                if record:
                    batch_sizes.append(answer_meta(answer_headers, answer)["batch"]["requests"])
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
    p.add_argument("--rounds", type=int, default=5, help="rounds alternating the two sides of each comparison")
    p.add_argument("--repeats", type=int, default=4, help="timed medium requests (and engine calls) per round")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each throughput run, per round")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--device", default="cpu", help="the service's and the in-process engine's device")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    budget = Settings().thread_budget
    results: dict = {"engine_threads_in_process": torch.get_num_threads(),
                     "engine_threads_in_service": {"large_alone": budget.cores, "shared": budget.shared},
                     "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}

    medium_b64, medium_data = body(MEDIUM, "b64"), body(MEDIUM, "data")
    medium_binary, binary_headers = binary_body(MEDIUM)
    tiny_payloads = {enc: [body(TINY, enc, seed) for seed in range(64)] for enc in ("b64", "data")}
    tiny_mixed = [body({**TINY, "n": 33 + seed}, "b64", seed) for seed in range(64)]
    results["device"] = args.device
    own_threads = torch.get_num_threads()
    medium_threads = budget.for_call(MEDIUM["b"] * MEDIUM["h"] * MEDIUM["n"] * MEDIUM["d"], queue_empty=True)
    med = {"service": [], "timing": [], "engine": [], "engine_service_threads": [], "floor": [], "binary": []}
    on_off: list[tuple[dict, dict]] = []
    on_off_mixed: list[tuple[dict, dict]] = []
    # Every comparison alternates its two sides in rounds, so that a machine whose load drifts
    # (other jobs on shared cores) moves both sides alike.
    with local_service(device=args.device, log_level="warning") as url, \
            local_service(device=args.device, log_level="warning", max_batch_size=1) as url_off, \
            echo_service() as url_echo:
        for _ in range(args.rounds):
            times, parts, answer_bytes = service_samples(url, medium_b64, args.repeats)
            med["service"] += times
            med["timing"] += parts
            med["floor"] += floor_samples(url_echo, medium_b64, answer_bytes, args.repeats)
            med["binary"] += service_samples(url, medium_binary, args.repeats, headers=binary_headers)[0]
            med["engine"] += engine_samples(MEDIUM, args.repeats, own_threads, args.device)
            med["engine_service_threads"] += engine_samples(MEDIUM, args.repeats, medium_threads, args.device)
            on = throughput(url, tiny_payloads["b64"], args.concurrency, args.seconds)
            off = throughput(url_off, tiny_payloads["b64"], args.concurrency, args.seconds)
            on_off.append((on, off))
            on_off_mixed.append((throughput(url, tiny_mixed, args.concurrency, args.seconds),
                                 throughput(url_off, tiny_mixed, args.concurrency, args.seconds)))
        results["medium_data_service_p50_ms"] = statistics.median(service_samples(url, medium_data, 3)[0])
        results["tiny_b64_service_p50_ms"] = statistics.median(service_samples(url, tiny_payloads["b64"][0], 50)[0])
        results["tiny_data_service_p50_ms"] = statistics.median(service_samples(url, tiny_payloads["data"][0], 50)[0])
    results["medium_service_p50_ms"] = statistics.median(med["service"])
    results["medium_service_timing_ms"] = {k: statistics.median(t[k] for t in med["timing"]) for k in med["timing"][0]}
    results["medium_engine_p50_ms"] = statistics.median(med["engine"])
    results["medium_engine_service_threads_p50_ms"] = statistics.median(med["engine_service_threads"])
    results["medium_http_floor_p50_ms"] = statistics.median(med["floor"])
    results["medium_binary_service_p50_ms"] = statistics.median(med["binary"])
    results["medium_binary_ratio"] = results["medium_binary_service_p50_ms"] / results["medium_engine_p50_ms"]
    results["tiny_rounds"] = [{"on": on, "off": off} for on, off in on_off]
    results["batching_on"] = {k: statistics.median(on[k] for on, _ in on_off) for k in on_off[0][0]}
    results["batching_off"] = {k: statistics.median(off[k] for _, off in on_off) for k in on_off[0][1]}
    results["peak_memory_overhead"] = {
        name: {"without_ms": statistics.median(engine_samples(spec, n, budget.shared, args.device)),
               "with_ms": statistics.median(engine_samples(spec, n, budget.shared, args.device, peak_memory=True))}
        for name, spec, n in (("medium", MEDIUM, 3 * args.repeats), ("tiny", TINY, 200))
    }
    results["body_bytes"] = {"medium_b64": len(medium_b64), "medium_data": len(medium_data),
                             "medium_binary": len(medium_binary),
                             "tiny_b64": len(tiny_payloads["b64"][0]), "tiny_data": len(tiny_payloads["data"][0])}
    results["medium_ratio"] = results["medium_service_p50_ms"] / results["medium_engine_p50_ms"]
    results["batching_ratio"] = statistics.median(on["requests_per_s"] / off["requests_per_s"] for on, off in on_off)
    results["mixed_lengths"] = {
        "batching_on": {k: statistics.median(on[k] for on, _ in on_off_mixed) for k in on_off_mixed[0][0]},
        "batching_off": {k: statistics.median(off[k] for _, off in on_off_mixed) for k in on_off_mixed[0][1]},
        "ratio": statistics.median(on["requests_per_s"] / off["requests_per_s"] for on, off in on_off_mixed),
    }

    print(f"medium  service p50 {results['medium_service_p50_ms']:.1f} ms / engine p50 "
          f"{results['medium_engine_p50_ms']:.1f} ms = {results['medium_ratio']:.3f}  (target <= 1.25); engine on the "
          f"{medium_threads} thread(s) the service gives it: {results['medium_engine_service_threads_p50_ms']:.1f} ms")
    floor = results["medium_http_floor_p50_ms"]
    print(f"        HTTP floor (uvicorn reading the body and answering as many bytes, no work): {floor:.1f} ms; "
          f"floor + engine = {floor + results['medium_engine_p50_ms']:.1f} ms, "
          f"{(floor + results['medium_engine_p50_ms']) / results['medium_engine_p50_ms']:.2f}x the engine")
    print(f"        as binary tensors ({len(medium_binary) / 1e6:.1f} MB in): service p50 "
          f"{results['medium_binary_service_p50_ms']:.1f} ms = {results['medium_binary_ratio']:.3f}x the engine")
    timing = results["medium_service_timing_ms"]
    print(f"        where the medium request's time goes (p50s): engine call {timing['compute']:.1f} ms, queue "
          f"{timing['queue']:.1f} ms, rest of the service (body read, parse, decode, encode) "
          f"{timing['total'] - timing['compute'] - timing['queue']:.1f} ms, outside the service's total (transfer, "
          f"response write) {results['medium_service_p50_ms'] - timing['total']:.1f} ms")
    print(f"tiny    batching on {results['batching_on']['requests_per_s']:.0f} req/s (mean batch "
          f"{results['batching_on']['mean_batch']:.1f}) / off {results['batching_off']['requests_per_s']:.0f} req/s"
          f"; median ratio over {args.rounds} rounds {results['batching_ratio']:.2f}x  (target >= 2)")
    mixed = results["mixed_lengths"]
    print(f"        64 lengths (n 33..96): on {mixed['batching_on']['requests_per_s']:.0f} req/s (mean batch "
          f"{mixed['batching_on']['mean_batch']:.1f}) / off {mixed['batching_off']['requests_per_s']:.0f} req/s; "
          f"median ratio {mixed['ratio']:.2f}x")
    print(f"data vs b64: medium {results['medium_data_service_p50_ms']:.0f} ms vs "
          f"{results['medium_service_p50_ms']:.0f} ms ({results['body_bytes']['medium_data'] / 1e6:.1f} MB vs "
          f"{results['body_bytes']['medium_b64'] / 1e6:.1f} MB); tiny {results['tiny_data_service_p50_ms']:.2f} ms vs "
          f"{results['tiny_b64_service_p50_ms']:.2f} ms")
    for name, cost in results["peak_memory_overhead"].items():
        print(f"PeakMemory around the engine, {name}: {cost['with_ms']:.2f} ms vs {cost['without_ms']:.2f} ms without")
    print(f"load average at start {results['load_average_at_start']}, at end {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
