"""One FastAGI connection: the only code that reads or writes an AGI socket.

`AgiSession` is the connection's asyncio protocol. Every byte Asterisk sends goes straight from
`data_received` into the sans-I/O parser (`protocol`), and its events are routed at once: the
environment and the command's reply go to whoever is waiting for them, an unprompted `HANGUP` line
(or EOF) marks the channel as gone — also while the call flow is not talking to Asterisk, e.g.
while it waits for the CRM. Every command has a timeout.

Why a protocol and not a stream reader with a reader task: a call's replies arrive as several
small segments, and a reader task wakes up for each; here the waiting call flow wakes up once,
when its reply is complete. That is a measurable share of the gateway's CPU per
call (see bench/results).

Exception tree raised by `AgiSession`:

    AgiSessionError
    ├── CallerHungUp        the channel is gone: HANGUP seen and a command answered 511, or EOF
    ├── AgiTimeout          Asterisk did not answer within the command's timeout
    ├── NoEnvironment       the connection ended or stalled before a complete environment
    └── AgiPeerError        the peer broke the protocol (wraps protocol.AgiProtocolError)

Asterisk keeps a channel up for as long as a FastAGI server keeps its socket open, so `close()`
is called on every path by the server; it does not wait for the socket to be gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from agi_gateway.commands import Command
from agi_gateway.protocol import (
    AgiParser,
    AgiProtocolError,
    Environment,
    Event,
    HangupNotice,
    Reply,
)
from shared.waits import done_within

log = logging.getLogger(__name__)

DEAD_CHANNEL = 511
CLOSE_GRACE = 5.0  # seconds a closed session's unsent bytes may wait for a peer that is slow


class AgiSessionError(Exception):
    """The session cannot go on as asked."""


class CallerHungUp(AgiSessionError):
    """The caller hung up (HANGUP, 511) or Asterisk closed the connection."""


class AgiTimeout(AgiSessionError):
    """Asterisk did not answer a command in time."""


class AgiPeerError(AgiSessionError):
    """The peer sent something that is not AGI."""


class NoEnvironment(AgiSessionError):
    """No complete AGI environment arrived (timeout, EOF or garbage before the blank line)."""


class AgiSession(asyncio.Protocol):
    """One connection. `on_connect(session)` is called once the socket is up (the server
    starts the call there); `command_timeout` bounds every command without its own timeout."""

    def __init__(
        self,
        on_connect: Callable[[AgiSession], object],
        *,
        command_timeout: float = 10.0,
        parser: AgiParser | None = None,
    ) -> None:
        self._on_connect = on_connect
        self._parser = parser or AgiParser()
        self._command_timeout = command_timeout
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._environment: asyncio.Future[Environment] = loop.create_future()
        # The reply to the one command in flight, once it is in. Asterisk answers each command
        # exactly once, so a reply with no command waiting for it is a peer that is not
        # Asterisk: refusing it keeps the session bounded (a flood would otherwise pile up while
        # the flow waits for the CRM) and keeps a pre-sent reply from answering a later command.
        self._reply: Reply | None = None
        self._awaiting = False  # a command was written and its reply not taken yet
        self._answered = False  # some command has had its reply
        # When the latest reply was read off the socket (time.monotonic): a call's budget runs
        # from the reply that ended the entry, not from when the flow got round to it.
        self.replied_at = 0.0
        # The flow waiting for its reply: woken when it is in, or at the end.
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None  # set while the transport is paused
        self._ended: AgiSessionError | None = None  # EOF or protocol error: no reply will come
        self._expired = False  # the command in flight ran out of time
        # Done on HANGUP or EOF; the flow races long waits on it (a future, not an Event: it
        # goes into asyncio.wait as it is, with no task wrapped around it).
        self.hangup: asyncio.Future[None] = loop.create_future()

    # --- asyncio.Protocol: called by the event loop -------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, hence no check).
        self._transport = cast(asyncio.Transport, transport)
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        if self._ended is not None:
            return  # the parser has failed or seen EOF: nothing more is read
        try:
            events = self._parser.feed(data)
        except AgiProtocolError as exc:
            self._peer_broke(exc)
            return
        for event in events:
            self._dispatch(event)
            if self._ended is not None:
                break  # e.g. a reply nobody asked for: the rest is not read either

    def eof_received(self) -> bool:
        if self._ended is None:
            try:
                self._parser.feed_eof()
            except AgiProtocolError as exc:
                self._peer_broke(exc)
            else:
                self._end(CallerHungUp("Asterisk closed the connection"))
        return True  # keep our side open: the server closes it when the call is over

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ended is None:
            reason = "connection closed" if exc is None else "connection reset by Asterisk"
            self._end(CallerHungUp(reason))
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- the call flow's side -------------------------------------------------------------

    @property
    def hung_up(self) -> bool:
        return self.hangup.done()

    @property
    def peername(self) -> object:
        """The peer's address as the transport reports it (a tuple for TCP)."""
        return None if self._transport is None else self._transport.get_extra_info("peername")

    @property
    def answered(self) -> bool:
        """Whether Asterisk has answered any command yet. A real Asterisk always answers the
        first one (the gateway's first command works on a hung-up channel too), so a session
        that ends before that never ran a call: a probe, a scanner, a half-open socket."""
        return self._answered

    def abort(self) -> None:
        """Drop the connection at once, unread and unanswered (a refused peer)."""
        if self._transport is not None:
            self._transport.abort()

    def raise_if_broken(self) -> None:
        """Raise AgiPeerError if the session ended because the peer broke the protocol.

        `hangup` is also set then (nothing more will come), and a flow waiting on it must not
        report a protocol violation as a caller hanging up.
        """
        if isinstance(self._ended, AgiPeerError):
            raise self._ended

    async def environment(self, timeout: float) -> Environment:
        """The environment block; NoEnvironment if it is not complete within `timeout`."""
        # Usually it is already in: it came with the connection's first segment.
        if not await done_within(self._environment, timeout):
            raise NoEnvironment(f"no complete AGI environment within {timeout:g} s")
        try:
            return self._environment.result()
        except AgiSessionError as exc:
            raise NoEnvironment(f"no complete AGI environment: {exc}") from exc

    async def run(self, command: Command, *, timeout: float | None = None) -> Reply:
        """Send one command and return its reply; the next command may go only after it.

        Asterisk reads commands with fgets() from a stdio stream but waits for the next one
        with poll() on the raw socket (`run_agi` in res/res_agi.c): a second command written
        before the first is answered lands in the stdio buffer, where poll() cannot see it, and
        waits until more bytes arrive or the socket closes. So there is never more than one
        command in flight, and this method refuses to send while one is.

        A 511 reply raises CallerHungUp; any other reply (200, 510, 520) is returned for the
        caller to interpret (`channel` does). SET VARIABLE and EXEC still answer 200 after a
        hang-up.
        """
        if self._ended is not None:
            raise self._ended
        assert self._transport is not None, "run before the connection was made"
        assert not self._awaiting, "one command at a time: Asterisk does not read ahead"
        self._transport.write(command.encode())
        self._awaiting = True
        limit = self._command_timeout if timeout is None else timeout
        # A loop timer that wakes the wait, not an `asyncio.timeout` context: this runs four
        # times a call, and the context (a task lookup, a reschedule, cancel bookkeeping) cost
        # several times what the timer does (bench/ab.py measured the difference).
        self._expired = False
        timer = asyncio.get_running_loop().call_later(limit, self._expire)
        try:
            if self._writable is not None:
                await self._writable
            reply = None if self._expired else await self._take_reply()
        finally:
            timer.cancel()
        if reply is None:
            raise AgiTimeout(f"{command.name}: no reply within {limit:g} s")
        if reply.code == DEAD_CHANNEL:
            self._hang_up()
            raise CallerHungUp(f"{command.name}: channel is dead (511)")
        return reply

    async def _take_reply(self) -> Reply | None:
        """The reply, or None if the command's timer expired first."""
        if self._reply is None and self._ended is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        reply = self._reply
        if reply is None:
            if self._ended is None:
                assert self._expired
                return None
            raise self._ended
        self._reply = None
        self._awaiting = False
        return reply

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Reply):
            if not self._awaiting or self._reply is not None:
                self._peer_broke(AgiProtocolError(f"reply without a command: {event.text[:40]!r}"))
                return
            self._reply = event
            self._answered = True
            self.replied_at = time.monotonic()
            self._wake()
        elif isinstance(event, Environment):
            if not self._environment.done():
                self._environment.set_result(event)
        elif isinstance(event, HangupNotice):
            self._hang_up()
        # EndOfStream is handled by eof_received.

    def _peer_broke(self, exc: AgiProtocolError) -> None:
        # Logged once, by whoever ends the call (server or flow), not here as well.
        log.debug("AGI peer broke the protocol: %s", exc)
        self._end(AgiPeerError(str(exc)))
        if self._transport is not None:
            self._transport.pause_reading()

    def _hang_up(self) -> None:
        if not self.hangup.done():
            self.hangup.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self) -> None:
        """The command in flight ran out of time: wake its wait, which then reports it."""
        self._expired = True
        self._wake()
        if self._writable is not None and not self._writable.done():
            # Past its deadline the session is given up (AgiTimeout closes it), so waking a
            # wait for a paused transport early does no harm.
            self._writable.set_result(None)

    def _end(self, error: AgiSessionError) -> None:
        if self._ended is not None:
            return
        self._ended = error
        self._hang_up()
        self._wake()
        if not self._environment.done():
            self._environment.set_exception(error)
            # Nobody may be waiting for it (e.g. a probe that connects and leaves).
            self._environment.exception()

    def close(self) -> None:
        """Close the socket; Asterisk then returns from AGI() and runs the dialplan on.

        The transport sends what is still buffered first. A peer that does not read it within
        `CLOSE_GRACE` gets the connection aborted: nothing may hold a finished call open.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pending = transport.get_write_buffer_size()
        transport.close()
        if pending:
            asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)
