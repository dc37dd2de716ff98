"""The resolver: answer one identification request from the cache or the node's CRM.

What belongs here: the rules of docs/design.md §5-§7 — which node, whether the request is still
worth answering, cache first, one CRM call per identical lookup in flight, the time budget,
the one retry, the circuit breaker, what an acceptable answer is, what is cached and for how
long — and the resolver's metrics. What does not: transport (the RabbitMQ consumer and the
in-memory bus call `Resolver.__call__`), HTTP (`CrmClient`), storage (`Cache`).

Rules chosen here, beyond the design's words:
- The node, and so the CRM URL, comes from the resolver's own configuration by the
  request's node id; a message can never aim the resolver at a URL.
- A request whose deadline has passed is answered `expired` with no cache or CRM call.
- Budget of an attempt: min(node.crm_timeout, deadline - now). With no time left (the
  deadline passed while the request waited for the cache or another's lock) the CRM is not
  asked: the reply is `crm_timeout`, and neither the breaker nor the CRM metrics hear of it.
- Only the CRM's own failures are outages (`_blame`): unreachable, a 5xx, or a timeout of an
  attempt that had the CRM's full time — a budget of at least FULL_ATTEMPT (90 %) of
  node.crm_timeout (the gateway's deadline is crm_timeout after the caller's last digit, so a
  first attempt always has a little less: the 10 % is the request's way to the resolver), and
  that time really went by with this process running: a timeout noticed more than
  STALL_MARGIN after its budget ran out was noticed by a process that was not running (frozen,
  its event loop blocked), whose CRM answer may well be waiting unread in its socket. Any
  other timeout is the call's time running out, not the CRM's: UNTESTED for the breaker (it
  neither opens nor closes a circuit) and never retried.
- Retry: at most once, only after a CRM outage, only when the breaker still allows it, and
  only if the time left is at least max(RETRY_MIN_BUDGET, half of what the first attempt was
  given). A retry with less time than that would mostly time out too and only delay the
  caller's fallback.
- A `crm_true_false` node given a destination answers `crm_bad_response`: such a node has
  no place to route a CRM-chosen destination, so the CRM is not speaking the node's protocol.
  A destination whose type the node does not allow is `crm_disallowed_destination`. Neither
  is cached; for the breaker both count as "the CRM is up".
- Caching: true and destination answers for node.cache_ttl_positive, false for
  node.cache_ttl_negative, each with jitter (±10 % by default) so entries written together
  do not expire together; a TTL of 0 disables that kind; a node with both at 0 does not read
  the cache either. Errors are never cached. A cached answer the node no longer accepts (its
  config changed) is a miss, asked again and overwritten.
- One algorithm, whichever the cache: every cache adapter implements the flight lock
  (`ports.Cache`: Redis shared by several resolver processes, or in process for a resolver
  alone), so a request of a node that caches does no separate cache read: its in-process
  shared call starts with `lead`, which in one step returns the cached answer (a hit) or, on
  a miss, takes the lookup's lock for the time left to the deadline plus LOCK_MARGIN (so a
  holder that was killed blocks the others at most that long). Identical requests in flight
  at once share that one step, hit or miss. Holding the lock, it asks the CRM and replies;
  storing the answer (if it is cached) and releasing the lock are one `settle`, started as
  the shared call ends and tracked until it is carried out (`close()` waits for it, at most
  `close_timeout`). The memory cache carries it out at once; Redis sends it with the next
  `lead` or within a few ms. So a Redis hit costs one round trip, a miss two when alone and
  one under load, and the reply waits for one. A lookup arriving between the reply and a
  Redis `settle` finds the lock held and takes the answer by polling, below.
  If another process holds the lock, this one polls (every `flight_poll` s) for that
  process's answer in the cache and replies from it (source `cache`, counted as merged); if
  the lock goes away without an answer (the holder's call failed — errors are never cached —
  or its answer is of a kind not cached, or it died), it tries to take the lock again and,
  holding it, asks the CRM itself: one process at a time asks, and each at most once per
  in-process call. At its deadline it gives up with `crm_timeout`. A lock backend failure
  fails open: the CRM is asked without the lock (its answer stored after the reply, with a
  plain `put`); so is a cached answer the node no longer accepts (overwritten by the put).
  Locks are distrusted for a while after a Redis failure: see "Doubted locks" in
  `crm_resolver.redis_cache`.
- A caller never waits past its own deadline: one that joined a shared call started by a
  caller with a later deadline gives up at its own with `crm_timeout` (the shared call goes
  on for the others and still fills the cache).
- Unknown nodes are counted under the node label UNKNOWN_NODE: the id in the message
  is not a bounded label value.

Metrics, per node name: requests{verdict} once per reply; cache_lookups{hit|miss|error} once
per request of a node that caches, with the result of the cache read that served it (its
shared call's first `lead`, whose ERROR is a lookup error; a request that gives up at its
deadline before that shared call ends counts a miss), plus an error per
later failed flight-lock round trip (a `peek` or a renewed `lead`); crm_requests{result} and
crm_duration per HTTP attempt (result is the verdict or the error code; a call refused by
the open breaker counts as `crm_circuit_open` with no duration); merged per request not
answered by a cache hit that got another caller's CRM answer or error, by joining this
process's shared call or from another process through the cache; expired; circuit_state
from breaker state changes (an open breaker whose wait is over shows half_open when next
asked). A cache hit is never merged, even when its lookup was shared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from crm_resolver.circuit import Attempt, BreakerRegistry, CircuitBreaker
from crm_resolver.metrics import CACHE_RESULTS, ResolverMetrics
from crm_resolver.ports import (
    Cache,
    CallContext,
    CrmAnswer,
    CrmClient,
    CrmError,
    CrmHttpStatus,
    CrmTimeout,
    CrmUnreachable,
    Flight,
    Lease,
)
from crm_resolver.singleflight import SingleFlight
from shared.answering import answer_request
from shared.crm_answer import answer_reply, judge
from shared.messages import IdentifyReply, IdentifyRequest
from shared.metrics import UNKNOWN_NODE
from shared.nodes import NodeConfig, NodeSet
from shared.outcomes import CacheLookup, CircuitState, ErrorCode, Source, Verdict
from shared.waits import done_within

log = logging.getLogger(__name__)

RETRY_MIN_BUDGET = 0.05
"""Seconds: a retry given less than this is not attempted."""

FULL_ATTEMPT = 0.9
"""Share of node.crm_timeout an attempt must be given for its timeout to be the CRM's fault."""

