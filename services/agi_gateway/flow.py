"""The call flow of an identification node (docs/design.md §1–3), over one AGI session.

Select the node, answer, collect the entry, ask the `Identifier` within the node's CRM budget,
write the decision and end. Destinations of type 9 (another identification node) are followed
in the same session up to `max_hops`. Whatever fails, the call leaves with a decision: a caller
who hangs up gets `hangup`, anything the gateway cannot run gets `config_error` and the fallback.

The flow talks to Asterisk only through a `Channel` (one command at a time, typed results), so
it can be driven by a scripted fake in unit tests. While it waits for the identification reply
it does not talk to Asterisk, so it races the reply against the channel's hang-up future (a
hang-up cancels the pending request) and against the server's abort future (done when a drain
runs out of time: the call takes its failover destination instead of being cut off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agi_gateway.channel import AgiChannel, Channel, CommandRefused, PromptMissing
from agi_gateway.collect import collect_entry
from agi_gateway.decisions import (
    Decision,
    config_error_decision,
    entry_decision,
    failover_decision,
    hangup_decision,
    no_entry_decision,
    reply_decision,
)
from agi_gateway.limits import Limits, LimitSettings, caller_key
from agi_gateway.metrics import GatewayMetrics
from agi_gateway.protocol import Environment
from agi_gateway.routing import JumpTemplates, apply_decision
from agi_gateway.session import AgiPeerError, AgiSession, AgiTimeout, CallerHungUp
from shared.destination import IDENTIFICATION_NODE_TYPE, Destination
from shared.messages import IdentifyReply, IdentifyRequest
from shared.metrics import UNKNOWN_NODE
from shared.nodes import NodeConfig, NodeSet
from shared.outcomes import Outcome
from shared.ports import Identifier, IdentifyTimeout, IdentifyUnavailable
from shared.waits import first_done

log = logging.getLogger(__name__)

_NODE_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
CLOSED_BEFORE_CALL = "closed_before_call"  # a sessions_rejected reason
REFUSAL_LOG_INTERVAL = 60.0  # seconds between two log lines about refused calls
_SCRIPT_PREFIX = "identify/"
# Bytes that may travel in a request's informational fields (never written to the AGI socket).
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True, slots=True)
class FlowSettings:
    jumps: JumpTemplates
    fallback: Destination | None = None
    max_hops: int = 5
    limits: LimitSettings = field(default_factory=LimitSettings)
    # Slack past the node's CRM budget before the gateway stops waiting on its own; the
    # identifier normally raises IdentifyTimeout at the deadline itself.
    deadline_slack: float = 0.05
    show_customer_ids: bool = False


def requested_node(variables: Mapping[str, str]) -> str | None:
    """The node id from `agi_network_script` (`identify/<id>`), or else `agi_arg_1`."""
    script = variables.get("agi_network_script", "")
    candidate = script[len(_SCRIPT_PREFIX) :] if script.startswith(_SCRIPT_PREFIX) else ""
    candidate = candidate.strip("/") or variables.get("agi_arg_1", "").strip()
    return candidate if _NODE_ID.fullmatch(candidate) else None


def mask(customer_id: str | None, *, show: bool = False) -> str:
    if customer_id is None:
        return "-"
    return customer_id if show else "*" * max(len(customer_id) - 2, 0) + customer_id[-2:]


class CallFlow:
    def __init__(
        self,
        nodes: Callable[[], NodeSet],
        identifier: Identifier,
        metrics: GatewayMetrics,
        settings: FlowSettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nodes = nodes
        self._identifier = identifier
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._refusals = _RefusalLog(monotonic)
        self._limits = Limits(settings.limits, monotonic)

    async def handle(
        self, session: AgiSession, environment: Environment, abort: asyncio.Future[None]
    ) -> Decision:
        """Run one call to its decision and hand the decision to Asterisk."""
        started = self._monotonic()
        env = environment.variables
        node_id: str | None = None
        channel = AgiChannel(session)
        label = UNKNOWN_NODE
        decision: Decision | None = None
        try:
            try:
                node_id = requested_node(env)
                decision, label = await self._run(channel, env, node_id, abort)
            except (AgiTimeout, AgiPeerError):
                raise
            except Exception:
                # A bug or a fault nobody foresaw must still leave the call with a decision:
                # every call that reaches a node leaves it with OML_IDENT_OUTCOME set.
                log.exception("call on node %s failed unexpectedly: routed to a fallback", node_id)
                decision, label = self._unexpected(node_id)
            if decision.outcome is Outcome.HANGUP and not session.answered:
                # Gone before Asterisk answered a single command: no call ever ran (a real
                # Asterisk answers the first one even after a hang-up). Not a call of a node.
                self._metrics.sessions_rejected.labels(CLOSED_BEFORE_CALL).inc()
                log.debug("AGI session closed before its call started (node %s)", node_id)
                return decision
            self._record(label, decision)
            with contextlib.suppress(CallerHungUp):  # Asterisk closed the socket: nothing to tell
                await apply_decision(channel, decision, self._settings.jumps)
        except (AgiTimeout, AgiPeerError) as exc:
            # Out of step with Asterisk: nothing more can be written safely; the server closes.
            log.error("AGI session broke on node %s: %s", node_id, exc)
            if decision is None:
                self._record(label, config_error_decision(None))
            raise
        if log.isEnabledFor(logging.INFO):  # its arguments cost more than the check
            self._log_call(env, label, decision, started)
        return decision

    def _log_call(
        self, env: Mapping[str, str], label: str, decision: Decision, started: float
    ) -> None:
        log.info(
            "call %s node=%s outcome=%s source=%s dest=%s id=%s %.0f ms",
            env.get("agi_uniqueid", "-")[:64],
            label,
            decision.outcome.value,
            decision.source.value,
            decision.destination or "-",
            mask(decision.customer_id, show=self._settings.show_customer_ids),
            (self._monotonic() - started) * 1000,
        )

    async def reject(self, session: AgiSession, environment: Environment, reason: str) -> None:
        """Turn a call away without collecting anything (over capacity, draining, peer limit).

        It still leaves with a destination: the gateway-wide fallback, else the requested
        node's failover. The server counts the refusal (once); it is not a call of a node.
        """
        node_id = requested_node(environment.variables)
        node = self._nodes().get(node_id) if node_id is not None else None
        decision = self._cannot_run(node) if node is not None else self._fallback_decision()
        self._refusals.note(reason, decision.destination)
        with contextlib.suppress(CallerHungUp):
            await apply_decision(AgiChannel(session), decision, self._settings.jumps)

    def _unexpected(self, node_id: str | None) -> tuple[Decision, str]:
        node = self._nodes().get(node_id) if node_id is not None else None
        if node is None:
            return self._fallback_decision(), UNKNOWN_NODE
        return self._cannot_run(node), node.name

    def _fallback_decision(self) -> Decision:
        return config_error_decision(self._settings.fallback)

    async def _run(
        self,
        channel: Channel,
        env: Mapping[str, str],
        node_id: str | None,
        abort: asyncio.Future[None],
    ) -> tuple[Decision, str]:
        for _hop in range(self._settings.max_hops + 1):
            node = self._nodes().get(node_id) if node_id is not None else None
            if node is None:
                log.error("unknown identification node %r: routed to the fallback", node_id)
                return config_error_decision(self._settings.fallback), UNKNOWN_NODE
            try:
                decision = await self._run_node(channel, env, node, abort)
            except CallerHungUp:
                return hangup_decision(), node.name
            except (PromptMissing, CommandRefused) as exc:
                log.error("node %s cannot run: %s", node.id, exc)
                return self._cannot_run(node), node.name
            destination = decision.destination
            if destination is None or destination.type != IDENTIFICATION_NODE_TYPE:
                return decision, node.name
            self._record(node.name, decision)
            node_id = str(destination.id)
        log.error(
            "identification nodes hop more than %d times: routed to the fallback",
            self._settings.max_hops,
        )
        return config_error_decision(self._settings.fallback), UNKNOWN_NODE

    async def _run_node(
        self,
        channel: Channel,
        env: Mapping[str, str],
        node: NodeConfig,
        abort: asyncio.Future[None],
    ) -> Decision:
        collected = await collect_entry(channel, node)
        caller = caller_key(env.get("agi_callerid", ""))
        if collected.customer_id is None:
            if node.uses_crm and collected.last_entry_invalid:
                self._limits.failed(caller)
            return no_entry_decision(node, last_entry_invalid=collected.last_entry_invalid)
        if not node.uses_crm:
            return entry_decision(node, collected.customer_id)
        limit = self._limits.check(node.id, caller)
        if limit is not None:
            self._metrics.identifications_limited.labels(node.name, limit.value).inc()
            return failover_decision(node, Outcome.CRM_ERROR, collected.customer_id)
        decision = await self._identify(
            channel, env, node, collected.customer_id, abort, collected.entered_at
        )
        if decision.outcome is Outcome.NOT_IDENTIFIED:
            self._limits.failed(caller)
        return decision

    async def _identify(
        self,
        channel: Channel,
        env: Mapping[str, str],
        node: NodeConfig,
        customer_id: str,
        abort: asyncio.Future[None],
        entered_at: float,
    ) -> Decision:
        # The budget runs from when the entry reached the gateway, not from now: under CPU
        # starvation the reads after it (and the loop itself) can be late by a lot.
        now = self._monotonic()
        started = min(entered_at, now) if entered_at else now
        request = IdentifyRequest(
            request_id=secrets.token_hex(16),  # 32 hex digits, as uuid4().hex, cheaper
            node_id=node.id,
            customer_id=customer_id,
            # Only where the CRM is to see it: the request crosses RabbitMQ, and a number that
            # is not needed there should not travel.
            caller_number=(
                _UNPRINTABLE.sub("", env.get("agi_callerid", ""))[:64]
                if node.crm_send_context
                else ""
            ),
            call_id=_UNPRINTABLE.sub("", env.get("agi_uniqueid", ""))[:64],
            deadline=self._clock() + node.crm_timeout - (now - started),
        )
        reply_task = asyncio.ensure_future(self._identifier.identify(request))
        music = False
        try:
            limit = node.crm_timeout + self._settings.deadline_slack
            # The hang-up and the abort are futures shared with others: waited on, never
            # cancelled here.
            waiting: tuple[asyncio.Future[Any], ...] = (reply_task, channel.hangup, abort)
            if node.hold_music_after is not None and node.hold_music_after < limit:
                await first_done(waiting, node.hold_music_after)
                if not any(future.done() for future in waiting):
                    await channel.hold_music(True, node.hold_music_class)
                    music = True
            remaining = limit - (self._monotonic() - started)
            await first_done(waiting, max(remaining, 0))
        finally:
            if not reply_task.done():
                reply_task.cancel()
                await asyncio.wait([reply_task])
        self._metrics.identification_wait_of(node.name).observe(self._monotonic() - started)
        if channel.hung_up:
            channel.raise_if_broken()
            raise CallerHungUp("hung up while waiting for the CRM")
        if music:
            await channel.hold_music(False)
        return self._reply_decision(node, customer_id, reply_task)

    def _reply_decision(
        self, node: NodeConfig, customer_id: str, reply_task: asyncio.Future[IdentifyReply]
    ) -> Decision:
        counter = self._metrics.identify_requests_of
        if reply_task.cancelled():  # neither reply nor error in time: our own deadline, or abort
            counter(node.name, "timeout").inc()
            return failover_decision(node, Outcome.CRM_TIMEOUT, customer_id)
        error = reply_task.exception()
        if isinstance(error, IdentifyTimeout):
            counter(node.name, "timeout").inc()
            return failover_decision(node, Outcome.CRM_TIMEOUT, customer_id)
        if isinstance(error, IdentifyUnavailable):
            counter(node.name, "unavailable").inc()
            return failover_decision(node, Outcome.CRM_TIMEOUT, customer_id)
        if error is not None:
            log.error("identification failed unexpectedly", exc_info=error)
            counter(node.name, "unavailable").inc()
            return failover_decision(node, Outcome.CRM_ERROR, customer_id)
        counter(node.name, "reply").inc()
        return reply_decision(node, reply_task.result(), customer_id)

    def _cannot_run(self, node: NodeConfig) -> Decision:
        fallback = self._settings.fallback or node.on_error or node.on_not_identified
        return config_error_decision(fallback)

    def _record(self, label: str, decision: Decision) -> None:
        self._metrics.calls_of(label, decision.outcome.value, decision.source.value).inc()


class _RefusalLog:
    """One WARNING per refusal reason a minute at most: under a flood of connections (an
    attack, a PBX far over capacity) the log must not become the next bottleneck."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, reason: str, destination: Destination | None) -> None:
        self._since[reason] = self._since.get(reason, 0) + 1
        now = self._clock()
        last = self._last.get(reason)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return
        log.warning(
            "call refused (%s): routed to %s (%d refused for this reason since the last line)",
            reason,
            destination or "no destination (set CALLERID_FALLBACK_DESTINATION)",
            self._since.pop(reason),
        )
        self._last[reason] = now
