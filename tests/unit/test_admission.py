"""The gateway's front door under attack: who may talk FastAGI, and what a flood can hold.

Attackers connect from other loopback addresses (127.0.0.2, 127.0.0.3: all of 127/8 is this
machine), the PBX from 127.0.0.1. Every test also places a real call from the allowed peer
during the attack and checks it is decided normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from agi_gateway.admission import Admission, parse_networks
from agi_gateway.flow import CallFlow, FlowSettings
from agi_gateway.metrics import GatewayMetrics
from agi_gateway.routing import JumpTemplates
from agi_gateway.server import AgiServer
from shared.destination import Destination
from shared.messages import IdentifyReply, IdentifyRequest
from shared.nodes import build_nodes
from tests.waiting import eventually
from tools.asterisk_sim import CallScript, environment_writes, run_call

NODES = [
    {
        "id": "local",
        "name": "local",
        "audio": "prompt",
        "min_length": 3,
        "on_identified": "1,5",
        "on_not_identified": "1,6",
    },
]
PBX = "127.0.0.1"
ATTACKER = "127.0.0.3"


class NoIdentifier:
    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        raise AssertionError("the test nodes never ask the CRM")


@dataclass
class Front:
    server: AgiServer
    registry: CollectorRegistry

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def rejected(self, reason: str) -> float:
        return self.sample("callerid_agi_sessions_rejected_total", reason=reason)

    def calls(self, outcome: str) -> float:
        total = 0.0
        for source in ("local", "failover", "crm", "cache"):
            for node in ("local", "unknown"):
                total += self.sample(
                    "callerid_calls_total", node=node, outcome=outcome, source=source
                )
        return total

    async def pbx_call(self) -> dict[str, str]:
        """A real call from the PBX's address: decided as the node says, never refused."""
        host, port = self.server.address
        result = await run_call(host, port, CallScript(node="local", entries=["4567"]), timeout=10)
        assert result.protocol_errors == []
        return result.variables


@contextlib.asynccontextmanager
async def front(**server_options: object) -> AsyncIterator[Front]:
    nodes = build_nodes(NODES)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.init_nodes(nodes.names())
    flow = CallFlow(
        lambda: nodes,
        NoIdentifier(),
        metrics,
        FlowSettings(jumps=JumpTemplates({}), fallback=Destination(type=1, id=99)),
    )
    server = AgiServer(flow, metrics, command_timeout=5, **server_options)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    try:
        yield Front(server, registry)
    finally:
        await server.drain(0.5)


ENVIRONMENT = b"".join(environment_writes(CallScript(node="local"), "127.0.0.1", 4573))


async def connect_from(
    source: str, server: AgiServer
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.address
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def test_peers_outside_the_allowed_list_are_closed_at_accept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With CALLERID_AGI_ALLOWED_PEERS set, 200 connections from another address are closed
    before anything is read or written, each counted, with one log line in all; the PBX's
    call is decided meanwhile."""
    caplog.set_level(logging.WARNING, logger="agi_gateway.admission")
    async with front(admission=Admission(parse_networks([f"{PBX}/32"]))) as gateway:
        received = b""
        for _ in range(200):
            reader, writer = await connect_from(ATTACKER, gateway.server)
            with contextlib.suppress(ConnectionError):
                writer.write(ENVIRONMENT)
                received += await reader.read()
            writer.close()
        assert received == b""
        variables = await gateway.pbx_call()
        assert variables["OML_IDENT_OUTCOME"] == "identified"
        assert gateway.rejected("peer_not_allowed") == 200
        refusals = [r for r in caplog.records if "ALLOWED_PEERS" in r.getMessage()]
        assert len(refusals) == 1


async def test_connections_without_a_whole_environment_hold_no_call_slot() -> None:
    """With two call slots, 50 connections that send half an environment and stall do not
    take them: the PBX's call is decided while they wait, and they are dropped after the
    environment timeout, each counted as bad_environment."""
    async with front(max_calls=2, environment_timeout=0.5) as gateway:
        stalled = []
        for _ in range(50):
            reader, writer = await connect_from(ATTACKER, gateway.server)
            writer.write(ENVIRONMENT[:40])
            stalled.append((reader, writer))
        await eventually(lambda: gateway.server.live_calls >= 50)
        variables = await gateway.pbx_call()
        assert variables["OML_IDENT_OUTCOME"] == "identified"
        for reader, writer in stalled:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        assert gateway.rejected("bad_environment") == 50


async def answer_until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> list[bytes]:
    """Answer every command `200 result=0` until the gateway closes; the commands."""
    commands = []
    while line := await asyncio.wait_for(reader.readline(), 5):
        commands.append(line)
        writer.write(b"200 result=0\n")
    return commands


async def test_a_peer_over_its_cap_gets_the_fallback_and_others_are_served() -> None:
    """CALLERID_AGI_MAX_CALLS_PER_PEER=3: three sessions from one address that never answer
    hold its share; its fourth call is refused with config_error and the fallback (never an
    empty destination), counted once as peer_limit and not as a call; the PBX is served."""
    async with front(admission=Admission(max_per_peer=3), max_calls=100) as gateway:
        held = []
        for _ in range(3):
            reader, writer = await connect_from(ATTACKER, gateway.server)
            writer.write(ENVIRONMENT)
            assert (await reader.readline()).startswith(b"EXEC MSet")  # the call started
            held.append(writer)
        reader, writer = await connect_from(ATTACKER, gateway.server)
        writer.write(ENVIRONMENT)
        commands = await answer_until_closed(reader, writer)
        writer.close()
        assert commands == [
            b'EXEC MSet "OML_DEST_TYPE=1,OML_DEST_ID=99,OML_IDENT_SOURCE=failover,'
            b'OML_IDENT_OUTCOME=config_error"\n'
        ]
        assert gateway.rejected("peer_limit") == 1
        assert gateway.calls("config_error") == 0
        variables = await gateway.pbx_call()
        assert variables["OML_IDENT_OUTCOME"] == "identified"
        for writer in held:
            writer.close()


async def test_over_capacity_calls_get_a_destination_and_are_counted_once() -> None:
    """Over CALLERID_MAX_CALLS a call is answered at once with config_error and the fallback;
    the refusal is counted once (sessions rejected), not also as a call of a node."""
    async with front(max_calls=1) as gateway:
        reader, writer = await connect_from(ATTACKER, gateway.server)
        writer.write(ENVIRONMENT)
        assert (await reader.readline()).startswith(b"EXEC MSet")  # holds the one slot
        variables = await gateway.pbx_call()
        assert variables["OML_IDENT_OUTCOME"] == "config_error"
        assert (variables["OML_DEST_TYPE"], variables["OML_DEST_ID"]) == ("1", "99")
        assert gateway.rejected("over_capacity") == 1
        assert gateway.calls("config_error") == 0
        writer.close()


async def test_sessions_that_never_started_a_call_are_not_calls_of_a_node() -> None:
    """A socket that sends an environment and closes before answering a single command (a
    scanner, a half-open socket) is counted as closed_before_call, not as a hang-up of the
    node it named; a real call's hang-up still counts."""
    async with front() as gateway:
        for _ in range(20):
            reader, writer = await connect_from(ATTACKER, gateway.server)
            writer.write(ENVIRONMENT)
            writer.write_eof()
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
        await eventually(lambda: gateway.rejected("closed_before_call") == 20)
        assert gateway.calls("hangup") == 0
        host, port = gateway.server.address
        await run_call(host, port, CallScript(node="local", hangup="prompt"), timeout=10)
        assert gateway.calls("hangup") == 1