STALL_MARGIN = 0.1
"""Seconds past its budget a timeout may be noticed and still be the CRM's fault; later, the
process was not running when the time ran out."""

TTL_JITTER = 0.1

LOCK_MARGIN = 0.1
"""Seconds a flight lock outlives its holder's deadline: time to store the answer."""

FLIGHT_POLL = 0.01
"""Seconds between looks at the cache while another process asks the CRM."""

CLOSE_TIMEOUT = 1.0
"""Seconds `close()` waits for cache writes still running after their replies. Each is one
Redis round trip bounded by the client's own timeout; this only bounds a broken client."""


def jitter_ttl(ttl: float) -> float:
    """The default TTL jitter: uniformly within ±TTL_JITTER of `ttl`."""
    return ttl * random.uniform(1 - TTL_JITTER, 1 + TTL_JITTER)


_Lookup = CacheLookup
"""What a request's cache read found: the shared vocabulary (never SKIPPED here)."""


@dataclass(frozen=True, slots=True)
class _Resolution:
    """What a shared lookup produced: an acceptable answer or an error code, and where the
    answer came from (a hit, or another process's CRM call, is answered from the cache).

    `ttl`: how long the answer is to be cached (jitter applied; 0 when it is not). `lookup`:
    what the shared call's cache read found, for its callers to count (None when the node
    does not cache, so the cache was never read).
    """

    answer: CrmAnswer | None
    error: ErrorCode | None
    crm_ms: float | None
    source: Source = Source.CRM
    ttl: float = 0.0
    lookup: _Lookup | None = None

    def with_lookup(self, lookup: _Lookup) -> _Resolution:
        """This resolution, with what the cache read found (once a call: `dataclasses.replace`
        costs several times this)."""
        return _Resolution(self.answer, self.error, self.crm_ms, self.source, self.ttl, lookup)

    def reply(self, request_id: str) -> IdentifyReply:
        if self.answer is not None:
            return answer_reply(request_id, self.answer, self.source, self.crm_ms)
        assert self.error is not None
        return IdentifyReply.failure(request_id, self.error, crm_ms=self.crm_ms)


_Claim = Lease | CrmAnswer | Flight | _Resolution
"""What the cache said of a lookup (a lease, an answer, the lock's state), or how it ended."""


