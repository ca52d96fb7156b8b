"""The dynamic batcher: under concurrency every answer is its own, batches form, faults stay local."""

from __future__ import annotations

import asyncio
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from engine import attention, parse_pattern
from engine.batcher import (
    LARGE_CALL_ELEMENTS, Batcher, ClientGone, DeadlineExceeded, QueueFull, ShuttingDown, ThreadBudget,
)
from engine.kernels.dense import cpu_native_half
from pattern_strategies import for_heads
from reference import assert_matches_reference, reference_attention
from service.settings import usable_cores
from service_support import Gate, from_json, post_in_one_wave, qkv, request_body, serve, settings

SW = {"type": "sliding_window", "window": 4}
STRIDED = {"type": "strided", "stride": 3}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _mixed_requests(n: int):
    """n requests with distinct inputs; shapes and patterns vary so some batch and some cannot."""
    out = []
    for i in range(n):
        lq, lk = [(16, 16), (8, 16), (16, 16), (5, 9)][i % 4]
        pattern = [SW, STRIDED, SW, {"type": "dense"}][i % 4]
        q, k, v = qkv(b=1 + i % 2, h=4, hkv=2, lq=lq, lk=lk, d=8, dv=4, seed=100 + i)
        out.append((q, k, v, pattern))
    return out


@pytest.mark.anyio
async def test_many_concurrent_requests_each_get_their_own_answer_and_batches_form():
    gate = Gate()
    async with serve(settings(max_batch_size=16, max_batch_delay_ms=5), compute=gate) as c:
        requests = _mixed_requests(48)
        bodies = [request_body(q, k, v, pattern=p, return_lse=i % 3 == 0) for i, (q, k, v, p) in enumerate(requests)]
        responses = await post_in_one_wave(c, gate, bodies)
    sizes = []
    for (q, k, v, pattern), r in zip(requests, responses):
        assert r.status_code == 200, r.text
        got = r.json()
        out, lse = attention(q, k, v, pattern, return_lse=True)
        assert torch.allclose(from_json(got["output"]), out, atol=1e-5)
        if got["lse"] is not None:
            assert torch.allclose(from_json(got["lse"]), lse, atol=1e-5)
        sizes.append(got["meta"]["batch"]["requests"])
    # 47 queued requests in 3 compatible groups (24, 12 and 12): each ran in calls of at most 16.
    assert max(sizes) > 1 and sizes.count(1) == 1
    assert all(size <= 16 for size in sizes)


class _FailOn:
    """The engine, except that a call containing the marked value raises (a fault in one request)."""

    MARK = 1234.5

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, q, *args, **kwargs):
        self.calls.append(q.shape[0])
        if bool((q == self.MARK).any()):
            raise RuntimeError("injected engine fault")
        return attention(q, *args, **kwargs)


@pytest.mark.anyio
async def test_one_failing_request_fails_alone_and_the_rest_are_recomputed():
    faulty = _FailOn()
    gate = Gate(faulty)  # held while the wave queues up
    requests = [qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4, seed=200 + i) for i in range(6)]
    requests[3][0][0, 0, 0, 0] = _FailOn.MARK
    async with serve(settings(max_batch_size=8, max_batch_delay_ms=5), compute=gate) as c:
        faulty.calls.clear()
        responses = await post_in_one_wave(c, gate, [request_body(q, k, v) for q, k, v in requests])
    for i, ((q, k, v), r) in enumerate(zip(requests, responses)):
        if i == 3:
            assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"
        else:
            assert r.status_code == 200, r.text
            assert torch.allclose(from_json(r.json()["output"]), attention(q, k, v), atol=1e-6)
    # The first ran alone; the 5 queued behind it ran as one call, which failed, so it was split in
    # halves (2 + 3) and the failing half again, down to the faulty request alone. The reruns depend
    # on where the faulty one sat in the queue (positions 0-1, 2, or 3-4).
    assert faulty.calls[:2] == [1, 5]
    assert sorted(faulty.calls[2:]) in ([1, 1, 2, 3], [1, 2, 2, 3], [1, 1, 1, 2, 2, 3])


