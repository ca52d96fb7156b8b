"""Two small ASGI middlewares: request identity and timing, and the request-body size limit."""

from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response
from .metrics import Metrics

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


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
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
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


class BodyLimit:
    """413 for a body over `max_bytes`: at once when Content-Length says so (the body is never
    read), otherwise as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(Request(scope), 413, "body", self._message(f"{declared} bytes"))
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise ApiError(413, "body", self._message(f"more than {self.max_bytes} bytes"))
            return message

        await self.app(scope, counting_receive, send)

    def _message(self, size: str) -> str:
        return f"body: {size}, over the limit of {self.max_bytes} bytes (ATTN_MAX_BODY_BYTES)"
