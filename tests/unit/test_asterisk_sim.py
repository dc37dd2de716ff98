"""The simulated Asterisk client, driven by a tiny in-test FastAGI server.

The server side is built from the gateway's own parser and commands (`FakeGateway`), so these
tests also check that the two sides agree on the wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agi_gateway.commands import (
    Answer,
    ChannelStatus,
    Command,
    Exec,
    GetData,
    MultiSet,
    SetMusic,
    SetVariable,
    StreamFile,
    Verbose,
)
from agi_gateway.protocol import (
    AgiParser,
    AgiProtocolError,
    EndOfStream,
    Environment,
    HangupNotice,
    Reply,
)
from tools.asterisk_sim import (
    LINE_MAX,
    PIPELINED,
    CallResult,
    CallScript,
    HangupMode,
    SimulatedChannel,
    app_separate_args,
    environment_writes,
    main,
    parse_args,
    run_call,
)
from tools.asterisk_sim.args import _app_separate_args_by_char, _parse_args_by_char
from tools.asterisk_sim.wire import _Call

DEAD = "511 Command Not Permitted on a dead channel or intercept routine"
WAIT = 5.0  # generous bound on any single wait; never reached when things work


@dataclass
class FakeGateway:
    """The gateway side of one connection: sends commands, parses what comes back."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: AgiParser = field(default_factory=AgiParser)
    pending: list[Environment | Reply | HangupNotice | EndOfStream] = field(default_factory=list)
    hangups: int = 0

    async def _next(
        self, *, stop_at_hangup: bool = False
    ) -> Environment | Reply | EndOfStream | None:
        """The next event other than HANGUP (counted); None at a HANGUP if `stop_at_hangup`."""
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, HangupNotice):
                    self.hangups += 1
                    if stop_at_hangup:
                        return None
                    continue
                return event
            async with asyncio.timeout(WAIT):
                data = await self.reader.read(4096)
            self.pending += self.parser.feed(data) if data else self.parser.feed_eof()

    async def environment(self) -> Mapping[str, str]:
        event = await self._next()
        assert isinstance(event, Environment)
        return event.variables

    async def send_raw(self, line: bytes) -> Reply:
        self.writer.write(line)
        await self.writer.drain()
        event = await self._next()
        assert isinstance(event, Reply), event
        return event

    async def run(self, command: Command) -> Reply:
        return await self.send_raw(command.encode())

    async def wait_for_hangup(self) -> None:
        """Read until Asterisk's HANGUP line (no command is outstanding meanwhile)."""
        if self.hangups == 0:
            event = await self._next(stop_at_hangup=True)
            assert event is None, f"unexpected {event} while waiting for HANGUP"


Scenario = Callable[[FakeGateway], Awaitable[object]]


@dataclass
class Served:
    port: int
    done: asyncio.Future[object]  # the scenario's return value, or its exception


@contextlib.asynccontextmanager
async def fake_gateway(scenario: Scenario, *, keep_open: bool = False) -> AsyncIterator[Served]:
    """Serve one connection with `scenario`; close the socket after it unless `keep_open`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[object] = loop.create_future()
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            result = await scenario(FakeGateway(reader, writer))
            if keep_open:
                await release.wait()
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(result)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield Served(server.sockets[0].getsockname()[1], done)
    finally:
        release.set()
        server.close()
        await server.wait_closed()
        await asyncio.wait([done], timeout=WAIT)  # the handler has finished: no leaked task
        if done.done() and not done.cancelled():
            done.exception()  # retrieved, so an unchecked failure does not warn at GC


async def call(scenario: Scenario, script: CallScript) -> CallResult:
    """Run one simulated call against `scenario`; re-raise the scenario's assertion errors."""
    async with fake_gateway(scenario) as served:
        result = await run_call("127.0.0.1", served.port, script, timeout=WAIT)
        await asyncio.wait_for(served.done, WAIT)
    return result


