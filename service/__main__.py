"""`python -m service`: serve the app with uvicorn on ATTN_HOST:ATTN_PORT, draining on SIGTERM."""

from __future__ import annotations

import time
from types import FrameType

import uvicorn

from .app import Service, create_app
from .settings import Settings


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its graceful shutdown. On the first SIGTERM or SIGINT the
    service answers every new request 503 with Retry-After (a load balancer moves on to another
    replica) while the requests already accepted run on; after `drain_s` it stops listening and
    gives those still running up to `shutdown_timeout_s`. A second signal ends the drain at once."""

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


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    """uvicorn serving a new app with the settings' address and connection limits."""
    return uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
        limit_concurrency=settings.max_connections, h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


def main() -> None:
    settings = Settings()
    config = uvicorn_config(settings)
    DrainingServer(config, config.app.state.service, settings.drain_s).run()


if __name__ == "__main__":
    main()
