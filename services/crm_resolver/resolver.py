"""The resolver: answer one identification request from the cache or the node's CRM.

What belongs here: the rules of DESIGN §5-§7 — which node, whether the request is still
worth answering, cache first, one CRM call per identical lookup in flight, the time budget,
the one retry, the circuit breaker, what an acceptable answer is, what is cached and for how
long — and the resolver's metrics. What does not: transport (the RabbitMQ consumer and the
in-memory bus call `Resolver.__call__`), HTTP (`CrmClient`), storage (`Cache`).

Rules chosen here, beyond the design's words:
- The node, and so the CRM URL, comes from the resolver's own configuration by the
  request's node id; a message can never aim the resolver at a URL.
- A request whose deadline has passed is answered `expired` with no cache or CRM call.
- Budget of an attempt: min(node.crm_timeout, deadline - now).
- Retry: at most once, only after a CRM outage error (timeout, unreachable, 5xx), only when
  the breaker still allows it, and only if the time left is at least
  max(RETRY_MIN_BUDGET, half of what the first attempt was given). A retry with less time
  than that would mostly time out too and only delay the caller's fallback.
- A `crm_true_false` node given a destination answers `crm_bad_response`: such a node has
  no place to route a CRM-chosen destination, so the CRM is not speaking the node's protocol.
  A destination whose type the node does not allow is `crm_disallowed_destination`. Neither
  is cached; for the breaker both count as "the CRM is up".
- Caching: true and destination answers for node.cache_ttl_positive, false for
  node.cache_ttl_negative, each with jitter (±10 % by default) so entries written together
  do not expire together; a TTL of 0 disables that kind; a node with both at 0 does not read
  the cache either. Errors are never cached. The answer is stored before the shared call
  ends, so a lookup arriving after it finds the cache.
- Across resolver processes (with a `FlightLock`, i.e. a shared Redis cache), the one
  in-process call for a (node, customer id) that missed the cache takes the lookup's lock
  before asking the CRM, for the time left to its deadline plus LOCK_MARGIN (so a holder that
  was killed blocks the others at most that long). If another process holds it, this one
  polls (every `flight_poll` s) for that process's answer in the cache and replies from it
  (source `cache`, counted as merged); if the lock goes away without an answer (the holder's
  call failed — errors are never cached — or its answer is of a kind not cached, or it
  died), it tries to take the lock again and, holding it, asks the CRM itself: one process
  at a time asks, and each at most once per in-process call. At its deadline it gives up
  with `crm_timeout`. A lock backend failure fails open: the CRM is asked without the lock,
  and the failure counts as a cache error. Only cache misses of nodes that cache
  (a TTL > 0) touch the lock; cache hits cost what they did.
- A caller never waits past its own deadline: one that joined a shared call started by a
  caller with a later deadline gives up at its own with `crm_timeout` (the shared call goes
  on for the others and still fills the cache).
- Unknown nodes are counted under the node label UNKNOWN_NODE: the id in the message
  is not a bounded label value.

Metrics, per node name: requests{verdict} once per reply; cache_lookups{hit|miss|error} per
cache read, and error per failed flight-lock round trip; crm_requests{result} and
crm_duration per HTTP attempt (result is the verdict or the error code; a call refused by
the open breaker counts as `crm_circuit_open` with no duration); merged per caller that
joined a shared call, in this process or another; expired; circuit_state from breaker
state changes (an open breaker whose wait is over shows half_open when next asked).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from crm_resolver.circuit import BreakerRegistry, CircuitState
from crm_resolver.metrics import CIRCUIT_STATES, ResolverMetrics
from crm_resolver.ports import (
    Cache,
    CacheMiss,
    CallContext,
    CrmAnswer,
    CrmClient,
    CrmError,
    CrmHttpStatus,
    CrmTimeout,
    CrmUnreachable,
    Flight,
    FlightLock,
    Lease,
)
from crm_resolver.singleflight import SingleFlight
from shared.messages import IdentifyReply, IdentifyRequest
from shared.metrics import UNKNOWN_NODE
from shared.nodes import NodeConfig, NodeSet
from shared.outcomes import ErrorCode, Interaction, Source, Verdict

log = logging.getLogger(__name__)

RETRY_MIN_BUDGET = 0.05
"""Seconds: a retry given less than this is not attempted."""

TTL_JITTER = 0.1

LOCK_MARGIN = 0.1
"""Seconds a flight lock outlives its holder's deadline: time to store the answer."""