@pytest.mark.anyio
async def test_dropped_when_the_client_left_or_the_deadline_passed_before_starting():
    counted = _FailOn()  # counts the engine calls by batch size
    gate = Gate(counted)
    q, k, v = qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4)
    pattern = parse_pattern(None)
    client_left = asyncio.Event()

    async with Batcher("cpu", max_batch_size=4, max_delay_ms=0, queue_size=2, compute=gate) as batcher:
        gate.close()
        running = asyncio.create_task(batcher.submit(q, k, v, pattern))
        await gate.holding()
        left = asyncio.create_task(batcher.submit(q, k, v, pattern, client_gone=client_left.wait))
        late = asyncio.create_task(batcher.submit(q, k, v, pattern, timeout_s=0.02))
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        with pytest.raises(QueueFull):
            await batcher.submit(q, k, v, pattern)
        client_left.set()
        with pytest.raises(ClientGone):
            await left
        with pytest.raises(DeadlineExceeded):
            await late
        assert batcher.queue_depth == 0  # both left the queue at once, the call ahead still running:
        behind = [asyncio.create_task(batcher.submit(q, k, v, pattern)) for _ in range(2)]  # room for two
        await asyncio.sleep(0.01)
        gate.open()
        assert torch.equal((await running).output, attention(q, k, v))
        for answer in await asyncio.gather(*behind):
            assert torch.equal(answer.output, attention(q, k, v))
        gate.close()
        held = asyncio.create_task(batcher.submit(q, k, v, pattern))
        await gate.holding()
        cancelled = asyncio.create_task(batcher.submit(q, k, v, pattern))  # its caller's task cancelled, as
        await asyncio.sleep(0.01)  # a server shutting down cancels its handlers: dropped, not run for nobody
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert batcher.queue_depth == 0
        gate.open()
        await held
    assert counted.calls == [1, 2, 1]  # the held calls and the two behind: the three dropped never ran
    with pytest.raises(ShuttingDown):
        await batcher.submit(q, k, v, pattern)


@pytest.mark.anyio
async def test_a_group_whose_callers_all_left_is_not_computed():
    """Two groups collected in one round run one after the other: when every caller of the second
    leaves while the first runs, the second is not computed for nobody."""
    counted = _FailOn()
    gate = Gate(counted)
    q, k, v = qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4)
    other = qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4, seed=7)
    dense, banded = parse_pattern(None), parse_pattern(SW)
    client_left = asyncio.Event()
    async with Batcher("cpu", max_batch_size=4, max_delay_ms=50, compute=gate) as batcher:
        gate.close()
        first = asyncio.create_task(batcher.submit(q, k, v, dense))
        gone = [asyncio.create_task(batcher.submit(*other, banded, client_gone=client_left.wait)) for _ in range(2)]
        await gate.holding()  # both groups collected; the dense one runs, held
        client_left.set()
        for task in gone:
            with pytest.raises(ClientGone):
                await task
        gate.open()
        assert torch.equal((await first).output, attention(q, k, v))
    assert counted.calls == [1]


@pytest.mark.anyio
async def test_a_cancelled_close_still_answers_the_queued_requests():
    """A server's shutdown may cancel the task closing the batcher: the requests already queued are
    answered all the same, not left to wait out their deadlines."""
    gate = Gate()
    q, k, v = qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4)
    pattern = parse_pattern(None)
    batcher = await Batcher("cpu", max_delay_ms=0, compute=gate).__aenter__()
    gate.close()
    running = asyncio.create_task(batcher.submit(q, k, v, pattern, timeout_s=5))
    await gate.holding()
    queued = asyncio.create_task(batcher.submit(q, k, v, pattern, timeout_s=5))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.01)
    closing.cancel()
    gate.open()
    for answer in await asyncio.wait_for(asyncio.gather(running, queued), 2):
        assert torch.equal(answer.output, attention(q, k, v))
    with pytest.raises(asyncio.CancelledError):
        await closing
    await batcher.close()


