"""Load generator for the attention service, on `AsyncAttentionClient`.

    python -m service.loadtest --url http://127.0.0.1:8000 --concurrency 32 --duration 10 --out out/
    python -m service.loadtest --url http://127.0.0.1:8000 --rate 200 --requests 2000 --out out/

Closed loop (`--concurrency N`: N requests always in flight) or open loop (`--rate R`:
Poisson arrivals at R per second that never wait for answers, so overload shows as queueing,
429s and timeouts instead of silently slowing the generator down). Open-loop latency is
measured from each request's scheduled arrival, so a lagging generator cannot hide delay;
`send_lag_ms` says how far behind schedule the generator itself was (when it is large, the
generator, not the service, is the bottleneck).

`--processes N` shares the load out over N generator processes (concurrency and request count
split, the rate divided: Poisson streams add up to one at the full rate), for machines where
one Python process cannot keep up; their samples are merged on one time line.

Requests are drawn by weight from a scenario (YAML or JSON, see `Scenario`), each from a small
pool of random inputs whose expected answers are computed locally with `engine.attention`
before the run; answers are compared with them and differences counted as mismatches.
Writes DIR/report.json, DIR/report.md and DIR/latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.synchronize import Barrier
from pathlib import Path
from threading import BrokenBarrierError
from typing import Any

import httpx
import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from engine import attention
from engine.attention import shape_problem
from engine.patterns import Dense, Pattern, echo_of_bad_members, error_field, error_reason

from .client import AsyncAttentionClient, AttentionClient, AttentionError, AttentionResult, TransportError
from .wire import DTYPES, DTypeName, Encoding, encoding_problem

CONNECTIONS_PER_CLIENT = 8
NO_ANSWER = "transport_error"  # by_status key of requests that got no HTTP answer at all

# (atol, rtol) of an answer against the local engine: a swapped or wrong answer is off by O(1).
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (4e-3, 4e-3), "bfloat16": (3e-2, 3e-2)}
LSE_TOLERANCE = (1e-3, 1e-4)


# The entry's field for each tensor `shape_problem` can blame here (their batch, head dims and
# value heads always agree): k for its heads, q for its length.
_SHAPE_FIELDS = {"k": "kv_heads", "q": "q_len"}


class RequestShape(BaseModel):
    """One kind of request in a scenario: shapes, dtype, encoding, pattern, and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    weight: float = Field(1.0, gt=0)
    batch: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1, description="defaults to heads")
    q_len: int = Field(64, ge=1)
    k_len: int | None = Field(None, ge=1, description="defaults to q_len")
    head_dim: int = Field(32, ge=1)
    v_dim: int | None = Field(None, ge=1, description="defaults to head_dim")
    dtype: DTypeName = "float32"
    encoding: Encoding = "b64"
    pattern: Pattern = Field(default_factory=Dense)
    causal: bool = True
    return_lse: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> RequestShape:
        problem = shape_problem(*self.shapes)
        if problem:  # the engine's rule, named by the entry's field that breaks it
            raise ValueError(f"{_SHAPE_FIELDS[problem[0]]}: {problem[1]}")
        problem = encoding_problem(self.dtype, self.encoding)
        if problem:
            raise ValueError(f"encoding: {problem}")
        self.pattern.check_heads(self.heads)
        if not self.name:
            self.name = (
                f"{self.pattern.type} n={self.q_len} H={self.heads} D={self.head_dim} {self.dtype} {self.encoding}"
            )
        return self

    @property
    def tokens(self) -> int:
        """Query tokens one request asks for (the unit of tokens_per_s)."""
        return self.batch * self.q_len

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The shapes of q, k and v, the defaults filled in."""
        hkv, lk = self.kv_heads or self.heads, self.k_len or self.q_len
        return ((self.batch, self.heads, self.q_len, self.head_dim), (self.batch, hkv, lk, self.head_dim),
                (self.batch, hkv, lk, self.v_dim or self.head_dim))

    def make_inputs(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(shape, generator=gen).to(DTYPES[self.dtype]) for shape in self.shapes)


class Scenario(BaseModel):
    """The mix of requests a run sends: `requests`, each drawn with probability ∝ its weight."""

    model_config = ConfigDict(extra="forbid")

    requests: list[RequestShape] = Field(min_length=1)

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        """From a .json file, or YAML (any other suffix); a ValueError naming the file if it does not parse."""
        text = Path(path).read_text()
        try:
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        return cls.model_validate(data)


DEFAULT_SCENARIO = Scenario(
    requests=[
        RequestShape(weight=6, heads=4, q_len=64, head_dim=32),
        RequestShape(weight=1, heads=4, q_len=64, head_dim=32, encoding="data"),
        RequestShape(
            weight=2, heads=8, kv_heads=2, q_len=512, head_dim=64, pattern={"type": "sliding_window", "window": 128}
        ),
        RequestShape(
            weight=1,
            heads=4,
            q_len=256,
            head_dim=64,
            dtype="float16",
            return_lse=True,
            pattern={
                "type": "union",
                "patterns": [{"type": "sliding_window", "window": 32}, {"type": "strided", "stride": 32}],
            },
        ),
        RequestShape(weight=1, heads=8, kv_heads=1, q_len=1, k_len=1024, head_dim=64, dtype="bfloat16"),
    ]
)


class LoadConfig(BaseModel):
    """One run: `concurrency` (closed loop) or `rate` (open loop), bounded by `duration_s`
    and/or `requests` (10 s when neither is given). Times are finite: nan or inf ran forever."""

    model_config = ConfigDict(extra="forbid")

    url: str
    concurrency: int | None = Field(None, ge=1)
    rate: float | None = Field(None, gt=0, allow_inf_nan=False)
    duration_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    requests: int | None = Field(None, ge=1)
    scenario: Scenario = Field(default_factory=lambda: DEFAULT_SCENARIO)
    check_fraction: float = Field(1.0, ge=0, le=1)
    pool: int = Field(4, ge=1)
    seed: int = 0
    timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    max_connections: int = Field(512, ge=1, description="open loop: the most requests in flight at once")
    api_key: str | None = None
    progress: bool = True
    ready_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False, description="the wait for GET /readyz first")
    processes: int = Field(1, ge=1, description="generator processes sharing the load, for machines with cores to spare")

    @model_validator(mode="after")
    def _one_mode(self) -> LoadConfig:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.duration_s is None and self.requests is None:
            self.duration_s = 10.0
        if self.processes > min(self.concurrency or self.processes, self.requests or self.processes):
            raise ValueError("processes: each process needs at least one of the concurrency and the requests")
        return self

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


@dataclass
class Sample:
    """What happened to one request; times in seconds from the start of the run."""

    scheduled_s: float
    sent_s: float
    done_s: float
    status: str
    kind: str
    tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    mismatch: bool | None = None  # None: not checked
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.done_s - self.scheduled_s


@dataclass
class Case:
    """One pooled input with the answer the local engine gives for it."""

    shape: RequestShape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    output: torch.Tensor
    lse: torch.Tensor | None


def pooled_cases(scenario: Scenario, pool: int, seed: int) -> list[list[Case]]:
    """`pool` random inputs per scenario entry, each with its answer from the local engine,
    computed before the run so that checking answers costs the generator almost nothing."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for shape in scenario.requests:
        variants = []
        for _ in range(pool):
            q, k, v = shape.make_inputs(gen)
            expected = attention(q, k, v, shape.pattern, causal=shape.causal, return_lse=shape.return_lse)
            output, lse = expected if shape.return_lse else (expected, None)
            variants.append(Case(shape, q, k, v, output, lse))
        cases.append(variants)
    return cases


