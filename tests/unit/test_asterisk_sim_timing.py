"""The simulator's digit collection (GET DATA's one timeout, Read's two), its variables and
dialplan functions, and res_agi's one-command-at-a-time reading of the socket.

The channel tests drive `SimulatedChannel` with raw command lines (no I/O). The socket tests
place a call with `run_call` against a raw FastAGI server that writes bytes exactly as given,
so the gateway's own code plays no part here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.asterisk_sim import (
    DEFAULT_DIGIT_TIMEOUT_MS,
    DEFAULT_RESPONSE_TIMEOUT_MS,
    INTERRUPTED_GET_DATA,
    PIPELINED,
    CallResult,
    CallScript,
    Keys,
    SimulatedChannel,
    parse_entry,
    run_call,
    timeout_ms,
)
from tools.asterisk_sim.wire import _Call

WAIT = 5.0  # generous bound on any single wait; never reached when things work
READ_RESULT = b'GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"'


def channel_for(*entries: str | None, **script: object) -> SimulatedChannel:
    return SimulatedChannel(CallScript(entries=list(entries), **script))  # type: ignore[arg-type]


def read(
    channel: SimulatedChannel, arguments: str = "CALLERID_ENTRY,callerid-test/prompt,5"
) -> str:
    """EXEC Read, then what GET FULL VARIABLE says of the entry and READSTATUS."""
    assert channel.handle(f'EXEC Read "{arguments}"'.encode()) == "200 result=0"
    return channel.handle(READ_RESULT)


# The entries notation.


@pytest.mark.parametrize(
    ("entry", "keys"),
    [
        ("12345", Keys(((0.0, "1"), (0.0, "2"), (0.0, "3"), (0.0, "4"), (0.0, "5")), 0.0)),
        ("12(2.5)345", Keys(((0, "1"), (0, "2"), (2.5, "3"), (0, "4"), (0, "5")), 0.0)),
        ("(6)12", Keys(((6.0, "1"), (0.0, "2")), 0.0)),
        ("(1)(.5)1", Keys(((1.5, "1"),), 0.0)),
        ("12~", Keys(((0.0, "1"), (0.0, "2")), 0.0)),
        ("12#", Keys(((0.0, "1"), (0.0, "2"), (0.0, "#")), 0.0)),
        ("1(3)", Keys(((0.0, "1"),), 3.0)),
        (None, Keys((), 0.0)),
        ("", Keys((), 0.0)),
        ("~", Keys((), 0.0)),
        ("a(b)~x", Keys(((0, "a"), (0, "("), (0, "b"), (0, ")"), (0, "~"), (0, "x")), 0.0)),
    ],
)
def test_entry_notation(entry: str | None, keys: Keys) -> None:
    """Keys in order, each with the pause before it; "(s)" pauses add up; "~" at the end
    only says the caller stops; anything that is not a pause is a key as written."""
    assert parse_entry(entry) == keys


# GET DATA: one timeout, for the first digit and between digits.


@pytest.mark.parametrize(
    ("entry", "command", "reply"),
    [
        ("12(2.5)345", "GET DATA p 4000 5", "200 result=12345"),
        ("12(2.5)345", "GET DATA p 2000 5", "200 result=12 (timeout)"),
        ("(6)12345", "GET DATA p 5000 5", "200 result= (timeout)"),
        ("(5)12345", "GET DATA p 5000 5", "200 result= (timeout)"),  # at the timeout: too late
        ("(5.5)12345", "GET DATA p 0 5", "200 result=12345"),  # 0: 6 s for the first digit
        ("1(2.5)2345", "GET DATA p 0 5", "200 result=1 (timeout)"),  # ... and 2 s between
        ("(5.9)1(1.9)2", "GET DATA p", "200 result=12 (timeout)"),  # absent: the same
        ("(100)1", "GET DATA p -1 1", "200 result=1"),  # negative: forever
        ("12345", "GET DATA p 5000 10", "200 result=12345 (timeout)"),
        ("12345", "GET DATA p 5000 3", "200 result=123"),
        ("12~", "GET DATA p 5000 5", "200 result=12 (timeout)"),
        ("12#", "GET DATA p 5000 5", "200 result=12"),
        ("#", "GET DATA p 5000 5", "200 result="),
        (None, "GET DATA p 5000 5", "200 result= (timeout)"),
    ],
)
def test_get_data_has_one_timeout(entry: str | None, command: str, reply: str) -> None:
    """GET DATA waits its one timeout for the first digit and between digits (6 s / 2 s when
    0 or absent, forever when negative); `#` ends the entry and is not returned."""
    channel = channel_for(entry)
    assert channel.handle(command.encode()) == reply
    assert channel.protocol_errors == []


def test_get_data_ignores_the_channel_timeouts() -> None:
    """TIMEOUT(response) and TIMEOUT(digit) play no part in GET DATA."""
    channel = channel_for("12(2.5)345", "(8)1")
    channel.handle(b'EXEC MSet "TIMEOUT(response)=1,TIMEOUT(digit)=1"')
    assert channel.handle(b"GET DATA p 4000 5") == "200 result=12345"
    assert channel.handle(b"GET DATA p 9000 1") == "200 result=1"


def test_get_data_missing_prompt_hangup_and_bad_maxdigits() -> None:
    """A missing prompt answers -1 with the channel up and takes no entry; maxdigits 0 answers
    -1 too; a hang-up while keying answers -1 and is followed by HANGUP; maxdigits outside
    1..1023 is recorded."""
    missing = channel_for("12345", missing_prompt=True)
    assert missing.handle(b"GET DATA p 5000 5") == "200 result=-1"
    assert not missing.hangup_after_reply
    assert missing.entries_used == 0
    assert missing.handle(b'GET DATA "" 5000 5') == "200 result=12345"  # nothing to play
    zero = channel_for("12345")
    assert zero.handle(b"GET DATA p 5000 0") == "200 result=-1"
    assert zero.protocol_errors == ["GET DATA maxdigits '0': Asterisk takes 1..1023"]
    keying = channel_for("12", hangup="entry")
    assert keying.handle(b"GET DATA p 5000 5") == "200 result=-1"
    assert keying.hangup_after_reply
    assert keying.caller_hung_up


# Read: TIMEOUT(response) for the first digit, TIMEOUT(digit) between digits.


def test_channel_timeouts_default_to_asterisks_and_are_functions_not_variables() -> None:
    """A channel starts with __ast_pbx_run's 10 s / 5 s; MSet and SET VARIABLE of
    TIMEOUT(response) / TIMEOUT(digit) set them (seconds, fractions allowed), GET VARIABLE
    reads them back as func_timeout prints them, and no variable is recorded."""
    channel = channel_for()
    assert (channel.response_timeout_ms, channel.digit_timeout_ms) == (10000, 5000)
    assert (DEFAULT_RESPONSE_TIMEOUT_MS, DEFAULT_DIGIT_TIMEOUT_MS) == (10000, 5000)
    mset = b'EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"'
    assert channel.handle(mset) == "200 result=0"
    assert (channel.response_timeout_ms, channel.digit_timeout_ms) == (5000, 3000)
    assert channel.handle(b'SET VARIABLE TIMEOUT(digit) "2.5"') == "200 result=1"
    assert channel.digit_timeout_ms == 2500
    assert channel.handle(b"GET VARIABLE TIMEOUT(digit)") == "200 result=1 (2.500)"
    assert channel.handle(b'EXEC Set "TIMEOUT(r)=7"') == "200 result=0"
    assert channel.response_timeout_ms == 7000
    assert channel.variables == {}
    assert channel.protocol_errors == []


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("5.000", 5000),
        ("3", 3000),
        ("2.5", 2500),
        ("3.0015", 3001),
        (" 7", 7000),
        ("1e3", 1000),
        ("5 .5", 5500),
        (".5", 0),
        ("-1", 0),
        ("abc", 0),
        ("", 0),
    ],
)
def test_timeout_values_are_read_as_func_timeout_reads_them(value: str, ms: int) -> None:
    """sscanf("%ld%lf"): whole seconds then the rest as a fraction; no leading integer or a
    negative one gives 0."""
    assert timeout_ms(value) == ms


def test_other_functions_and_odd_timeout_values_are_recorded() -> None:
    """A function other than TIMEOUT (names are case-sensitive), a TIMEOUT type other than
    response/digit, and a value sscanf would read differently from a plain number are all
    recorded; none of them sets a variable."""
    channel = channel_for()
    channel.handle(b'EXEC MSet "CALLERID(num)=1,timeout(digit)=1,TIMEOUT(absolute)=1"')
    channel.handle(b'SET VARIABLE TIMEOUT(digit) ".5"')
    assert channel.variables == {}
    assert channel.digit_timeout_ms == 0
    assert channel.protocol_errors == [
        "function the simulator does not know: 'CALLERID(num)'",
        "function the simulator does not know: 'timeout(digit)'",
        "TIMEOUT type the simulator does not model: 'TIMEOUT(absolute)'",
        "TIMEOUT(digit) value '.5' is read by sscanf as 0 ms",
    ]


@pytest.mark.parametrize(
    ("timeouts", "entry", "found"),
    [
        ("", "(9)1(4.5)2345", "12345,OK"),  # the defaults: 10 s first, 5 s between
        ("", "(10)12345", ",TIMEOUT"),
        ("", "1(5)2345", "1,TIMEOUT"),
        ("TIMEOUT(digit)=1", "12(2.5)345", "12,TIMEOUT"),
        ("TIMEOUT(digit)=3", "12(2.5)345", "12345,OK"),
        ("TIMEOUT(response)=5", "(6)12345", ",TIMEOUT"),
        ("TIMEOUT(response)=7", "(6)12345", "12345,OK"),
        ("", "123", "123,TIMEOUT"),
        ("", "123~", "123,TIMEOUT"),
        ("", "12#", "12,OK"),
        ("", "#", ",OK"),
        ("", "1234567", "12345,OK"),
        ("", None, ",TIMEOUT"),
    ],
)
def test_read_waits_response_then_digit_timeouts(
    timeouts: str, entry: str | None, found: str
) -> None:
    """Read with no timeout argument waits TIMEOUT(response) for the first digit and
    TIMEOUT(digit) between digits; READSTATUS is OK for max digits or `#` (also alone) and
    TIMEOUT when a timeout ended it, with or without digits."""
    channel = channel_for(entry)
    if timeouts:
        channel.handle(f'EXEC MSet "{timeouts}"'.encode())
    assert read(channel) == f"200 result=1 ({found})"
    assert channel.protocol_errors == []


def test_read_timeout_argument_is_used_for_both() -> None:
    """A positive timeout argument (seconds) is Read's first-digit and between-digit timeout;
    0 or empty leaves the channel's."""
    channel = channel_for("(3)1", "(1.5)12(1.5)345", "(3)1")
    assert read(channel, "CALLERID_ENTRY,p,5,,,2") == "200 result=1 (,TIMEOUT)"
    assert read(channel, "CALLERID_ENTRY,p,5,,,2") == "200 result=1 (12345,OK)"
    assert read(channel, "CALLERID_ENTRY,p,1,,,0") == "200 result=1 (1,OK)"