FLIGHT_POLL = 0.01
"""Seconds between looks at the cache while another process asks the CRM."""


def jitter_ttl(ttl: float) -> float:
    """The default TTL jitter: uniformly within ±TTL_JITTER of `ttl`."""
    return ttl * random.uniform(1 - TTL_JITTER, 1 + TTL_JITTER)


@dataclass(frozen=True, slots=True)
class _Resolution:
    """What a shared lookup produced: an acceptable answer or an error code, and where the
    answer came from (another process's CRM call is answered from the cache)."""

    answer: CrmAnswer | None
    error: ErrorCode | None
    crm_ms: float | None
    source: Source = Source.CRM


class _NodeMeters:
    """A node's metric children, looked up once: label lookups are not free on a hot path."""

    __slots__ = ("_crm", "_name", "duration", "expired", "hit", "merged", "miss", "requests")

    def __init__(self, metrics: ResolverMetrics, name: str) -> None:
        self._name = name
        self._crm = metrics.crm_requests
        self.requests = {v: metrics.requests.labels(name, v.value) for v in Verdict}
        self.hit = metrics.cache_lookups.labels(name, "hit")
        self.miss = {m: metrics.cache_lookups.labels(name, m.value) for m in CacheMiss}
        self.expired = metrics.expired.labels(name)
        self.merged = metrics.merged.labels(name)
        self.duration: Histogram = metrics.crm_duration.labels(name)

    def crm(self, result: str) -> Counter:
        return self._crm.labels(self._name, result)