def mismatched(case: Case, result: AttentionResult) -> bool:
    """True when the service's answer is not the local engine's for the same inputs."""
    atol, rtol = TOLERANCE[case.shape.dtype]
    out = result.output
    if out.shape != case.output.shape or out.dtype != case.output.dtype:
        return True
    if not torch.allclose(out.float(), case.output.float(), atol=atol, rtol=rtol):
        return True
    if case.lse is None:
        return False
    return result.lse is None or not torch.allclose(result.lse, case.lse, atol=LSE_TOLERANCE[0], rtol=LSE_TOLERANCE[1])


@dataclass
class LoadResult:
    config: LoadConfig
    samples: list[Sample]
    wall_s: float
    issue_s: float  # how long requests were being issued
    started_at: float  # time.time() at the run's zero, to line up the processes of one run


class _Run:
    """The state of one run: the clients, the pooled cases, the samples and the clock."""

    def __init__(
        self,
        cfg: LoadConfig,
        clients: list[AsyncAttentionClient],
        cases: list[list[Case]],
        on_answer: Callable[[int], None] | None,
    ):
        self.cfg, self.clients, self.cases, self.on_answer = cfg, clients, cases, on_answer
        self.rng = random.Random(cfg.seed)
        self.weights = [shape.weight for shape in cfg.scenario.requests]
        self.samples: list[Sample] = []
        self.sent = 0
        self.issue_s: float | None = None
        self.t0, self.started_at = time.perf_counter(), time.time()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def more(self, at_s: float | None = None) -> bool:
        """Whether to issue another request (one due at `at_s`, by default now); the first
        False marks the end of issuing."""
        cfg, at_s = self.cfg, self.now() if at_s is None else at_s
        over = (cfg.requests is not None and self.sent >= cfg.requests) or (
            cfg.duration_s is not None and at_s >= cfg.duration_s
        )
        if over and self.issue_s is None:
            self.issue_s = at_s
        return not over

    async def send(self, client: AsyncAttentionClient, scheduled_s: float) -> None:
        variants = self.rng.choices(self.cases, self.weights)[0]
        case = variants[self.rng.randrange(len(variants))]
        check = self.rng.random() < self.cfg.check_fraction
        shape = case.shape
        sample = Sample(scheduled_s, self.now(), 0.0, "", shape.name, shape.tokens)
        try:
            result = await client.attention(
                case.q,
                case.k,
                case.v,
                shape.pattern.describe(),
                causal=shape.causal,
                return_lse=shape.return_lse,
                encoding=shape.encoding,
            )
            sample.status, sample.meta = "200", result.meta
            sample.mismatch = mismatched(case, result) if check else None
        except TransportError as exc:
            sample.status, sample.error = NO_ANSWER, exc.message
        except AttentionError as exc:
            sample.status, sample.error = str(exc.status), exc.message
        sample.done_s = self.now()
        self.samples.append(sample)
        if self.on_answer is not None:
            self.on_answer(len(self.samples))

    def progress(self) -> tuple[float, str]:
        """How far the run is (requests answered, or seconds) and a line of counts."""
        cfg = self.cfg
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(Counter(s.status for s in self.samples).items()))
        done = len(self.samples) if cfg.requests is not None else min(self.now(), cfg.duration_s)
        in_flight = self.sent - len(self.samples)
        return done, f"sent {self.sent} answered {len(self.samples)} in flight {in_flight} {statuses}"

    async def closed_loop(self) -> None:
        async def worker(client: AsyncAttentionClient) -> None:
            while self.more():
                self.sent += 1
                await self.send(client, self.now())

        clients = self.clients
        await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(self.cfg.concurrency)))

    async def open_loop(self) -> None:
        """Poisson arrivals: exponential gaps at the configured rate, each request its own task.
        Every arrival due within the duration is sent, late if the generator fell behind."""
        tasks: set[asyncio.Task] = set()
        arrival = 0.0
        while True:
            arrival += self.rng.expovariate(self.cfg.rate)
            if not self.more(arrival):
                break
            await asyncio.sleep(max(0.0, arrival - self.now()))
            self.sent += 1
            task = asyncio.create_task(self.send(self.clients[self.sent % len(self.clients)], arrival))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)