async def test_identified_call_records_variables_and_continues_at_the_goto_target() -> None:
    """Variables are captured unquoted, the Goto target is where the dialplan continues, and
    the decision timestamps are taken. TIMEOUT(digit) is a function: it sets the channel's
    digit timeout, not a variable."""
    sent = [
        Answer(),
        SetVariable("TIMEOUT(digit)", "3"),
        GetData("customer-id", 5000, 5),
        SetVariable("__OMLCODCLI", "12345"),
        SetVariable("OML_IDENT_OUTCOME", "identified"),
        Exec("Goto", "oml-dest-1,3,1"),
    ]

    async def scenario(gw: FakeGateway) -> list[Reply]:
        env = await gw.environment()
        assert env["agi_network_script"] == "identify/7"
        assert env["agi_callerid"] == "5550000"
        return [await gw.run(command) for command in sent]

    result = await call(scenario, CallScript(node="7", caller_number="5550000"))
    assert result.variables == {
        "__OMLCODCLI": "12345",
        "OML_IDENT_OUTCOME": "identified",
    }
    assert result.commands == [command.encode().decode().rstrip("\n") for command in sent]
    assert (result.context, result.extension, result.priority) == ("oml-dest-1", "3", 1)
    assert result.digit_timeout_ms == 3000
    assert result.closed_by_gateway
    assert not result.hung_up
    assert result.protocol_errors == []
    assert result.last_digit_at is not None
    assert result.decided_at is not None
    assert result.decided_at >= result.last_digit_at


async def test_mset_sets_every_pair_in_order_and_answers_once() -> None:
    """EXEC MSet, as the gateway sends its decision: one `200 result=0`, every pair set with
    its name as written (the `__` inheritance prefix kept, as for SET VARIABLE), an empty
    value set as empty, and the decision time taken when OML_IDENT_OUTCOME is set."""
    decision = MultiSet(
        [
            ("__OML_CUSTOMER_ID", "12345"),
            ("__OMLCODCLI", "12345"),
            ("OML_DEST_TYPE", ""),
            ("OML_DEST_ID", ""),
            ("OML_IDENT_SOURCE", "local"),
            ("OML_IDENT_OUTCOME", "hangup"),
        ]
    )

    async def scenario(gw: FakeGateway) -> list[str]:
        await gw.environment()
        return [(await gw.run(decision)).text, (await gw.run(Exec("Goto", "c,e,1"))).text]

    async with fake_gateway(scenario) as served:
        result = await run_call("127.0.0.1", served.port, CallScript(), timeout=WAIT)
        texts = await asyncio.wait_for(served.done, WAIT)
    assert texts == ["200 result=0", "200 result=0"]
    assert list(result.variables.items()) == list(decision.pairs)
    assert result.decided_at is not None
    assert result.protocol_errors == []
    assert (result.context, result.extension, result.priority) == ("c", "e", 1)


def test_mset_splits_its_argument_as_asterisk_does() -> None:
    """Quotes are removed, a backslash keeps the next character, parentheses group, a value
    keeps every `=` after the first, and a part with no `=` is ignored (and recorded)."""
    channel = SimulatedChannel(CallScript())
    line = b'EXEC MSet "A=\\"quoted\\",B=x=y,C,D=(1,2),E=a\\\\,b,_F=\\"\\""'
    assert channel.handle(line) == "200 result=0"
    assert channel.variables == {"A": "quoted", "B": "x=y", "D": "(1,2)", "E": "a,b", "_F": ""}
    assert channel.protocol_errors == ["MSet ignores 'C': no '='"]
    assert channel.decided_at is None


def test_mset_warnings_are_protocol_errors_and_its_99th_part_takes_the_rest() -> None:
    """An empty MSet sets nothing; past 99 pairs the 99th value swallows the rest, as in
    Asterisk; both are what a gateway must never send, so they are recorded."""
    channel = SimulatedChannel(CallScript())
    assert channel.handle(b'EXEC MSet ""') == "200 result=0"
    many = ",".join(f"V{index}={index}" for index in range(100))
    assert channel.handle(f'EXEC MSet "{many}"'.encode()) == "200 result=0"
    assert channel.variables["V97"] == "97"
    assert channel.variables["V98"] == "98,V99=99"
    assert "V99" not in channel.variables
    assert len(channel.protocol_errors) == 2
    assert "without a name=value pair" in channel.protocol_errors[0]
    assert "over 99 pairs" in channel.protocol_errors[1]