class Resolver:
    """Implements `shared.ports.RequestHandler`: never raises for business errors."""

    def __init__(
        self,
        nodes: Callable[[], NodeSet],
        crm: CrmClient,
        cache: Cache,
        metrics: ResolverMetrics,
        *,
        clock: Callable[[], float] = time.time,
        breakers: BreakerRegistry | None = None,
        retry: bool = True,
        jitter: Callable[[float], float] | None = None,
        flights: FlightLock | None = None,
        flight_poll: float = FLIGHT_POLL,
    ) -> None:
        self._nodes = nodes
        self._crm = crm
        self._cache = cache
        self._metrics = metrics
        # Deadlines are Unix times set by another process, so the clock is the wall clock;
        # CRM durations use it too, clamped at 0, which keeps tests with a fake clock exact.
        self._clock = clock
        self._breakers = breakers if breakers is not None else BreakerRegistry()
        self._breakers.subscribe(self._circuit_changed)
        self._retry = retry
        self._jitter = jitter if jitter is not None else jitter_ttl
        # None: this process is the only resolver on its cache (embedded, memory cache).
        self._flight_lock = flights
        self._flight_poll = flight_poll
        self._flights: SingleFlight[tuple[str, str], _Resolution] = SingleFlight()
        self._meters: dict[str, _NodeMeters] = {}

    async def __call__(self, request: IdentifyRequest) -> IdentifyReply:
        in_flight = self._metrics.in_flight
        in_flight.inc()
        meters: _NodeMeters | None = None
        try:
            node = self._nodes().get(request.node_id)
            meters = self._meters_for(node.name if node is not None else UNKNOWN_NODE)
            reply = await self._resolve(request, node, meters)
        except Exception:
            log.exception("internal error answering request %s", request.request_id)
            reply = IdentifyReply.failure(request.request_id, ErrorCode.INTERNAL)
        finally:
            in_flight.dec()
        (meters or self._meters_for(UNKNOWN_NODE)).requests[reply.verdict].inc()
        return reply

    async def close(self) -> None:
        """Cancel shared CRM calls nobody waits for any more (call after the last request)."""
        await self._flights.close()

    async def _resolve(
        self, request: IdentifyRequest, node: NodeConfig | None, meters: _NodeMeters
    ) -> IdentifyReply:
        if node is None or not node.uses_crm:
            log.debug("request %s names no CRM node", request.request_id)
            return IdentifyReply.failure(request.request_id, ErrorCode.UNKNOWN_NODE)
        deadline = request.deadline
        if deadline <= self._clock():
            meters.expired.inc()
            return IdentifyReply.failure(request.request_id, ErrorCode.EXPIRED)

        customer_id = request.customer_id
        if node.cache_ttl_positive > 0 or node.cache_ttl_negative > 0:
            found = await self._cache.fetch(node.id, customer_id)
            # A cached answer the node no longer accepts (its config changed) is a miss.
            if isinstance(found, CrmAnswer) and _judge(node, found) is None:
                meters.hit.inc()
                return _answer_reply(request.request_id, found, Source.CACHE, None)
            meters.miss[found if isinstance(found, CacheMiss) else CacheMiss.MISS].inc()

        context = CallContext(request.caller_number, request.call_id)
        try:
            async with asyncio.timeout(deadline - self._clock()):
                resolution, joined = await self._flights.run(
                    (node.id, customer_id),
                    lambda: self._ask_crm(node, customer_id, deadline, context, meters),
                )
        except TimeoutError:
            return IdentifyReply.failure(request.request_id, ErrorCode.CRM_TIMEOUT)
        if joined:
            meters.merged.inc()
        if resolution.answer is not None:
            return _answer_reply(
                request.request_id, resolution.answer, resolution.source, resolution.crm_ms
            )
        assert resolution.error is not None
        return IdentifyReply.failure(request.request_id, resolution.error, crm_ms=resolution.crm_ms)

    async def _ask_crm(
        self,
        node: NodeConfig,
        customer_id: str,
        deadline: float,
        context: CallContext,
        meters: _NodeMeters,
    ) -> _Resolution:
        # Runs once for all callers sharing it: an unexpected error is logged here, once,
        # and every caller gets `internal`.
        try:
            lock = self._flight_lock
            if lock is None or (node.cache_ttl_positive <= 0 and node.cache_ttl_negative <= 0):
                return await self._attempts(node, customer_id, deadline, context, meters)
            return await self._coordinated(lock, node, customer_id, deadline, context, meters)
        except Exception:
            log.exception("internal error asking the CRM of node %r", node.name)
            return _Resolution(None, ErrorCode.INTERNAL, None)

    async def _coordinated(
        self,
        lock: FlightLock,
        node: NodeConfig,
        customer_id: str,
        deadline: float,
        context: CallContext,
        meters: _NodeMeters,
    ) -> _Resolution:
        """Ask the CRM only while holding the lookup's lock; else take the holder's answer."""
        clock = self._clock
        while True:
            left = deadline - clock()
            if left <= 0:
                return _Resolution(None, ErrorCode.CRM_TIMEOUT, None)
            claim = await lock.lead(node.id, customer_id, left + LOCK_MARGIN)
            if isinstance(claim, Lease):
                try:
                    return await self._attempts(node, customer_id, deadline, context, meters)
                finally:
                    # After the answer is stored (in _attempts): a waiter that sees the lock
                    # gone without an answer knows there is none to wait for.
                    await lock.release(claim)
            seen: CrmAnswer | Flight | _Resolution = claim
            if claim is Flight.HELD:
                seen = await self._await_holder(lock, node, customer_id, deadline)
            if isinstance(seen, _Resolution):
                return seen
            if isinstance(seen, CrmAnswer):
                if _judge(node, seen) is None:
                    meters.merged.inc()
                    return _Resolution(seen, None, None, Source.CACHE)
                # A stale answer the node no longer accepts: ask, and overwrite it.
                return await self._attempts(node, customer_id, deadline, context, meters)
            if seen is Flight.ERROR:
                meters.miss[CacheMiss.ERROR].inc()
                return await self._attempts(node, customer_id, deadline, context, meters)
            # FREE: the holder let go without an answer; take the lock and ask ourselves.

    async def _await_holder(
        self, lock: FlightLock, node: NodeConfig, customer_id: str, deadline: float
    ) -> CrmAnswer | Flight | _Resolution:
        """The holder's answer, FREE or ERROR; a crm_timeout resolution at the deadline."""
        clock = self._clock
        while True:
            left = deadline - clock()
            if left <= 0:
                return _Resolution(None, ErrorCode.CRM_TIMEOUT, None)
            await asyncio.sleep(min(self._flight_poll, left))
            seen = await lock.peek(node.id, customer_id)
            if seen is not Flight.HELD:
                return seen

    async def _attempts(
        self,
        node: NodeConfig,
        customer_id: str,
        deadline: float,
        context: CallContext,
        meters: _NodeMeters,
    ) -> _Resolution:
        assert node.url is not None  # uses_crm implies a URL (NodeConfig validates it)
        breaker = self._breakers.get(node.url)
        if not breaker.allow():
            meters.crm(ErrorCode.CRM_CIRCUIT_OPEN.value).inc()
            return _Resolution(None, ErrorCode.CRM_CIRCUIT_OPEN, None)

        clock = self._clock
        budget = first_budget = min(node.crm_timeout, deadline - clock())
        spent = 0.0
        retried = False
        while True:
            started = clock()
            try:
                answer = await self._crm.lookup(node, customer_id, budget=budget, context=context)
            except CrmError as err:
                took = max(0.0, clock() - started)
                spent += took
                meters.duration.observe(took)
                meters.crm(err.code.value).inc()
                if not _is_outage(err):
                    breaker.record_success()
                    return _Resolution(None, err.code, spent * 1000)
                breaker.record_failure()
                left = deadline - clock()
                if (
                    self._retry
                    and not retried
                    and left >= max(RETRY_MIN_BUDGET, first_budget / 2)
                    and breaker.allow()
                ):
                    retried = True
                    budget = min(node.crm_timeout, left)
                    continue
                return _Resolution(None, err.code, spent * 1000)

            took = max(0.0, clock() - started)
            spent += took
            meters.duration.observe(took)
            breaker.record_success()
            error = _judge(node, answer)
            meters.crm(answer.verdict.value if error is None else error.value).inc()
            if error is not None:
                return _Resolution(None, error, spent * 1000)
            ttl = node.cache_ttl_positive if answer.positive else node.cache_ttl_negative
            if ttl > 0:
                await self._cache.put(node.id, customer_id, answer, self._jitter(ttl))
            return _Resolution(answer, None, spent * 1000)

    def _meters_for(self, name: str) -> _NodeMeters:
        meters = self._meters.get(name)
        if meters is None:
            meters = self._meters[name] = _NodeMeters(self._metrics, name)
        return meters

    def _circuit_changed(self, url: str, state: CircuitState) -> None:
        value = CIRCUIT_STATES[state]
        for node in self._nodes():
            if node.url == url:
                self._metrics.circuit_state.labels(node.name).set(value)


def _is_outage(err: CrmError) -> bool:
    """Errors that say the CRM is down or overloaded: they trip the breaker and may retry."""
    if isinstance(err, CrmHttpStatus):
        return err.status >= 500
    return isinstance(err, CrmTimeout | CrmUnreachable)


def _judge(node: NodeConfig, answer: CrmAnswer) -> ErrorCode | None:
    """Why the node cannot use this answer, or None when it can."""
    if answer.destination is None:
        return None
    if node.interaction is not Interaction.CRM_DESTINATION:
        return ErrorCode.CRM_BAD_RESPONSE
    if answer.destination.type not in node.allowed_destination_types:
        return ErrorCode.CRM_DISALLOWED_DESTINATION
    return None


def _answer_reply(
    request_id: str, answer: CrmAnswer, source: Source, crm_ms: float | None
) -> IdentifyReply:
    return IdentifyReply(
        request_id=request_id,
        verdict=answer.verdict,
        destination=answer.destination,
        source=source,
        crm_ms=crm_ms,
    )
