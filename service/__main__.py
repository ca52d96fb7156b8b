"""`python -m service`: serve the app with uvicorn on ATTN_HOST:ATTN_PORT (or --host, --port), draining on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
import time
import uuid
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body
from .middleware import OVER_CONNECTION_LIMIT
from .settings import Settings, settings_problems, unknown_variables

if TYPE_CHECKING:
    from engine.batcher import Compute

    from .app import Service


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request whose head (request line and headers) is
    still incomplete after `max_head_bytes`, or `head_timeout_s` after the connection opened or the
    head's first byte (or the previous answer, for a pipelined head), with 408: httptools itself
    buffers a head without any limit, and uvicorn waits for one forever (a few sockets that never
    finish a head held ATTN_MAX_CONNECTIONS for good).
    Complete heads over the limit are refused by the app (`RequestLimits`, 431, JSON). Past
    `max_connections` open connections, or requests in progress, it marks the request for the
    app to answer 503 in the service's JSON, with Retry-After and X-Request-ID (uvicorn's own
    `limit_concurrency` answers plain text)."""

    def __init__(self, *args: Any, max_head_bytes: int, head_timeout_s: float, max_connections: int | None,
                 on_refused: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = max_head_bytes
        self.head_timeout_s = head_timeout_s
        self.max_connections = max_connections
        self.on_refused = on_refused  # told the status of each request refused here (the metrics)
        self._head_bytes: int | None = None  # bytes received while a head is open; None between heads
        self._heads_begun = self._messages_done = 0
        self._head_timer: asyncio.TimerHandle | None = None  # while a head is awaited
        self._refusal: tuple[int, str, str] | None = None  # one waiting for the answers due before it

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._heads_begun += 1
        self._head_bytes = 0
        if not self._answering():
            self._await_head()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._messages_done += 1

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._answering() or self.transport.is_closing():
            return
        if self._refusal is not None:
            self._refuse(*self._refusal)
        elif self._head_bytes is not None:  # a head begun while an answer was due: timed from now, and not
            self._unset_keepalive_if_required()  # closed by uvicorn's keep-alive timer, which only data cancels
            self._await_head()

    def _answering(self) -> bool:
        """Whether an answer on this connection is still to be written: a refusal written then would
        read as that answer; and once a pipelined head is complete, or a body passes its high-water
        mark, uvicorn reads nothing more until it is (so a head begun then may not finish)."""
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def _await_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, "headers", f"the request line and headers did not arrive within {self.head_timeout_s:g} s "
                                         "(ATTN_BODY_TIMEOUT_S)")

    def on_headers_complete(self) -> None:
        self._head_arrived()
        self._head_bytes = None
        limit = self.max_connections
        if limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit):
            self.scope["state"][OVER_CONNECTION_LIMIT] = True
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        begun, done = self._heads_begun, self._messages_done
        super().data_received(data)
        if self._head_bytes is None or self.transport.is_closing():
            return
        # The read is the open head's alone unless it also ended the request before: then it holds that
        # one's bytes too, and is not counted (the limit is passed by at most that one read).
        if self._heads_begun == begun or self._messages_done == done:
            self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, "headers", f"over the limit of {self.max_head_bytes} bytes (ATTN_MAX_HEADER_BYTES)")

    def send_400_response(self, msg: str) -> None:
        """Bytes that are not HTTP (httptools could not parse them): the service's JSON, not uvicorn's text."""
        self._refuse(400, "request", f"not valid HTTP/1.1 ({msg})")

    def _refuse(self, status: int, field: str, message: str) -> None:
        """Answer in the service's error shape, with an X-Request-ID, and close: the app never sees these.
        Answers due before it on this connection (pipelined requests') are written first, reading
        nothing more meanwhile: the refusal must not read as their answer."""
        if self._answering():
            self._refusal = (status, field, message)
            self._head_arrived()
            self.transport.pause_reading()
            return
        self.on_refused(status)
        body = error_body(status, field, f"{field}: {message}").model_dump_json().encode()
        self.transport.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                             f"content-length: {len(body)}\r\nx-request-id: {uuid.uuid4().hex}\r\n"
                             "connection: close\r\n\r\n".encode() + body)
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its graceful shutdown. On the first SIGTERM or SIGINT the
    service answers every new request 503 with Retry-After (a load balancer moves on to another
    replica) while the requests already accepted run on; after `drain_s` it stops listening and
    gives those still running up to `shutdown_timeout_s` (those still waiting then get 503). A second
    signal ends the drain at once."""

    def __init__(self, config: uvicorn.Config, service: Service, drain_s: float) -> None:
        super().__init__(config)
        self.service = service
        self.drain_s = drain_s
        self._drain: tuple[int, float] | None = None  # (the signal, when draining ends)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is None:
            self.service.drain()
            self._drain = (sig, time.monotonic() + self.drain_s)
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain is not None and not self.should_exit and time.monotonic() >= self._drain[1]:
            super().handle_exit(self._drain[0], None)
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful shutdown; shortly before its timeout, which would cancel the requests still
        running and answer them a plain-text 500, the service answers them 503 (`Service.abandon`)."""
        timeout = self.config.timeout_graceful_shutdown
        assert timeout is not None, "uvicorn_config sets it"
        timer = asyncio.get_running_loop().call_later(timeout - min(1.0, timeout / 2), self.service.abandon)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def uvicorn_config(settings: Settings, compute: Compute | None = None) -> uvicorn.Config:
    """uvicorn serving a new app (`create_app`'s `compute` too) with the settings' address and limits."""
    from .app import create_app  # imported once the settings are known good: the module builds an app

    app = create_app(settings, compute=compute)
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        http=functools.partial(BoundedHeadProtocol, max_head_bytes=settings.max_header_bytes,
                               head_timeout_s=settings.body_timeout_s, max_connections=settings.max_connections,
                               on_refused=app.state.service.metrics.observe_refused),
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


def main() -> None:
    """Start, or exit 1 with one line per bad setting; an unknown ATTN_* variable is warned about.
    Every setting is also a flag (`--port 9000`, `--max-batch-size 8`; `--help` lists them), which
    wins over its variable."""
    try:
        settings = Settings(_cli_parse_args=True, _cli_prog_name="python -m service", _cli_kebab_case=True)
        settings.torch_device  # noqa: B018 - ATTN_DEVICE=cuda without a GPU is refused here, not in a traceback
    except ValidationError as error:
        sys.exit("invalid settings:\n  " + "\n  ".join(settings_problems(error)))
    except ValueError as error:
        sys.exit(f"invalid settings:\n  {error}")
    for name in unknown_variables(os.environ):
        logging.getLogger("service").warning("%s is not a setting and is ignored (a typo?)", name)
    config = uvicorn_config(settings)
    try:
        DrainingServer(config, config.app.state.service, settings.drain_s).run()
    except KeyboardInterrupt:  # Ctrl-C: drained and shut down already; uvicorn re-raises the signal
        sys.exit(130)


if __name__ == "__main__":
    main()
