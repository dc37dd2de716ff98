"""`callerid-asterisk-sim`'s command line: entries as arguments, and a line per call that says
what each attempt typed and what Asterisk read of it.

The calls go to the real gateway (AgiServer and CallFlow, in this process, with nodes that
need no CRM) or, where a test needs to see the environment, to a stub FastAGI server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from agi_gateway.flow import CallFlow, FlowSettings
from agi_gateway.metrics import GatewayMetrics
from agi_gateway.routing import JumpTemplates
from agi_gateway.server import AgiServer
from shared.messages import IdentifyReply, IdentifyRequest
from shared.nodes import build_nodes
from tools.asterisk_sim import build_parser, main

NODES = [
    {
        "id": "1",
        "name": "five-digits",
        "audio": "prompt",
        "expected_length": 5,
        "attempts": 3,
        "on_identified": "1,5",
        "on_not_identified": "1,6",
        "on_no_input": "3,1",
    },
    {
        "id": "2",
        "name": "one-try",
        "audio": "prompt",
        "expected_length": 5,
        "on_identified": "1,5",
        "on_not_identified": "1,6",
    },
]


class NoCrm:
    """These nodes never ask a CRM."""

    pending = 0

    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        raise AssertionError(f"no node here asks the CRM ({request.node_id})")


@pytest.fixture
async def gateway_port() -> AsyncIterator[int]:
    """The real gateway on a free loopback port."""
    nodes = build_nodes(NODES)
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.init_nodes(nodes.names())
    flow = CallFlow(
        lambda: nodes,
        NoCrm(),
        metrics,
        FlowSettings(jumps=JumpTemplates({"*": "oml-dest-{type},{id},1"})),
    )
    server = AgiServer(flow, metrics, max_calls=10, command_timeout=5)
    await server.start("127.0.0.1", 0)
    yield server.address[1]
    await server.drain(1)


Capture = pytest.CaptureFixture[str]


async def _sim(capsys: Capture, port: int, *args: str) -> tuple[int, list[str]]:
    """Run the command line and return its exit status and printed lines. In a thread: it
    runs an event loop of its own, and the server answers on this test's loop."""
    capsys.readouterr()
    status = await asyncio.to_thread(main, ["--port", str(port), "--timeout", "5", *args])
    return status, capsys.readouterr().out.splitlines()


def test_entries_take_several_values_and_the_repeated_form() -> None:
    """`--entries 123 12345` is two attempts, as `--entries 123 --entries 12345` was; the
    forms mix, and "-" and "" (nothing typed) are values, not options."""
    parser = build_parser()
    assert parser.parse_args(["--entries", "123", "12345"]).entries == ["123", "12345"]
    assert parser.parse_args(["--entries", "123", "--entries", "12345"]).entries == [
        "123",
        "12345",
    ]
    mixed = parser.parse_args(["--entries", "1", "-", "--node", "2", "--entries", "", "12#"])
    assert mixed.entries == ["1", "-", "", "12#"]
    assert mixed.node == "2"
    assert parser.parse_args([]).entries is None


def test_help_documents_the_notation() -> None:
    """--help explains pauses, the terminator, the explicit timeout and nothing typed."""
    text = build_parser().format_help()
    for notation in ("12(2.5)345", "(6)12345", "12#", "12~", '""', "--entries 123 12345"):
        assert notation in text, notation
    assert "max digits" in text


async def test_two_attempts_are_two_entries_and_the_line_says_so(
    gateway_port: int, capsys: Capture
) -> None:
    """A short entry, then a valid one: invalid, then identified; the line shows both."""
    status, lines = await _sim(capsys, gateway_port, "--node", "1", "--entries", "123", "12345")
    assert status == 0
    assert lines[0].startswith("call 1: outcome=identified dest=1,5 source=local ")
    assert " attempts=[123 12345] " in lines[0]
    assert "unused" not in lines[0]
    assert lines[1].startswith("summary: calls=1 decided=1 outcomes={'identified': 1}")


async def test_the_old_repeated_form_still_places_the_same_call(
    gateway_port: int, capsys: Capture
) -> None:
    """`--entries 123 --entries 12345` gives the same call as `--entries 123 12345`."""
    status, lines = await _sim(
        capsys, gateway_port, "--node", "1", "--entries", "123", "--entries", "12345"
    )
    assert status == 0
    assert "outcome=identified" in lines[0]
    assert " attempts=[123 12345] " in lines[0]


async def test_keys_past_the_digit_limit_are_shown_not_hidden(
    gateway_port: int, capsys: Capture
) -> None:
    """Read stops at the node's max digits, as in Asterisk: 123456 is read as 12345 (and
    identified), and the line shows what was typed and what was read."""
    status, lines = await _sim(capsys, gateway_port, "--node", "2", "--entries", "123456")
    assert status == 0
    assert "outcome=identified dest=1,5" in lines[0]
    assert " attempts=[123456->12345] " in lines[0]


async def test_nothing_typed_pauses_and_unused_entries(gateway_port: int, capsys: Capture) -> None:
    """ "-" and "" type nothing; a pause past the first-digit timeout reads nothing; the
    entries after the deciding attempt are listed as unused."""
    status, lines = await _sim(
        capsys, gateway_port, "--node", "1", "--entries", "-", "(60)12345", "", "99999"
    )
    assert status == 0
    assert "outcome=no_input dest=3,1" in lines[0]
    assert " attempts=[- (60)12345->nothing -] unused=[99999] " in lines[0]
    status, lines = await _sim(
        capsys, gateway_port, "--node", "1", "--entries", "12#", "12345", "54321"
    )
    assert "outcome=identified" in lines[0]
    assert " attempts=[12#->12 12345] unused=[54321] " in lines[0]


async def test_a_hang_up_at_the_prompt_takes_no_entry(gateway_port: int, capsys: Capture) -> None:
    """Hung up during the first prompt: no attempt; the entry it had is unused."""
    status, lines = await _sim(capsys, gateway_port, "--node", "1", "--hangup", "prompt")
    assert status == 0
    assert "outcome=hangup" in lines[0]
    assert " attempts=[] unused=[12345] " in lines[0]


async def test_every_call_of_every_run_has_a_calling_number_of_its_own(capsys: Capture) -> None:
    """The gateway limits CRM lookups per calling number: calls and runs do not share one
    unless --caller-number says so."""
    numbers: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := (await reader.readline()).strip():
                name, _, value = line.decode().partition(": ")
                if name == "agi_callerid":
                    numbers.append(value)
            writer.write(
                b'EXEC MSet "OML_DEST_TYPE=1,OML_DEST_ID=5,OML_IDENT_OUTCOME=identified"\n'
            )
            await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        first = await _sim(capsys, port, "--calls", "3")
        second = await _sim(capsys, port, "--calls", "3")
        fixed = await _sim(capsys, port, "--calls", "2", "--caller-number", "5551234")
    assert (first[0], second[0], fixed[0]) == (0, 0, 0)
    assert len(numbers) == 8
    assert len(set(numbers[:6])) == 6
    assert numbers[6:] == ["5551234", "5551234"]
    assert " attempts=[] unused=[12345] " in first[1][0]  # no GET DATA or Read: nothing typed
