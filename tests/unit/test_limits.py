"""Enumeration limits: nobody can learn which customer ids exist by trying them fast."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from agi_gateway.flow import CallFlow, FlowSettings
from agi_gateway.limits import Limit, Limits, LimitSettings, caller_key
from agi_gateway.metrics import GatewayMetrics
from agi_gateway.routing import JumpTemplates
from agi_gateway.server import AgiServer
from shared.messages import IdentifyReply, IdentifyRequest
from shared.nodes import build_nodes
from shared.outcomes import Source, Verdict
from tests.fakes import FakeClock
from tools.asterisk_sim import CallScript, run_call

KNOWN = {f"{n:05d}" for n in range(100, 120)}


def test_caller_key_treats_withheld_numbers_as_one() -> None:
    """No number, `anonymous`, `unknown` and the like are no number; a number is itself."""
    for none in ("", " ", "anonymous", "Unknown", "PRIVATE", "restricted"):
        assert caller_key(none) is None
    assert caller_key("+5491155551234") == "+5491155551234"


def test_failures_then_lookups_per_caller_and_the_window() -> None:
    """A calling number gets its failed tries, then is refused until the hour is over; another
    number is not affected; lookups have their own, larger allowance."""
    clock = FakeClock()
    limits = Limits(LimitSettings(caller_lookups_per_hour=5, caller_failures_per_hour=2), clock)
    for _ in range(2):
        assert limits.check("n", "111") is None
        limits.failed("111")
    assert limits.check("n", "111") is Limit.CALLER_FAILURES
    assert limits.check("n", "222") is None
    for _ in range(4):
        assert limits.check("n", "222") is None
    assert limits.check("n", "222") is Limit.CALLER_LOOKUPS
    clock.advance(3600)
    assert limits.check("n", "111") is None


def test_anonymous_callers_share_one_allowance_per_node() -> None:
    """Withholding the number does not lift the limit: such calls share one per node."""
    limits = Limits(LimitSettings(anonymous_lookups_per_hour=3), FakeClock())
    assert [limits.check("a", None) for _ in range(4)] == [
        None,
        None,
        None,
        Limit.ANONYMOUS_LOOKUPS,
    ]
    assert limits.check("b", None) is None


def test_node_rate_per_second() -> None:
    """With a per-node rate, lookups beyond it in the same second are refused."""
    clock = FakeClock()
    limits = Limits(LimitSettings(node_lookups_per_second=2), clock)
    assert [limits.check("n", f"{i}") for i in range(3)] == [None, None, Limit.NODE_RATE]
    clock.advance(1)
    assert limits.check("n", "9") is None


def test_memory_is_bounded() -> None:
    """Only the newest `max_callers` calling numbers are remembered."""
    limits = Limits(LimitSettings(max_callers=100), FakeClock())
    for number in range(10_000):
        limits.check("n", str(number))
    assert len(limits._callers) <= 101


class Crm:
    """Knows the ids in KNOWN; counts what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        self.asked.append(request.customer_id)
        verdict = Verdict.TRUE if request.customer_id in KNOWN else Verdict.FALSE
        return IdentifyReply(request_id=request.request_id, verdict=verdict, source=Source.CRM)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[AgiServer, Crm, CollectorRegistry]]:
    nodes = build_nodes(
        [
            {
                "id": "gold",
                "name": "gold",
                "interaction": "crm_true_false",
                "url": "http://127.0.0.1:9/x",
                "audio": "prompt",
                "expected_length": 5,
                "on_identified": "1,3",
                "on_not_identified": "1,4",
                "on_error": "1,9",
            }
        ]
    )
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.init_nodes(nodes.names())
    crm = Crm()
    flow = CallFlow(lambda: nodes, crm, metrics, FlowSettings(jumps=JumpTemplates({})))
    server = AgiServer(flow, metrics, command_timeout=5)
    await server.start("127.0.0.1", 0)
    yield server, crm, registry
    await server.drain(0.5)


async def test_one_caller_guessing_ids_learns_at_most_its_allowance(
    gateway: tuple[AgiServer, Crm, CollectorRegistry],
) -> None:
    """A caller trying 200 ids (20 exist) in parallel gets real answers for at most 10
    unknown ids plus the known ones found by then (default: 10 failures, 30 lookups an hour);
    every other try takes the failover without reaching the CRM and is counted. A real caller
    from another number is identified meanwhile."""
    server, crm, registry = gateway
    host, port = server.address

    async def attempt(customer: str, caller: str) -> dict[str, str]:
        script = CallScript(node="gold", entries=[customer], caller_number=caller)
        return (await run_call(host, port, script, timeout=10)).variables

    tries = [f"{n:05d}" for n in range(200)]
    outcomes = []
    for batch in range(0, len(tries), 20):
        outcomes += await asyncio.gather(
            *(attempt(t, "5550000") for t in tries[batch : batch + 20])
        )
    answered = [v for v in outcomes if v["OML_IDENT_OUTCOME"] in {"identified", "not_identified"}]
    limited = [v for v in outcomes if v["OML_IDENT_OUTCOME"] == "crm_error"]
    assert len(answered) <= 30
    assert len(crm.asked) == len(answered)
    assert len(limited) == 200 - len(answered)
    assert all(v["OML_IDENT_SOURCE"] == "failover" for v in limited)
    refused = sum(
        registry.get_sample_value(
            "callerid_identifications_limited_total", {"node": "gold", "limit": limit.value}
        )
        or 0
        for limit in Limit
    )
    assert refused == len(limited)
    honest = await attempt("00105", "5559999")
    assert honest["OML_IDENT_OUTCOME"] == "identified"
