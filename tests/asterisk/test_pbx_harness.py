"""The real-PBX harness itself (tools/pbx.py) against a real Asterisk 22.

The FastAGI side is a tiny scripted server written here, not the gateway: per node id, a list
of commands sent one at a time, each reply read before the next (res_agi reads one command per
poll() wake-up; see tools/asterisk_sim/'s docstring). Each test uses node ids of its own, so
its calls and AGI sessions never mix with another test's on the shared instance.
"""

from __future__ import annotations

import asyncio
import uuid
import wave
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.waiting import eventually
from tools import pbx
from tools.pbx import Call, Hangup, Keys, PrivateAsterisk, Wait

pytestmark = pytest.mark.asterisk

WAIT_HANGUP = "<read until HANGUP>"  # a script step: read lines until Asterisk says HANGUP
READ_TIMEOUT = 20.0  # no read from Asterisk waits longer (a test never hangs on a socket)


@dataclass
class AgiSession:
    """One FastAGI connection as the scripted server saw it."""

    env: dict[str, str] = field(default_factory=dict)
    replies: list[tuple[str, str]] = field(default_factory=list)  # (command, reply)
    hangups: int = 0  # unsolicited HANGUP lines seen, before or after the server closed
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def reply(self, command_prefix: str) -> str:
        return next(r for c, r in self.replies if c.startswith(command_prefix))


class ScriptedAgi:
    """FastAGI server: `script(node, commands)`, then calls to `identify/<node>` run them."""

    def __init__(self) -> None:
        self.scripts: dict[str, Sequence[str]] = {}
        self.sessions: dict[str, list[AgiSession]] = {}
        self.address = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def script(self, node: str, commands: Sequence[str]) -> str:
        self.scripts[node] = commands
        return node

    async def session(self, node: str, within: float = 20.0) -> AgiSession:
        """The (only) session for `node`, once the server is done with it."""
        async with asyncio.timeout(within):
            while not self.sessions.get(node):  # noqa: ASYNC110 - Asterisk connects when it does
                await asyncio.sleep(0.01)
            session = self.sessions[node][0]
            await session.done.wait()
        return session

    async def _line(self, reader: asyncio.StreamReader) -> str | None:
        async with asyncio.timeout(READ_TIMEOUT):
            raw = await reader.readline()
        return raw.decode().rstrip("\n") if raw else None

    async def _reply(self, reader: asyncio.StreamReader, session: AgiSession) -> str:
        lines: list[str] = []
        while (line := await self._line(reader)) is not None:
            if line == "HANGUP":  # unsolicited: it may come where a reply is expected
                session.hangups += 1
                continue
            lines.append(line)
            if not line.startswith("520-"):  # 520- starts a usage block ending "520 End..."
                break
        return "\n".join(lines)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = AgiSession()
        try:
            while line := await self._line(reader):
                name, _, value = line.partition(": ")
                session.env[name] = value
            node = session.env.get("agi_network_script", "").removeprefix("identify/")
            self.sessions.setdefault(node, []).append(session)
            for command in self.scripts.get(node, ()):
                if command == WAIT_HANGUP:
                    while session.hangups == 0 and (line := await self._line(reader)):
                        session.hangups += line == "HANGUP"
                    continue
                writer.write(f"{command}\n".encode())
                await writer.drain()
                session.replies.append((command, await self._reply(reader, session)))
            writer.write_eof()
            # Asterisk answers the close with HANGUP and closes its side.
            while (line := await self._line(reader)) is not None:
                session.hangups += line == "HANGUP"
        finally:
            writer.close()
            session.done.set()


@pytest.fixture
async def agi() -> AsyncIterator[ScriptedAgi]:
    server = ScriptedAgi()
    await server.start()
    yield server
    await server.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def run_calls(
    pbx_: PrivateAsterisk, agi: ScriptedAgi, calls: Sequence[Call], timeout: float = 30.0
) -> dict[str, pbx.CallResult]:
    ids = pbx_.place_calls(calls, agi.address)
    results = await pbx_.wait_for_results_async(ids, timeout=timeout)
    incomplete = {i: r.missing for i, r in results.items() if r.missing}
    assert not incomplete, f"calls that never recorded: {incomplete}; log {pbx_.log_path}"
    return results


