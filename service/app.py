"""The HTTP service (CONTRACT §2-§4): `service.app:app`, or `create_app(settings)` for a custom one.

Thin on purpose: pydantic validates, `engine.batcher.Batcher` batches and computes, and the
routes only translate between the two and add the contract's metadata.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, AsyncIterator

import orjson
import torch
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from engine.batcher import Batcher, Compute, DeadlineExceeded, Result
from engine.planner import warm_up_calls
from engine.patterns import PATTERN_CATALOG, parse_pattern
from engine.picture import mask_png

from . import binary, errors
from .errors import ApiError
from .metrics import Metrics
from .middleware import JsonCors, RequestContext, RequestLimits
from .schemas import (
    JSON_NUMBER_BYTES, AttentionRequest, AttentionResponse, BatchInfo, ErrorResponse, Limits, Memory, Meta, Timing, TensorOut,
)
from .settings import Settings
from .wire import tensor_bytes

log = logging.getLogger("service")

DESCRIPTION = """Exact dense and sparse causal attention (Sparse Transformer patterns) over HTTP.

See a pattern's mask: [/patterns/preview](/patterns/preview?pattern=%7B%22type%22%3A%22union%22%2C%22patterns%22%3A%5B%7B%22type%22%3A%22sliding_window%22%2C%22window%22%3A8%7D%2C%7B%22type%22%3A%22strided%22%2C%22stride%22%3A8%7D%5D%7D&n=64)
(the paper's sliding window + strided), and every pattern type at [/patterns](/patterns).
Errors are `{"error": {"status", "field", "message", "errors"}}`.
"""
PREVIEW_MAX_N = 512
# Bodies up to this size are parsed, and answers built, on the event loop (well under a millisecond),
# larger ones in a thread.
INLINE_BYTES = 256 * 1024
# Characters of the pattern: percent-encoded (up to 12 bytes a character) it still fits the
# default request-line and header limit (ATTN_MAX_HEADER_BYTES, 16 KiB).
PREVIEW_MAX_PATTERN = 1024
PREVIEW_MAX_HEADS = 64
_ERRORS = {status: {"model": ErrorResponse} for status in (401, 408, 413, 415, 422, 429, 431, 503, 504)}
_REQUEST_ID_HEADER = {"description": "the client's X-Request-ID when it sent one (up to 1024 characters of visible "
                                     "ASCII with inner spaces), otherwise a new one", "schema": {"type": "string"}}
_RETRY_AFTER_HEADER = {"description": "seconds to wait before retrying (ATTN_RETRY_AFTER_S)",
                       "schema": {"type": "string"}}


class Service:
    """What the routes share: settings, the batcher (while running), readiness, metrics."""

    def __init__(self, settings: Settings, compute: Compute | None) -> None:
        self.settings = settings
        self.device = settings.torch_device
        self.limits = Limits(settings.max_tokens_per_request, settings.max_tensor_elements, settings.max_heads,
                             settings.pairs_limit)
        self.compute = compute
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.metrics = Metrics(lambda: self.batcher.queue_depth if self.batcher else 0)
        self.retry_after = {"Retry-After": str(settings.retry_after_s)}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Lifespan: start the batcher, warm the engine in the background, drain on exit."""
        s = self.settings
        torch.set_num_threads(s.thread_budget.shared)  # the event loop's own torch calls
        extra = {"compute": self.compute} if self.compute is not None else {}
        async with Batcher(
            self.device, max_batch_size=s.max_batch_size, max_delay_ms=s.max_batch_delay_ms,
            queue_size=s.queue_size, on_batch=self._observe_batch, threads=s.thread_budget, **extra,
        ) as batcher:
            self.batcher = batcher
            warm = asyncio.create_task(self._warm_up(batcher))
            try:
                yield
            finally:
                self.ready = False
                warm.cancel()
        self.batcher = None

    async def _warm_up(self, batcher: Batcher) -> None:
        """The engine's warm-up calls (`warm_up_calls`) through the worker thread, then ready."""
        started = time.perf_counter()
        try:
            for q, pattern, causal in warm_up_calls(self.device):
                await batcher.submit(q, q, q, pattern, causal=causal, timeout_s=600)
        except Exception:
            log.exception("the engine failed to warm up on %s; /readyz stays 503", self.device)
            return
        self.ready = True
        log.info("engine warm on %s in %.0f ms", self.device, (time.perf_counter() - started) * 1000)

    def _observe_batch(self, requests: int) -> None:
        """An engine call's size in the metrics, once ready: the warm-up's calls are not client requests."""
        if self.ready:
            self.metrics.batch_size.observe(requests)

    def require_ready(self) -> None:
        if self.draining:
            raise ApiError(503, None, "the service is shutting down", self.retry_after)
        if not self.ready or self.batcher is None:
            raise ApiError(503, None, "the engine is not ready (warming up or shutting down)", self.retry_after)

    def drain(self) -> None:
        """Shutting down: new requests get 503 from now on; those already accepted run to the end."""
        self.draining = True

    def abandon(self) -> None:
        """The shutdown's time is up: every request still waiting for the engine gets 503 now."""
        if self.batcher is not None:
            self.batcher.abandon("the service shut down before this request could finish (ATTN_SHUTDOWN_TIMEOUT_S)")


_bearer = HTTPBearer(auto_error=False, description="required when ATTN_API_KEYS is set")


async def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless no keys are configured or the Bearer key matches one (constant-time).
    Async so that FastAPI does not hop to its thread pool for it on every request."""
    keys = request.app.state.service.settings.api_keys
    if not keys:
        return
    given = credentials.credentials.encode() if credentials else b""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.get_secret_value().encode())
    if not matched:
        raise ApiError(401, "Authorization", "Authorization: a valid 'Bearer <key>' header is required",
                       {"WWW-Authenticate": "Bearer"})


def _disconnect(request: Request):
    """Returns once the client has gone (the body is read, so the next message is the disconnect)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def _is_binary(request: Request) -> bool:
    """Whether the body is binary (`service.binary`) rather than JSON; 415 unless it is one of the
    two (an undeclared body is JSON, as FastAPI's JSON bodies allow)."""
    declared = request.headers.get("content-type")
    if declared is None:
        return False
    media_type = declared.partition(";")[0].strip().lower()
    if media_type == binary.MEDIA_TYPE:
        return True
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "Content-Type", f"Content-Type: {declared!r}; the body must be application/json "
                                            f"(or {binary.MEDIA_TYPE} with binary tensors)")
    return False