@pytest.mark.parametrize(
    ("data", "delim", "limit", "parts"),
    [
        ("a,b", ",", 99, ["a", "b"]),
        ("a,", ",", 99, ["a", ""]),
        (",", ",", 99, ["", ""]),
        ("", ",", 99, []),
        ('"a,b",c', ",", 99, ["a,b", "c"]),
        ("f(a,b),c", ",", 99, ["f(a,b)", "c"]),
        ("[a,b],c", ",", 99, ["[a,b]", "c"]),
        ("a\\,b", ",", 99, ["a,b"]),
        ('a\\"b', ",", 99, ['a"b']),
        ("a,b,c", ",", 2, ["a", "b,c"]),
        ('a,"b",\\c', ",", 2, ["a", '"b",\\c']),
        ("x=y=z", "=", 2, ["x", "y=z"]),
        ("N=", "=", 2, ["N", ""]),
        ("N", "=", 2, ["N"]),
        ('a"b"c=1', "=", 2, ["abc", "1"]),
        ("F(a=b)=1", "=", 2, ["F(a=b)", "1"]),
    ],
)
def test_app_separate_args_matches_asterisk(
    data: str, delim: str, limit: int, parts: list[str]
) -> None:
    """__ast_app_separate_args with remove_chars: groups, removals, the limit, a trailing
    delimiter."""
    assert app_separate_args(data, delim, limit) == parts


async def test_replies_match_asterisk() -> None:
    """ANSWER, CHANNEL STATUS, GET DATA, STREAM FILE, SET MUSIC and VERBOSE answer as
    Asterisk 22 does; two digits typed for a GET DATA of five end by its timeout."""

    async def scenario(gw: FakeGateway) -> list[str]:
        await gw.environment()
        commands = [
            ChannelStatus(),
            Answer(),
            ChannelStatus(),
            GetData("p", 5000, 5),
            StreamFile("p", "#"),
            SetMusic(True),
            SetMusic(False),
            Verbose("hello"),
        ]
        return [(await gw.run(command)).text for command in commands]

    async with fake_gateway(scenario) as served:
        await run_call("127.0.0.1", served.port, CallScript(entries=["42"]), timeout=WAIT)
        texts = await asyncio.wait_for(served.done, WAIT)
    assert texts == [
        "200 result=4",
        "200 result=0",
        "200 result=6",
        "200 result=42 (timeout)",
        "200 result=0 endpos=8000",
        "200 result=0",
        "200 result=0",
        "200 result=1",
    ]


async def test_get_data_entry_forms() -> None:
    """Typed, nothing, inter-digit timeout, terminator, max digits, and beyond the script."""

    async def scenario(gw: FakeGateway) -> list[tuple[str | None, str | None]]:
        await gw.environment()
        found = []
        for max_digits in (5, 5, 5, 5, 3, 5):
            reply = await gw.run(GetData("p", 5000, max_digits))
            found.append((reply.result, reply.data))
        return found

    async with fake_gateway(scenario) as served:
        script = CallScript(entries=["12345", None, "12~", "77#", "98765"])
        await run_call("127.0.0.1", served.port, script, timeout=WAIT)
        found = await asyncio.wait_for(served.done, WAIT)
    assert found == [
        ("12345", None),
        ("", "timeout"),
        ("12", "timeout"),
        ("77", None),
        ("987", None),
        ("", "timeout"),
    ]


