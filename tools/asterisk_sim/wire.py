"""The socket side: the environment in several writes, res_agi's buffers, one call's timers.

Part of the simulated Asterisk; the package docstring (tools/asterisk_sim/__init__.py) says
what it reproduces and where each behaviour was checked in Asterisk's source.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple, cast

from tools.asterisk_sim.channel import (
    SimulatedChannel,
    channel_name,
)
from tools.asterisk_sim.script import (
    INTERRUPTED_GET_DATA,
    LINE_MAX,
    PIPELINED,
    CallResult,
    CallScript,
)


def environment_writes(script: CallScript, host: str, port: int) -> list[bytes]:
    """The environment as Asterisk 22 writes it: network lines first, several writes.

    Empty values keep the space after the colon, as Asterisk's "%s: %s\\n" writes them.
    """
    script_path = "identify" if script.node_in_arg else f"identify/{script.node}"
    uniqueid = script.uniqueid
    network = (
        "agi_network: yes\n"
        f"agi_network_script: {script_path}\n"
        f"agi_request: agi://{host}:{port}/{script_path}\n"
    )
    channel = (
        f"agi_channel: {channel_name(script)}\n"
        "agi_language: en\n"
        "agi_type: PJSIP\n"
        f"agi_uniqueid: {uniqueid}\n"
        "agi_version: 22.1.0\n"
        f"agi_callerid: {script.caller_number}\n"
        f"agi_calleridname: {script.caller_name}\n"
        f"{_CHANNEL_TAIL}"
    )
    dialplan = (
        f"agi_context: {script.context}\n"
        f"agi_extension: {script.extension}\n"
        f"agi_priority: {script.priority}\n"
        f"{_DIALPLAN_TAIL}"
    )
    arguments = f"agi_arg_1: {script.node}\n\n" if script.node_in_arg else "\n"
    return [network.encode(), channel.encode(), dialplan.encode(), arguments.encode()]


_CHANNEL_TAIL = (
    "agi_callingpres: 0\n"
    "agi_callingani2: 0\n"
    "agi_callington: 0\n"
    "agi_callingtns: 0\n"
    "agi_dnid: unknown\n"
    "agi_rdnis: unknown\n"
)
_DIALPLAN_TAIL = "agi_enhanced: 0.0\nagi_accountcode: \nagi_threadid: 140234567890\n"


async def run_call(
    host: str,
    port: int,
    script: CallScript,
    *,
    # Running out of time after connecting is a result here (a hung channel), not an error.
    timeout: float = 30.0,
) -> CallResult:
    """Place one simulated call against a FastAGI server and report what it did.

    Raises TimeoutError if the connection is not up within `timeout`, OSError if it fails.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    channel = SimulatedChannel(script)
    call = _Call(channel, environment_writes(script, host, port), loop)
    transport: asyncio.BaseTransport | None = None
    closed_by_gateway = False
    try:
        async with asyncio.timeout_at(deadline) as scope:
            transport, _ = await loop.create_connection(lambda: call, host, port)
            closed_by_gateway = await call.finished
    except TimeoutError:
        if transport is None or not scope.expired():  # connecting, or a socket's own timeout
            raise
    finally:
        call.stop()
        if transport is not None:
            await call.close(abort=not closed_by_gateway)
    context, extension, priority = channel.final_position()
    return CallResult(
        variables=channel.variables,
        commands=channel.commands,
        context=context,
        extension=extension,
        priority=priority,
        hung_up=channel.caller_hung_up,
        closed_by_gateway=closed_by_gateway,
        last_digit_at=channel.last_digit_at,
        decided_at=channel.decided_at,
        protocol_errors=channel.protocol_errors,
        response_timeout_ms=channel.response_timeout_ms,
        digit_timeout_ms=channel.digit_timeout_ms,
    )


class _Pending(NamedTuple):
    """A realtime reply waiting for the time its entry takes, with what follows it."""

    reply: str
    hangup: bool  # send HANGUP after it
    lookup: bool  # start the "lookup" hang-up timer after it
    interruptible: bool  # GET DATA: bytes from the gateway end the command, unanswered