# Patterns whose rows round alike padded to a longer request's length, and those with a stride
# whose rows past the last whole run of s keys take their own key apart (`strided._with_own_keys`):
# padding moves that run's end, so such a row may round otherwise batched with a longer request.
PADDED_ALIKE = [None, {"type": "sliding_window", "window": 2048}, {"type": "fixed", "block": 64, "summary": 8},
                {"type": "union", "patterns": [{"type": "sliding_window", "window": 2048},
                                               {"type": "strided", "stride": 64}]}]
OWN_KEYS_APART = [{"type": "strided", "stride": 3},
                  {"type": "union", "patterns": [{"type": "fixed", "block": 64, "summary": 8},
                                                 {"type": "strided", "stride": 3}]},
                  {"type": "per_head", "patterns": [{"type": "strided", "stride": 64},
                                                    {"type": "sliding_window", "window": 2048}]}]


async def _alone_and_batched(pattern, requests) -> None:
    """Three requests batched into one call on three threads (this thread has its own count): each
    answer is bit for bit the request's own computed alone here."""
    gate = Gate()
    async with Batcher("cpu", max_delay_ms=0, compute=gate, threads=ThreadBudget(cores=3, reserved=0)) as batcher:
        gate.close()
        ahead = asyncio.create_task(batcher.submit(*requests[0], pattern))
        await gate.holding()
        batched = [asyncio.create_task(batcher.submit(*r, pattern)) for r in requests]
        await asyncio.sleep(0.01)
        gate.open()
        await ahead
        answers = await asyncio.gather(*batched)
    assert [a.batch_requests for a in answers] == [3, 3, 3]
    for (q, k, v), answer in zip(requests, answers):
        out, lse = attention(q, k, v, pattern, return_lse=True)
        assert torch.equal(answer.output, out) and torch.equal(answer.lse, lse)


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PADDED_ALIKE + OWN_KEYS_APART)
@pytest.mark.parametrize("heads,rows,keys", [((4, 2), 3, 3000), ((6, 2), 40, 9000)])
async def test_a_request_rounds_alike_alone_and_batched_with_its_own_shape(pattern, dtype, heads, rows, keys):
    """Short runs of rows after thousands of keys (where the CPU kernel splits the keys into parts,
    and unions and strides merge partials), three of one shape stacked in one call: each answer is
    the request's own alone. Three query heads over one key/value head: dense folds them into rows."""
    h, hkv = heads
    await _alone_and_batched(pattern, [qkv(h=h, hkv=hkv, lq=rows, lk=keys + rows, d=32, dv=32, dtype=dtype, seed=i)
                                       for i in range(3)])


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PADDED_ALIKE)
@pytest.mark.parametrize("heads,lengths,keys", [((4, 2), (3, 4, 3), 3000), ((6, 2), (40, 50, 40), 9000)])
async def test_a_padded_request_rounds_alike_alone_and_batched(pattern, dtype, heads, lengths, keys):
    """As above, two of the three padded to the third's length (small causal requests): rows and as
    many keys appended. Dense's folded rows, 120 and 150, split their keys alike (parts of 4096)."""
    h, hkv = heads
    await _alone_and_batched(pattern, [qkv(h=h, hkv=hkv, lq=lq, lk=keys + lq, d=32, dv=32, dtype=dtype, seed=i)
                                       for i, lq in enumerate(lengths)])