@dataclass(frozen=True, slots=True)
class _Ask:
    """One shared lookup: what every step of asking the CRM for it needs."""

    node: NodeConfig
    customer_id: str
    deadline: float
    context: CallContext
    meters: _NodeMeters


class _NodeMeters:
    """A node's metric children, looked up once: label lookups are not free on a hot path."""

    __slots__ = ("_crm", "_name", "duration", "expired", "lookups", "merged", "requests")

    def __init__(self, metrics: ResolverMetrics, name: str) -> None:
        self._name = name
        self._crm = metrics.crm_requests
        self.requests = {v: metrics.requests.labels(name, v.value) for v in Verdict}
        self.lookups = {k: metrics.cache_lookups.labels(name, k.value) for k in CACHE_RESULTS}
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
        flight_poll: float = FLIGHT_POLL,
        close_timeout: float = CLOSE_TIMEOUT,
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
        self._flight_poll = flight_poll
        self._flights: SingleFlight[tuple[str, str], _Resolution] = SingleFlight()
        # Cache writes running after their replies; strong references until they end.
        self._after: set[asyncio.Future[None]] = set()
        self._close_timeout = close_timeout
        self._meters: dict[str, _NodeMeters] = {}
        self._working = 0  # requests being answered: the in-flight gauge reads it when scraped
        metrics.in_flight.set_function(lambda: self._working)

    async def __call__(self, request: IdentifyRequest) -> IdentifyReply:
        node = self._nodes().get(request.node_id)
        meters = self._meters_for(node.name if node is not None else UNKNOWN_NODE)
        self._working += 1
        try:
            # A bug below still gets a reply, counted under its node (shared.answering).
            reply = await answer_request(lambda r: self._resolve(r, node, meters), request)
        finally:
            self._working -= 1
        meters.requests[reply.verdict].inc()
        return reply

    async def close(self) -> None:
        """Cancel shared CRM calls nobody waits for any more, then wait (at most
        `close_timeout`) for the cache writes still running after their replies, which
        include the lock releases of the cancelled calls. Call after the last request."""
        await self._flights.close()
        if not self._after:
            return
        _, pending = await asyncio.wait(set(self._after), timeout=self._close_timeout)
        if pending:
            log.warning("%d cache writes unfinished at close: cancelled", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

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
        context = CallContext(request.caller_number, request.call_id)
        flight, joined = self._flights.start(
            (node.id, customer_id),
            lambda: self._shared_lookup(_Ask(node, customer_id, deadline, context, meters)),
        )
        if await done_within(flight, deadline - self._clock()):
            resolution = flight.result()
        else:
            # Given up before the shared call ended (it goes on for the others and the
            # cache): not answered from the cache.
            lookup = _Lookup.MISS if node.caches else None
            resolution, joined = (
                _Resolution(None, ErrorCode.CRM_TIMEOUT, None, lookup=lookup),
                False,
            )
        _count(resolution, joined, meters)
        return resolution.reply(request.request_id)

    async def _shared_lookup(self, ask: _Ask) -> _Resolution:
        # Runs once for all callers sharing it: an unexpected error is logged here, once,
        # and every caller gets `internal`.
        try:
            if not ask.node.caches:
                return await self._attempts(ask)  # nothing to read, store or lock
            return await self._coordinated(ask)
        except Exception:
            log.exception("internal error asking the CRM of node %r", ask.node.name)
            return _Resolution(None, ErrorCode.INTERNAL, None)

    async def _coordinated(self, ask: _Ask) -> _Resolution:
        """Resolve through the flight lock: `lead` is the cache read and, on a miss, takes
        the lock; the resolution's `lookup` is what that read found."""
        claim = await self._cache.lead(
            ask.node.id, ask.customer_id, ask.deadline - self._clock() + LOCK_MARGIN
        )
        if isinstance(claim, CrmAnswer) and judge(ask.node, claim) is None:
            return _Resolution(claim, None, None, Source.CACHE, lookup=_Lookup.HIT)
        resolution = await self._contend(claim, ask)
        lookup = _Lookup.ERROR if claim is Flight.ERROR else _Lookup.MISS
        return resolution.with_lookup(lookup)

    async def _contend(self, claim: _Claim, ask: _Ask) -> _Resolution:
        """Act on what `lead` said (anything but an acceptable answer) until resolved: each
        step turns what the cache said into the next thing to act on."""
        while not isinstance(claim, _Resolution):
            claim = await self._step(claim, ask)
        return claim

    async def _step(self, claim: Lease | CrmAnswer | Flight, ask: _Ask) -> _Claim:
        if isinstance(claim, Lease):
            return await self._holding(claim, ask)
        if claim is Flight.HELD:
            return await self._await_holder(ask)
        if claim is Flight.FREE:
            # The holder let go without an answer: take the lock and ask ourselves.
            return await self._retake(ask)
        if isinstance(claim, CrmAnswer) and judge(ask.node, claim) is None:
            return _Resolution(claim, None, None, Source.CACHE)  # another process's answer
        # The lock backend failed (counted where it was seen), or the cached answer is one the
        # node no longer accepts: ask without the lock (and overwrite it).
        return await self._unlocked(ask)

    async def _holding(self, lease: Lease, ask: _Ask) -> _Resolution:
        """Ask the CRM under `lease`; store and release after the reply, however it ends."""
        answer, ttl = None, 0.0
        try:
            resolution = await self._attempts(ask)
            if resolution.ttl > 0:
                answer, ttl = resolution.answer, resolution.ttl
            return resolution
        finally:
            # Store and release in one atomic step: a waiter that sees the lock gone without
            # an answer knows there is none to wait for. Also on an error or when cancelled
            # (close()): the lock is given back, not left to expire.
            self._after_reply(self._cache.settle(lease, answer, ttl))

    async def _await_holder(self, ask: _Ask) -> _Claim:
        """The holder's answer, FREE or ERROR; a crm_timeout resolution at the deadline."""
        clock = self._clock
        while True:
            left = ask.deadline - clock()
            if left <= 0:
                return _Resolution(None, ErrorCode.CRM_TIMEOUT, None)
            await asyncio.sleep(min(self._flight_poll, left))
            seen = await self._cache.peek(ask.node.id, ask.customer_id)
            if seen is Flight.ERROR:
                ask.meters.lookups[_Lookup.ERROR].inc()
            if seen is not Flight.HELD:
                return seen

    async def _retake(self, ask: _Ask) -> _Claim:
        """Try again for the lock (or the answer stored meanwhile), while time is left."""
        left = ask.deadline - self._clock()
        if left <= 0:
            return _Resolution(None, ErrorCode.CRM_TIMEOUT, None)
        claim = await self._cache.lead(ask.node.id, ask.customer_id, left + LOCK_MARGIN)
        if claim is Flight.ERROR:
            ask.meters.lookups[_Lookup.ERROR].inc()
        return claim

    async def _unlocked(self, ask: _Ask) -> _Resolution:
        """Ask the CRM without the lock; store a cacheable answer after the reply."""
        resolution = await self._attempts(ask)
        if resolution.answer is not None and resolution.ttl > 0:
            self._after_reply(
                self._cache.put(ask.node.id, ask.customer_id, resolution.answer, resolution.ttl)
            )
        return resolution

    def _after_reply(self, work: Awaitable[None]) -> None:
        """Run a cache write in the background: the replies sharing the call do not wait."""
        task = asyncio.ensure_future(work)
        self._after.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Future[None]) -> None:
        self._after.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The adapters fail open, so this is a bug; it must not go unnoticed, nor escape.
            log.error("cache write after a reply failed", exc_info=exc)

    async def _attempts(self, ask: _Ask) -> _Resolution:
        """Ask the CRM within the budget, and once more after an outage when the rules allow
        (module docstring); crm_ms is the time of both."""
        assert ask.node.url is not None  # uses_crm implies a URL (NodeConfig validates it)
        breaker = self._breakers.get(ask.node.url)
        budget = min(ask.node.crm_timeout, ask.deadline - self._clock())
        if budget <= 0:
            # The time went on the cache or another's lock: nothing to ask the CRM with, and
            # nothing learnt about it.
            return _Resolution(None, ErrorCode.CRM_TIMEOUT, None)
        if not breaker.allow():
            ask.meters.crm(ErrorCode.CRM_CIRCUIT_OPEN.value).inc()
            return _Resolution(None, ErrorCode.CRM_CIRCUIT_OPEN, None)
        first, down = await self._attempt(ask, breaker, budget)
        retry_budget = self._retry_budget(ask, breaker, budget) if down else None
        if retry_budget is None:
            return first
        second, _ = await self._attempt(ask, breaker, retry_budget)
        return dataclasses.replace(second, crm_ms=(first.crm_ms or 0.0) + (second.crm_ms or 0.0))

    def _retry_budget(
        self, ask: _Ask, breaker: CircuitBreaker, first_budget: float
    ) -> float | None:
        """The budget of a retry after an outage, or None when there is to be no retry."""
        left = ask.deadline - self._clock()
        if not self._retry or left < max(RETRY_MIN_BUDGET, first_budget / 2):
            return None
        # The breaker last: asking it may use up a half-open circuit's one probe.
        return min(ask.node.crm_timeout, left) if breaker.allow() else None

    async def _attempt(
        self, ask: _Ask, breaker: CircuitBreaker, budget: float
    ) -> tuple[_Resolution, bool]:
        """One CRM call, timed, counted and told to the breaker; and whether it failed with an
        outage (the only kind of failure worth a retry)."""
        started = self._clock()
        try:
            answer = await self._crm.lookup(
                ask.node, ask.customer_id, budget=budget, context=ask.context
            )
        except CrmError as err:
            took = self._took(started, ask.meters)
            ask.meters.crm(err.code.value).inc()
            attempt = _blame(err, ask.node, budget, took)
            breaker.record(attempt)
            return _Resolution(None, err.code, took * 1000), attempt is Attempt.DOWN
        took = self._took(started, ask.meters)
        breaker.record_success()
        return self._judged(answer, ask, took), False

    def _took(self, started: float, meters: _NodeMeters) -> float:
        """Seconds since `started`, observed as a CRM duration."""
        took = max(0.0, self._clock() - started)
        meters.duration.observe(took)
        return took

    def _judged(self, answer: CrmAnswer, ask: _Ask, took: float) -> _Resolution:
        """A CRM answer's resolution: refused when the node cannot use it, else with the TTL
        it is to be cached for (jittered; 0 when that kind is not cached)."""
        error = judge(ask.node, answer)
        ask.meters.crm(answer.verdict.value if error is None else error.value).inc()
        if error is not None:
            return _Resolution(None, error, took * 1000)
        node = ask.node
        ttl = node.cache_ttl_positive if answer.positive else node.cache_ttl_negative
        return _Resolution(answer, None, took * 1000, ttl=self._jitter(ttl) if ttl > 0 else 0.0)

    def _meters_for(self, name: str) -> _NodeMeters:
        meters = self._meters.get(name)
        if meters is None:
            meters = self._meters[name] = _NodeMeters(self._metrics, name)
        return meters

    def _circuit_changed(self, url: str, state: CircuitState) -> None:
        value = state.level
        for node in self._nodes():
            if node.url == url:
                self._metrics.circuit_state.labels(node.name).set(value)