@pytest.mark.parametrize(
    ("jump", "position"),
    [
        (None, ("from-pstn", "s", 4)),
        (Exec("Goto", "ctx,ext,1"), ("ctx", "ext", 1)),
        (Exec("Goto", "ext2,5"), ("from-pstn", "ext2", 5)),
        (Exec("Goto", "9"), ("from-pstn", "s", 9)),
        (Exec("Goto", "+2"), ("from-pstn", "s", 5)),
    ],
    ids=["no jump", "full", "extension,priority", "priority", "relative"],
)
async def test_goto_priority_semantics(
    jump: Command | None, position: tuple[str, str, int]
) -> None:
    """ast_explicit_goto stores priority-1 and the pbx loop adds 1 when AGI() returns, so a
    Goto lands exactly on its target and no jump continues at the next priority."""

    async def scenario(gw: FakeGateway) -> None:
        await gw.environment()
        if jump is not None:
            assert (await gw.run(jump)).text == "200 result=0"

    result = await call(scenario, CallScript(priority=3))
    assert (result.context, result.extension, result.priority) == position
    assert result.protocol_errors == []


async def test_set_context_extension_priority() -> None:
    """SET CONTEXT/EXTENSION set the field; SET PRIORITY goes through ast_explicit_goto."""

    async def scenario(gw: FakeGateway) -> None:
        await gw.environment()
        for line in (b"SET CONTEXT sales\n", b"SET EXTENSION 100\n", b"SET PRIORITY 2\n"):
            assert (await gw.send_raw(line)).text == "200 result=0"

    result = await call(scenario, CallScript())
    assert (result.context, result.extension, result.priority) == ("sales", "100", 2)


async def test_hangup_during_prompt_then_511_except_dead_safe_commands() -> None:
    """ "prompt": GET DATA answers -1, HANGUP follows; afterwards only dead-safe commands
    (SET VARIABLE, EXEC) still work and the rest get 511."""

    async def scenario(gw: FakeGateway) -> list[str]:
        await gw.environment()
        first = await gw.run(GetData("p", 5000, 5))
        texts = [first.text]
        texts.append((await gw.run(ChannelStatus())).text)
        texts.append((await gw.run(SetVariable("OML_IDENT_OUTCOME", "hangup"))).text)
        texts.append((await gw.run(Exec("Goto", "h,1"))).text)
        texts.append((await gw.run(GetData("p", 5000, 5))).text)
        assert gw.hangups == 1
        return texts

    async with fake_gateway(scenario) as served:
        result = await run_call("127.0.0.1", served.port, CallScript(hangup="prompt"), timeout=WAIT)
        texts = await asyncio.wait_for(served.done, WAIT)
    assert texts == ["200 result=-1", DEAD, "200 result=1", "200 result=0", DEAD]
    assert result.hung_up
    assert result.variables == {"OML_IDENT_OUTCOME": "hangup"}
    assert result.last_digit_at is None


async def test_hangup_during_lookup_arrives_while_the_gateway_is_silent() -> None:
    """ "lookup": after the last scripted GET DATA, HANGUP arrives unprompted while the gateway
    sends nothing; later playback commands get 511."""

    async def scenario(gw: FakeGateway) -> list[str]:
        await gw.environment()
        first = await gw.run(GetData("p", 5000, 5))
        second = await gw.run(GetData("p", 5000, 5))
        await gw.wait_for_hangup()
        after = await gw.run(StreamFile("p"))
        return [first.text, second.text, after.text]

    async with fake_gateway(scenario) as served:
        script = CallScript(entries=[None, "12345"], hangup="lookup", hangup_delay=0.01)
        result = await run_call("127.0.0.1", served.port, script, timeout=WAIT)
        texts = await asyncio.wait_for(served.done, WAIT)
    assert texts == ["200 result= (timeout)", "200 result=12345", DEAD]
    assert result.hung_up
    assert result.closed_by_gateway


async def test_missing_prompt_answers_minus_one_with_the_channel_up() -> None:
    """missing_prompt: GET DATA and STREAM FILE answer -1 but no HANGUP follows."""

    async def scenario(gw: FakeGateway) -> list[str]:
        await gw.environment()
        texts = [
            (await gw.run(GetData("p", 5000, 5))).text,
            (await gw.run(StreamFile("p"))).text,
            (await gw.run(ChannelStatus())).text,
        ]
        assert gw.hangups == 0
        return texts

    async with fake_gateway(scenario) as served:
        script = CallScript(missing_prompt=True, channel_up=True)
        result = await run_call("127.0.0.1", served.port, script, timeout=WAIT)
        texts = await asyncio.wait_for(served.done, WAIT)
    assert texts == ["200 result=-1", "200 result=-1 endpos=0", "200 result=6"]
    assert not result.hung_up