@pytest.mark.anyio
async def test_arguments_the_engine_refuses_are_refused_at_submit():
    """Stacked with others, mismatched shapes or dtypes could pass: a v shorter than k was padded
    with attended zero rows, one longer cropped, a q batch of 2 beside k, v of 1 read another
    request's keys. Each is the engine's own error at once; a dict pattern is taken, as by the engine."""
    q, k, v = qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4)
    refused = {
        "v: heads and length [2, 6] must equal k's [2, 8]": (q, k, v[:, :, :6]),
        "k: batch 1 must equal q's batch 2": (torch.cat([q, q]), k, v),
        "k: dtype torch.float16 differs from q's torch.float32": (q, k.half(), v.half()),
    }
    async with Batcher("cpu", max_delay_ms=0) as batcher:
        for message, (qs, ks, vs) in refused.items():
            with pytest.raises(ValueError, match=re.escape(message)):
                await batcher.submit(qs, ks, vs, None)
        with pytest.raises(TypeError, match="^causal: expected a bool"):
            await batcher.submit(q, k, v, None, causal="false")
        answer = await batcher.submit(q[0], k[0], v[0], SW)  # [H, L, D]: B = 1
        assert torch.equal(answer.output, attention(q, k, v, SW))
    calls = []
    async with Batcher("cpu", max_delay_ms=0, compute=lambda *args, **kwargs: calls.append(args)) as batcher:
        for scale, message in ((float("nan"), "^scale: must be finite"), (1e39, r"^scale: \|scale\| must be at most")):
            with pytest.raises(ValueError, match=message):
                await batcher.submit(q, k, v, None, scale=scale)
    assert not calls  # refused before the queue: no engine call was made for them


@pytest.mark.anyio
async def test_a_fault_outside_the_engine_calls_fails_its_round_and_the_batcher_goes_on(monkeypatch):
    q, k, v = qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4)
    async with Batcher("cpu", max_delay_ms=0) as batcher:
        run_groups = batcher._run_groups
        monkeypatch.setattr(batcher, "_run_groups", lambda *args: (_ for _ in ()).throw(RuntimeError("injected")))
        with pytest.raises(RuntimeError, match="injected"):
            await batcher.submit(q, k, v, None, timeout_s=5)
        monkeypatch.setattr(batcher, "_run_groups", run_groups)
        assert torch.equal((await batcher.submit(q, k, v, None, timeout_s=5)).output, attention(q, k, v))


@pytest.mark.anyio
async def test_batching_off_runs_one_request_per_call():
    async with serve(settings(max_batch_size=1)) as c:
        requests = [qkv(h=2, hkv=2, lq=8, lk=8, d=4, dv=4, seed=300 + i) for i in range(8)]
        responses = await asyncio.gather(*(c.post("/attention", json=request_body(q, k, v)) for q, k, v in requests))
    assert [r.json()["meta"]["batch"]["requests"] for r in responses] == [1] * 8


def _record_threads(seen: list[int]):
    """The engine, recording the torch thread count each call ran with."""

    def compute(q, k, v, pattern, **kwargs):
        seen.append(torch.get_num_threads())
        return attention(q, k, v, pattern, **kwargs)

    return compute