def test_read_answers_the_channel_and_its_options() -> None:
    """Read answers a channel that is not up; option n reads without answering; option s
    skips (READSTATUS SKIPPED, variable ''); option t sets the terminators; option e keeps a
    terminator typed alone; options it does not model (i) are recorded."""
    answered = channel_for("12345")
    assert answered.handle(b"CHANNEL STATUS") == "200 result=4"
    read(answered)
    assert answered.handle(b"CHANNEL STATUS") == "200 result=6"
    quiet = channel_for("12345")
    assert read(quiet, "CALLERID_ENTRY,p,5,n") == "200 result=1 (12345,OK)"
    assert quiet.handle(b"CHANNEL STATUS") == "200 result=4"
    skipped = channel_for("12345")
    assert read(skipped, "CALLERID_ENTRY,p,5,s") == "200 result=1 (,SKIPPED)"
    assert skipped.entries_used == 0
    star = channel_for("12*", "12#", "#")
    assert read(star, "CALLERID_ENTRY,p,5,t(*)") == "200 result=1 (12,OK)"
    assert read(star, "CALLERID_ENTRY,p,5,t(*)") == "200 result=1 (12#,TIMEOUT)"
    assert read(star, "CALLERID_ENTRY,p,5,e") == "200 result=1 (#,OK)"  # e: keep a lone '#'
    assert [answered.protocol_errors, quiet.protocol_errors, star.protocol_errors] == [[], [], []]
    tones = channel_for("12345")
    read(tones, "CALLERID_ENTRY,p,5,i")
    assert tones.protocol_errors == ["Read option 'i' the simulator does not model"]