async def test_hangup_before_environment_end() -> None:
    """ "before_env_end": the connection drops mid-environment, which the parser reports."""

    async def scenario(gw: FakeGateway) -> None:
        await gw.environment()

    async with fake_gateway(scenario) as served:
        result = await run_call(
            "127.0.0.1", served.port, CallScript(hangup="before_env_end"), timeout=WAIT
        )
        with pytest.raises(AgiProtocolError, match="middle of the environment"):
            await asyncio.wait_for(served.done, WAIT)
    assert result.hung_up
    assert result.commands == []


async def test_gateway_that_never_closes_is_reported_not_waited_for() -> None:
    """A gateway that keeps the socket open after its commands: run_call returns at its
    timeout with closed_by_gateway False."""

    async def scenario(gw: FakeGateway) -> None:
        await gw.environment()
        await gw.run(SetVariable("OML_IDENT_OUTCOME", "identified"))

    async with fake_gateway(scenario, keep_open=True) as served:
        result = await run_call("127.0.0.1", served.port, CallScript(), timeout=0.3)
    assert not result.closed_by_gateway
    assert result.variables == {"OML_IDENT_OUTCOME": "identified"}


async def test_node_in_argument() -> None:
    """node_in_arg: the script is plain "identify" and the node travels in agi_arg_1."""

    async def scenario(gw: FakeGateway) -> Mapping[str, str]:
        return await gw.environment()

    async with fake_gateway(scenario) as served:
        await run_call(
            "127.0.0.1", served.port, CallScript(node="12", node_in_arg=True), timeout=WAIT
        )
        env = await asyncio.wait_for(served.done, WAIT)
    assert isinstance(env, Mapping)
    assert env["agi_network_script"] == "identify"
    assert env["agi_arg_1"] == "12"
    assert env["agi_accountcode"] == ""


async def test_rejected_commands_are_answered_like_asterisk_and_recorded() -> None:
    """Unknown commands get 510, malformed ones the multi-line 520 block (after which the
    next reply is still in sync); CR, unbalanced quotes and unquoted EXEC options are
    recorded as protocol errors."""

    async def scenario(gw: FakeGateway) -> list[Reply]:
        await gw.environment()
        return [
            await gw.send_raw(b"FROBNICATE\n"),
            await gw.send_raw(b"GET DATA\n"),
            await gw.send_raw(b'SET VARIABLE X "a\r\n'),
            await gw.send_raw(b'SET VARIABLE Y "open\n'),
            await gw.send_raw(b"EXEC NoOp hello world\n"),
            await gw.run(Answer()),
        ]

    async with fake_gateway(scenario) as served:
        result = await run_call("127.0.0.1", served.port, CallScript(), timeout=WAIT)
        answered = await asyncio.wait_for(served.done, WAIT)
    assert isinstance(answered, list)
    unknown, usage, cr, open_quote, unquoted, answer = cast(list[Reply], answered)
    assert unknown.code == 510
    assert usage.code == 520
    # As Asterisk 22.10.1 sends it: the command's XML description, markup and all (checked
    # against the real one in tests/asterisk/test_differential.py).
    assert usage.text == (
        "520-Invalid command syntax.  Proper usage follows:\n"
        "Stream the given <replaceable>file</replaceable>, and receive DTMF data.\n"
        "Returns the digits received from the channel at the other end.\n"
        "520 End of proper usage."
    )
    assert cr.text == "200 result=1"
    assert open_quote.text == "200 result=1"
    assert unquoted.text == "200 result=0"
    assert answer.text == "200 result=0"
    assert result.variables["X"] == "a\r"  # what Asterisk really stores: the CR is kept
    errors = " | ".join(result.protocol_errors)
    for expected in ("unknown command", "bad arguments", "CR inside", "unbalanced", "EXEC"):
        assert expected in errors
    assert len(result.protocol_errors) == 6  # the CR line has an unbalanced quote too