def client_pools(in_flight: int) -> list[int]:
    """Connections of each client: CONNECTIONS_PER_CLIENT each, adding up to exactly `in_flight`."""
    full, rest = divmod(in_flight, CONNECTIONS_PER_CLIENT)
    return [CONNECTIONS_PER_CLIENT] * full + [rest] * (rest > 0)


async def run_async(
    cfg: LoadConfig, start: Barrier | None = None, on_answer: Callable[[int], None] | None = None
) -> LoadResult:
    """Run the load described by `cfg` (in this process) and return every request's sample.
    `start`, when given, is waited at before the clock starts; `on_answer` hears the count of
    answers after each one."""
    # Requests in flight are spread over clients of CONNECTIONS_PER_CLIENT connections each:
    # httpcore's pool rescans its connections for every waiting request whenever one frees up,
    # which costs the generator ~3x the CPU per request at 32 in flight through one client.
    in_flight = cfg.concurrency if cfg.mode == "closed" else cfg.max_connections
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                AsyncAttentionClient(cfg.url, api_key=cfg.api_key, timeout=cfg.timeout_s, max_retries=0,
                                     limits=httpx.Limits(max_connections=size, max_keepalive_connections=size))
            )
            for size in client_pools(in_flight)
        ]
        await clients[0].wait_ready(timeout_s=cfg.ready_timeout_s)
        cases = pooled_cases(cfg.scenario, cfg.pool, cfg.seed)
        if start is not None:
            start.wait()
        run = _Run(cfg, clients, cases, on_answer)
        with _ProgressBar(cfg) as bar:
            ticker = asyncio.create_task(bar.follow(run.progress))
            try:
                await (run.closed_loop() if cfg.mode == "closed" else run.open_loop())
            finally:
                ticker.cancel()
            bar.update(*run.progress())
        wall_s = run.now()
    return LoadResult(cfg, run.samples, wall_s, run.issue_s or wall_s, run.started_at)


