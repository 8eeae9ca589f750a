"""The HTTP server: uvicorn, with limits so that a slow or stalled client cannot hold a connection.

uvicorn (0.54) closes an idle keep-alive connection after timeout_keep_alive, but has no timer
on a request still arriving: a client that opens a connection and sends half a request line
holds it for ever (its keep-alive timer is cancelled by the first byte). RequestHeadTimeout
closes a connection whose request line and headers have not all arrived within
http_header_timeout_seconds of it opening, or of the previous response ending. Told to stop,
the server ends its event streams at once and gives other requests http_shutdown_seconds.
"""

import asyncio
import socket
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.lifespan.on import LifespanOn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.api.events.hub import EventHub
from app.core.config import Settings


class RequestHeadTimeout(H11Protocol):
    """h11, plus a deadline for each request's line and headers (the head)."""

    head_timeout_seconds = 10.0  # set per server by protocol_with_head_timeout()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in: the request is the app's now
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()  # the next request on this connection gets a deadline too

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout_seconds, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request head did not arrive in time")
            self.transport.close()


def protocol_with_head_timeout(seconds: float) -> type[RequestHeadTimeout]:
    return type("RequestHeadTimeout", (RequestHeadTimeout,), {"head_timeout_seconds": seconds})


class Server(uvicorn.Server):
    """uvicorn's server, which ends the app's live event streams as soon as it begins to stop.

    uvicorn runs the app's shutdown only once every connection has closed, and an event stream
    closes only when its client leaves or event_stream_max_seconds (5 minutes) pass: one
    dashboard left open held a Ctrl-C or a `docker stop` for that long. Ended, each stream's
    client reconnects with Last-Event-ID (to this server once restarted, or another) and
    misses nothing. Other requests get http_shutdown_seconds to finish, then are cancelled.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        hub: EventHub | None = getattr(self.app.state, "event_hub", None)
        if hub is not None:
            await hub.close()
        await super().shutdown(sockets)
        if self.force_exit and not self._app_shut_down:
            # A second Ctrl-C forces the exit: uvicorn then skips the app's shutdown, and the
            # event loop's end cancelled it mid-wait, which logged a CancelledError traceback.
            # The app's shutdown only closes its pools: quick, so it runs forced or not.
            await self.lifespan.shutdown()

    @property
    def _app_shut_down(self) -> bool:
        return isinstance(self.lifespan, LifespanOn) and self.lifespan.shutdown_event.is_set()


def build_server(app: FastAPI, host: str, port: int, settings: Settings) -> uvicorn.Server:
    """A server for `app` with the slow-client limits from settings; `.run()` serves it until
    Ctrl-C or SIGTERM (or until its `should_exit` is set)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_with_head_timeout(settings.http_header_timeout_seconds),
        timeout_keep_alive=settings.http_keep_alive_seconds,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        limit_concurrency=settings.http_max_connections,
        timeout_graceful_shutdown=settings.http_shutdown_seconds,
        log_config=None,  # logging is configured once, by configure_logging()
        log_level=settings.log_level.lower(),
    )
    return Server(config, app)