def test_channel_status_by_name_and_with_too_many_arguments() -> None:
    """CHANNEL STATUS answers the channel's state, also when named by its own name; any other
    name gets -1 (recorded: the simulator has no other channels); more arguments get the
    usage block, as handle_channelstatus does."""
    channel = SimulatedChannel(CallScript(channel_up=True))
    assert channel.handle(b"CHANNEL STATUS") == "200 result=6"
    assert channel.handle(f"CHANNEL STATUS {channel.name}".encode()) == "200 result=6"
    assert channel.handle(b"CHANNEL STATUS SIP/other-1") == "200 result=-1"
    usage = channel.handle(b"CHANNEL STATUS one two")
    assert usage.startswith(
        "520-Invalid command syntax.  Proper usage follows:\n"
        "Returns the status of the specified <replaceable>channelname</replaceable>."
    )
    assert usage.endswith("    <enum>7</enum> - Line is busy.\n520 End of proper usage.")
    assert channel.protocol_errors == [
        "CHANNEL STATUS of another channel: 'SIP/other-1'",
        "bad arguments: 'CHANNEL STATUS one two'",
    ]


@pytest.mark.parametrize(
    ("hangup", "commands", "replies", "hangups"),
    [
        (None, [b"NOOP\n"], ["200 result=0"], 0),
        # The caller's hang-up has its own HANGUP; closing brings one more.
        ("prompt", [b'GET DATA "p" 5000 5\n', b"NOOP\n"], ["200 result=-1", "200 result=0"], 1),
    ],
)
async def test_the_agi_ends_with_hangup_when_the_gateway_closes_its_side(
    hangup: HangupMode, commands: list[bytes], replies: list[str], hangups: int
) -> None:
    """When the gateway closes its side, the AGI ends with one last HANGUP line and then the
    end of the stream (the end of run_agi, AGISIGHUP's default), hung up before or not: a
    gateway that half-closes and reads on sees it."""

    async def scenario(gw: FakeGateway) -> tuple[list[str], int, bytes]:
        await gw.environment()
        texts = [(await gw.send_raw(command)).text for command in commands]
        gw.writer.write_eof()
        async with asyncio.timeout(WAIT):
            rest = await gw.reader.read()  # up to the end of the stream
        return texts, gw.hangups, rest

    async with fake_gateway(scenario) as served:
        result = await run_call("127.0.0.1", served.port, CallScript(hangup=hangup), timeout=WAIT)
        answered = await asyncio.wait_for(served.done, WAIT)
    assert answered == (replies, hangups, b"HANGUP\n")
    assert result.closed_by_gateway


def test_environment_is_sent_in_several_writes_network_lines_first() -> None:
    """The environment goes out in several writes, network lines first, blank line last."""
    writes = environment_writes(CallScript(node="3"), "127.0.0.1", 4573)
    assert len(writes) >= 3
    assert writes[0].startswith(b"agi_network: yes\nagi_network_script: identify/3\n")
    assert b"".join(writes).endswith(b"\n\n")
    parser = AgiParser()
    events = [event for chunk in writes for event in parser.feed(chunk)]
    assert len(events) == 1
    assert isinstance(events[0], Environment)
    variables = events[0].variables
    for name in ("agi_request", "agi_channel", "agi_uniqueid", "agi_version", "agi_enhanced"):
        assert name in variables
    assert variables["agi_accountcode"] == ""


@pytest.mark.parametrize(
    ("line", "argv", "unbalanced"),
    [
        ('SET VARIABLE X "a b"', ["SET", "VARIABLE", "X", "a b"], False),
        ('SET VARIABLE X ""', ["SET", "VARIABLE", "X", ""], False),
        ("A  B\tC", ["A", "B", "C"], False),
        ('A "b\\"c"', ["A", 'b"c'], False),
        ('A x"y z"w', ["A", "xy zw"], False),
        ('A "open', ["A", "open"], True),
        ("A b\\", ["A", "b"], True),
    ],
)
def test_parse_args_matches_res_agi(line: str, argv: list[str], unbalanced: bool) -> None:
    """Quotes group, backslash escapes, quotes mid-word join; open quotes are flagged."""
    assert parse_args(line) == (argv, unbalanced)


