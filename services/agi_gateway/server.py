"""The FastAGI TCP server: accepts Asterisk connections, bounds them, drains on shutdown.

Each connection gets its own `AgiSession` and runs `CallFlow.handle`; the socket is closed on
every path (Asterisk keeps the channel up while the socket is open). Over `max_calls` live
sessions, or while draining, a connection is still answered — with `config_error` and the
gateway-wide fallback — so the dialplan always gets `OML_IDENT_OUTCOME`.

Drain (SIGTERM): stop listening, let live calls finish for `drain_timeout`, then set the abort
event so calls waiting for the CRM take their failover destination at once, and finally cancel
whatever is still running after a short grace.
"""

from __future__ import annotations

import asyncio
import logging

from agi_gateway.flow import CallFlow
from agi_gateway.metrics import GatewayMetrics
from agi_gateway.session import AgiSession, AgiSessionError, NoEnvironment

log = logging.getLogger(__name__)

ABORT_GRACE = 2.0  # after the abort, time for calls to write their failover decision


class AgiServer:
    def __init__(
        self,
        flow: CallFlow,
        metrics: GatewayMetrics,
        *,
        max_calls: int = 5000,
        command_timeout: float = 10.0,
    ) -> None:
        self._flow = flow
        self._metrics = metrics
        self._max_calls = max_calls
        self._command_timeout = command_timeout
        self._server: asyncio.Server | None = None
        self._calls: set[asyncio.Task[None]] = set()
        # Done when a drain runs out of time; the flows waiting for the CRM race it.
        self._abort: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._draining = False

    @property
    def live_calls(self) -> int:
        return len(self._calls)

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving() and not self._draining

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        assert self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_session, host, port, backlog=1024, reuse_address=True
        )
        log.info("FastAGI listening on %s:%d", *self.address)

    def _new_session(self) -> AgiSession:
        return AgiSession(self._start_call, command_timeout=self._command_timeout)

    def _start_call(self, session: AgiSession) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(session))
        self._calls.add(task)
        self._metrics.sessions_live.inc()

    async def _serve(self, session: AgiSession) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if self._draining or len(self._calls) > self._max_calls:
                reason = "draining" if self._draining else "over_capacity"
                self._metrics.sessions_rejected.labels(reason).inc()
                await self._flow.reject(session, reason)
            else:
                await self._flow.handle(session, self._abort)
        except NoEnvironment as exc:
            self._metrics.sessions_rejected.labels("bad_environment").inc()
            log.warning("AGI connection dropped: %s", exc)
        except AgiSessionError as exc:
            # Logged where it was understood: Asterisk stopped answering or broke the protocol.
            # Nothing can be routed on this socket any more.
            log.debug("AGI session ended early: %s", exc)
        finally:
            session.close()
            self._metrics.sessions_live.dec()
            self._calls.discard(task)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let live calls finish within `timeout`, then fail them over."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        log.info("draining: %d live calls, up to %.0f s", len(self._calls), timeout)
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=timeout)
        if self._calls:
            log.warning("drain timeout: %d calls take their failover now", len(self._calls))
            if not self._abort.done():
                self._abort.set_result(None)
            await asyncio.wait(set(self._calls), timeout=ABORT_GRACE)
        for task in set(self._calls):
            task.cancel()
        if self._calls:
            await asyncio.wait(set(self._calls))
        if self._server is not None:
            await self._server.wait_closed()
        log.info("drained")