def run(cfg: LoadConfig) -> LoadResult:
    """Run the load, in `cfg.processes` generator processes when more than one."""
    return asyncio.run(run_async(cfg)) if cfg.processes == 1 else _run_processes(cfg)


def _parts(cfg: LoadConfig) -> list[LoadConfig]:
    """The load shared out over `cfg.processes` processes: concurrency, request count and
    connections split evenly, the rate divided (Poisson streams add up to one at the full
    rate), and a seed each."""
    n = cfg.processes

    def share(total: int, i: int) -> int:
        return total // n + (i < total % n)

    return [
        cfg.model_copy(update={
            "processes": 1,
            "progress": False,
            "seed": cfg.seed + i,
            "concurrency": share(cfg.concurrency, i) if cfg.concurrency is not None else None,
            "rate": cfg.rate / n if cfg.rate is not None else None,
            "requests": share(cfg.requests, i) if cfg.requests is not None else None,
            "max_connections": max(1, share(cfg.max_connections, i)),
        })
        for i in range(n)
    ]


def _run_part(cfg: LoadConfig, index: int, start: Barrier, answered: Any, results: Any) -> None:
    """One generator process: its share of the load, its samples sent back on `results`."""
    try:
        result = asyncio.run(run_async(cfg, start, lambda n: answered.__setitem__(index, n)))
        results.put((index, result, None))
    except Exception as exc:  # noqa: BLE001 - any failure goes back to the parent whole
        start.abort()
        results.put((index, None, exc))