@settings(max_examples=300, deadline=None)
@given(line=st.text(alphabet=st.sampled_from(' \t"\\abAB\r\u00e9'), max_size=30))
def test_parse_args_shortcut_agrees_with_the_character_loop(line: str) -> None:
    """parse_args takes a shortcut when there is no backslash; it agrees with res_agi's
    character-by-character loop on every line."""
    assert parse_args(line) == _parse_args_by_char(line)


@settings(max_examples=300, deadline=None)
@given(
    data=st.text(alphabet=st.sampled_from(',=ab ()[]"\\'), max_size=20),
    delim=st.sampled_from(",="),
    limit=st.integers(1, 5),
)
def test_app_separate_args_shortcut_agrees_with_the_character_loop(
    data: str, delim: str, limit: int
) -> None:
    """With nothing that groups or escapes, app_separate_args is a plain split; it agrees
    with Asterisk's character loop on every argument."""
    assert app_separate_args(data, delim, limit) == _app_separate_args_by_char(data, delim, limit)


def test_environment_bytes_are_exactly_asterisks() -> None:
    """The environment, byte for byte, in its four writes (the last is the blank line, after
    agi_arg_1 when the node travels as an argument)."""
    script = CallScript(node="7", uniqueid="1700000000.42", caller_number="100", caller_name="")
    writes = environment_writes(script, "10.0.0.1", 4573)
    assert writes == [
        b"agi_network: yes\nagi_network_script: identify/7\n"
        b"agi_request: agi://10.0.0.1:4573/identify/7\n",
        b"agi_channel: PJSIP/trunk-00000042\nagi_language: en\nagi_type: PJSIP\n"
        b"agi_uniqueid: 1700000000.42\nagi_version: 22.1.0\nagi_callerid: 100\n"
        b"agi_calleridname: \nagi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\n"
        b"agi_callingtns: 0\nagi_dnid: unknown\nagi_rdnis: unknown\n",
        b"agi_context: from-pstn\nagi_extension: s\nagi_priority: 1\nagi_enhanced: 0.0\n"
        b"agi_accountcode: \nagi_threadid: 140234567890\n",
        b"\n",
    ]
    in_arg = environment_writes(CallScript(node="7", node_in_arg=True), "h", 1)
    assert in_arg[0].startswith(b"agi_network: yes\nagi_network_script: identify\n")
    assert in_arg[3] == b"agi_arg_1: 7\n\n"


