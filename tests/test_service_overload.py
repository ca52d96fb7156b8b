"""Overload: open-loop arrivals at several times the measured capacity, for two seconds, against
a real `python -m service`. Every request gets an answer (200, 429, 503 or 504), none is lost or
hangs, every 200 is correct and within its deadline, the queue and the process's memory stay
bounded, and latency comes back to normal once the load stops."""

from __future__ import annotations

import asyncio
import re

import httpx

from service.loadtest import LoadConfig, RequestShape, Scenario, run_async, summarize
from service_support import service_process

QUEUE_SIZE = 16
DEADLINE_MS = 1000
OVERLOAD = 4  # times the measured capacity
BURST_S = 2.0
# Requests of small payloads whose attention costs some time (a union of two fixed members runs on
# the masked kernel: 7.6 ms here at 1536 rows), so that the generator, on the same cores, keeps up
# with several times the service's capacity. At 768 rows (2.3 ms) the capacity was 160-230 req/s and
# a slow run's generator sent only 1.97 times it (313 req/s); at 1536 it is ~90 and sends ~4 times.
SCENARIO = Scenario(requests=[RequestShape(heads=2, q_len=1536, head_dim=2,
                                           pattern={"type": "union", "patterns": [
                                               {"type": "fixed", "block": 64, "summary": 4},
                                               {"type": "fixed", "block": 48, "summary": 3}]})])


def _config(url: str, **load) -> LoadConfig:
    # A client timeout: a request that hung would show up as an unanswered one.
    return LoadConfig(url=url, scenario=SCENARIO, pool=4, timeout_s=15, progress=False, **load)


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in KiB."""
    status = open(f"/proc/{pid}/status").read()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) for key in ("VmRSS", "VmHWM")}


async def _queue_depths(url: str, stop: asyncio.Event) -> list[float]:
    """The service's queue depth gauge, sampled every 50 ms until `stop`."""
    depths = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while not stop.is_set():
            text = (await c.get("/metrics")).text
            depths.append(float(re.search(r"^attention_queue_depth (\S+)$", text, re.M).group(1)))
            await asyncio.sleep(0.05)
    return depths


def test_open_loop_overload_answers_everything_within_bounds_and_recovers():
    settings = dict(queue_size=QUEUE_SIZE, request_timeout_ms=DEADLINE_MS, max_batch_size=8)
    with service_process(**settings) as (url, proc):
        capacity = summarize(asyncio.run(run_async(_config(url, concurrency=4, duration_s=1.5))))
        before = summarize(asyncio.run(run_async(_config(url, concurrency=1, duration_s=1.0))))
        memory_before = _memory_kib(proc.pid)
        rate = OVERLOAD * capacity["throughput_rps"]

        async def burst():
            stop = asyncio.Event()
            sampler = asyncio.create_task(_queue_depths(url, stop))
            result = await run_async(_config(url, rate=rate, duration_s=BURST_S, max_connections=256))
            stop.set()
            return result, await sampler

        result, depths = asyncio.run(burst())
        memory_after = _memory_kib(proc.pid)
        overload = summarize(result)
        after = summarize(asyncio.run(run_async(_config(url, concurrency=1, duration_s=1.0))))

    statuses = overload["by_status"]
    sent_at = [s.sent_s for s in result.samples]
    sent_rps = len(sent_at) / (max(sent_at) - min(sent_at))  # arrivals as they actually left the generator
    print(f"capacity {capacity['throughput_rps']} req/s; offered {overload['offered_rps']} req/s for {BURST_S:g} s, "
          f"sent at {sent_rps:.0f} req/s: "
          f"sent {overload['sent']}, answered {overload['answered']}, by status {statuses}, "
          f"max queue depth {max(depths)}, peak RSS +{(memory_after['VmHWM'] - memory_before['VmRSS']) // 1024} MiB, "
          f"p50 before {before['latency_ms']['p50']} ms, after {after['latency_ms']['p50']} ms, wall {overload['wall_s']} s")
    # The load that reached the service was several times what it can do (the generator kept up).
    assert sent_rps >= 2 * capacity["throughput_rps"]
    # Every request got an answer, each one of the contract's statuses for load; none lost or hung.
    assert overload["sent"] == overload["answered"] == sum(statuses.values()) > 0
    assert set(statuses) <= {"200", "429", "503", "504"} and "200" in statuses
    assert statuses.keys() & {"429", "504"}  # the excess was refused, not queued without bound
    # Every accepted request was answered correctly and within the deadline.
    assert overload["mismatches"] == 0 and overload["checked"] == statuses["200"]
    ok = [s for s in result.samples if s.status == "200"]
    assert max(s.meta["timing_ms"]["total"] for s in ok) <= DEADLINE_MS
    # Bounded: the queue never held more than its size, and the process's peak memory grew by far
    # less than holding every request sent would take (each body is ~0.2 MB of b64 and its tensors).
    assert max(depths) <= QUEUE_SIZE
    grown_mib = (memory_after["VmHWM"] - memory_before["VmRSS"]) / 1024
    assert grown_mib < 256
    # Once the load stopped, latency came back to normal (generous: this machine is shared).
    assert after["by_status"] == {"200": after["sent"]}
    assert after["latency_ms"]["p50"] <= 3 * before["latency_ms"]["p50"] + 20