# ---------------------------------------------------------------------------------------------
# The five things the harness must show


async def test_agi_variables_reach_the_results(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    awkward = "a b,c&d=e+f%g"  # every character the record line's encoding must survive
    node = agi.script(
        unique("vars"),
        [
            f'SET VARIABLE OML_IDENT_SOURCE "{awkward}"',
            'EXEC MSet "OML_DEST_TYPE=1,OML_DEST_ID=3,__OML_CUSTOMER_ID=12345,'
            '__OMLCODCLI=12345,OML_IDENT_OUTCOME=identified"',
        ],
    )
    call = Call(node)

    result = (await run_calls(private_asterisk, agi, [call]))[call.call_id]

    session = await agi.session(node)
    assert session.replies[0][1] == "200 result=1"
    assert session.replies[1][1] == "200 result=0"
    assert result.outcome == "identified"
    assert result.var("OML_IDENT_SOURCE") == awkward
    assert (result.var("OML_DEST_TYPE"), result.var("OML_DEST_ID")) == ("1", "3")
    assert result.var("OML_CUSTOMER_ID") == result.var("OMLCODCLI") == "12345"
    assert result.agi_status == "SUCCESS"
    # The dialplan went on after the AGI: priority AGI+1 stamps the time, AGI+2 records.
    assert result.ended == f"{pbx.INBOUND_CONTEXT},{node},{pbx.AGI_PRIORITY + 2}"
    assert result.node == node
    started, returned, hung_up = result.started_at, result.agi_returned_at, result.hangup_at
    assert started is not None
    assert returned is not None
    assert hung_up is not None
    assert started <= returned <= hung_up


async def test_real_dtmf_reaches_get_data(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    node = agi.script(unique("dtmf"), [f'GET DATA "{pbx.PROMPT}" 4000 5'])
    call = Call(node, [Wait(1.5), Keys("12345")])

    result = (await run_calls(private_asterisk, agi, [call]))[call.call_id]

    session = await agi.session(node)
    assert session.reply("GET DATA") == "200 result=12345"
    assert result.agi_status == "SUCCESS"
    assert result.last_key_at is not None


async def test_caller_hangs_up_during_the_prompt(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    node = agi.script(unique("hup"), [f'GET DATA "{pbx.LONG_PROMPT}" 4000 5', WAIT_HANGUP])
    call = Call(node, [Wait(1.0), Hangup()])

    result = (await run_calls(private_asterisk, agi, [call]))[call.call_id]

    session = await agi.session(node)
    assert session.reply("GET DATA") == "200 result=-1"
    assert session.hangups >= 1
    assert result.agi_status == "HANGUP"
    assert result.caller["HUNG_UP_BY_SCRIPT"] == "1"
    # The call ended inside the AGI, and the AGI ran once: no h-extension rerun.
    assert result.ended == ""
    assert result.var("HANGUP_LOCATION") == f"{pbx.INBOUND_CONTEXT},{node},{pbx.AGI_PRIORITY}"
    assert len(agi.sessions[node]) == 1


async def test_goto_lands_on_the_destination_context(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    node = agi.script(unique("jump"), ['EXEC Goto "oml-dest-1,3,1"'])
    call = Call(node)

    result = (await run_calls(private_asterisk, agi, [call]))[call.call_id]

    assert (await agi.session(node)).reply("EXEC Goto") == "200 result=0"
    assert result.ended == "oml-dest-1,3,1"
    assert result.agi_status == "SUCCESS"
    assert result.agi_returned_at is not None


async def test_twenty_calls_at_once_are_each_recorded(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    prefix = unique("many")
    calls = []
    for i in range(20):
        node = agi.script(
            f"{prefix}-{i}",
            [f'GET DATA "{pbx.PROMPT}" 4000 1', f"SET VARIABLE OML_CUSTOMER_ID {i}"],
        )
        calls.append(Call(node, [Wait(1.2), Keys(str(i % 10))]))

    results = await run_calls(private_asterisk, agi, calls)

    for i, call in enumerate(calls):
        result = results[call.call_id]
        assert (result.node, result.var("OML_CUSTOMER_ID")) == (call.node, str(i))
        assert result.agi_status == "SUCCESS"
        session = await agi.session(call.node)
        assert session.reply("GET DATA") == f"200 result={i % 10}"
    # Every channel goes away by itself.
    # A CLI round trip per check: poll gently.
    await eventually(lambda: private_asterisk.active_channels() == 0, within=10, interval=0.1)


# ---------------------------------------------------------------------------------------------
# The rest of the harness's promises


async def test_call_variables_and_caller_id_reach_the_inbound_leg(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    # core_unreal.c (ast_unreal_call_setup) copies every variable of ;1 to ;2, "__" or not.
    node = agi.script(unique("inherit"), ["GET VARIABLE PLAIN", "GET VARIABLE INHERITED"])
    call = Call(
        node,
        variables={"PLAIN": "p", "__INHERITED": "x; y,#z"},
        caller_number="+5491155550000",
    )

    await run_calls(private_asterisk, agi, [call])

    session = await agi.session(node)
    assert session.reply("GET VARIABLE PLAIN") == "200 result=1 (p)"
    assert session.reply("GET VARIABLE INHERITED") == "200 result=1 (x; y,#z)"
    assert session.env["agi_callerid"] == "+5491155550000"
    assert session.env["agi_extension"] == node
    assert session.env["agi_network_script"] == f"identify/{node}"


async def test_a_test_can_bring_its_own_inbound_context(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    context = unique("own-inbound")
    private_asterisk.add_dialplan(
        context,
        pbx.inbound_context(context, ["Set(AFTER_AGI=yes)", "Goto(oml-dest-5,7,1)"]),
    )
    private_asterisk.add_record_variables("AFTER_AGI")
    # A text Asterisk cannot parse is refused, and leaves the rest in place.
    with pytest.raises(pbx.AsteriskError):
        private_asterisk.add_dialplan("broken", "[broken\nexten => 1,1,NoOp()\n")
    node = agi.script(unique("own"), ["NOOP"])
    call = Call(node, inbound_context=context)

    result = (await run_calls(private_asterisk, agi, [call]))[call.call_id]

    assert result.var("AFTER_AGI") == "yes"
    assert result.ended == "oml-dest-5,7,1"
    assert result.var("CHANNEL").startswith(f"Local/{node}@{context}-")
    private_asterisk.remove_dialplan(context)


async def test_an_unanswered_call_still_records_both_legs(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    # The caller leg starts only on answer; pbx.c runs the caller context's "failed"
    # extension instead, so the harness never waits for a record that cannot come.
    context = unique("no-answer")
    private_asterisk.add_dialplan(context, pbx.inbound_context(context, answer="none"))
    node = agi.script(unique("unanswered"), ["NOOP"])
    call = Call(node, [Keys("1")], inbound_context=context)

    result = (await run_calls(private_asterisk, agi, [call]))[call.call_id]

    assert result.caller_failed != ""
    assert result.last_key_at is None
    assert result.agi_status == "SUCCESS"
    private_asterisk.remove_dialplan(context)


async def test_agi_debug_puts_the_transcript_in_the_full_log(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    node = agi.script(unique("debug"), ['SET VARIABLE OML_IDENT_OUTCOME "no_input"'])
    call = Call(node)
    mark = private_asterisk.log_size()
    private_asterisk.set_agi_debug(True)
    try:
        result = (await run_calls(private_asterisk, agi, [call]))[call.call_id]
    finally:
        private_asterisk.set_agi_debug(False)

    transcript = pbx.agi_transcript(private_asterisk.log_since(mark), result.var("CHANNEL"))
    assert transcript[:2] == [
        ("Tx", "agi_network: yes"),
        ("Tx", f"agi_network_script: identify/{node}"),
    ]
    assert ("Rx", 'SET VARIABLE OML_IDENT_OUTCOME "no_input"') in transcript
    assert ("Tx", "200 result=1") in transcript
    assert transcript[-1] == ("Tx", "HANGUP")


async def test_the_instance_is_private_and_measurable(
    private_asterisk: PrivateAsterisk, agi: ScriptedAgi
) -> None:
    assert private_asterisk.listening_inet_sockets() == []
    assert private_asterisk.workdir in private_asterisk.config_path.parents
    before = private_asterisk.cpu_seconds()
    node = agi.script(unique("cpu"), ["NOOP"])
    await run_calls(private_asterisk, agi, [Call(node)])
    assert private_asterisk.cpu_seconds() >= before


def test_a_private_instance_starts_and_stops_cleanly(asterisk_binary: Path, tmp_path: Path) -> None:
    with PrivateAsterisk(asterisk_binary, tmp_path) as instance:
        pid = instance.pid
        assert pid is not None
        assert instance.active_channels() == 0
    assert not instance.running
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    assert not (tmp_path / "run" / "asterisk.ctl").exists()


# ---------------------------------------------------------------------------------------------
# Pure Python: the script notation and the call checks


def test_keys_expand_into_one_timed_dtmf_step_per_digit() -> None:
    assert pbx.encode_script([Wait(1.5), Keys("12", gap_ms=250, duration_ms=120), Hangup()]) == [
        "wait:1.500",
        "dtmf:1:120",
        "wait:0.150",  # the gap less SendDTMF's own 100 ms of quiet
        "dtmf:2:120",
        "hangup",
    ]


@pytest.mark.parametrize(
    "call",
    [
        Call("h"),
        Call("--h"),
        Call("---"),
        Call("bad node"),
        Call("x" * 65),
        Call("ok", call_id="a/b"),
        Call("ok", variables={"X": "a\nb"}),
        Call("ok", variables={"X": "a #b"}),
        Call("ok", variables={"X": "a "}),
    ],
)
def test_calls_asterisk_would_misread_are_refused(call: Call) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names its own field
        call.validate()


def test_a_record_line_decodes_exactly() -> None:
    parsed = pbx.parse_record("rec=inbound&call=c1&OML_IDENT_SOURCE=a%20b%2Cc%26d%3De%2Bf&X=")
    assert parsed == ("inbound", "c1", {"OML_IDENT_SOURCE": "a b,c&d=e+f", "X": ""})


def test_prompts_have_exact_lengths(tmp_path: Path) -> None:
    pbx.write_wav(tmp_path / "p.wav", 1.0)
    with wave.open(str(tmp_path / "p.wav")) as w:
        assert (w.getnframes(), w.getframerate(), w.getnchannels(), w.getsampwidth()) == (
            8000,
            8000,
            1,
            2,
        )


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        # The digit's SendDTMF returned: its own stamp.
        ({"LAST_KEY_AT": "10.205", "KEY_SENDING_AT": "10.000", "HANGUP_AT": "11.0"}, 10.205),
        # The hang-up cut the 1 ms sleep after the digit: sending + 100 ms quiet + duration.
        (
            {
                "LAST_KEY_AT": "9.500",
                "KEY_SENDING_AT": "10.000",
                "KEY_DURATION_MS": "120",
                "HANGUP_AT": "10.222",
            },
            10.22,
        ),
        # The hang-up came before that digit could end: the previous digit was the last.
        ({"LAST_KEY_AT": "9.500", "KEY_SENDING_AT": "10.000", "HANGUP_AT": "10.050"}, 9.5),
        ({"KEY_SENDING_AT": "10.000", "HANGUP_AT": "10.050"}, None),
        ({"HANGUP_AT": "10.050"}, None),
    ],
)
def test_last_key_at_survives_a_hang_up_on_the_last_digit(
    caller: dict[str, str], expected: float | None
) -> None:
    result = pbx.CallResult("c", inbound={}, caller=caller)
    assert result.last_key_at == (pytest.approx(expected) if expected is not None else None)
