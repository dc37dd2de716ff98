"""Differential test: the simulator (tools/asterisk_sim/) against the real Asterisk 22.

The same scripted command sequences are sent by a tiny FastAGI server of this test to (a) the
real, private Asterisk (tools/pbx.py), whose caller keys real DTMF, pauses and hangs up, and
(b) the simulator (`run_call`) with the equivalent `CallScript`. Each side's conversation is
recorded as a list of (what the server sent, what came back) and the two lists must be equal,
line for line: replies, 520 usage blocks, the unsolicited HANGUP lines and where they arrive,
what comes after the server closes its side, and, for commands written together, what is NOT
answered. Nothing is normalised: every reply in these scripts is one Asterisk computes from
the channel, the files and the timeouts, all of which the simulator is given the same.

Caller timings are far from every timeout edge (at least 0.5 s), so the real run gives one
answer only: the caller keys its first digit about 0.5 s after the 1 s prompt has ended, and
a pause is either well over or well under the timeout it is measured against.

What this test first found, each settled from Asterisk's source and fixed in the simulator:
the closing HANGUP that run_agi sends when the server closes its side (hung up or not), the
520 usage text (the command's XML description, not an old "Usage:" line), and CHANNEL STATUS
with a channel name (-1 for none such) or too many arguments (usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from tools import asterisk_sim, pbx
from tools.asterisk_sim import CallScript, HangupMode
from tools.pbx import Call, Hangup, Keys, PrivateAsterisk, Wait

pytestmark = pytest.mark.asterisk

READ_TIMEOUT = 20.0  # no read from either side waits longer (a broken run fails, never hangs)
NOT_ANSWERED_S = 1.0  # the generous bound proving a pipelined second command was NOT answered
CALL_TIMEOUT = 30.0  # a whole call, either side

# What the server "sent" in entries that are not a command's reply.
UNSOLICITED = "(unsolicited)"  # a line arriving while a reply was awaited: HANGUP
WAITED = f"(nothing sent; waited {NOT_ANSWERED_S:.1f} s)"
NO_REPLY = f"(no reply within {NOT_ANSWERED_S:.1f} s)"
OWED = "(nothing sent; the reply still owed)"
CLOSED = "(server closed its side)"  # each line Asterisk sends after that
EOF = "(end of stream)"

PROMPT = pbx.PROMPT  # 1.000 s: a fully played STREAM FILE reports endpos=8000
MISSING = "callerid-test/nosuchfile"
MSET_TIMEOUTS = 'EXEC MSet "TIMEOUT(response)=3.000,TIMEOUT(digit)=1.000"'
READ = f'EXEC Read "CALLERID_ENTRY,{PROMPT},5"'
ENTRY = 'GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"'
GET_DATA = f'GET DATA "{PROMPT}" 4000 5'
POSITION = 'GET FULL VARIABLE "${CONTEXT},${EXTEN},${PRIORITY}"'

Exchange = list[tuple[str, str]]


@dataclass(frozen=True)
class Pipelined:
    """`first` and `second` in ONE write; the first's reply; nothing more within
    NOT_ANSWERED_S; then `third`, after which the second's reply and the third's come."""

    first: str
    second: str
    third: str


Step = str | Pipelined


@dataclass(frozen=True)
class Script:
    """One call: the server's steps, the real caller, and the simulated caller."""

    title: str
    steps: tuple[Step, ...]
    caller: tuple[pbx.Step, ...] = ()
    entries: tuple[str | None, ...] = ()
    hangup: HangupMode = None
    missing_prompt: bool = False  # the simulator cannot tell files apart: all or none missing


# Keys 0.5 s after the 1 s prompt (the caller starts on answer, the AGI right after it).
AFTER_PROMPT = Wait(1.5)

