"""Small ASGI middlewares: request identity and timing, the limits on a request's headers and body, and
CORS answering in the service's error body."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_body, error_response
from .metrics import Metrics

# The client ids kept (CONTRACT §2: the client's), any header value of visible ASCII with inner spaces or
# tabs up to 1024 characters; others (non-ASCII, obsolete in HTTP; longer, unlike any tracing id) get a new one.
REQUEST_ID = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]{0,1022}[\x21-\x7e])?")


class RequestContext:
    """Gives every request an id (the client's X-Request-ID when sane) and an arrival time,
    echoes the id on every response, and records the request in the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "").strip(" \t")  # a field value's edges are not its value
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        arrived = time.perf_counter()
        scope.setdefault("state", {}).update(request_id=request_id, arrived=arrived)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.observe_request(scope["method"], scope["path"], status, time.perf_counter() - arrived)


# Set in a request's scope["state"] by the server's protocol (`python -m service`) when the request
# arrived over ATTN_MAX_CONNECTIONS; `RequestLimits` answers it 503, except on these paths: the
# probes and the metrics scrape cost no more than the 503, and an overloaded replica is alive.
OVER_CONNECTION_LIMIT = "over_connection_limit"
PATHS_OVER_CONNECTION_LIMIT = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestLimits:
    """503 with Retry-After for a request the server marked `OVER_CONNECTION_LIMIT` (but the probes' and
    metrics', `PATHS_OVER_CONNECTION_LIMIT`). 431 for a
    request line and headers over `max_header_bytes` in all. 413 for a body over `max_bytes`: at once
    when Content-Length says so (the body is never read), otherwise as soon as the bytes received
    pass the limit. 408 when the whole body has not arrived within `timeout_s` of the request's
    start: a client trickling its body in (slowloris) holds one connection for that long at most,
    never the engine or other clients."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, max_header_bytes: int,
                 retry_after: dict[str, str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_header_bytes = max_header_bytes
        self.retry_after = retry_after
        # A refused body's remaining bytes are never read: the connection closes after the answer
        # (kept alive, a client trickling them in held it, and a connection slot, for good).
        self.closing = {"Connection": "close"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("state", {}).get(OVER_CONNECTION_LIMIT):
            if scope["path"] not in PATHS_OVER_CONNECTION_LIMIT:
                message = "connections: the server is at its limit of open connections (ATTN_MAX_CONNECTIONS)"
                headers = {**self.retry_after, "Connection": "close"}
                await error_response(Request(scope), 503, "connections", message, headers)(scope, receive, send)
                return
            send = _closing(send)  # answered, but the connection does not stay over the limit
        line = scope.get("raw_path") or scope["path"].encode()
        head_bytes = len(scope["method"]) + len(line) + len(scope.get("query_string", b"")) + 12  # " ?  HTTP/1.1\r\n"
        head_bytes += sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
        if head_bytes > self.max_header_bytes:
            message = (f"headers: request line and headers {head_bytes} bytes, over the limit of "
                       f"{self.max_header_bytes} (ATTN_MAX_HEADER_BYTES)")
            await error_response(Request(scope), 431, "headers", message)(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:  # closed after: the body is never read
            response = error_response(Request(scope), 413, "body", self._message(f"{declared} bytes"), self.closing)
            await response(scope, receive, send)
            return
        received = 0
        complete = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):  # a timer, not wait_for's task per body chunk
                    message = await receive()
            except TimeoutError:
                raise ApiError(
                    408, "body", f"body: not received within {self.timeout_s:g} s (ATTN_BODY_TIMEOUT_S)", self.closing,
                ) from None
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.max_bytes:
                raise ApiError(413, "body", self._message(f"more than {self.max_bytes} bytes"), self.closing)
            return message

        await self.app(scope, guarded_receive, send)

    def _message(self, size: str) -> str:
        return f"body: {size}, over the limit of {self.max_bytes} bytes (ATTN_MAX_BODY_BYTES)"


def _closing(send: Send) -> Send:
    """`send` with Connection: close on the response, so that the server closes the connection after it."""

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message)["Connection"] = "close"
        await send(message)

    return send_closing


class JsonCors(CORSMiddleware):
    """Starlette's CORS, answering a refused preflight with the service's JSON error body (400 naming
    the request header at fault) rather than its plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        allowed = {  # Starlette's word for each failure: the request header at fault, and what is allowed
            "origin": ("Origin", "an origin of ATTN_CORS_ORIGINS"),
            "method": ("Access-Control-Request-Method", "one of " + ", ".join(self.allow_methods)),
            "headers": ("Access-Control-Request-Headers", "headers among " + ", ".join(sorted(self.allow_headers))),
            "private-network": ("Access-Control-Request-Private-Network", "no private network access"),
        }
        errors = []
        for failure in bytes(response.body).decode().removeprefix("Disallowed CORS ").split(", "):
            field, allows = allowed.get(failure, (failure, "what Starlette's CORS allows"))
            errors.append({"field": field, "message": f"{field}: {request_headers.get(field)!r} is not allowed; "
                                                      f"this service allows {allows}"})
        headers = {name: value for name, value in response.headers.items()
                   if name not in ("content-length", "content-type")}
        body = error_body(400, errors[0]["field"], errors[0]["message"], errors)
        return JSONResponse(body.model_dump(), status_code=400, headers=headers)  # RequestContext adds the id