@pytest.mark.parametrize(("maxdigits", "digits"), [("5", "12345"), ("", "1" * 255)])
def test_read_maxdigits(maxdigits: str, digits: str) -> None:
    """Read stops at maxdigits; with none it reads up to 255."""
    channel = channel_for("1" * 300 if not maxdigits else "1234567")
    assert read(channel, f"CALLERID_ENTRY,p,{maxdigits}") == f"200 result=1 ({digits},OK)"


@pytest.mark.parametrize("maxdigits", ["0", "256", "-1"])
def test_read_maxdigits_out_of_range_reads_255_and_is_recorded(maxdigits: str) -> None:
    """maxdigits outside 1..255 quietly becomes 255 in Asterisk; the simulator records it."""
    channel = channel_for("1" * 300)
    assert read(channel, f"CALLERID_ENTRY,p,{maxdigits}") == f"200 result=1 ({'1' * 255},OK)"
    assert channel.protocol_errors == [f"Read maxdigits {maxdigits!r}: Asterisk reads up to 255"]


def test_read_missing_prompt_is_error_with_the_channel_up() -> None:
    """A prompt that cannot be played: nothing is read (no entry is taken), the variable is
    '', READSTATUS ERROR, and no HANGUP follows."""
    channel = channel_for("12345", missing_prompt=True)
    assert read(channel) == "200 result=1 (,ERROR)"
    assert channel.entries_used == 0
    assert not channel.hangup_after_reply
    assert channel.handle(b"CHANNEL STATUS") == "200 result=6"


