"""A CRM's answer and the rules for using it: which answers a node accepts, and the reply
that carries one. No I/O.

Both services apply these rules: the resolver to what the CRM said (an answer the node cannot
use is an error reply and is not cached), the gateway to what it reads from the answer cache
and, as the last hop before Asterisk, to every reply (defence in depth). Keeping them here is
what makes the two agree; parsing the CRM's HTTP body stays with the resolver
(`crm_resolver.crm_response`), the only one that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.destination import Destination
from shared.messages import IdentifyReply
from shared.nodes import NodeConfig
from shared.outcomes import ErrorCode, Interaction, Source, Verdict


@dataclass(frozen=True, slots=True)
class CrmAnswer:
    """A CRM's usable answer: true, false, or a destination."""

    verdict: Verdict
    destination: Destination | None = None

    def __post_init__(self) -> None:
        if self.verdict is Verdict.ERROR:
            raise ValueError("a CrmAnswer is never an error; raise CrmError instead")
        if (self.verdict is Verdict.DESTINATION) != (self.destination is not None):
            raise ValueError("destination is set exactly when verdict is 'destination'")

    @property
    def positive(self) -> bool:
        return self.verdict is not Verdict.FALSE


def judge(node: NodeConfig, answer: CrmAnswer | IdentifyReply) -> ErrorCode | None:
    """Why `node` cannot use this answer (a CRM answer, or a reply that is not an error), or
    None when it can. Every rejection is a `crm_bad_response` call outcome:

    - a `true` where the node has no `on_identified` (only a `crm_destination` node may lack
      one, and its CRM is meant to name a destination): nowhere to route it;
    - a destination on a node that does not let the CRM route (`crm_bad_response`): the CRM
      is not speaking the node's protocol;
    - a destination of a type the node does not allow (`crm_disallowed_destination`).
    """
    destination = answer.destination
    if destination is None:
        if answer.verdict is Verdict.TRUE and node.on_identified is None:
            return ErrorCode.CRM_BAD_RESPONSE
        return None
    if node.interaction is not Interaction.CRM_DESTINATION:
        return ErrorCode.CRM_BAD_RESPONSE
    if destination.type not in node.allowed_destination_types:
        return ErrorCode.CRM_DISALLOWED_DESTINATION
    return None


def answer_reply(
    request_id: str, answer: CrmAnswer, source: Source, crm_ms: float | None = None
) -> IdentifyReply:
    """The reply carrying an answer the node accepts (`judge` said None)."""
    return IdentifyReply(
        request_id=request_id,
        verdict=answer.verdict,
        destination=answer.destination,
        source=source,
        crm_ms=crm_ms,
    )
