"""Every outcome of the call flow, over real TCP: simulated Asterisk → AgiServer → CallFlow.

The identification port is a scripted fake here (the resolver and the buses have their own
tests); everything on the Asterisk side is the real server, session, parser and commands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from agi_gateway.flow import CallFlow, FlowSettings, requested_node
from agi_gateway.metrics import GatewayMetrics
from agi_gateway.routing import JumpTemplates
from agi_gateway.server import AgiServer
from shared.destination import Destination
from shared.messages import IdentifyReply, IdentifyRequest
from shared.nodes import build_nodes
from shared.outcomes import ErrorCode, Outcome, Source, Verdict
from shared.ports import IdentifyTimeout, IdentifyUnavailable
from tools.asterisk_sim import CallResult, CallScript, run_call

NODES = [
    {
        "id": "tf",
        "name": "true-false",
        "interaction": "crm_true_false",
        "url": "http://127.0.0.1:9/identify",
        "audio": "prompt",
        "expected_length": 5,
        "attempts": 3,
        "on_identified": "1,3",
        "on_not_identified": "1,4",
        "on_error": "1,9",
        "crm_timeout": 0.3,
    },
    {
        "id": "ctx",
        "name": "with-context",
        "interaction": "crm_true_false",
        "url": "http://127.0.0.1:9/identify",
        "audio": "prompt",
        "expected_length": 5,
        "on_identified": "1,3",
        "on_not_identified": "1,4",
        "crm_send_context": True,
    },
    {
        "id": "local",
        "name": "local",
        "audio": "prompt",
        "min_length": 3,
        "max_length": 6,
        "attempts": 2,
        "on_identified": "1,5",
        "on_not_identified": "1,6",
        "on_no_input": "3,1",
        "on_invalid": "3,2",
    },
    {
        "id": "dest",
        "name": "dest",
        "interaction": "crm_destination",
        "url": "http://127.0.0.1:9/route",
        "audio": "prompt",
        "expected_length": 5,
        "on_identified": "1,3",
        "on_not_identified": "1,4",
        "crm_timeout": 0.3,
        "hold_music_after": 0.05,
    },
    {
        # Type-9 destinations name a node by number: the hop targets have numeric ids.
        "id": "4",
        "name": "step2",
        "audio": "prompt2",
        "expected_length": 4,
        "on_identified": "1,8",
        "on_not_identified": "1,4",
    },
    {
        "id": "7",
        "name": "loop",
        "audio": "prompt",
        "expected_length": 1,
        "on_identified": "9,7",
        "on_not_identified": "1,4",
    },
    {
        "id": "hop",
        "name": "hop",
        "audio": "prompt",
        "min_length": 3,
        "on_identified": "9,4",
        "on_not_identified": "1,6",
    },
]


@dataclass
class ScriptedIdentifier:
    """Answers by customer id: a reply verdict, an exception, or a delay."""

    answers: dict[str, Callable[[IdentifyRequest], IdentifyReply]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    requests: list[IdentifyRequest] = field(default_factory=list)
    cancelled: int = 0

    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        self.requests.append(request)
        try:
            await asyncio.sleep(self.delays.get(request.customer_id, 0))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.answers[request.customer_id](request)


def verdict(
    v: Verdict, dest: str | None = None, source: Source = Source.CRM
) -> Callable[..., IdentifyReply]:
    return lambda r: IdentifyReply(
        request_id=r.request_id,
        verdict=v,
        destination=Destination.parse(dest) if dest else None,
        source=source,
    )


def error(code: ErrorCode) -> Callable[..., IdentifyReply]:
    return lambda r: IdentifyReply.failure(r.request_id, code)


def raises(exc: Exception) -> Callable[..., IdentifyReply]:
    def _raise(_: IdentifyRequest) -> IdentifyReply:
        raise exc

    return _raise


@dataclass
class Harness:
    server: AgiServer
    identifier: ScriptedIdentifier
    registry: CollectorRegistry

    async def call(self, script: CallScript) -> CallResult:
        host, port = self.server.address
        return await run_call(host, port, script, timeout=10)

    def calls(self, node: str, outcome: str, source: str) -> float:
        value = self.registry.get_sample_value(
            "callerid_calls_total", {"node": node, "outcome": outcome, "source": source}
        )
        return value or 0.0


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    nodes = build_nodes(NODES)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.init_nodes(nodes.names())
    identifier = ScriptedIdentifier()
    flow = CallFlow(
        lambda: nodes,
        identifier,
        metrics,
        FlowSettings(
            jumps=JumpTemplates({"1": "oml-inbound,{id},1", "*": "oml-dest-{type},{id},1"}),
            fallback=Destination(type=1, id=99),
            max_hops=3,
        ),
    )
    server = AgiServer(flow, metrics, max_calls=50, command_timeout=5)
    await server.start("127.0.0.1", 0)
    yield Harness(server, identifier, registry)
    await server.drain(1)


def _route(result: CallResult) -> tuple[str, str, str, str]:
    v = result.variables
    return (v["OML_IDENT_OUTCOME"], v["OML_DEST_TYPE"], v["OML_DEST_ID"], v["OML_IDENT_SOURCE"])


async def test_crm_true_routes_to_on_identified_and_jumps(harness: Harness) -> None:
    """CRM true → identified, on_identified, id passed on; the dialplan lands on the template."""
    harness.identifier.answers["12345"] = verdict(Verdict.TRUE)
    result = await harness.call(CallScript(node="tf", entries=["12345"]))
    assert _route(result) == ("identified", "1", "3", "crm")
    assert result.variables["__OML_CUSTOMER_ID"] == "12345"
    assert result.variables["__OMLCODCLI"] == "12345"
    assert (result.context, result.extension, result.priority) == ("oml-inbound", "3", 1)
    assert result.closed_by_gateway
    assert harness.calls("true-false", "identified", "crm") == 1


async def test_crm_false_routes_to_on_not_identified(harness: Harness) -> None:
    """CRM false → not_identified and on_not_identified; a cached answer says source=cache."""
    harness.identifier.answers["54321"] = verdict(Verdict.FALSE, source=Source.CACHE)
    result = await harness.call(CallScript(node="tf", entries=["54321"]))
    assert _route(result) == ("not_identified", "1", "4", "cache")


async def test_crm_destination_is_followed(harness: Harness) -> None:
    """A CRM-named destination becomes crm_destination with that type and id."""
    harness.identifier.answers["22222"] = verdict(Verdict.DESTINATION, "3,7")
    result = await harness.call(CallScript(node="dest", entries=["22222"]))
    assert _route(result) == ("crm_destination", "3", "7", "crm")
    assert (result.context, result.extension, result.priority) == ("oml-dest-3", "7", 1)


async def test_disallowed_destination_is_a_bad_response(harness: Harness) -> None:
    """A destination type outside the node's allow-list never reaches the dialplan."""
    harness.identifier.answers["22222"] = verdict(Verdict.DESTINATION, "99,1")
    result = await harness.call(CallScript(node="dest", entries=["22222"]))
    assert _route(result) == ("crm_bad_response", "1", "4", "failover")


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (error(ErrorCode.CRM_UNREACHABLE), "crm_error"),
        (error(ErrorCode.CRM_STATUS_FAIL), "crm_error"),
        (error(ErrorCode.CRM_CIRCUIT_OPEN), "crm_error"),
        (error(ErrorCode.CRM_BAD_RESPONSE), "crm_bad_response"),
        (error(ErrorCode.CRM_TIMEOUT), "crm_timeout"),
        (raises(IdentifyTimeout("late")), "crm_timeout"),
        (raises(IdentifyUnavailable("no broker")), "crm_timeout"),
    ],
)
async def test_crm_failures_take_the_error_destination(
    harness: Harness, answer: Callable[..., IdentifyReply], outcome: str
) -> None:
    """Every CRM or transport failure is a failover to on_error, with its own outcome."""
    harness.identifier.answers["12345"] = answer
    result = await harness.call(CallScript(node="tf", entries=["12345"]))
    assert _route(result) == (outcome, "1", "9", "failover")
    assert result.variables["__OML_CUSTOMER_ID"] == "12345"