def test_read_hangups() -> None:
    """A hang-up during the prompt or while keying: EXEC still answers 200 result=0 and a
    HANGUP follows; the variable holds what was typed so far; READSTATUS is HANGUP. Read
    after the hang-up (EXEC is dead-safe) also says HANGUP. If the entry ends before the
    caller hangs up, READSTATUS says how it ended and HANGUP follows the reply."""
    prompt = channel_for("12345", hangup="prompt")
    assert prompt.handle(b'EXEC Read "CALLERID_ENTRY,p,5"') == "200 result=0"
    assert prompt.hangup_after_reply
    prompt.mark_dead()
    assert prompt.handle(READ_RESULT) == "200 result=1 (,HANGUP)"
    assert read(prompt) == "200 result=1 (,HANGUP)"
    keying = channel_for("12", hangup="entry")
    assert keying.handle(b'EXEC Read "CALLERID_ENTRY,p,5"') == "200 result=0"
    assert keying.hangup_after_reply
    assert keying.handle(READ_RESULT) == "200 result=1 (12,HANGUP)"
    later = channel_for("12(4)", hangup="entry")  # hangs up 4 s after the 2: during the wait
    assert read(later) == "200 result=1 (12,HANGUP)"
    after = channel_for("12(6)", hangup="entry")  # TIMEOUT(digit) 5 s ends it first
    assert after.handle(b'EXEC Read "CALLERID_ENTRY,p,5"') == "200 result=0"
    assert after.hangup_after_reply  # the caller hangs up right after
    assert after.handle(READ_RESULT) == "200 result=1 (12,TIMEOUT)"


def test_read_attempts_take_one_entry_each() -> None:
    """With attempts, an empty entry is retried with the next scripted entry."""
    channel = channel_for(None, "#", "12345", "99")
    assert read(channel, "CALLERID_ENTRY,p,5,,3") == "200 result=1 (12345,OK)"
    assert channel.entries_used == 3


def test_read_without_a_variable_is_an_error() -> None:
    """Read with no variable reads nothing and leaves READSTATUS ERROR (recorded)."""
    channel = channel_for("12345")
    assert channel.handle(b'EXEC Read ",p,5"') == "200 result=0"
    assert channel.handle(b'GET FULL VARIABLE "${READSTATUS}"') == "200 result=1 (ERROR)"
    assert channel.entries_used == 0
    assert channel.protocol_errors == ["Read without a variable: Asterisk reads nothing"]


# GET FULL VARIABLE and variable names.


def test_get_full_variable_substitutes_every_reference() -> None:
    """Every ${NAME} is replaced wherever it stands (unset: ''), other text is kept (a lone
    `$` too), nested references first, built-in names and TIMEOUT(...) answer; the reply is
    always result=1; it works on a dead channel."""
    channel = channel_for(priority=3)
    channel.handle(b'EXEC MSet "A=1,B=two,N=A,__INH=x"')
    cases = {
        "${A},${B}": "1,two",
        "${UNSET}": "",
        "x${A}y$z${B}": "x1y$ztwo",
        "${${N}}": "1",
        "${INH}|${__INH}": "x|",
        "${CONTEXT},${EXTEN},${PRIORITY}": "from-pstn,s,3",
        "${TIMEOUT(digit)}": "5.000",
        "plain": "plain",
    }
    for expression, value in cases.items():
        line = f'GET FULL VARIABLE "{expression}"'.encode()
        assert channel.handle(line) == f"200 result=1 ({value})", expression
    channel.mark_dead()
    assert channel.handle(b'GET FULL VARIABLE "${A}"') == "200 result=1 (1)"
    assert channel.protocol_errors == []