SCRIPTS: tuple[Script, ...] = (
    Script(
        "1 the gateway's normal sequence, caller keys 12345",
        (
            MSET_TIMEOUTS,
            READ,
            ENTRY,
            'EXEC MSet "__OML_CUSTOMER_ID=12345,__OMLCODCLI=12345,OML_DEST_TYPE=1,'
            'OML_DEST_ID=3,OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=identified"',
            "GET VARIABLE OML_IDENT_OUTCOME",
            'GET FULL VARIABLE "${OMLCODCLI}"',
        ),
        caller=(AFTER_PROMPT, Keys("12345")),
        entries=("12345",),
    ),
    Script(
        # TIMEOUT(digit)=1 s against a 2.7 s gap between the ends of digits 2 and 3.
        "2 Read ended by the inter-digit timeout: 12, 2.5 s, 345",
        (MSET_TIMEOUTS, READ, ENTRY),
        caller=(AFTER_PROMPT, Keys("12"), Wait(2.5), Keys("345")),
        entries=("12(2.5)345",),
    ),
    Script(
        # GET DATA's one 4 s timeout is also the inter-digit one: the 2.7 s gap fits.
        "3a GET DATA with the same caller: 12, 2.5 s, 345",
        (GET_DATA,),
        caller=(AFTER_PROMPT, Keys("12"), Wait(2.5), Keys("345")),
        entries=("12(2.5)345",),
    ),
    Script("3b GET DATA, nothing typed", (GET_DATA,), entries=(None,)),
    Script(
        "3c GET DATA, 12#",
        (GET_DATA,),
        caller=(AFTER_PROMPT, Keys("12#")),
        entries=("12#",),
    ),
    Script("4a Read, nothing typed", (MSET_TIMEOUTS, READ, ENTRY), entries=(None,)),
    Script(
        "4b Read, # alone",
        (MSET_TIMEOUTS, READ, ENTRY),
        caller=(AFTER_PROMPT, Keys("#")),
        entries=("#",),
    ),
    Script(
        "4c a missing prompt: Read, GET DATA, STREAM FILE, then CHANNEL STATUS",
        (
            f'EXEC Read "CALLERID_ENTRY,{MISSING},5"',
            ENTRY,
            f'GET DATA "{MISSING}" 4000 5',
            f'STREAM FILE "{MISSING}" ""',
            "CHANNEL STATUS",
        ),
        missing_prompt=True,
    ),
    Script(
        "5 playback, music, Goto, unknown command and application, usage, unset variable",
        (
            f'STREAM FILE "{PROMPT}" ""',
            'SAY DIGITS "123" ""',
            "SET MUSIC on default",
            "SET MUSIC off",
            "FROBNICATE NOW",
            'EXEC NoSuchApp ""',
            "SET VARIABLE DIFF_NAME_ONLY",
            "GET VARIABLE DIFF_NEVER_SET",
            POSITION,
            'EXEC Goto "oml-dest-1,3,1"',
            POSITION,
        ),
    ),
    Script(
        "5b a malformed command of each kind (the 520 usage blocks), a channel that does not exist",
        (
            "GET DATA",
            f'STREAM FILE "{PROMPT}"',
            "SAY DIGITS",
            "WAIT FOR DIGIT",
            "SET VARIABLE DIFF_NAME_ONLY",
            "GET VARIABLE",
            "GET FULL VARIABLE",
            "EXEC",
            "SET CONTEXT",
            "SET EXTENSION",
            "SET PRIORITY",
            "SET MUSIC",
            "VERBOSE",
            "CHANNEL STATUS one two",
            "CHANNEL STATUS DIFF/no-such-channel",
        ),
    ),
    Script(
        # Default timeouts (10 s / 5 s): the hang-up 0.7 s after digit 2 ends is inside them.
        "6 the caller keys 12 and hangs up during Read",
        (
            READ,
            ENTRY,
            f'STREAM FILE "{PROMPT}" ""',
            'EXEC MSet "OML_IDENT_OUTCOME=hangup"',
        ),
        caller=(AFTER_PROMPT, Keys("12"), Wait(0.5), Hangup()),
        entries=("12(0.5)",),
        hangup="entry",
    ),
    Script(
        "7 two commands in one write: only the first is answered until more bytes come",
        (
            'EXEC MSet "DIFF_X=x,DIFF_Y=y,DIFF_Z=z"',
            Pipelined("GET VARIABLE DIFF_X", "GET VARIABLE DIFF_Y", "GET VARIABLE DIFF_Z"),
        ),
    ),
)


def node_of(index: int) -> str:
    return f"diff-{index + 1}"