async def test_slow_crm_times_out_within_budget(harness: Harness) -> None:
    """A reply slower than crm_timeout gives crm_timeout no later than the budget allows."""
    harness.identifier.answers["12345"] = verdict(Verdict.TRUE)
    harness.identifier.delays["12345"] = 5
    result = await harness.call(CallScript(node="tf", entries=["12345"]))
    assert _route(result) == ("crm_timeout", "1", "9", "failover")
    assert result.decided_at is not None
    assert result.last_digit_at is not None
    assert result.decided_at - result.last_digit_at < 0.3 + 0.25
    assert harness.identifier.cancelled == 1


async def test_hold_music_plays_while_crm_is_slow(harness: Harness) -> None:
    """Past hold_music_after the caller hears music on hold, stopped before routing."""
    harness.identifier.answers["22222"] = verdict(Verdict.TRUE)
    harness.identifier.delays["22222"] = 0.15
    result = await harness.call(CallScript(node="dest", entries=["22222"]))
    assert _route(result)[0] == "identified"
    music = [c for c in result.commands if c.startswith("SET MUSIC")]
    assert music == ['SET MUSIC on "default"', "SET MUSIC off"]


async def test_retries_then_valid_entry(harness: Harness) -> None:
    """Wrong length and silence cost attempts; a later valid entry is used."""
    harness.identifier.answers["12345"] = verdict(Verdict.TRUE)
    result = await harness.call(CallScript(node="tf", entries=["12", None, "12345"]))
    assert _route(result)[0] == "identified"
    assert sum(c.startswith("EXEC Read") for c in result.commands) == 3
    # The node's timeouts are set once, before the first attempt.
    assert sum(c.startswith('EXEC MSet "TIMEOUT(') for c in result.commands) == 1