def _run_processes(cfg: LoadConfig) -> LoadResult:
    """Run the parts in spawned processes that start their clocks together; merge the samples
    on one time line."""
    ctx = multiprocessing.get_context("spawn")
    parts = _parts(cfg)
    start = ctx.Barrier(len(parts))
    answered = ctx.Array("q", len(parts), lock=False)
    results = ctx.Queue()
    processes = [ctx.Process(target=_run_part, args=(p, i, start, answered, results)) for i, p in enumerate(parts)]
    for process in processes:
        process.start()
    outputs: dict[int, LoadResult] = {}
    began = time.perf_counter()
    try:
        with _ProgressBar(cfg) as bar:
            while len(outputs) < len(parts):
                try:
                    index, result, error = results.get(timeout=0.25)
                except queue.Empty:
                    crashed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                    if crashed:
                        raise RuntimeError(f"a generator process exited with status {crashed[0]}") from None
                else:
                    if isinstance(error, BrokenBarrierError):
                        continue  # another process failed first; its own error follows
                    if error is not None:
                        raise error
                    outputs[index] = result
                elapsed = time.perf_counter() - began
                done = sum(answered) if cfg.requests is not None else min(elapsed, cfg.duration_s)
                bar.update(done, f"answered {sum(answered)} in {len(parts)} processes")
    finally:
        start.abort()  # frees any process still waiting for one that failed
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    zero = min(r.started_at for r in outputs.values())
    samples = []
    for result in outputs.values():
        shift = result.started_at - zero
        samples += [
            replace(s, scheduled_s=s.scheduled_s + shift, sent_s=s.sent_s + shift, done_s=s.done_s + shift)
            for s in result.samples
        ]
    samples.sort(key=lambda s: s.scheduled_s)
    wall_s = max(r.started_at - zero + r.wall_s for r in outputs.values())
    issue_s = max(r.started_at - zero + r.issue_s for r in outputs.values())
    return LoadResult(cfg, samples, wall_s, issue_s, zero)


class _ProgressBar:
    """A live rich progress bar over requests (count-bounded runs) or seconds."""

    def __init__(self, cfg: LoadConfig):
        self.cfg = cfg
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            disable=not cfg.progress,
        )

    def update(self, done: float, stats: str) -> None:
        self.bar.update(self.task, completed=done, stats=stats)

    async def follow(self, progress: Callable[[], tuple[float, str]]) -> None:
        """Refresh from `progress()` four times a second until cancelled."""
        while True:
            self.update(*progress())
            await asyncio.sleep(0.25)

    def __enter__(self) -> _ProgressBar:
        cfg = self.cfg
        total = cfg.requests if cfg.requests is not None else cfg.duration_s
        label = f"{cfg.mode} loop " + (f"c={cfg.concurrency}" if cfg.mode == "closed" else f"{cfg.rate:g}/s")
        self.bar.start()
        self.task = self.bar.add_task(label, total=total, stats="")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.stop()


# ----------------------------------------------------------------------------------------- report


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(max(values), 3),
    }


def summarize(result: LoadResult) -> dict[str, Any]:
    """report.json: counts by status, throughput and tokens/s of 200s over the run's wall time,
    client latency of 200s, the server's own timing, batch sizes and mismatches."""
    cfg, samples = result.config, result.samples
    ok = [s for s in samples if s.status == "200"]
    timing = {
        part: [float(s.meta["timing_ms"][part]) for s in ok if part in s.meta.get("timing_ms", {})]
        for part in ("queue", "compute", "total")
    }
    batches = Counter(int(s.meta["batch"]["requests"]) for s in ok if "batch" in s.meta)
    checked = [s for s in samples if s.mismatch is not None]
    return {
        "url": cfg.url,
        "mode": cfg.mode,
        "concurrency": cfg.concurrency,
        "rate": cfg.rate,
        "duration_s": cfg.duration_s,
        "requests": cfg.requests,
        "scenario": [shape.model_dump(mode="json") for shape in cfg.scenario.requests],
        "sent": len(samples),
        "answered": sum(s.status != NO_ANSWER for s in samples),
        "by_status": dict(sorted(Counter(s.status for s in samples).items())),
        "wall_s": round(result.wall_s, 3),
        "offered_rps": round(len(samples) / result.issue_s, 3) if result.issue_s > 0 else None,
        "throughput_rps": round(len(ok) / result.wall_s, 3),
        "tokens_per_s": round(sum(s.tokens for s in ok) / result.wall_s, 1),
        "latency_ms": percentiles([s.latency_s * 1000 for s in ok]),
        "send_lag_ms": percentiles([(s.sent_s - s.scheduled_s) * 1000 for s in samples]),
        "server_ms": {part: percentiles(values) for part, values in timing.items()},
        "batch_sizes": {str(size): n for size, n in sorted(batches.items())},
        "checked": len(checked),
        "mismatches": sum(bool(s.mismatch) for s in checked),
        "by_kind": {
            kind: {"sent": n, "ok": sum(s.status == "200" for s in samples if s.kind == kind)}
            for kind, n in sorted(Counter(s.kind for s in samples).items())
        },
        "errors": dict(Counter(f"{s.status}: {s.error}"[:200] for s in samples if s.status != "200").most_common(5)),
    }