@pytest.mark.anyio
async def test_a_large_call_alone_gets_every_core_and_does_not_wait_to_batch():
    seen: list[int] = []
    budget = ThreadBudget(cores=3, reserved=2)
    # A delay far longer than the test: a request that waited for company would show it.
    async with Batcher("cpu", max_delay_ms=60_000, threads=budget, compute=_record_threads(seen)) as batcher:
        large = torch.randn(1, 1, LARGE_CALL_ELEMENTS // 8, 8)
        result = await asyncio.wait_for(batcher.submit(large, large, large, parse_pattern(SW)), 30)
    assert seen == [3]
    assert result.queue_ms < 30_000


@pytest.mark.anyio
async def test_small_calls_leave_the_reserved_cores_to_the_event_loop():
    seen: list[int] = []
    async with Batcher("cpu", max_delay_ms=0, threads=ThreadBudget(cores=3, reserved=2),
                       compute=_record_threads(seen)) as batcher:
        q, k, v = qkv(b=1, h=2, hkv=2, lq=16, lk=16, d=8, dv=8, seed=1)
        await batcher.submit(q, k, v, parse_pattern(SW))
    assert seen == [1]


def test_thread_budget_from_settings():
    assert settings(torch_threads=3).thread_budget == ThreadBudget(3, reserved=0)
    auto = settings(torch_threads=0).thread_budget
    assert auto.cores == len(os.sched_getaffinity(0)) and auto.reserved == 1  # one core left to the event loop
    assert ThreadBudget(4).for_call(LARGE_CALL_ELEMENTS, queue_empty=False) == 3
    assert ThreadBudget(4).for_call(LARGE_CALL_ELEMENTS - 1, queue_empty=True) == 3
    assert ThreadBudget(1).shared == 1


PADDABLE_PATTERNS = [
    SW, STRIDED, {"type": "fixed", "block": 8, "summary": 2},
    {"type": "union", "patterns": [SW, {"type": "strided", "stride": 7}]},
    {"type": "per_head", "patterns": [SW, {"type": "dense"}]},
]


@pytest.mark.anyio
@pytest.mark.parametrize("pattern", PADDABLE_PATTERNS, ids=lambda p: p["type"])
async def test_small_causal_requests_of_different_lengths_run_padded_in_one_call(pattern):
    # Lq from 65 to 128 (one power-of-two bucket), Lk - Lq = 3 for all, GQA: one call, exact answers.
    lengths = [65, 128, 90, 77, 101, 66]
    requests = [qkv(b=1 + i % 2, h=4, hkv=2, lq=n, lk=n + 3, d=8, dv=4, seed=200 + i) for i, n in enumerate(lengths)]
    parsed = parse_pattern(pattern)
    async with Batcher("cpu", max_batch_size=16, max_delay_ms=500) as batcher:
        results = await asyncio.gather(*(batcher.submit(q, k, v, parsed) for q, k, v in requests))
    assert [r.batch_requests for r in results] == [len(lengths)] * len(lengths)
    for (q, k, v), result in zip(requests, results):
        ref_out, ref_lse = reference_attention(q, k, v, pattern)
        assert result.output.shape == (q.shape[0], 4, q.shape[2], 4)
        torch.testing.assert_close(result.output.double(), ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(result.lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@st.composite
def request_families(draw):
    """2 to 6 requests that may share one engine call: the same heads, head dims, dtype, pattern,
    causality, scale and Lk - Lq; causal ones of query lengths in one power-of-two bucket (padded
    to the longest), non-causal ones of one length; batch sizes 1 or 2."""
    hkv = draw(st.integers(1, 2))
    h = hkv * draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8, 16]))
    causal = draw(st.booleans())
    bucket = draw(st.integers(0, 7))  # query lengths in (2^(bucket - 1), 2^bucket]
    lengths = draw(st.lists(st.integers(2 ** (bucket - 1) + 1 if bucket else 1, 2**bucket), min_size=2, max_size=6))
    if not causal:
        lengths = [lengths[0]] * len(lengths)
    return dict(
        h=h, hkv=hkv, d=d, dv=draw(st.sampled_from([d, 8])), causal=causal, lengths=lengths,
        batches=draw(st.lists(st.integers(1, 2), min_size=len(lengths), max_size=len(lengths))),
        extra=draw(st.integers(0, 40)), pattern=draw(for_heads(h)),
        scale=draw(st.one_of(st.none(), st.floats(-2, 2))), dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2**30)),
    )