class _Call(asyncio.Protocol):
    """The socket side of one call: the environment out, then res_agi's read loop.

    Bytes from the gateway go to `_kernel` (what the socket holds, unread); res_agi's fgets
    moves all of it to `_stdio` (the FILE's buffer) whenever the buffer has no whole line, and
    takes one line per loop turn, and a turn happens only while the socket holds unread bytes
    (poll) or has reached its end. So lines written together wait in `_stdio`.

    `finished` is True when the gateway closed (EOF, reset, or a write failed because it
    was gone) and False when the caller went away first ("before_env_end"); run_call cancels
    it at the deadline.
    """

    def __init__(
        self, channel: SimulatedChannel, writes: list[bytes], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._channel = channel
        self._writes = writes
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._kernel = bytearray()  # received, not yet read() by fgets
        self._stdio = bytearray()  # read() into the FILE buffer, not yet returned by fgets
        self._stopped = False  # no more answers: the call is over for run_call
        self._paused = False  # over the high-water mark: answer nothing more until resumed
        self._eof = False
        self._pending: _Pending | None = None  # realtime: a reply waiting for its entry's time
        self._pending_timer: asyncio.TimerHandle | None = None
        self._hangup_timer: asyncio.TimerHandle | None = None
        self._hangup_due = False  # the "lookup" hang-up came while res_agi was not in poll()
        self.finished: asyncio.Future[bool] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport = cast(asyncio.Transport, transport)
        if self._channel.script.hangup == "before_env_end":
            transport.write(self._writes[0])
            self._channel.caller_hung_up = True
            self._finish(False)
            return
        for chunk in self._writes:  # one write each, as Asterisk sends them
            transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self._kernel += data
        pending = self._pending
        if pending is None:
            self._run()
        elif pending.interruptible:
            self._interrupt(by_command=True)

    def eof_received(self) -> bool:
        self._eof = True
        pending = self._pending
        if not self._stopped:
            if pending is None:
                self._run()
            elif pending.interruptible:  # GET DATA sees the socket readable at its end too
                self._interrupt(by_command=False)
        return True  # run_call closes the socket, as Asterisk does when AGI() returns

    def _run(self) -> None:
        """run_agi's loop: while poll() finds the socket readable, fgets one line, answer it."""
        transport = self._transport
        assert transport is not None
        kernel, stdio = self._kernel, self._stdio
        while not self._paused and self._pending is None and not self._stopped:
            if not kernel:
                if not self._eof and not transport.is_closing():
                    break  # poll(): nothing unread on the socket; buffered lines wait
            elif not stdio and kernel.find(b"\n", 0, LINE_MAX) == len(kernel) - 1:
                # The usual case, one whole command and nothing else: fgets in short.
                whole = bytes(kernel[:-1])
                kernel.clear()
                self._answer(whole, transport)
                continue
            line = self._fgets(transport)
            if line is None:
                break
            self._answer(line, transport)
        if self._hangup_due and self._in_poll():
            self._hangup_due = False
            self._lookup_hangup()

    def _fgets(self, transport: asyncio.Transport) -> bytes | None:
        """One line as fgets returns it (without its "\\n"); None while a line is unfinished
        (fgets keeps reading) or when the stream has ended (the call is then finished)."""
        stdio = self._stdio
        end = stdio.find(b"\n", 0, LINE_MAX)
        did_read = False
        if end < 0 and len(stdio) < LINE_MAX:
            kernel = self._kernel
            if kernel:  # read() takes everything the socket holds
                stdio += kernel
                kernel.clear()
                did_read = True
                end = stdio.find(b"\n", 0, LINE_MAX)
            if end < 0 and len(stdio) < LINE_MAX:
                if not self._eof and not transport.is_closing():
                    return None
                if not stdio:  # fgets finds nothing more: the AGI ends
                    if not transport.is_closing():  # and run_agi's last word (AGISIGHUP)
                        transport.write(b"HANGUP\n")
                    self._finish(True)
                    return None
                self._channel._error("unterminated command line at end of stream: Asterisk runs it")
                line = bytes(stdio)
                stdio.clear()
                return line
        if end < 0:
            line = bytes(stdio[:LINE_MAX])
            del stdio[:LINE_MAX]
            self._channel._error(
                f"command line longer than {LINE_MAX} bytes: Asterisk runs each {LINE_MAX} "
                "bytes of it as a command"
            )
        else:
            line = bytes(stdio[:end])
            del stdio[: end + 1]
        if did_read and (stdio.find(b"\n", 0, LINE_MAX) >= 0 or len(stdio) >= LINE_MAX):
            self._channel._error(PIPELINED)
        return line

    def _answer(self, line: bytes, transport: asyncio.Transport) -> None:
        channel = self._channel
        reply = channel.handle(line)
        if channel.reply_delay > 0:  # realtime: the reply goes when the entry has ended
            self._pending = _Pending(
                reply,
                channel.hangup_after_reply,
                channel.start_lookup_hangup,
                channel.reply_interruptible,
            )
            channel.hangup_after_reply = channel.start_lookup_hangup = False
            self._pending_timer = self._loop.call_later(channel.reply_delay, self._pending_due)
            return
        if not transport.is_closing():  # else the gateway is gone: Asterisk's write fails
            transport.write(reply.encode() + b"\n")
        if channel.hangup_after_reply or channel.start_lookup_hangup:
            hangup, lookup = channel.hangup_after_reply, channel.start_lookup_hangup
            channel.hangup_after_reply = channel.start_lookup_hangup = False
            self._after_reply(hangup, lookup)

    def _after_reply(self, hangup: bool, lookup: bool) -> None:
        if hangup and not self._channel.dead:
            self._send_hangup()
        if lookup:
            self._start_hangup_timer()

    def _pending_due(self) -> None:
        pending = self._pending
        self._pending = self._pending_timer = None
        if pending is None or self._stopped:
            return
        transport = self._transport
        assert transport is not None
        if not transport.is_closing():
            transport.write(pending.reply.encode() + b"\n")
        self._after_reply(pending.hangup, pending.lookup)
        self._run()

    def _interrupt(self, *, by_command: bool) -> None:
        """GET DATA ends when the socket turns readable (ast_waitfordigit_full's cmdfd) and
        handle_getdata answers nothing; what was to follow its reply still happens."""
        pending = self._pending
        timer = self._pending_timer
        assert pending is not None
        assert timer is not None
        timer.cancel()
        self._pending = self._pending_timer = None
        if by_command:
            self._channel._error(INTERRUPTED_GET_DATA)
        self._after_reply(pending.hangup, pending.lookup)
        self._run()

    def _send_hangup(self) -> None:
        # res_agi sends this once, when it notices the hang-up; from then on `dead` holds.
        assert self._transport is not None
        self._channel.mark_dead()
        if not self._transport.is_closing():
            self._transport.write(b"HANGUP\n")

    def _in_poll(self) -> bool:
        """res_agi sits in poll() (so it notices a hang-up at once): not blocked on a write,
        not in a command, not in fgets waiting for the rest of a line."""
        if self._paused or self._pending is not None:
            return False
        stdio = self._stdio
        return not stdio or stdio.find(b"\n", 0, LINE_MAX) >= 0 or len(stdio) >= LINE_MAX

    def _start_hangup_timer(self) -> None:
        if self._hangup_timer is not None:
            self._hangup_timer.cancel()
        delay = self._channel.script.hangup_delay
        self._channel.lookup_hangup_at = self._channel._clock() + delay
        self._hangup_timer = self._loop.call_later(delay, self._lookup_hangup)

    def _lookup_hangup(self) -> None:
        self._hangup_timer = None
        if self._stopped or self._channel.caller_hung_up:  # an entry already ended by it
            return
        if not self._in_poll():  # noticed when res_agi is back in poll()
            self._hangup_due = True
            return
        self._channel.caller_hung_up = True
        self._send_hangup()

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is None or self._transport.is_closing() or self._stopped:
            return
        self._transport.resume_reading()
        self._run()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None or isinstance(exc, ConnectionError):
            self._finish(True)
        elif not self.finished.done():
            self.finished.set_exception(exc)
        self.stop()
        if not self._closed.done():
            self._closed.set_result(None)

    def _finish(self, closed_by_gateway: bool) -> None:
        self._stopped = True
        if not self.finished.done():
            self.finished.set_result(closed_by_gateway)

    def stop(self) -> None:
        """Answer nothing more and drop the timers."""
        self._stopped = True
        for timer in (self._hangup_timer, self._pending_timer):
            if timer is not None:
                timer.cancel()
        self._hangup_timer = self._pending_timer = None
        self._pending = None

    async def close(self, *, abort: bool) -> None:
        """Close and wait until closed; `abort` drops unsent replies (no one reads them)."""
        transport = self._transport
        assert transport is not None
        if abort and transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()
        await self._closed


# The command line. What it adds to the simulation: the entries notation on the command line
# ("-" for nothing typed), a calling number of its own for every call of every run, and a
# line per call that says what each attempt typed and what Asterisk read of it.