async def _read_request(request: Request) -> tuple[bytes, memoryview | None]:
    """(the JSON, the binary tensors' bytes or None). A binary body is read into a bytearray, so
    that its tensors are used in place, writable, without a copy."""
    if not _is_binary(request):
        return await request.body(), None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    try:
        header, tensors = binary.split(body, request.headers.get(binary.HEADER))
    except binary.BinaryBodyError as e:
        raise ApiError(422, e.field, str(e)) from None
    return bytes(header), tensors


def deadline_passed(what: str) -> ApiError:
    """The 504, naming `timeout_ms`: the request's deadline, ATTN_REQUEST_TIMEOUT_MS when it gives none."""
    return ApiError(504, "timeout_ms", f"timeout_ms: the deadline passed: {what}")


def _answer(req: AttentionRequest, result: Result, pairs: int, *, request_id: str, device: str, arrived: float,
            timeout_ms: float) -> Response:
    """The 200: the result ([B, H, Lq, Dv] and [B, H, Lq] whatever the inputs' rank, CONTRACT §2) in
    the request's encoding, with the contract's metadata; a 504 instead if it is ready only after
    the request's deadline."""
    output, lse = result.output, result.lse
    encoding = req.response_encoding
    response = AttentionResponse(
        output=TensorOut.encode(output, encoding),
        lse=TensorOut.encode(lse, encoding) if req.return_lse else None,
        meta=Meta(
            request_id=request_id,
            device=device,
            backend=result.backend,
            pattern=req.pattern.describe(),
            batch=BatchInfo(requests=result.batch_requests),
            timing_ms=Timing(queue=result.queue_ms, compute=result.compute_ms,
                             total=(time.perf_counter() - arrived) * 1000),
            memory=Memory(peak_bytes=result.peak_bytes, dense_scores_bytes=req.dense_pairs * 4),
            attended_pairs=pairs,
            density=pairs / req.dense_pairs,
        ),
    )
    if response.meta.timing_ms.total > timeout_ms:  # a 200 always arrives within its deadline
        raise deadline_passed(f"the answer took {response.meta.timing_ms.total:.0f} ms of {timeout_ms:g} ms")
    # orjson: pydantic's serializer scans the multi-megabyte b64 strings ~25x slower.
    body = response.model_dump(exclude_none=True)  # a tensor shows only its encoding
    body.setdefault("lse", None)
    if encoding != "binary":
        return Response(orjson.dumps(body), media_type="application/json")
    tensors = [output, lse] if req.return_lse else [output]
    content, headers = binary.join(orjson.dumps(body), [tensor_bytes(t) for t in tensors])
    return Response(content, media_type=binary.MEDIA_TYPE, headers=headers)