def _count(resolution: _Resolution, joined: bool, meters: _NodeMeters) -> None:
    """Count one request's cache lookup, and whether another caller's work answered it."""
    lookup = resolution.lookup
    if lookup is not None:
        meters.lookups[lookup].inc()
    # Another caller's CRM answer or error: through this process's shared call, or from the
    # cache without being a hit (another process asked).
    if lookup is not _Lookup.HIT and (joined or resolution.source is Source.CACHE):
        meters.merged.inc()


def _is_outage(err: CrmError) -> bool:
    """Errors of the kinds that say the CRM is down or overloaded (a timeout only when the CRM
    caused it: `_blame`)."""
    if isinstance(err, CrmHttpStatus):
        return err.status >= 500
    return isinstance(err, CrmTimeout | CrmUnreachable)


def _blame(err: CrmError, node: NodeConfig, budget: float, took: float) -> Attempt:
    """What a failed attempt says about the CRM. DOWN (an outage: the breaker counts it, it
    may be retried): unreachable, a 5xx, or a timeout the CRM caused — it had its full time
    (`budget` at least FULL_ATTEMPT of node.crm_timeout) and the time ran out while this
    process was running (noticed at most STALL_MARGIN late). UNTESTED: any other timeout, the
    call's time running out. UP: every other error, an answer from a CRM that is up."""
    if not _is_outage(err):
        return Attempt.UP
    if isinstance(err, CrmTimeout):
        full = budget >= FULL_ATTEMPT * node.crm_timeout
        if not full or took > budget + STALL_MARGIN:
            return Attempt.UNTESTED
    return Attempt.DOWN
