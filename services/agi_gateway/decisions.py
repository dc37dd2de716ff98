"""What a call's result means: outcome, destination and source (docs/design.md §2), without I/O.

Every way out of a node is built here, so the table in the design and the README has exactly
one implementation: a local decision (no CRM), a CRM/cache reply, a failover when the
identification RPC failed, a hang-up, and a configuration error. Which answers a node accepts
is `shared.crm_answer.judge`, the rule the resolver applies too; which outcomes are failovers
is `Outcome.is_failover`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.crm_answer import judge
from shared.destination import Destination
from shared.messages import IdentifyReply
from shared.nodes import NodeConfig
from shared.outcomes import Outcome, Source, Verdict


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    source: Source
    destination: Destination | None  # None only for hang-ups and unrouted config errors
    customer_id: str | None = None  # the validated entry, when there was one


def entry_decision(node: NodeConfig, customer_id: str) -> Decision:
    """A valid entry on a node that does not ask the CRM."""
    return Decision(Outcome.IDENTIFIED, Source.LOCAL, node.on_identified, customer_id)


def no_entry_decision(node: NodeConfig, *, last_entry_invalid: bool) -> Decision:
    """Attempts exhausted: invalid if the last try had digits, no input otherwise."""
    if last_entry_invalid:
        return Decision(
            Outcome.INVALID_INPUT, Source.LOCAL, node.on_invalid or node.on_not_identified
        )
    return Decision(Outcome.NO_INPUT, Source.LOCAL, node.on_no_input or node.on_not_identified)


def failover_decision(node: NodeConfig, outcome: Outcome, customer_id: str) -> Decision:
    """The CRM could not decide (timeout, error, bad answer): route to the error destination."""
    if not outcome.is_failover:
        raise ValueError(f"{outcome.value} is not a failover outcome")
    return Decision(outcome, Source.FAILOVER, node.on_error or node.on_not_identified, customer_id)


def reply_decision(node: NodeConfig, reply: IdentifyReply, customer_id: str) -> Decision:
    """A resolver's reply, already validated as an envelope by the message model."""
    error = reply.error
    if error is None:
        # Defence in depth: the resolver judged the answer by the same rule, but the gateway
        # is the last hop before Asterisk and must not route anywhere the node does not allow
        # (nor a "true" where it has no "identified" destination).
        error = judge(node, reply)
    if error is not None:
        return failover_decision(node, error.outcome, customer_id)
    if reply.verdict is Verdict.TRUE:
        assert node.on_identified is not None  # judge refuses a "true" the node cannot route
        return Decision(Outcome.IDENTIFIED, reply.source, node.on_identified, customer_id)
    if reply.verdict is Verdict.FALSE:
        return Decision(Outcome.NOT_IDENTIFIED, reply.source, node.on_not_identified, customer_id)
    assert reply.destination is not None  # guaranteed by IdentifyReply's validator
    return Decision(Outcome.CRM_DESTINATION, reply.source, reply.destination, customer_id)


def hangup_decision(customer_id: str | None = None) -> Decision:
    return Decision(Outcome.HANGUP, Source.LOCAL, None, customer_id)


def config_error_decision(fallback: Destination | None) -> Decision:
    return Decision(Outcome.CONFIG_ERROR, Source.FAILOVER, fallback)