def create_app(settings: Settings | None = None, *, compute: Compute | None = None) -> FastAPI:
    """The ASGI app; `compute` replaces the engine call (tests inject faults and delays with it)."""
    settings = settings or Settings()
    service = Service(settings, compute)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.running():
            yield

    app = FastAPI(title="attention-service", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    errors.install(app, service.retry_after)
    # The last added runs first: RequestContext sees every answer (CORS preflights too), and CORS
    # adds its headers to the limits' errors, so that a browser can read them.
    app.add_middleware(RequestLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       max_header_bytes=settings.max_header_bytes, retry_after=service.retry_after)
    if settings.cors_origins:  # closed by default: no CORS headers unless origins are configured
        app.add_middleware(
            JsonCors, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"], expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContext, metrics=service.metrics)

    binary_body = {"schema": {"type": "string", "format": "binary", "description": (
        f"the JSON request (its length in the {binary.HEADER} header) with tensors given as binary_data_size, "
        "followed by their raw little-endian bytes in the order q, k, v")}}

    @app.post(
        "/attention",
        response_model=AttentionResponse,
        responses={**_ERRORS, 200: {"content": {binary.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary",
                                                                                "description": "encoding 'binary'"}}}}},
        dependencies=[Depends(require_key)],
        openapi_extra={"requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AttentionRequest"}},
                        binary.MEDIA_TYPE: binary_body},
        }},
    )
    async def post_attention(request: Request) -> Response:
        """Attention over q, k, v with a pattern (CONTRACT §2). Batched with concurrent requests."""
        service.require_ready()
        header, binary_tensors = await _read_request(request)
        # Parsing, decoding, the metadata's pattern arithmetic and building a large answer run in
        # threads: a large body or answer or an intricate pattern must not stall the event loop that
        # serves every other client. A small body is parsed, a small answer built, in place: there
        # the thread hand-offs cost more than the work.
        parse = partial(AttentionRequest.model_validate_json, header, strict=True,  # "causal": "no" is no bool
                        context={"limits": service.limits, "binary": binary_tensors})
        size = len(header) + (len(binary_tensors) if binary_tensors is not None else 0)
        req = parse() if size <= INLINE_BYTES else await run_in_threadpool(parse)
        q, k, v = req.tensors
        timeout_ms = min(req.timeout_ms or settings.request_timeout_ms, settings.request_timeout_ms)
        arrived = request.state.arrived
        assert service.batcher is not None
        try:
            result, pairs = await asyncio.gather(  # the exact count, for `meta`, beside the engine call
                service.batcher.submit(
                    q, k, v, req.pattern, causal=req.causal, scale=req.scale,
                    timeout_s=timeout_ms / 1000 - (time.perf_counter() - arrived), client_gone=_disconnect(request),
                ),
                run_in_threadpool(req.attended_pairs),
            )
        except DeadlineExceeded:  # the batcher knows only the time that was left when it was handed the request
            raise deadline_passed(f"no answer within {timeout_ms:g} ms") from None
        service.metrics.queue_time.observe(result.queue_ms / 1000)
        service.metrics.tokens.inc(q.shape[0] * q.shape[2])
        answer = partial(_answer, req, result, pairs, request_id=request.state.request_id, device=str(service.device),
                         arrived=arrived, timeout_ms=timeout_ms)
        value_bytes = JSON_NUMBER_BYTES if req.response_encoding == "data" else result.output.element_size()
        return answer() if result.output.numel() * value_bytes <= INLINE_BYTES else await run_in_threadpool(answer)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict[str, str]:
        """200 once the engine is loaded and warm; 503 with Retry-After before, and when draining."""
        service.require_ready()
        return {"status": "ready", "device": str(service.device)}


    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/patterns")
    async def patterns() -> list[dict]:
        """Every pattern type with its parameters and rule (CONTRACT §1)."""
        return PATTERN_CATALOG

    preview_lock = threading.Lock()  # matplotlib's pyplot state is not thread-safe

    @app.get("/patterns/preview", response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 422: {"model": ErrorResponse}})
    async def preview(
        pattern: Annotated[str, Query(description="the pattern as JSON", max_length=PREVIEW_MAX_PATTERN)] = '{"type": "dense"}',
        n: Annotated[int, Query(ge=1, le=PREVIEW_MAX_N, description="sequence length drawn")] = 64,
        heads: Annotated[int, Query(ge=1, le=PREVIEW_MAX_HEADS, description="head count, for per_head")] = 1,
        causal: bool = True,
    ) -> Response:
        """A PNG of the pattern's mask, one panel per distinct head pattern (queries down, keys across)."""
        try:
            parsed = parse_pattern(pattern)
            parsed.check_heads(heads)
        except ValueError as e:
            raise ApiError(422, str(e).partition(": ")[0], str(e)) from None

        def draw() -> bytes:
            with preview_lock:
                return mask_png(parsed, n, causal=causal, heads=heads)

        return Response(await run_in_threadpool(draw), media_type="image/png")

    for route in list(app.routes):  # HEAD wherever GET is (RFC 9110; load balancers' probes), which FastAPI does not add
        if isinstance(route, APIRoute) and "GET" in route.methods:
            app.add_api_route(route.path, route.endpoint, methods=["HEAD"], response_class=route.response_class,
                              include_in_schema=False)

    def openapi() -> dict:
        """FastAPI's document plus the request model, which the route validates itself (with limits),
        and the headers every response carries (X-Request-ID; Retry-After on 429 and 503)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            request_schema = AttentionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_schema.pop("$defs"))
            components["AttentionRequest"] = request_schema
            for operation in (operation for path in schema["paths"].values() for operation in path.values()):
                for status, response in operation["responses"].items():
                    headers = response.setdefault("headers", {})
                    headers["X-Request-ID"] = _REQUEST_ID_HEADER
                    if status in ("429", "503"):
                        headers["Retry-After"] = _RETRY_AFTER_HEADER
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    service.metrics.paths = frozenset(route.path for route in app.routes)
    return app


app = create_app()
