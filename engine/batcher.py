"""Dynamic batching in front of `attention`: many concurrent callers, few engine calls.

Like Triton Inference Server's dynamic batcher: callers `submit` from asyncio; a collector task
takes the first waiting request, gathers more for up to `max_delay_ms` (not for a large
request: it fills the machine alone) or until `max_batch_size`, and hands them to one worker
thread (torch releases the GIL, so the event loop keeps accepting meanwhile). Requests are
compatible when they agree on everything but the batch dimension (dtype, heads, head dims,
lengths, pattern, causal, scale); each compatible group runs as one engine call with the
groups' inputs concatenated along B. Small causal requests (q of at most SMALL_CALL_ELEMENTS,
B included) of different lengths (within a power of two, with the same Lk - Lq) are right-padded
to the longest, which is exact (`BatchKey`); larger ones, and non-causal ones, run as separate
calls per length in the same round, with no padding work (a small request and a large one of the
same lengths too: small ones group by bucket, large ones by length). Packing along the sequence
(a block-diagonal layout) would need a segment mask the structured kernels do not take, and with
a dense mask instead every pair of segments is computed: on the CPU that costs more than padding
small requests.

If a batched call raises, it is split in halves and each half rerun, down to single requests, so
one bad request fails alone and the others are answered. Running out of memory is handled the
same way (a smaller call may fit); a request that does not fit even alone gets `OutOfMemory`.
A caller that stops waiting (its deadline, its client gone, its task cancelled) takes its request
out of the queue at once, and a request already collected whose caller left is not computed.
Each caller gets back exactly the rows it sent. On the CPU a `ThreadBudget` sizes each call's
thread team: every core for a large call with nothing waiting, one fewer otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch
import torch.nn.functional as F

from .attention import attention, backend_for, checked_arguments, checked_scale, effective_scale
from .kernels.device import kernel_device
from .memory import PeakMemory
from .patterns import PatternBase


log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue is full; the caller should retry later."""


class ShuttingDown(Exception):
    """The batcher no longer accepts requests."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its answer was ready."""


class ClientGone(Exception):
    """The caller went away before its request started; it was dropped."""


class OutOfMemory(Exception):
    """The engine ran out of memory on this request even when it ran alone."""


def _is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (GPU allocators), Python's MemoryError, or the CPU allocator's
    failure, which torch raises as a plain RuntimeError."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


# q's elements (B*H*Lq*D) up to which a causal request is small: its call costs about its fixed
# overhead, so it may be padded to run with requests of other lengths (`BatchKey.lengths`).
SMALL_CALL_ELEMENTS = 1 << 18
# q's elements from which a call is large: it fills the machine by itself, so it takes every core
# when alone (`ThreadBudget`) and does not wait for others to batch with (that would only delay it).
LARGE_CALL_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class BatchKey:
    """Everything requests must share to run in one engine call.

    `lengths` is (Lq, Lk), or for a small causal request ("padded", the power-of-two bucket of Lq,
    Lk - Lq): such requests are right-padded to the longest in their call. That is exact: a real
    query keeps its position (Lk - Lq is shared), and every padded key lies after it, where causal
    attention never looks; padded query rows are dropped. In a bucket the longest is under twice
    the shortest, so padding at most quadruples a dense call's work (doubles a sparse one's), in
    calls that cost about their fixed overhead anyway, against one call per distinct length.
    """

    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    lengths: tuple
    pattern: PatternBase
    causal: bool
    scale: float

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: PatternBase, causal: bool,
           scale: float) -> "BatchKey":
        lq, lk = q.shape[2], k.shape[2]
        paddable = causal and q.numel() <= SMALL_CALL_ELEMENTS
        lengths = ("padded", (lq - 1).bit_length(), lk - lq) if paddable else (lq, lk)
        return cls(q.dtype, q.shape[1], k.shape[1], q.shape[3], v.shape[3], lengths, pattern, causal, scale)


@dataclass(frozen=True)
class Result:
    """One request's answer: its own rows of the output and lse, and how the call went (its
    kernels are those of the call's shape, which padding may have lengthened)."""

    output: torch.Tensor
    lse: torch.Tensor
    queue_ms: float
    compute_ms: float
    batch_requests: int
    peak_bytes: int
    backend: str


@dataclass(eq=False)
class _Job:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key: BatchKey
    deadline: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