def markdown(report: dict[str, Any]) -> str:
    """report.md: the same figures as report.json, as tables for people."""
    load = (
        f"concurrency {report['concurrency']}" if report["mode"] == "closed" else f"rate {report['rate']}/s (Poisson)"
    )
    bound = " and ".join(
        b
        for b in (
            f"{report['duration_s']} s" if report["duration_s"] else "",
            f"{report['requests']} requests" if report["requests"] else "",
        )
        if b
    )
    lines = [
        "# Load test report",
        "",
        f"`{report['url']}`, {report['mode']} loop, {load}, bounded by {bound}; wall time {report['wall_s']} s.",
        "",
        "| sent | answered | offered req/s | throughput req/s (200s) | tokens/s | checked | mismatches |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        (
            f"| {report['sent']} | {report['answered']} | {report['offered_rps']} | {report['throughput_rps']} | "
            f"{report['tokens_per_s']} | {report['checked']} | {report['mismatches']} |"
        ),
        "",
        "By status: " + ", ".join(f"`{k}` {v}" for k, v in report["by_status"].items()),
        "",
        "| ms | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("client latency (200s)", report["latency_ms"]),
        ("send lag (generator behind schedule)", report["send_lag_ms"]),
    ]
    rows += [(f"server {k}", v) for k, v in report["server_ms"].items()]
    lines += [f"| {name} | {p['p50']} | {p['p90']} | {p['p99']} | {p['max']} |" for name, p in rows]
    lines += ["", "Batch sizes (requests per engine call, as each request saw it): "]
    lines += [", ".join(f"{size}: {n}" for size, n in report["batch_sizes"].items()) or "none reported", ""]
    lines += ["| request kind | sent | 200 |", "|---|---:|---:|"]
    lines += [f"| {kind} | {c['sent']} | {c['ok']} |" for kind, c in report["by_kind"].items()]
    if report["errors"]:
        lines += ["", "Most frequent errors:", ""] + [f"- {n} × {e}" for e, n in report["errors"].items()]
    return "\n".join(lines) + "\n"


def plot(result: LoadResult, path: Path) -> None:
    """latency.png: the latency distribution of 200s, and per-second throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result.samples
    latencies = np.array([s.latency_s * 1000 for s in samples if s.status == "200"])
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 4.2))
    if latencies.size:
        bins = np.geomspace(max(latencies.min(), 1e-2), latencies.max() * 1.01 + 1e-2, 50)
        ax_lat.hist(latencies, bins=bins, color="tab:blue", alpha=0.8)
        ax_lat.set_xscale("log")
        for q, style in ((50, "-"), (90, "--"), (99, ":")):
            value = np.percentile(latencies, q)
            ax_lat.axvline(value, color="k", linestyle=style, label=f"p{q} {value:.1f} ms")
        ax_lat.legend()
    ax_lat.set(xlabel="latency (ms, log)", ylabel="requests", title="Latency of 200 answers")

    edges = np.append(np.arange(0.0, result.wall_s, 1.0), result.wall_s)
    widths, mids = np.diff(edges), (edges[:-1] + edges[1:]) / 2

    def per_second(times: list[float]) -> np.ndarray:
        return np.histogram(times, edges)[0] / widths

    ax_thr.plot(mids, per_second([s.scheduled_s for s in samples]), "k--", label="sent")
    ax_thr.plot(
        mids, per_second([s.done_s for s in samples if s.status == "200"]), color="tab:green", label="200 answers"
    )
    failed = per_second([s.done_s for s in samples if s.status != "200"])
    if failed.any():
        ax_thr.plot(mids, failed, color="tab:red", label="errors")
    ax_p50 = ax_thr.twinx()
    slot = np.digitize([s.done_s for s in samples if s.status == "200"], edges) - 1
    medians = [np.median(latencies[slot == b]) if (slot == b).any() else np.nan for b in range(len(mids))]
    ax_p50.plot(mids, medians, color="tab:blue", alpha=0.6, label="p50 latency")
    ax_p50.set_ylabel("p50 latency (ms)", color="tab:blue")
    ax_p50.set_ylim(bottom=0)
    ax_thr.set(xlabel="time (s)", ylabel="requests / s", title="Throughput and latency over time")
    ax_thr.set_ylim(bottom=0)
    ax_thr.legend(loc="lower left")
    fig.suptitle(
        f"{result.config.mode} loop: {result.config.concurrency or result.config.rate} "
        f"{'in flight' if result.config.mode == 'closed' else 'req/s offered'}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: LoadResult, out: str | Path) -> dict[str, Any]:
    """Write report.json, report.md and latency.png into `out`; return the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = summarize(result)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot(result, out / "latency.png")
    return report


