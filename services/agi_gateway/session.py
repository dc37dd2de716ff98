"""One FastAGI connection: the only code that reads or writes an AGI socket.

A background reader task feeds every byte into the sans-I/O parser (`protocol`) and routes its
events: the environment and command replies go to whoever is waiting for them, an unprompted
`HANGUP` line (or EOF) marks the channel as gone at once — also while the call flow is not
talking to Asterisk, e.g. while it waits for the CRM. Every command has a timeout.

Exception tree raised by `AgiSession`:

    AgiSessionError
    ├── CallerHungUp        the channel is gone: HANGUP seen and a command answered 511, or EOF
    ├── AgiTimeout          Asterisk did not answer within the command's timeout
    ├── NoEnvironment       the connection ended or stalled before a complete environment
    └── AgiPeerError        the peer broke the protocol (wraps protocol.AgiProtocolError)

Asterisk keeps a channel up for as long as a FastAGI server keeps its socket open, so `close()`
is called on every path by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence

from agi_gateway.commands import Command
from agi_gateway.protocol import (
    AgiParser,
    AgiProtocolError,
    EndOfStream,
    Environment,
    HangupNotice,
    Reply,
)

log = logging.getLogger(__name__)

_READ_CHUNK = 4096
DEAD_CHANNEL = 511


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


class AgiSession:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        command_timeout: float = 10.0,
        parser: AgiParser | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = parser or AgiParser()
        self._command_timeout = command_timeout
        self._environment: asyncio.Future[Environment] = asyncio.get_running_loop().create_future()
        self._replies: deque[Reply] = deque()
        # Commands written whose reply has not been taken yet. Asterisk answers each command
        # exactly once, so more replies than this is a peer that is not Asterisk: refusing
        # them keeps `_replies` bounded (a flood would otherwise pile up while the flow waits
        # for the CRM) and keeps a pre-sent reply from answering a later command.
        self._awaiting = 0
        self._reply_ready = asyncio.Event()
        self._ended: AgiSessionError | None = None  # EOF or protocol error: no reply will come
        self.hangup = asyncio.Event()  # set on HANGUP or EOF; the flow races long waits on it
        self._reader_task = asyncio.create_task(self._read_loop(), name="agi-reader")

    @property
    def hung_up(self) -> bool:
        return self.hangup.is_set()

    def raise_if_broken(self) -> None:
        """Raise AgiPeerError if the session ended because the peer broke the protocol.

        `hangup` is also set then (nothing more will come), and a flow waiting on it must not
        report a protocol violation as a caller hanging up.
        """
        if isinstance(self._ended, AgiPeerError):
            raise self._ended

    async def environment(self, timeout: float) -> Environment:
        """The environment block; NoEnvironment if it is not complete within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._environment)
        except TimeoutError:
            raise NoEnvironment(f"no complete AGI environment within {timeout:g} s") from None
        except AgiSessionError as exc:
            raise NoEnvironment(f"no complete AGI environment: {exc}") from exc

    async def run(self, command: Command, *, timeout: float | None = None) -> Reply:
        """Send one command and return its reply.

        A 511 reply raises CallerHungUp; any other reply (200, 510, 520) is returned for the
        caller to interpret. SET VARIABLE and EXEC still answer 200 after a hang-up.
        """
        return (await self.run_batch((command,), timeout=timeout))[0]

    async def run_batch(
        self, commands: Sequence[Command], *, timeout: float | None = None
    ) -> list[Reply]:
        """Send several commands in one write and return their replies, in order.

        Asterisk reads its AGI socket a line at a time and answers each command before it
        reads the next, so pipelining is safe and saves a round trip (and a system call on
        both sides) per command. Every reply is read before a 511 is raised, so the session
        stays in step. `timeout` bounds the whole batch.
        """
        if self._ended is not None:
            raise self._ended
        self._writer.write(b"".join(command.encode() for command in commands))
        self._awaiting += len(commands)
        limit = self._command_timeout if timeout is None else timeout
        names = "+".join(command.name for command in commands)
        try:
            async with asyncio.timeout(limit):
                await self._writer.drain()
                replies = [await self._next_reply() for _ in commands]
        except TimeoutError:
            raise AgiTimeout(f"{names}: no reply within {limit:g} s") from None
        except ConnectionError as exc:
            self.hangup.set()
            raise CallerHungUp(f"{names}: connection lost") from exc
        if any(reply.code == DEAD_CHANNEL for reply in replies):
            self.hangup.set()
            raise CallerHungUp(f"{names}: channel is dead (511)")
        return replies

    async def _next_reply(self) -> Reply:
        while not self._replies:
            if self._ended is not None:
                raise self._ended
            self._reply_ready.clear()
            await self._reply_ready.wait()
        self._awaiting -= 1
        return self._replies.popleft()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                events = self._parser.feed(data) if data else self._parser.feed_eof()
                for event in events:
                    self._dispatch(event)
                if not data:
                    break
            self._end(CallerHungUp("Asterisk closed the connection"))
        except AgiProtocolError as exc:
            # Logged once, by whoever ends the call (server or flow), not here as well.
            log.debug("AGI peer broke the protocol: %s", exc)
            self._end(AgiPeerError(str(exc)))
        except ConnectionError:
            self._end(CallerHungUp("connection reset by Asterisk"))

    def _dispatch(self, event: Environment | Reply | HangupNotice | EndOfStream) -> None:
        if isinstance(event, Environment):
            if not self._environment.done():
                self._environment.set_result(event)
        elif isinstance(event, Reply):
            if len(self._replies) >= self._awaiting:
                raise AgiProtocolError(f"reply without a command: {event.text[:40]!r}")
            self._replies.append(event)
            self._reply_ready.set()
        elif isinstance(event, HangupNotice):
            self.hangup.set()
        # EndOfStream is handled by the read loop ending.

    def _end(self, error: AgiSessionError) -> None:
        self._ended = error
        self.hangup.set()
        self._reply_ready.set()
        if not self._environment.done():
            self._environment.set_exception(error)
            # Nobody may be waiting for it (e.g. a probe that connects and leaves).
            self._environment.exception()

    async def close(self) -> None:
        """Close the socket; Asterisk then returns from AGI() and runs the dialplan on."""
        self._reader_task.cancel()
        await asyncio.wait([self._reader_task])  # waits without re-raising its cancellation
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