@dataclass
class ScriptedServer:
    """FastAGI server: a connection for `identify/<node>` runs that node's steps and records
    the conversation; `exchanges[node]` resolves to it when the connection is over."""

    steps: Mapping[str, Sequence[Step]]
    exchanges: dict[str, asyncio.Future[Exchange]] = field(default_factory=dict)
    address: tuple[str, int] = ("127.0.0.1", 0)
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.exchanges = {node: loop.create_future() for node in self.steps}
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = ("127.0.0.1", self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def exchange(self, node: str) -> Exchange:
        async with asyncio.timeout(CALL_TIMEOUT):
            return await self.exchanges[node]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log: Exchange = []
        node = ""
        try:
            env: dict[str, str] = {}
            while line := await _line(reader):
                name, _, value = line.partition(": ")
                env[name] = value
            node = env.get("agi_network_script", "").removeprefix("identify/")
            if node not in self.steps:
                return
            await _run_steps(self.steps[node], reader, writer, log)
            writer.write_eof()
            while (line := await _line(reader)) is not None:
                log.append((CLOSED, line))
            log.append((CLOSED, EOF))
        except Exception as exc:
            if node in self.exchanges and not self.exchanges[node].done():
                self.exchanges[node].set_exception(exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            if node in self.exchanges and not self.exchanges[node].done():
                self.exchanges[node].set_result(log)


async def _line(reader: asyncio.StreamReader, within: float = READ_TIMEOUT) -> str | None:
    """One line without its "\\n"; None at the end of the stream."""
    async with asyncio.timeout(within):
        raw = await reader.readline()
    return raw.decode().removesuffix("\n") if raw else None


async def _reply(reader: asyncio.StreamReader, log: Exchange) -> str | None:
    """The next reply (a whole 520 usage block is one), recording each unsolicited HANGUP in
    `log` where it arrived; None if the stream ended first."""
    lines: list[str] = []
    while (line := await _line(reader)) is not None:
        if line == "HANGUP" and not lines:
            log.append((UNSOLICITED, line))
            continue
        lines.append(line)
        # "520-" opens a usage block of free text that only a "520 " line ends.
        if not lines[0].startswith("520-") or line.startswith("520 "):
            return "\n".join(lines)
    return None


async def _run_steps(
    steps: Sequence[Step], reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: Exchange
) -> None:
    for step in steps:
        if isinstance(step, str):
            writer.write(f"{step}\n".encode())
            await writer.drain()
            reply = await _reply(reader, log)
            log.append((step, EOF if reply is None else reply))
            if reply is None:
                return
            continue
        writer.write(f"{step.first}\n{step.second}\n".encode())  # one write
        await writer.drain()
        reply = await _reply(reader, log)
        log.append((f"{step.first} + {step.second} (one write)", EOF if reply is None else reply))
        if reply is None:
            return
        owed = 1
        try:
            early = await _line(reader, within=NOT_ANSWERED_S)
        except TimeoutError:
            log.append((WAITED, NO_REPLY))
        else:  # answered after all (or HANGUP, or the end): the comparison shows it
            log.append((WAITED, EOF if early is None else early))
            if early is None:
                return
            owed -= early != "HANGUP"
        writer.write(f"{step.third}\n".encode())
        await writer.drain()
        owed += 1
        sent = step.third
        for _ in range(owed):
            reply = await _reply(reader, log)
            log.append((sent, EOF if reply is None else reply))
            if reply is None:
                return
            sent = OWED


def kind_of(entry: tuple[str, str]) -> str:
    """What an entry of an exchange is, for the summary."""
    sent, received = entry
    if received == "HANGUP":
        return "HANGUP lines"
    if received == EOF:
        return "ends of stream"
    if sent == WAITED:
        return "waits for an answer that must not come"
    return "command/reply pairs"


def real_call(index: int, script: Script) -> Call:
    return Call(node_of(index), script=script.caller)


def simulated_call(index: int, script: Script) -> CallScript:
    # The real inbound leg: answered (Answer(,i)) before the AGI, which runs at priority 3 of
    # callerid-inbound with the node id as its extension.
    return CallScript(
        node=node_of(index),
        entries=list(script.entries),
        hangup=script.hangup,
        missing_prompt=script.missing_prompt,
        channel_up=True,
        context=pbx.INBOUND_CONTEXT,
        extension=node_of(index),
        priority=pbx.AGI_PRIORITY,
    )


def side_by_side(title: str, real: Exchange, simulated: Exchange) -> str:
    """Both conversations, one row per entry, differing rows marked."""

    def cell(entry: tuple[str, str] | None) -> str:
        return "-" if entry is None else f"{entry[0]} -> {entry[1]!r}"

    rows = [f"script {title!r}:", f"    {'real Asterisk':<70} | simulator"]
    for index in range(max(len(real), len(simulated))):
        left = real[index] if index < len(real) else None
        right = simulated[index] if index < len(simulated) else None
        mark = "  " if left == right else "!="
        rows.append(f"{mark}  {cell(left):<70} | {cell(right)}")
    return "\n".join(rows)


async def run_real(
    asterisk: PrivateAsterisk, server: ScriptedServer, nodes: Sequence[str]
) -> dict[str, Exchange]:
    calls = [real_call(index, script) for index, script in enumerate(SCRIPTS)]
    host, port = server.address
    ids = asterisk.place_calls(calls, f"{host}:{port}")
    results = await asterisk.wait_for_results_async(ids, timeout=CALL_TIMEOUT)
    missing = {results[i].node or i: results[i].missing for i in ids if results[i].missing}
    assert not missing, f"calls that never recorded: {missing}; log {asterisk.log_path}"
    return {node: await server.exchange(node) for node in nodes}


async def run_simulated(server: ScriptedServer, nodes: Sequence[str]) -> dict[str, Exchange]:
    host, port = server.address
    results = await asyncio.gather(
        *(
            asterisk_sim.run_call(host, port, simulated_call(index, script), timeout=CALL_TIMEOUT)
            for index, script in enumerate(SCRIPTS)
        )
    )
    unclosed = [node for node, r in zip(nodes, results, strict=True) if not r.closed_by_gateway]
    assert not unclosed, f"simulated calls the server never closed: {unclosed}"
    return {node: await server.exchange(node) for node in nodes}


async def test_simulator_answers_every_script_as_the_real_asterisk_does(
    private_asterisk: PrivateAsterisk, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every script, run against the real Asterisk (real DTMF, pauses, hang-up) and against
    the simulator (the equivalent CallScript), gives the same conversation: the same reply to
    every command, the same unsolicited HANGUP lines in the same places, the same lines after
    the server closes, and the same unanswered pipelined command. Reports how many entries
    were compared; on a mismatch shows each failing script's two conversations side by side.
    """
    nodes = [node_of(index) for index in range(len(SCRIPTS))]
    steps = {node: script.steps for node, script in zip(nodes, SCRIPTS, strict=True)}
    real_server, sim_server = ScriptedServer(steps), ScriptedServer(steps)
    await real_server.start()
    await sim_server.start()
    started = time.monotonic()
    try:
        real, simulated = await asyncio.gather(
            run_real(private_asterisk, real_server, nodes), run_simulated(sim_server, nodes)
        )
    finally:
        await real_server.stop()
        await sim_server.stop()
    took = time.monotonic() - started

    compared = equal = 0
    kinds: Counter[str] = Counter()
    failures: list[str] = []
    for node, script in zip(nodes, SCRIPTS, strict=True):
        left, right = real[node], simulated[node]
        compared += max(len(left), len(right))
        equal += sum(a == b for a, b in zip(left, right, strict=False))
        kinds.update(kind_of(entry) for entry in left)
        if left != right:
            failures.append(side_by_side(script.title, left, right))
    summary = (
        f"differential: {len(SCRIPTS)} scripts, {compared} entries compared "
        f"({', '.join(f'{n} {kind}' for kind, n in kinds.most_common())}): {equal} equal, "
        f"{compared - equal} different; the real and simulated calls took {took:.1f} s"
    )
    with capsys.disabled():
        print(f"\n{summary}")
    assert equal == compared, summary + "\n\n" + "\n\n".join(failures)
    assert not failures, "\n\n".join(failures)