class _HeldTransport(asyncio.Transport):
    """A transport that records writes, and reading paused or not."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def test_backpressure_holds_answers_and_reading_until_the_gateway_reads() -> None:
    """Over the high-water mark nothing more is answered and reading stops (res_agi blocks
    on its write); a command that arrived meanwhile is answered once resumed, and a line that
    arrives in pieces is answered once its end has come."""
    channel = SimulatedChannel(CallScript())
    call = _Call(channel, [b"\n"], asyncio.get_running_loop())
    transport = _HeldTransport()
    call.connection_made(transport)
    assert transport.written == [b"\n"]
    call.pause_writing()
    assert not transport.reading
    call.data_received(b"ANSWER\n")
    assert transport.written == [b"\n"]
    call.resume_writing()
    assert transport.reading
    assert transport.written == [b"\n", b"200 result=0\n"]
    call.data_received(b"CHANNEL ")
    assert len(transport.written) == 2
    call.data_received(b"STATUS\n")
    assert transport.written[-1] == b"200 result=6\n"
    call.eof_received()
    assert await call.finished is True
    assert channel.protocol_errors == []


async def test_overlong_and_unterminated_lines_run_as_asterisk_runs_them() -> None:
    """fgets returns at most 2047 bytes: a line that fits is one command; a longer one runs as
    a 2047-byte command and then the rest (both recorded). A line left unterminated when the
    gateway closes still runs (fgets returns it at end of file), and is recorded."""
    channel = SimulatedChannel(CallScript())
    call = _Call(channel, [b"\n"], asyncio.get_running_loop())
    transport = _HeldTransport()
    call.connection_made(transport)
    fits = b"VERBOSE " + b"x" * (LINE_MAX - len(b"VERBOSE ") - 1) + b"\n"
    assert len(fits) == LINE_MAX
    call.data_received(fits)
    assert transport.written[-1] == b"200 result=1\n"
    assert channel.protocol_errors == []
    too_long = b"VERBOSE " + b"y" * (LINE_MAX - len(b"VERBOSE ")) + b"NOOP\n"
    call.data_received(too_long)
    assert channel.commands[-1] == too_long[:LINE_MAX].decode()
    assert channel.protocol_errors == [
        f"command line longer than {LINE_MAX} bytes: Asterisk runs each {LINE_MAX} bytes of it "
        "as a command",
        PIPELINED,  # the rest, "NOOP", is a second whole line in fgets' buffer
    ]
    call.data_received(b'EXEC Goto "c,e,1"')
    call.eof_received()
    assert await call.finished is True
    assert channel.commands[-2:] == ["NOOP", 'EXEC Goto "c,e,1"']
    assert channel.final_position() == ("c", "e", 1)
    assert channel.protocol_errors[2:] == [
        "unterminated command line at end of stream: Asterisk runs it"
    ]


def test_dead_channel_is_refused_by_non_dead_safe_commands() -> None:
    """Once dead, the sans-I/O channel answers 511 except to dead-safe commands."""
    channel = SimulatedChannel(CallScript())
    channel.mark_dead()
    assert channel.handle(b"ANSWER") == DEAD
    assert channel.handle(b"SET PRIORITY 3") == DEAD
    assert channel.handle(b'SET VARIABLE A "1"') == "200 result=1"
    assert channel.handle(b'EXEC MSet "B=2,C=3"') == "200 result=0"
    assert channel.variables == {"A": "1", "B": "2", "C": "3"}
    assert channel.handle(b"GET VARIABLE A") == "200 result=1 (1)"
    assert channel.handle(b'VERBOSE "x" 1') == "200 result=1"
    assert channel.handle(b"NOOP") == "200 result=0"


async def test_cli_places_calls_and_exits_zero_when_every_call_is_decided(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI prints one line per call and a summary, and exits 0 when all are decided."""
    finished = 0
    all_finished = asyncio.Event()  # handlers run on this loop: no leaked task at the end

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal finished
        gw = FakeGateway(reader, writer)
        try:
            env = await gw.environment()
            decided = env["agi_network_script"] == "identify/1"
            await gw.run(GetData("p", 5000, 5))
            if decided:
                pairs = [("OML_DEST_TYPE", "1"), ("OML_DEST_ID", "3"), ("OML_IDENT_SOURCE", "crm")]
                await gw.run(MultiSet([*pairs, ("OML_IDENT_OUTCOME", "identified")]))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            finished += 1
            if finished == 4:
                all_finished.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = str(server.sockets[0].getsockname()[1])
    try:
        base = ["--host", "127.0.0.1", "--port", port, "--entries", "12345", "--timeout", "5"]
        ok = await asyncio.to_thread(main, [*base, "--calls", "3", "--concurrency", "2"])
        out = capsys.readouterr().out
        failed = await asyncio.to_thread(main, [*base, "--node", "2"])
        failed_out = capsys.readouterr().out
        await asyncio.wait_for(all_finished.wait(), WAIT)
    finally:
        server.close()
        await server.wait_closed()
    assert ok == 0
    lines = out.strip().splitlines()
    assert len(lines) == 4
    assert all("outcome=identified dest=1,3 source=crm" in line for line in lines[:3])
    assert lines[3].startswith("summary: calls=3 decided=3")
    assert failed == 1
    assert "decided=0" in failed_out
