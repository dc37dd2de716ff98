"""The FastAGI TCP server: accepts Asterisk connections, admits them, drains on shutdown.

Each connection gets its own `AgiSession`; the socket is closed on every path (Asterisk keeps
the channel up while the socket is open). Admission (`admission`) runs at accept: a peer
outside `CALLERID_AGI_ALLOWED_PEERS` is closed before anything is read. A connection holds no
call slot while its environment block is coming in; once it is complete, a call over
`max_calls` live calls, over the peer's own cap, or while draining is still answered — with
`config_error` and the gateway-wide fallback, never an empty destination — so the dialplan
always gets `OML_IDENT_OUTCOME`. Each refusal is counted once, in
`callerid_agi_sessions_rejected_total`, not as a call of a node.

Drain (SIGTERM): stop listening, let live calls finish for `drain_timeout`, then set the abort
event so calls waiting for the CRM take their failover destination at once, and finally cancel
whatever is still running after a short grace.
"""

from __future__ import annotations

import asyncio
import logging

from agi_gateway.admission import Admission, peer_host
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
        environment_timeout: float = 5.0,
        admission: Admission | None = None,
    ) -> None:
        self._flow = flow
        self._metrics = metrics
        self._max_calls = max_calls
        self._command_timeout = command_timeout
        self._environment_timeout = environment_timeout
        self._admission = admission or Admission()
        self._server: asyncio.Server | None = None
        # Every session's task (drain waits for them all); `_in_call` of them hold a call slot.
        self._calls: set[asyncio.Task[None]] = set()
        self._in_call = 0
        # Read when scraped, not updated twice a call.
        metrics.sessions_live.set_function(lambda: len(self._calls))
        # Done when a drain runs out of time; the flows waiting for the CRM race it.
        self._abort: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._draining = False

    @property
    def live_calls(self) -> int:
        """Open sessions, whether their call has started or their environment is coming."""
        return len(self._calls)

    @property
    def calls_in_progress(self) -> int:
        """Sessions holding a call slot (their environment is complete)."""
        return self._in_call

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
        return AgiSession(self._start_session, command_timeout=self._command_timeout)

    def _start_session(self, session: AgiSession) -> None:
        host = peer_host(session.peername)
        refusal = self._admission.admit(host)
        if refusal == "peer_not_allowed":
            self._metrics.sessions_rejected.labels(refusal).inc()
            session.abort()  # nothing read, nothing written: not a call
            return
        task = asyncio.get_running_loop().create_task(self._serve(session, host, refusal))
        self._calls.add(task)

    async def _serve(self, session: AgiSession, host: str | None, refusal: str | None) -> None:
        task = asyncio.current_task()
        assert task is not None
        admitted = refusal is None  # then counted against its peer until the end
        try:
            # No call slot while the environment is coming in: a peer that connects and
            # stalls is dropped after the environment timeout without taking one.
            environment = await session.environment(self._environment_timeout)
            if refusal is None and self._draining:
                refusal = "draining"
            elif refusal is None and self._in_call >= self._max_calls:
                refusal = "over_capacity"
            if refusal is not None:
                self._metrics.sessions_rejected.labels(refusal).inc()
                await self._flow.reject(session, environment, refusal)
                return
            self._in_call += 1
            try:
                await self._flow.handle(session, environment, self._abort)
            finally:
                self._in_call -= 1
        except NoEnvironment as exc:
            self._metrics.sessions_rejected.labels("bad_environment").inc()
            log.warning("AGI connection dropped: %s", exc)
        except AgiSessionError as exc:
            # Logged where it was understood: Asterisk stopped answering or broke the protocol.
            # Nothing can be routed on this socket any more.
            log.debug("AGI session ended early: %s", exc)
        finally:
            session.close()
            if admitted:
                self._admission.leave(host)
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
