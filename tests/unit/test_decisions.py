"""The decision table (docs/design.md §2) and jump templates, without I/O."""

from __future__ import annotations

import pytest

from agi_gateway.decisions import (
    entry_decision,
    failover_decision,
    no_entry_decision,
    reply_decision,
)
from agi_gateway.routing import JumpTemplates
from shared.destination import Destination
from shared.messages import IdentifyReply
from shared.nodes import build_node
from shared.outcomes import ErrorCode, Outcome, Source, Verdict

BASE = {
    "id": "n",
    "name": "n",
    "interaction": "crm_destination",
    "url": "https://crm.example/x",
    "audio": "p",
    "on_identified": "1,3",
    "on_not_identified": "1,4",
}
BARE = build_node(BASE)
FULL = build_node({**BASE, "on_no_input": "3,1", "on_invalid": "3,2", "on_error": "5,1"})


def reply(
    verdict: Verdict, destination: str | None = None, source: Source = Source.CRM
) -> IdentifyReply:
    dest = Destination.parse(destination) if destination else None
    return IdentifyReply(request_id="r", verdict=verdict, destination=dest, source=source)


def test_optional_destinations_fall_back_to_on_not_identified() -> None:
    """no_input, invalid_input and CRM failures use on_not_identified when unset."""
    assert no_entry_decision(BARE, last_entry_invalid=False).destination == BARE.on_not_identified
    assert no_entry_decision(BARE, last_entry_invalid=True).destination == BARE.on_not_identified
    assert failover_decision(BARE, Outcome.CRM_ERROR, "1").destination == BARE.on_not_identified


def test_optional_destinations_are_used_when_set() -> None:
    """on_no_input, on_invalid and on_error route their own outcomes."""
    assert no_entry_decision(FULL, last_entry_invalid=False).destination == Destination(
        type=3, id=1
    )
    assert no_entry_decision(FULL, last_entry_invalid=True).outcome is Outcome.INVALID_INPUT
    assert no_entry_decision(FULL, last_entry_invalid=True).destination == Destination(type=3, id=2)
    assert failover_decision(FULL, Outcome.CRM_TIMEOUT, "1").destination == Destination(
        type=5, id=1
    )


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_fails_over_with_its_outcome(code: ErrorCode) -> None:
    """Each resolver error code becomes its one failover outcome (the table is
    `ErrorCode.outcome`, pinned in tests/unit/test_vocabulary.py), routed to on_error."""
    decision = reply_decision(FULL, IdentifyReply.failure("r", code), "12")
    assert (decision.outcome, decision.source) == (code.outcome, Source.FAILOVER)
    assert decision.destination == FULL.on_error
    assert decision.customer_id == "12"


@pytest.mark.parametrize("outcome", [o for o in Outcome if not o.is_failover])
def test_only_failover_outcomes_fail_over(outcome: Outcome) -> None:
    """A failover decision for an outcome that is not a failover is a bug, refused loudly."""
    with pytest.raises(ValueError, match="not a failover outcome"):
        failover_decision(FULL, outcome, "1")


def test_verdicts() -> None:
    """true, false and a destination map to their outcomes, keeping the reply's source."""
    assert reply_decision(FULL, reply(Verdict.TRUE), "1").outcome is Outcome.IDENTIFIED
    cached = reply_decision(FULL, reply(Verdict.FALSE, source=Source.CACHE), "1")
    assert (cached.outcome, cached.source) == (Outcome.NOT_IDENTIFIED, Source.CACHE)
    routed = reply_decision(FULL, reply(Verdict.DESTINATION, "2,8"), "1")
    assert (routed.outcome, routed.destination) == (
        Outcome.CRM_DESTINATION,
        Destination(type=2, id=8),
    )


def test_true_on_a_destination_node_without_on_identified_is_a_bad_response() -> None:
    """A crm_destination node saved without TRUEDST has nowhere to send "true": the CRM was to
    name a destination, so the call fails over as crm_bad_response; other verdicts route."""
    routed_by_crm = build_node({**BASE, "on_identified": None, "on_error": "5,1"})
    decision = reply_decision(routed_by_crm, reply(Verdict.TRUE), "1")
    assert (decision.outcome, decision.source) == (Outcome.CRM_BAD_RESPONSE, Source.FAILOVER)
    assert decision.destination == Destination(type=5, id=1)
    false = reply_decision(routed_by_crm, reply(Verdict.FALSE), "1")
    assert false.destination == Destination(type=1, id=4)
    routed = reply_decision(routed_by_crm, reply(Verdict.DESTINATION, "2,8"), "1")
    assert routed.outcome is Outcome.CRM_DESTINATION


def test_gateway_enforces_the_allow_list_too() -> None:
    """A destination type the node does not allow is a bad response even if a resolver let it by."""
    decision = reply_decision(FULL, reply(Verdict.DESTINATION, "4,1"), "1")
    assert decision.outcome is Outcome.CRM_BAD_RESPONSE
    assert decision.destination == Destination(type=5, id=1)


def test_gateway_judges_replies_by_the_resolvers_rule() -> None:
    """A destination on a node that does not let the CRM route is a bad response at the
    gateway too (shared.crm_answer.judge), though its type is allowed: the last hop before
    Asterisk routes only what the resolver would have accepted."""
    true_false = build_node({**BASE, "interaction": "crm_true_false", "on_error": "5,1"})
    decision = reply_decision(true_false, reply(Verdict.DESTINATION, "1,3"), "1")
    assert (decision.outcome, decision.source) == (Outcome.CRM_BAD_RESPONSE, Source.FAILOVER)
    assert decision.destination == Destination(type=5, id=1)
    assert reply_decision(true_false, reply(Verdict.TRUE), "1").outcome is Outcome.IDENTIFIED


def test_local_entry_is_identified() -> None:
    """A valid entry on a node without CRM is identified, source local."""
    decision = entry_decision(FULL, "777")
    assert (decision.outcome, decision.source, decision.customer_id) == (
        Outcome.IDENTIFIED,
        Source.LOCAL,
        "777",
    )


def test_jump_templates_render_per_type_and_default() -> None:
    """A type's own template wins over '*'; no template means no jump."""
    jumps = JumpTemplates({"1": "inbound-{id},s,1", "*": "oml-dest-{type},{id},1"})
    assert jumps.target(Destination(type=1, id=3)) == "inbound-3,s,1"
    assert jumps.target(Destination(type=3, id=7)) == "oml-dest-3,7,1"
    assert JumpTemplates({"1": "a,{id},1"}).target(Destination(type=2, id=1)) is None


@pytest.mark.parametrize(
    "template",
    [
        "ctx,{id}",  # no priority
        "ctx,{id},1\r\nHANGUP",  # would inject a command
        'ctx",{id},1',  # quote
        "ctx,{nope},1",  # unknown field
        "ctx,{id},{type}x",  # priority not a number
        "ctx {id},s,1",  # space
    ],
)
def test_bad_jump_templates_are_refused_at_start_up(template: str) -> None:
    """A template that cannot render to context,extension,priority is a configuration error."""
    with pytest.raises(ValueError, match="jump template"):
        JumpTemplates({"*": template})


def test_jump_template_keys_are_types() -> None:
    """Keys are destination types or '*'."""
    with pytest.raises(ValueError, match="key"):
        JumpTemplates({"campaign": "a,{id},1"})