async def test_no_input_after_all_attempts(harness: Harness) -> None:
    """Nothing typed in every attempt → no_input and on_no_input; no customer variables."""
    result = await harness.call(CallScript(node="local", entries=[None, None]))
    assert _route(result) == ("no_input", "3", "1", "local")
    assert "__OML_CUSTOMER_ID" not in result.variables


async def test_invalid_input_after_all_attempts(harness: Harness) -> None:
    """Last entry of a bad length → invalid_input and on_invalid; the CRM is never asked."""
    result = await harness.call(CallScript(node="tf", entries=["1", "123", "1234"]))
    assert _route(result) == ("invalid_input", "1", "4", "local")
    assert harness.identifier.requests == []


async def test_partial_entry_ended_by_inter_digit_timeout_is_validated(harness: Harness) -> None:
    """Digits ended by the inter-digit timeout count as the entry (here: valid for 'local')."""
    result = await harness.call(CallScript(node="local", entries=["1234~"]))
    assert _route(result) == ("identified", "1", "5", "local")
    assert 'EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"' in result.commands


async def test_none_interaction_identifies_locally(harness: Harness) -> None:
    """interaction none: a valid entry is identified without any CRM request."""
    result = await harness.call(CallScript(node="local", entries=["4567"]))
    assert _route(result) == ("identified", "1", "5", "local")
    assert harness.identifier.requests == []


async def test_node_from_agi_arg(harness: Harness) -> None:
    """The node can come from agi_arg_1 when the script path names none."""
    result = await harness.call(CallScript(node="local", node_in_arg=True, entries=["4567"]))
    assert _route(result)[0] == "identified"


async def test_unknown_node_is_a_config_error_to_the_fallback(harness: Harness) -> None:
    """An unknown node ends at once with config_error, routed to the gateway fallback."""
    result = await harness.call(CallScript(node="nope", entries=["12345"]))
    assert _route(result) == ("config_error", "1", "99", "failover")
    assert result.commands == [
        'EXEC MSet "OML_DEST_TYPE=1,OML_DEST_ID=99,OML_IDENT_SOURCE=failover,'
        'OML_IDENT_OUTCOME=config_error"',
        'EXEC Goto "oml-inbound,99,1"',
    ]
    assert harness.calls("unknown", "config_error", "failover") == 1


async def test_type_9_is_followed_in_session(harness: Harness) -> None:
    """A type-9 destination runs the next node in the same session, with its own prompt and
    timeouts."""
    result = await harness.call(CallScript(node="hop", entries=["4567", "8888"]))
    assert _route(result) == ("identified", "1", "8", "local")
    assert result.variables["__OML_CUSTOMER_ID"] == "8888"
    reads = [c for c in result.commands if c.startswith("EXEC Read")]
    assert reads == ['EXEC Read "CALLERID_ENTRY,prompt,20"', 'EXEC Read "CALLERID_ENTRY,prompt2,4"']
    assert harness.calls("hop", "identified", "local") == 1
    assert harness.calls("step2", "identified", "local") == 1


async def test_type_9_loop_hits_the_hop_limit(harness: Harness) -> None:
    """A node that routes to itself stops at max_hops with config_error and the fallback."""
    result = await harness.call(CallScript(node="7", entries=["1"] * 10))
    assert _route(result) == ("config_error", "1", "99", "failover")
    assert sum(c.startswith("EXEC Read") for c in result.commands) == 4


async def test_hangup_mid_prompt(harness: Harness) -> None:
    """A caller who hangs up during the prompt gets outcome hangup and nothing is routed."""
    result = await harness.call(CallScript(node="tf", entries=["12345"], hangup="prompt"))
    assert result.variables["OML_IDENT_OUTCOME"] == "hangup"
    assert result.variables["OML_DEST_TYPE"] == ""
    assert (result.context, result.priority) == ("from-pstn", 2)
    assert result.closed_by_gateway
    assert harness.identifier.requests == []