Compute = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ThreadBudget:
    """How many torch threads an engine call gets on the CPU. A large call with nothing queued
    behind it takes every core: the event loop has nothing to parse meanwhile, and the call's
    latency is what its client waits for. Any other call leaves `reserved` cores to the event
    loop, which is reading, parsing and encoding the requests around it."""

    cores: int
    reserved: int = 1

    @property
    def shared(self) -> int:
        """Threads while the event loop may be busy."""
        return max(1, self.cores - self.reserved)

    def for_call(self, elements: int, queue_empty: bool) -> int:
        return self.cores if queue_empty and elements >= LARGE_CALL_ELEMENTS else self.shared


class Batcher:
    """`async with Batcher(device) as b: result = await b.submit(q, k, v, pattern, ...)`."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        max_batch_size: int = 32,
        max_delay_ms: float = 2.0,
        queue_size: int = 256,
        compute: Compute = attention,
        on_batch: Callable[[int], None] | None = None,
        threads: ThreadBudget | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000
        self.queue_size = queue_size
        # Waiting for the engine, oldest first. A caller that stops waiting (deadline, client gone,
        # cancelled) takes its job out at once, so it neither holds a queue slot nor gets computed.
        self._queued: dict[_Job, None] = {}
        self._arrived = asyncio.Event()  # set when a job is queued or the batcher starts closing
        self._compute = compute
        self._on_batch = on_batch
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._collector: asyncio.Task | None = None
        self._closing = False
        self._waiting: set[_Job] = set()  # submitted and not yet answered

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the engine (not counting the batch running now)."""
        return len(self._queued)

    async def __aenter__(self) -> "Batcher":
        self._collector = asyncio.create_task(self._collect_forever(), name="batcher")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def abandon(self, reason: str) -> None:
        """Answer every request still waiting, queued or running, with ShuttingDown(reason) now: for
        a shutdown whose time is up, so that each gets an answer rather than being cut off."""
        self._closing = True
        for job in self._waiting:
            if not job.future.done():
                job.future.set_exception(ShuttingDown(reason))

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, then stop the worker. The collector is
        shielded: a close that is itself cancelled still leaves the queued requests answered."""
        self._closing = True
        self._arrived.set()
        if self._collector is not None:
            await asyncio.shield(self._collector)
            self._collector = None
        self._executor.shutdown(wait=True)

    async def submit(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: PatternBase | dict | None,
        *,
        causal: bool = True,
        scale: float | None = None,
        timeout_s: float = 30.0,
        client_gone: Callable[[], Awaitable[object]] | None = None,
    ) -> Result:
        """Queue one request of [B, H, L, D] tensors ([H, L, D] means B = 1) and wait for its answer.

        `client_gone()` is awaited alongside: when it returns first, the request is dropped.
        Raises the engine's ValueError or TypeError at once for arguments it refuses (checked here:
        stacked with others, a request of mismatched shapes could pass unnoticed), then QueueFull,
        ShuttingDown (also when `abandon`ed), DeadlineExceeded, ClientGone, OutOfMemory, or the engine's own error.
        """
        if self._closing or self._collector is None:
            raise ShuttingDown("the engine is shutting down")
        q, k, v, pattern = checked_arguments(q, k, v, pattern, causal=causal)
        key = BatchKey.of(q, k, v, pattern, causal, checked_scale(effective_scale(scale, q.shape[-1])))
        loop = asyncio.get_running_loop()
        if len(self._queued) >= self.queue_size:
            raise QueueFull(f"{self.queue_size} requests already waiting")
        job = _Job(q, k, v, key, loop.time() + timeout_s, loop.create_future())
        watch = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        self._queued[job] = None
        self._arrived.set()
        self._waiting.add(job)
        try:
            await asyncio.wait([job.future] + ([watch] if watch else []), timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller's task is gone (e.g. the server cancels it on shutdown):
            job.future.cancel()  # its job is dropped, not run for nobody
            raise
        finally:
            self._queued.pop(job, None)
            self._waiting.discard(job)
            if watch is not None:
                watch.cancel()
        if job.future.done():
            return job.future.result()
        job.future.cancel()  # not run if not started; if running, its answer is dropped
        if watch is not None and watch.done() and not watch.cancelled():
            raise ClientGone("the client disconnected before its answer was ready")
        raise DeadlineExceeded(f"the deadline passed: no answer within {timeout_s * 1000:.0f} ms")

    async def _collect_forever(self) -> None:
        """Round after round until closed with nothing queued: take the oldest job, gather more for
        up to `max_delay_s`, run them."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queued:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            jobs = [self._take()]
            closes_at = loop.time() + (self.max_delay_s if jobs[0].q.numel() < LARGE_CALL_ELEMENTS else 0.0)
            while len(jobs) < self.max_batch_size:
                if not self._queued:
                    wait = closes_at - loop.time()
                    if wait <= 0 or self._closing:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), wait)
                    except TimeoutError:
                        break
                else:
                    jobs.append(self._take())
            try:
                groups: dict[BatchKey, list[_Job]] = {}
                for job in jobs:
                    if self._still_wanted(job, loop.time()):
                        groups.setdefault(job.key, []).append(job)
                if groups:
                    await loop.run_in_executor(self._executor, self._run_groups, loop, list(groups.values()))
            except Exception as error:  # a fault outside the engine calls: this round's callers get it, and
                log.exception("batcher round failed")  # the collector goes on (dead, it left every later request
                for job in jobs:  # waiting out its deadline)
                    _settle(job.future, error)

    def _take(self) -> _Job:
        """The oldest queued job, out of the queue."""
        job = next(iter(self._queued))
        del self._queued[job]
        return job

    def _still_wanted(self, job: _Job, now: float) -> bool:
        """False (and the caller answered) if the caller stopped waiting or the deadline passed."""
        if job.future.done():  # the caller gave up: its deadline, its client left, or it was cancelled
            return False
        if now >= job.deadline:
            job.future.set_exception(DeadlineExceeded("the deadline passed while queued"))
            return False
        return True

    def _run_groups(self, loop: asyncio.AbstractEventLoop, groups: list[list[_Job]]) -> None:
        """Worker thread: each group as one engine call (split on failure), then its callers answered."""
        for jobs in groups:
            for job, answer in self._answers(jobs):
                loop.call_soon_threadsafe(_settle, job.future, answer)

    def _answers(self, jobs: list[_Job]) -> list[tuple[_Job, Result | Exception]]:
        """Each job's result or error: a failed call is split in halves and each rerun, so a
        fault stays with the request that causes it and the rest are answered. Jobs whose callers
        stopped waiting meanwhile (an earlier group's call ran long) are left out."""
        jobs = [job for job in jobs if not job.future.done()]  # read off the loop: a hint, which suffices
        if not jobs:
            return []
        try:
            return list(zip(jobs, self._run(jobs)))
        except Exception as error:
            out_of_memory = _is_out_of_memory(error)
            if len(jobs) == 1:
                if out_of_memory:
                    error = OutOfMemory(f"the engine ran out of memory on this request alone ({type(error).__name__})")
                return [(jobs[0], error)]
        # The halves run outside the except block: its traceback holds the failed call's frames,
        # and with them the batch's inputs and intermediates.
        if out_of_memory and self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the halves the memory the failed call cached
        half = len(jobs) // 2
        return self._answers(jobs[:half]) + self._answers(jobs[half:])

    def _run(self, jobs: list[_Job]) -> list[Result]:
        """One engine call over the jobs' inputs stacked along B (right-padded to the longest when
        their lengths differ, see `BatchKey`); each job's rows split back out."""
        started = time.perf_counter()
        key = jobs[0].key
        if self._on_batch is not None:
            self._on_batch(len(jobs))
        lq, lk = max(j.q.shape[2] for j in jobs), max(j.k.shape[2] for j in jobs)
        q, k, v = (torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*(
            (_right_padded(j.q, lq), _right_padded(j.k, lk), _right_padded(j.v, lk)) for j in jobs)))
        if self._threads is not None:
            # Read from this thread, the queue's length is a hint, which is all this needs.
            wanted = self._threads.for_call(q.numel(), not self._queued)
            if torch.get_num_threads() != wanted:  # this worker thread's own setting
                torch.set_num_threads(wanted)
        q, k, v = (t.to(self.device, non_blocking=True) for t in (q, k, v))
        with PeakMemory(self.device) as memory:
            out, lse = self._compute(q, k, v, key.pattern, causal=key.causal, scale=key.scale, return_lse=True)
        out, lse = out.cpu(), lse.cpu()
        compute_ms = (time.perf_counter() - started) * 1000
        sizes = [j.q.shape[0] for j in jobs]
        backend = backend_for(key.pattern, q.shape[1], lq, lk, key.causal, kernel_device(q.device))
        return [
            Result(o[:, :, : j.q.shape[2]], l[:, :, : j.q.shape[2]], (started - j.enqueued) * 1000, compute_ms,
                   len(jobs), memory.peak_bytes, backend)
            for j, o, l in zip(jobs, out.split(sizes), lse.split(sizes))
        ]


def _right_padded(x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, L, D] with zero rows appended up to `length` along L."""
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


def _settle(future: asyncio.Future, answer: Result | Exception) -> None:
    """Answer a caller on the event loop, unless it already stopped waiting."""
    if future.done():
        return
    if isinstance(answer, Exception):
        future.set_exception(answer)
    else:
        future.set_result(answer)
