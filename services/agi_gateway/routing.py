"""Hand a decision to Asterisk: channel variables, then an optional jump.

Every variable goes in one command, `EXEC MSet "__OML_CUSTOMER_ID=...,OML_DEST_TYPE=...,
OML_IDENT_OUTCOME=..."`, so Asterisk answers one line for all of them (one round trip: a
FastAGI server must wait for each reply before the next command). MSet sets the pairs in order,
each as SET VARIABLE would (so `__` inheritance to the agent's leg works the same), and
`OML_IDENT_OUTCOME` is the last pair: a dialplan (or a test) that sees it can rely on every
other variable being in place. Asterisk logs EXEC's options at verbosity 3; Read() has already
logged the entry there ("User entered ..."), so the id in MSet exposes nothing new. Only
fixed-form values reach the socket: outcome and source are enum words, destinations are
integers and the customer id has been validated to digits (`MultiSet` refuses anything else
when it is built).

Jumps use `EXEC Goto "context,extension,priority"`, after MSet's reply. Asterisk's Goto goes
through ast_explicit_goto, which stores priority-1 while the channel runs in the dialplan; when
AGI() returns, the dialplan adds 1, so the call continues exactly at the template's priority
(checked on a real Asterisk 22 by tests/asterisk/).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from agi_gateway.channel import Channel
from agi_gateway.decisions import Decision
from shared.destination import Destination

OUTCOME_VAR = "OML_IDENT_OUTCOME"
DEST_TYPE_VAR = "OML_DEST_TYPE"
DEST_ID_VAR = "OML_DEST_ID"
SOURCE_VAR = "OML_IDENT_SOURCE"
# "__" makes Asterisk copy the variable to every channel created from this one (the agent's).
CUSTOMER_VARS = ("__OML_CUSTOMER_ID", "__OMLCODCLI")

_GOTO_TARGET = re.compile(r"[A-Za-z0-9_\-]+,[A-Za-z0-9_\-+*#]+,[0-9]{1,5}")
ANY_TYPE = "*"


class JumpTemplates:
    """Per destination type, where to send the channel: e.g. `oml-dest-{type},{id},1`.

    The key `*` applies to types without their own template. Templates are checked when they
    are loaded, with the largest values a destination can hold, so a bad template is a
    start-up error and never a bad AGI command.
    """

    def __init__(self, templates: Mapping[str, str]) -> None:
        self._templates: dict[str, str] = {}
        for key, template in templates.items():
            if key != ANY_TYPE and not key.isdigit():
                raise ValueError(f"jump template key {key!r}: must be a destination type or '*'")
            probe = Destination(type=999, id=2_147_483_647)
            try:
                target = template.format(type=probe.type, id=probe.id)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"jump template {template!r}: {exc}") from exc
            if not _GOTO_TARGET.fullmatch(target):
                raise ValueError(
                    f"jump template {template!r}: must render to 'context,extension,priority'"
                )
            self._templates[key if key == ANY_TYPE else str(int(key))] = template

    def target(self, destination: Destination) -> str | None:
        template = self._templates.get(str(destination.type)) or self._templates.get(ANY_TYPE)
        return (
            None if template is None else template.format(type=destination.type, id=destination.id)
        )

    def __bool__(self) -> bool:
        return bool(self._templates)


async def apply_decision(channel: Channel, decision: Decision, jumps: JumpTemplates) -> None:
    """Write the decision's variables and, if a template matches, jump there."""
    destination = decision.destination
    pairs: list[tuple[str, str]] = []
    if decision.customer_id is not None:
        pairs += [(name, decision.customer_id) for name in CUSTOMER_VARS]
    pairs += [
        (DEST_TYPE_VAR, "" if destination is None else str(destination.type)),
        (DEST_ID_VAR, "" if destination is None else str(destination.id)),
        (SOURCE_VAR, decision.source.value),
        (OUTCOME_VAR, decision.outcome.value),  # last: see the module docstring
    ]
    await channel.set_variables(pairs)
    if destination is not None and not channel.hung_up:
        target = jumps.target(destination)
        if target is not None:
            await channel.goto(target)