@settings(max_examples=300, deadline=None)
@given(template=st.text(alphabet=st.sampled_from("${}[]AB:()x"), max_size=24))
def test_substitution_shortcut_agrees_with_the_character_loop(template: str) -> None:
    """GET FULL VARIABLE takes a shortcut for templates with no nesting and no $[...]; it
    agrees with the character loop modelled on Asterisk's, errors included."""
    shortcut, by_char = channel_for(), channel_for()
    for channel in (shortcut, by_char):
        channel.handle(b'EXEC MSet "A=1,B=two"')
    assert shortcut._substitute(template) == by_char._substitute_by_char(template)
    assert shortcut.protocol_errors == by_char.protocol_errors


def test_get_variable_and_leading_underscores() -> None:
    """A variable is found without its inheritance underscores and not with them; setting
    the bare name replaces the prefixed one; GET VARIABLE answers 0 when unset."""
    channel = channel_for()
    channel.handle(b'SET VARIABLE __X "1"')
    assert channel.handle(b"GET VARIABLE X") == "200 result=1 (1)"
    assert channel.handle(b"GET VARIABLE __X") == "200 result=0"
    channel.handle(b'SET VARIABLE X "2"')
    assert channel.variables == {"X": "2"}


# res_agi's reading of the socket, with a stand-in transport (exact writes, no timing).


class _Transport(asyncio.Transport):
    """Records writes; never closing."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def held_call(script: CallScript) -> tuple[_Call, SimulatedChannel, _Transport]:
    channel = SimulatedChannel(script)
    call = _Call(channel, [b"\n"], asyncio.get_running_loop())
    transport = _Transport()
    call.connection_made(transport)
    transport.written.clear()
    return call, channel, transport


async def test_buffered_lines_go_one_per_arrival_while_the_socket_has_unread_bytes() -> None:
    """Of lines written together only the first is answered. The next arrival lets the
    buffered lines through one by one while its bytes are unread, then the new bytes are
    read: their first line is answered and the rest wait again. At the end of the stream
    every buffered line is answered, then HANGUP ends the AGI. Each read that leaves a whole
    line behind is recorded."""
    call, channel, transport = held_call(CallScript())
    call.data_received(b"ANSWER\nCHANNEL STATUS\nNOOP\n")
    assert transport.written == [b"200 result=0\n"]
    call.data_received(b'VERBOSE "a" 1\nSET VARIABLE A "1"\n')
    assert transport.written[1:] == [b"200 result=6\n", b"200 result=0\n", b"200 result=1\n"]
    assert channel.commands[-1] == 'VERBOSE "a" 1'
    call.eof_received()
    # The last buffered line's reply, then the AGI ends: run_agi's closing HANGUP.
    assert transport.written[4:] == [b"200 result=1\n", b"HANGUP\n"]
    assert channel.variables == {"A": "1"}
    assert await call.finished is True
    assert channel.protocol_errors == [PIPELINED, PIPELINED]


async def test_one_command_per_round_trip_is_never_recorded() -> None:
    """A command per write, each after the reply before it: no protocol error, even when a
    line arrives in pieces."""
    call, channel, transport = held_call(CallScript())
    for chunk in (b"ANSWER\n", b"CHANNEL", b" STATUS\n", b"NOOP\n"):
        call.data_received(chunk)
    assert transport.written == [b"200 result=0\n", b"200 result=6\n", b"200 result=0\n"]
    assert channel.protocol_errors == []


async def test_get_data_ends_unanswered_when_a_command_comes_meanwhile() -> None:
    """Realtime: GET DATA watches the AGI socket, so bytes arriving while it waits end it and
    it never answers; the new command is answered. Read does not watch the socket: what comes
    meanwhile waits for its reply."""
    call, channel, transport = held_call(CallScript(entries=[None, None], realtime=True))
    call.data_received(b"GET DATA p 10000 5\n")
    assert transport.written == []
    call.data_received(b"NOOP\n")
    assert transport.written == [b"200 result=0\n"]
    assert channel.protocol_errors == [INTERRUPTED_GET_DATA]
    call.data_received(b'EXEC Read "V,p,5,,,10"\n')
    call.data_received(b"NOOP\n")
    assert transport.written == [b"200 result=0\n"]  # Read still waits for its first digit
    call.stop()


# Over a real socket, against a raw FastAGI server.


@dataclass
class RawGateway:
    """The FastAGI server side, writing exactly the bytes given."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def environment(self) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.reader.readuntil(b"\n\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.reader.readline()


