"""The operational HTTP port of both services: /metrics, /healthz and /readyz.

/healthz answers 200 while the event loop runs (a liveness probe: restart only a wedged
process). /readyz answers 200 only while the service can do its job — config loaded, broker
connected where one is used, not draining — so orchestrators stop sending it work first.

The port is for scrapers and probes, and must never cost the FastAGI side its file
descriptors or the log its readability, whoever connects to it:
- at most `MAX_CONNECTIONS` at once: beyond that a new connection takes the place of the one
  that has waited longest without sending a request (or is closed if none is waiting);
- a connection must send a whole request head within `HEAD_TIMEOUT` (slowloris), and an idle
  kept-alive one is closed after `KEEPALIVE_TIMEOUT`;
- a malformed request is one WARNING line, without a traceback, at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

MAX_CONNECTIONS = 64
HEAD_TIMEOUT = 10.0
KEEPALIVE_TIMEOUT = 15.0
BAD_REQUEST_LOG_INTERVAL = 60.0

log = logging.getLogger("callerid.http")


def build_app(registry: CollectorRegistry, ready: Callable[[], bool]) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http(
    host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]
) -> web.AppRunner:
    runner = web.AppRunner(
        build_app(registry, ready),
        access_log=None,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        logger=_quiet_logger(),
    )
    await runner.setup()
    await _GuardedSite(runner, host, port).start()
    return runner


class _BadRequestFilter(logging.Filter):
    """aiohttp logs every request it cannot parse at ERROR with a traceback; a port scanner or
    a typo in a probe would flood the log. One WARNING line a minute instead."""

    def __init__(self) -> None:
        super().__init__()
        self._last: float | None = None
        self._since = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        self._since += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < BAD_REQUEST_LOG_INTERVAL:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "malformed HTTP request from %s: %s (%d since the last such line)"
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.args = (peer, _one_line(error), self._since)
        record.exc_info = record.exc_text = None
        self._last, self._since = now, 0
        return True


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}"


def _quiet_logger() -> logging.Logger:
    logger = logging.getLogger("callerid.http.server")
    if not any(isinstance(f, _BadRequestFilter) for f in logger.filters):
        logger.addFilter(_BadRequestFilter())
    return logger


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, plus a deadline for its first request head.

    While it waits for that head it is in `waiting` (oldest first), where a new connection
    over the cap may evict it: a prober, which sends its request at once, is never starved by
    idle sockets.
    """

    def __init__(self, inner: asyncio.Protocol, waiting: dict[_Guarded, None]) -> None:
        self._inner = inner
        self._waiting = waiting
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self.evict)
        self._waiting[self] = None
        self._inner.connection_made(transport)

    def evict(self) -> None:
        self._stop_waiting()
        if self._transport is not None:
            self._transport.abort()

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.pop(self, None)
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._head = (self._head + data)[-4096:]
            if b"\r\n\r\n" in self._head or b"\n\n" in self._head:
                self._stop_waiting()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _GuardedSite(web.TCPSite):
    """A TCPSite whose connections are capped and must send a request head in time."""

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        waiting: dict[_Guarded, None] = {}

        def protocol() -> asyncio.Protocol:
            if len(server.connections) >= MAX_CONNECTIONS:
                if not waiting:  # every connection is in the middle of a request
                    return _Refused()
                next(iter(waiting)).evict()  # the one that has waited longest for its head
            return _Guarded(cast(asyncio.Protocol, server()), waiting)

        loop = asyncio.get_running_loop()
        listener: Any = await loop.create_server(protocol, self._host, self._port, backlog=128)
        self._server = listener
        self._bound_port = listener.sockets[0].getsockname()[1] if listener.sockets else self._port


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0 in tests)."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("HTTP server is not listening")