async def test_hangup_mid_lookup_cancels_the_request(harness: Harness) -> None:
    """A hang-up while the CRM is consulted cancels the pending request and ends at once."""
    harness.identifier.answers["12345"] = verdict(Verdict.TRUE)
    harness.identifier.delays["12345"] = 5
    result = await harness.call(CallScript(node="tf", entries=["12345"], hangup="lookup"))
    assert result.variables["OML_IDENT_OUTCOME"] == "hangup"
    assert result.closed_by_gateway
    assert harness.identifier.cancelled == 1
    assert harness.calls("true-false", "hangup", "local") == 1


async def test_missing_prompt_is_not_mistaken_for_a_hangup(harness: Harness) -> None:
    """READSTATUS=ERROR on a live channel means a missing prompt: config_error, still routed."""
    result = await harness.call(CallScript(node="local", missing_prompt=True))
    assert _route(result) == ("config_error", "1", "99", "failover")
    assert 'GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"' in result.commands
    assert "CHANNEL STATUS" not in result.commands  # READSTATUS alone tells a hang-up apart


async def test_customer_id_reaches_the_request(harness: Harness) -> None:
    """The request carries node, entry and call id; the caller number only when the node
    sends context to the CRM (it would cross RabbitMQ for nothing otherwise)."""
    harness.identifier.answers["12345"] = verdict(Verdict.TRUE)
    await harness.call(CallScript(node="tf", entries=["12345"], caller_number="5551234"))
    await harness.call(CallScript(node="ctx", entries=["12345"], caller_number="5551234"))
    plain, with_context = harness.identifier.requests
    assert (plain.node_id, plain.customer_id, plain.caller_number) == ("tf", "12345", "")
    assert (with_context.node_id, with_context.caller_number) == ("ctx", "5551234")


def test_requested_node_prefers_the_script_path() -> None:
    """identify/<id> wins over agi_arg_1; a malformed id is no node at all."""
    assert requested_node({"agi_network_script": "identify/7", "agi_arg_1": "9"}) == "7"
    assert requested_node({"agi_network_script": "identify", "agi_arg_1": "9"}) == "9"
    assert requested_node({"agi_network_script": "identify/a b"}) is None
    assert requested_node({"agi_network_script": "identify/x\r\nHANGUP"}) is None


# Each step of a call's path, made to raise in turn: (module attribute to replace, node, entry).
_FAULTS = [
    ("agi_gateway.flow.collect_entry", "tf", "12345"),
    ("agi_gateway.flow.caller_key", "tf", "12345"),
    ("agi_gateway.flow.Limits.check", "tf", "12345"),
    ("agi_gateway.flow.IdentifyRequest", "tf", "12345"),
    ("agi_gateway.flow.CallFlow._reply_decision", "tf", "12345"),
    ("agi_gateway.flow.reply_decision", "tf", "12345"),
    ("agi_gateway.flow.entry_decision", "local", "4567"),
    ("agi_gateway.flow.no_entry_decision", "local", None),
    ("agi_gateway.channel.AgiChannel.collect", "tf", "12345"),
    ("agi_gateway.channel.read_result", "tf", "12345"),
    ("agi_gateway.collect.CONFIRM_KEY", "tf", "12345"),  # not callable: a wrong type
    ("agi_gateway.flow.requested_node", "tf", "12345"),
]


@pytest.mark.parametrize(("target", "node", "entry"), _FAULTS, ids=[f[0] for f in _FAULTS])
async def test_a_call_keeps_a_decision_whichever_step_fails(
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    target: str,
    node: str,
    entry: str | None,
) -> None:
    """Whatever step of the call's path raises (a bug, a fault nobody foresaw), the call still
    leaves with OML_IDENT_OUTCOME and a destination, and the fault is logged once."""
    harness.identifier.answers["12345"] = verdict(Verdict.TRUE)

    def broken(*_: object, **__: object) -> object:
        raise RuntimeError(f"injected fault in {target}")

    monkeypatch.setattr(target, broken)
    caplog.set_level(logging.ERROR)
    result = await harness.call(CallScript(node=node, entries=[entry]))
    assert result.variables.get("OML_IDENT_OUTCOME") in {o.value for o in Outcome}
    assert result.variables["OML_DEST_TYPE"] != ""
    assert result.closed_by_gateway
    assert result.protocol_errors == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) <= 1