# ------------------------------------------------------------------------------- a local service


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_service(ready_timeout_s: float = 60.0, **settings: Any) -> Iterator[str]:
    """Run `python -m service` on a free loopback port with the given settings (as ATTN_*
    variables, e.g. max_batch_size=1) until the block ends; yield its URL once /readyz is 200."""
    port = free_port()
    env = {**os.environ, "ATTN_HOST": "127.0.0.1", "ATTN_PORT": str(port)}
    env.update({f"ATTN_{name.upper()}": str(value) for name, value in settings.items()})
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with AttentionClient(url) as client:
                deadline = time.monotonic() + ready_timeout_s
                while not client.ready():
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read().decode(errors="replace")[-2000:]
                        raise RuntimeError(f"the service at {url} did not get ready:\n{tail}")
                    time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -------------------------------------------------------------------------------------------- CLI


def problems(error: ValidationError) -> list[str]:
    """One line per problem of a scenario or a run: 'field: reason' (no field where a whole entry is wrong)."""
    return [": ".join(part for part in (error_field(e["loc"]), error_reason(e)) if part) for e in error.errors()
            if not echo_of_bad_members(e)]


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, Path]:
    parser = argparse.ArgumentParser(prog="python -m service.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="closed loop: requests always in flight")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--duration", type=float, help="seconds to issue requests for")
    parser.add_argument("--requests", type=int, help="requests to send in all")
    parser.add_argument(
        "--scenario", type=Path, help="YAML or JSON file with a `requests` list (default: a built-in mix)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md, latency.png")
    parser.add_argument(
        "--check-fraction", type=float, default=1.0, help="share of answers compared with the local engine"
    )
    parser.add_argument("--pool", type=int, default=4, help="distinct random inputs per scenario entry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--api-key", help="sent as Authorization: Bearer")
    parser.add_argument("--processes", type=int, default=1, help="generator processes sharing the load")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait for /readyz first")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = LoadConfig(
            url=args.url,
            concurrency=args.concurrency,
            rate=args.rate,
            duration_s=args.duration,
            requests=args.requests,
            scenario=Scenario.load(args.scenario) if args.scenario else DEFAULT_SCENARIO,
            check_fraction=args.check_fraction,
            pool=args.pool,
            seed=args.seed,
            timeout_s=args.timeout,
            max_connections=args.max_connections,
            api_key=args.api_key,
            progress=not args.no_progress,
            ready_timeout_s=args.ready_timeout,
            processes=args.processes,
        )
    except ValidationError as exc:
        parser.error("; ".join(problems(exc)))
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    return cfg, args.out


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when any checked answer mismatched the local engine, 2 when the service
    never got ready."""
    cfg, out = parse_args(argv)
    try:
        result = run(cfg)
    except TransportError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    report = write(result, out)
    print(
        f"sent {report['sent']}, answered {report['answered']}, by status {report['by_status']}, "
        f"{report['throughput_rps']} req/s, p50 {report['latency_ms']['p50']} ms, "
        f"p99 {report['latency_ms']['p99']} ms, mismatches {report['mismatches']}/{report['checked']} -> {out}"
    )
    return 1 if report["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