T = TypeVar("T")


@contextlib.asynccontextmanager
async def raw_gateway(
    scenario: Callable[[RawGateway], Awaitable[T]],
) -> AsyncIterator[tuple[int, asyncio.Future[T]]]:
    """Serve one connection with `scenario`, then close it; yields the port and its result."""
    done: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            done.set_result(await scenario(RawGateway(reader, writer)))
        except Exception as exc:
            done.set_exception(exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], done
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.wait([done], timeout=WAIT)


async def raw_call(
    scenario: Callable[[RawGateway], Awaitable[T]], script: CallScript
) -> tuple[CallResult, T]:
    async with raw_gateway(scenario) as (port, done):
        result = await run_call("127.0.0.1", port, script, timeout=WAIT)
        found = await asyncio.wait_for(done, WAIT)
    return result, found


async def test_socket_second_of_two_commands_waits_for_more_bytes() -> None:
    """Over a socket: two commands in one write get one reply; the second command runs only
    once a third is sent (its decision time is later than the first reply), and is answered
    before the third."""

    async def scenario(gw: RawGateway) -> tuple[list[bytes], float]:
        await gw.environment()
        await gw.send(b'ANSWER\nSET VARIABLE OML_IDENT_OUTCOME "x"\n')
        first = await gw.line()
        third_sent = time.monotonic()
        await gw.send(b"CHANNEL STATUS\n")
        return [first, await gw.line(), await gw.line()], third_sent

    result, found = await raw_call(scenario, CallScript())
    replies, third_sent = found
    assert replies == [b"200 result=0\n", b"200 result=1\n", b"200 result=6\n"]
    assert result.decided_at is not None
    assert result.decided_at >= third_sent
    assert result.protocol_errors == [PIPELINED]


async def test_socket_close_answers_the_buffered_commands_before_the_call_ends() -> None:
    """Over a socket: commands still buffered when the gateway closes all run, in order,
    before the AGI ends (after the close), and the Goto among them takes effect."""

    async def scenario(gw: RawGateway) -> tuple[bytes, float]:
        await gw.environment()
        await gw.send(b'NOOP\nSET VARIABLE OML_IDENT_OUTCOME "x"\nEXEC Goto "c,e,1"\n')
        first = await gw.line()
        return first, time.monotonic()

    result, found = await raw_call(scenario, CallScript())
    first, closing = found
    assert first == b"200 result=0\n"
    assert result.commands == ["NOOP", 'SET VARIABLE OML_IDENT_OUTCOME "x"', 'EXEC Goto "c,e,1"']
    assert result.decided_at is not None
    assert result.decided_at >= closing
    assert (result.context, result.extension, result.priority) == ("c", "e", 1)
    assert result.closed_by_gateway
    assert result.protocol_errors == [PIPELINED]


async def test_socket_gateway_sequence_with_read() -> None:
    """The gateway's sequence, one command per round trip: timeouts by MSet, Read, GET FULL
    VARIABLE, the decision by MSet and a Goto; no protocol error."""
    commands = [
        b'EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"\n',
        b'EXEC Read "CALLERID_ENTRY,callerid-test/prompt,5"\n',
        b'GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"\n',
        b"SET MUSIC on default\n",
        b"SET MUSIC off\n",
        b'EXEC MSet "__OML_CUSTOMER_ID=12345,__OMLCODCLI=12345,OML_DEST_TYPE=1,'
        b'OML_DEST_ID=3,OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=identified"\n',
        b'EXEC Goto "oml-dest-1,3,1"\n',
    ]

    async def scenario(gw: RawGateway) -> list[bytes]:
        await gw.environment()
        replies = []
        for command in commands:
            await gw.send(command)
            replies.append(await gw.line())
        return replies

    result, replies = await raw_call(scenario, CallScript(entries=["1(2.9)2345"]))
    assert (
        replies
        == [b"200 result=0\n", b"200 result=0\n", b"200 result=1 (12345,OK)\n"]
        + [b"200 result=0\n"] * 4
    )
    assert (result.response_timeout_ms, result.digit_timeout_ms) == (5000, 3000)
    assert result.variables["CALLERID_ENTRY"] == "12345"
    assert result.variables["READSTATUS"] == "OK"
    assert result.variables["OML_IDENT_OUTCOME"] == "identified"
    assert (result.context, result.extension, result.priority) == ("oml-dest-1", "3", 1)
    assert result.last_digit_at is not None
    assert result.protocol_errors == []