@pytest.mark.usefixtures("engine_passes")  # the padded calls on every kernel, CPU and CUDA
@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(request_families())
def test_random_request_families_run_in_one_call_and_each_gets_its_exact_answer(family):
    """Concurrent requests that may share a call do (padded where their lengths differ), and each
    gets the reference's answer for its own inputs: no row of one leaks into another's."""
    requests = [qkv(b=b, h=family["h"], hkv=family["hkv"], lq=lq, lk=lq + family["extra"], d=family["d"],
                    dv=family["dv"], dtype=family["dtype"], seed=family["seed"] + i)
                for i, (b, lq) in enumerate(zip(family["batches"], family["lengths"]))]
    pattern, causal, scale = family["pattern"], family["causal"], family["scale"]

    async def submit_all():
        # a full batch runs at once; the delay only covers a slow scheduler
        async with Batcher("cpu", max_batch_size=len(requests), max_delay_ms=500) as batcher:
            return await asyncio.gather(*(batcher.submit(q, k, v, parse_pattern(pattern), causal=causal, scale=scale)
                                          for q, k, v in requests))

    results = asyncio.run(submit_all())
    assert [r.batch_requests for r in results] == [len(requests)] * len(requests)
    tolerance = 3e-5 if family["dtype"] == torch.float32 else 2e-2  # bfloat16: the output's rounding
    # The lse stays float32-exact where half precision is computed in float32; torch's native bfloat16
    # CPU kernel (AMX) returns it within ~6e-5 (5.3e-5 to 6.9e-5 measured from 37 to 8192 keys).
    lse_tol = 1e-4 if cpu_native_half(family["dtype"]) else 3e-5
    for (q, k, v), result in zip(requests, results):
        ref_out, ref_lse = reference_attention(q, k, v, pattern, causal=causal, scale=scale)
        assert result.output.dtype == q.dtype and result.output.shape == (*q.shape[:3], v.shape[-1])
        assert_matches_reference(result.output, result.lse, ref_out, ref_lse, tol=tolerance, lse_tol=lse_tol)


@pytest.mark.anyio
async def test_requests_that_padding_would_change_run_alone():
    """Different lengths run as separate calls when padding would not be exact (not causal, or a
    different Lk - Lq), when their lengths are over a power of two apart, or when they are large."""
    sw = parse_pattern(SW)
    big = LARGE_CALL_ELEMENTS // (4 * 16)  # Lq of a request too large to pad (H = 4, D = 16)
    cases = [
        (dict(lq=20, lk=20), dict(lq=24, lk=24), {"causal": False}),
        (dict(lq=20, lk=20), dict(lq=24, lk=26), {}),
        (dict(lq=20, lk=20), dict(lq=40, lk=40), {}),
        (dict(lq=big, lk=big), dict(lq=big - 8, lk=big - 8), {}),
    ]
    async with Batcher("cpu", max_batch_size=16, max_delay_ms=200) as batcher:
        for first, second, options in cases:
            pair = [qkv(b=1, h=4, hkv=2, d=16, dv=16, seed=i, **shape) for i, shape in enumerate((first, second))]
            results = await asyncio.gather(*(batcher.submit(q, k, v, sw, **options) for q, k, v in pair))
            assert [r.batch_requests for r in results] == [1, 1], (first, second, options)
            for (q, k, v), r in zip(pair, results):
                torch.testing.assert_close(r.output, attention(q, k, v, sw, causal=options.get("causal", True)))


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no limit
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still gets one thread
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1, no limit
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ({}, None),  # no cgroup files at all
])
def test_usable_cores_honours_a_container_cpu_limit(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == (affinity if cpus is None else min(affinity, cpus))
    (tmp_path / "cpu.max").write_text(f"{(affinity + 1) * 100000} 100000\n")  # a limit above the affinity
    assert usable_cores(tmp_path) == affinity


@pytest.mark.anyio
async def test_the_backend_reported_is_that_of_the_padded_call():
    # Alone, Lk = 65 <= window 70 is dense ("sdpa"); padded to 100 with the other it runs on the band.
    window = parse_pattern({"type": "sliding_window", "window": 70})
    pair = [qkv(b=1, h=2, hkv=2, lq=n, lk=n, d=8, dv=8, seed=n) for n in (65, 100)]
    async with Batcher("cpu", max_batch_size=4, max_delay_ms=500) as batcher:
        results = await asyncio.gather(*(batcher.submit(q, k, v, window) for q, k, v in pair))
    assert [r.batch_requests for r in results] == [2, 2]
    assert [r.backend for r in results] == ["band", "band"]
    for (q, k, v), r in zip(pair, results):
        torch.testing.assert_close(r.output, attention(q, k, v, window))