async def test_socket_hangup_while_keying_a_read() -> None:
    """hangup="entry": EXEC Read answers 200 result=0, then the HANGUP line; the entry so far
    and READSTATUS HANGUP can still be read."""

    async def scenario(gw: RawGateway) -> list[bytes]:
        await gw.environment()
        await gw.send(b'EXEC Read "CALLERID_ENTRY,p,5"\n')
        lines = [await gw.line(), await gw.line()]
        await gw.send(READ_RESULT + b"\n")
        return [*lines, await gw.line()]

    result, lines = await raw_call(scenario, CallScript(entries=["123"], hangup="entry"))
    assert lines == [b"200 result=0\n", b"HANGUP\n", b"200 result=1 (123,HANGUP)\n"]
    assert result.hung_up


async def test_socket_lookup_hangup_starts_after_the_last_read() -> None:
    """hangup="lookup": the HANGUP line comes unprompted after the reply to the last scripted
    entry's Read; later playback gets 511."""

    async def scenario(gw: RawGateway) -> list[bytes]:
        await gw.environment()
        await gw.send(b'EXEC Read "CALLERID_ENTRY,p,5"\n')
        lines = [await gw.line(), await gw.line()]
        await gw.send(b'STREAM FILE p ""\n')
        return [*lines, await gw.line()]

    script = CallScript(entries=["12345"], hangup="lookup", hangup_delay=0.01)
    result, lines = await raw_call(scenario, script)
    assert lines == [
        b"200 result=0\n",
        b"HANGUP\n",
        b"511 Command Not Permitted on a dead channel or intercept routine\n",
    ]
    assert result.hung_up


async def test_realtime_replies_wait_for_the_timeout_that_ends_the_entry() -> None:
    """realtime: GET DATA's reply comes no sooner than its timeout after the last key, and
    Read's no sooner than TIMEOUT(digit) after its last key."""

    async def scenario(gw: RawGateway) -> list[tuple[bytes, float]]:
        await gw.environment()
        found = []
        for command in (
            b"GET DATA p 300 5\n",
            b'EXEC MSet "TIMEOUT(digit)=0.3"\n',
            b'EXEC Read "CALLERID_ENTRY,p,5"\n',
        ):
            sent = time.monotonic()
            await gw.send(command)
            found.append((await gw.line(), time.monotonic() - sent))
        return found

    _, found = await raw_call(scenario, CallScript(entries=["12", "(0.1)1"], realtime=True))
    (get_data, get_data_took), _, (read_reply, read_took) = found
    assert get_data == b"200 result=12 (timeout)\n"
    assert get_data_took >= 0.29
    assert read_reply == b"200 result=0\n"
    assert read_took >= 0.39


async def test_realtime_lookup_hangup_ends_an_entry_in_progress() -> None:
    """realtime: a "lookup" hang-up that falls inside a later entry ends it there: GET DATA
    answers -1 at the moment of the hang-up (not at its timeout), then HANGUP."""

    async def scenario(gw: RawGateway) -> tuple[list[bytes], float]:
        await gw.environment()
        await gw.send(b"GET DATA p 5000 5\n")
        first = await gw.line()
        sent = time.monotonic()
        await gw.send(b"GET DATA p 5000 1\n")
        lines = [first, await gw.line(), await gw.line()]
        return lines, time.monotonic() - sent

    script = CallScript(entries=["12345"], hangup="lookup", hangup_delay=0.3, realtime=True)
    result, found = await raw_call(scenario, script)
    lines, took = found
    assert lines == [b"200 result=12345\n", b"200 result=-1\n", b"HANGUP\n"]
    assert 0.2 <= took < 4.0  # ended by the hang-up, not by the 5 s timeout
    assert result.hung_up
    assert result.protocol_errors == []
