"""The resolver's rules (docs/design.md §5-§7) against fakes: verdicts, cache, budget, retry,
breaker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from crm_resolver.circuit import BreakerRegistry
from crm_resolver.metrics import CACHE_RESULTS, ResolverMetrics
from crm_resolver.ports import (
    CacheMiss,
    CrmAnswer,
    CrmBadResponse,
    CrmError,
    CrmHttpStatus,
    CrmStatusFail,
    CrmTimeout,
    CrmUnreachable,
    Flight,
    Lease,
)
from crm_resolver.resolver import (
    FULL_ATTEMPT,
    LOCK_MARGIN,
    RETRY_MIN_BUDGET,
    Resolver,
    jitter_ttl,
)
from shared.destination import Destination
from shared.messages import IdentifyReply, IdentifyRequest
from shared.nodes import NodeConfig, NodeSet
from shared.outcomes import CircuitState, ErrorCode, Interaction, Source, Verdict
from tests.fakes import (
    CRM_URL,
    FALSE,
    TRUE,
    FakeClock,
    FakeCrm,
    RecordingCache,
    destination,
    make_node,
)

URL = CRM_URL


class ProcessView:
    """The shared cache as one resolver "process" sees it (its own client, as with Redis):
    what the calls do is the real `MemoryCache`'s (through `RecordingCache`); this records the
    process's own calls and runs the test's hooks before every lead, peek and settle (to move
    the fake clock, let "another process" act, or hold a settle, at a known point without
    sleeping). "Another process" acting directly on the shared cache is not recorded."""

    def __init__(self, cache: RecordingCache) -> None:
        self.cache = cache
        self.fetches = 0
        self.leads: list[tuple[str, str, float]] = []
        self.peeks = 0
        self.settled: list[tuple[Lease, CrmAnswer | None, float]] = []
        self.on_lead: Callable[[], Awaitable[None]] | None = None
        self.on_peek: Callable[[], Awaitable[None]] | None = None
        self.on_settle: Callable[[], Awaitable[None]] | None = None

    async def fetch(self, node_id: str, customer_id: str) -> CrmAnswer | CacheMiss:
        self.fetches += 1
        return await self.cache.fetch(node_id, customer_id)

    async def put(self, node_id: str, customer_id: str, answer: CrmAnswer, ttl: float) -> None:
        await self.cache.put(node_id, customer_id, answer, ttl)

    async def lead(self, node_id: str, customer_id: str, ttl: float) -> Lease | CrmAnswer | Flight:
        self.leads.append((node_id, customer_id, ttl))
        if self.on_lead is not None:
            await self.on_lead()
        return await self.cache.lead(node_id, customer_id, ttl)

    async def peek(self, node_id: str, customer_id: str) -> CrmAnswer | Flight:
        self.peeks += 1
        if self.on_peek is not None:
            await self.on_peek()
        return await self.cache.peek(node_id, customer_id)

    def settle(
        self, lease: Lease, answer: CrmAnswer | None = None, ttl: float = 0.0
    ) -> Awaitable[None]:
        if self.on_settle is None:  # as the memory cache does: at once
            self.settled.append((lease, answer, ttl))
            return self.cache.settle(lease, answer, ttl)
        return self._hooked_settle(self.on_settle, lease, answer, ttl)

    async def _hooked_settle(
        self,
        hook: Callable[[], Awaitable[None]],
        lease: Lease,
        answer: CrmAnswer | None,
        ttl: float,
    ) -> None:
        await hook()
        self.settled.append((lease, answer, ttl))
        await self.cache.settle(lease, answer, ttl)


@dataclass
class Harness:
    resolver: Resolver
    crm: FakeCrm
    cache: RecordingCache
    view: ProcessView
    clock: FakeClock
    breaker_clock: FakeClock
    registry: CollectorRegistry
    nodes: NodeSet
    counter: list[int] = field(default_factory=lambda: [0])

    def request(
        self, customer_id: str = "12345", *, node_id: str = "1", left: float = 4.0
    ) -> IdentifyRequest:
        self.counter[0] += 1
        return IdentifyRequest(
            request_id=f"r{self.counter[0]}",
            node_id=node_id,
            customer_id=customer_id,
            caller_number="5551234",
            call_id="1700000000.1",
            deadline=self.clock() + left,
        )

    async def ask(self, customer_id: str = "12345", **kwargs: Any) -> IdentifyReply:
        return await self.resolver(self.request(customer_id, **kwargs))

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def other_holds(self, ttl: float, customer_id: str = "12345") -> Lease:
        """Take the lookup's lock as another process would (one that may never let go)."""
        lease = await self.cache.lead("1", customer_id, ttl)
        assert isinstance(lease, Lease)
        return lease

    def peer(self) -> Harness:
        """Another resolver "process" on the same CRM, cache and clock, with its own view of
        the cache, metrics and breakers (request ids stay unique across the two)."""
        registry = CollectorRegistry()
        metrics = ResolverMetrics(registry)
        node_set = self.nodes
        metrics.init_nodes(node_set.names())
        view = ProcessView(self.cache)
        resolver = Resolver(
            lambda: node_set,
            self.crm,
            view,
            metrics,
            clock=self.clock,
            breakers=BreakerRegistry(clock=self.breaker_clock),
            jitter=lambda ttl: ttl,
            flight_poll=0,
        )
        return Harness(
            resolver,
            self.crm,
            self.cache,
            view,
            self.clock,
            self.breaker_clock,
            registry,
            node_set,
            self.counter,
        )


def harness(
    results: list[CrmAnswer | Exception] | None = None,
    *,
    nodes: list[NodeConfig] | None = None,
    default: CrmAnswer | Exception = TRUE,
    takes: float = 0.0,
    retry: bool = True,
    broken_cache: bool = False,
    failure_threshold: int = 5,
    close_timeout: float = 1.0,
) -> Harness:
    clock = FakeClock()
    breaker_clock = FakeClock()
    registry = CollectorRegistry()
    metrics = ResolverMetrics(registry)
    node_set = NodeSet(nodes if nodes is not None else [make_node()])
    metrics.init_nodes(node_set.names())
    crm = FakeCrm(results or (), default=default, clock=clock, takes=takes)
    cache = RecordingCache(broken=broken_cache, clock=clock)
    view = ProcessView(cache)
    breakers = BreakerRegistry(
        failure_threshold=failure_threshold, reset_after=5.0, clock=breaker_clock
    )
    resolver = Resolver(
        lambda: node_set,
        crm,
        view,
        metrics,
        clock=clock,
        breakers=breakers,
        retry=retry,
        jitter=lambda ttl: ttl,
        flight_poll=0,
        close_timeout=close_timeout,
    )
    return Harness(resolver, crm, cache, view, clock, breaker_clock, registry, node_set)


# --- verdicts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "verdict", "dest"),
    [
        (TRUE, Verdict.TRUE, None),
        (FALSE, Verdict.FALSE, None),
        (destination(3, 7), Verdict.DESTINATION, Destination(type=3, id=7)),
    ],
)
async def test_crm_answers_become_replies(
    answer: CrmAnswer, verdict: Verdict, dest: Destination | None
) -> None:
    """A crm_destination node passes true, false and an allowed destination through, from crm."""
    h = harness([answer], takes=0.2)
    reply = await h.ask()
    assert reply.verdict is verdict
    assert reply.destination == dest
    assert reply.source is Source.CRM
    assert reply.crm_ms == pytest.approx(200)
    assert reply.request_id == "r1"
    assert h.sample("callerid_resolver_requests_total", node="gold", verdict=verdict.value) == 1
    assert h.sample("callerid_crm_requests_total", node="gold", result=verdict.value) == 1
    assert h.sample("callerid_crm_request_duration_seconds_sum", node="gold") == pytest.approx(0.2)
    assert h.sample("callerid_resolver_in_flight") == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CrmStatusFail("fail"), ErrorCode.CRM_STATUS_FAIL),
        (CrmBadResponse("garbage"), ErrorCode.CRM_BAD_RESPONSE),
        (CrmHttpStatus(404), ErrorCode.CRM_HTTP_STATUS),
        (CrmHttpStatus(503), ErrorCode.CRM_HTTP_STATUS),
        (CrmUnreachable("refused"), ErrorCode.CRM_UNREACHABLE),
        (CrmTimeout("slow"), ErrorCode.CRM_TIMEOUT),
    ],
)
async def test_crm_errors_become_failure_replies(error: CrmError, code: ErrorCode) -> None:
    """Each CrmError maps to a failure reply with its own code, counted by code."""
    h = harness(default=error, retry=False)
    reply = await h.ask()
    assert reply.verdict is Verdict.ERROR
    assert reply.error is code
    assert reply.crm_ms is not None
    assert h.sample("callerid_crm_requests_total", node="gold", result=code.value) == 1
    assert h.sample("callerid_resolver_requests_total", node="gold", verdict="error") == 1


async def test_budget_is_crm_timeout_or_time_left_whichever_is_less() -> None:
    """The CRM gets min(node.crm_timeout, deadline - now), plus the call's context."""
    h = harness(nodes=[make_node(crm_timeout=2)])
    await h.ask("1", left=5.0)
    await h.ask("2", left=1.5)
    assert [c.budget for c in h.crm.calls] == [2.0, 1.5]
    assert h.crm.calls[0].context.caller_number == "5551234"
    assert h.crm.calls[0].context.call_id == "1700000000.1"


# --- node checks ------------------------------------------------------------------------------


async def test_unknown_node_fails_without_crm_and_is_counted_under_a_fixed_label() -> None:
    """A node id the resolver does not know answers unknown_node; the id is not a label."""
    h = harness()
    reply = await h.ask(node_id="nope")
    assert reply.error is ErrorCode.UNKNOWN_NODE
    assert h.crm.calls == []
    assert h.sample("callerid_resolver_requests_total", node="unknown", verdict="error") == 1


async def test_node_without_crm_is_unknown_node() -> None:
    """A node with interaction none has no CRM to ask: unknown_node, counted by its name."""
    h = harness(nodes=[make_node(interaction=Interaction.NONE, url=None, name="plain")])
    reply = await h.ask()
    assert reply.error is ErrorCode.UNKNOWN_NODE
    assert h.crm.calls == []
    assert h.sample("callerid_resolver_requests_total", node="plain", verdict="error") == 1


async def test_disallowed_destination_is_refused_and_not_cached() -> None:
    """A destination type outside allowed_destination_types fails and is never cached."""
    h = harness(nodes=[make_node(allowed_destination_types={1, 3})], default=destination(5, 1))
    first = await h.ask()
    second = await h.ask()
    assert first.error is second.error is ErrorCode.CRM_DISALLOWED_DESTINATION
    assert len(h.crm.calls) == 2
    assert h.cache.puts == []
    assert (
        h.sample("callerid_crm_requests_total", node="gold", result="crm_disallowed_destination")
        == 2
    )


async def test_true_false_node_given_a_destination_is_a_bad_response() -> None:
    """A crm_true_false node cannot route to a CRM-chosen destination: crm_bad_response."""
    h = harness(
        nodes=[make_node(interaction=Interaction.CRM_TRUE_FALSE)], default=destination(1, 3)
    )
    reply = await h.ask()
    assert reply.error is ErrorCode.CRM_BAD_RESPONSE
    assert h.cache.puts == []


async def test_true_where_the_node_has_no_identified_destination_is_a_bad_response() -> None:
    """A crm_destination node saved without on_identified has nowhere to route "true": the
    resolver judges it as the gateway does (shared.crm_answer.judge), crm_bad_response, counted
    as such and not cached; "false" and destinations still pass."""
    routed_by_crm = make_node(on_identified=None, cache_ttl_positive=300, cache_ttl_negative=60)
    h = harness([TRUE, FALSE, destination(1, 3)], nodes=[routed_by_crm])
    assert (await h.ask("1")).error is ErrorCode.CRM_BAD_RESPONSE
    assert (await h.ask("2")).verdict is Verdict.FALSE
    assert (await h.ask("3")).verdict is Verdict.DESTINATION
    assert h.sample("callerid_crm_requests_total", node="gold", result="crm_bad_response") == 1
    assert h.sample("callerid_crm_requests_total", node="gold", result="true") == 0
    assert [put[1] for put in h.cache.puts] == ["2", "3"]


# --- deadline ---------------------------------------------------------------------------------


async def test_expired_request_touches_neither_cache_nor_crm() -> None:
    """A request past its deadline answers expired, counted, with no cache read or CRM call."""
    h = harness()
    reply = await h.ask(left=-0.001)
    assert reply.error is ErrorCode.EXPIRED
    assert h.crm.calls == []
    assert h.sample("callerid_expired_requests_total", node="gold") == 1
    for result in CACHE_RESULTS:
        assert h.sample("callerid_cache_lookups_total", node="gold", result=result.value) == 0


async def test_joiner_gives_up_at_its_own_deadline() -> None:
    """A caller that joined a longer shared call answers crm_timeout at its own deadline."""
    h = harness()
    gate = h.crm.hold()
    leader = asyncio.create_task(h.ask(left=30.0))
    await h.crm.entered.wait()
    joiner = await h.ask(left=0.05)
    assert joiner.error is ErrorCode.CRM_TIMEOUT
    gate.set()
    assert (await leader).verdict is Verdict.TRUE
    assert len(h.crm.calls) == 1


# --- cache ------------------------------------------------------------------------------------


async def test_cache_hit_skips_the_crm() -> None:
    """The second identical lookup is answered from the cache, with no CRM time."""
    h = harness([destination(1, 9)])
    await h.ask()
    reply = await h.ask()
    assert reply.source is Source.CACHE
    assert reply.destination == Destination(type=1, id=9)
    assert reply.crm_ms is None
    assert len(h.crm.calls) == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="hit") == 1


async def test_errors_are_never_cached() -> None:
    """A failure is not stored: the next lookup asks the CRM again and gets its answer."""
    h = harness([CrmStatusFail("fail")])
    assert (await h.ask()).error is ErrorCode.CRM_STATUS_FAIL
    assert h.cache.puts == []
    assert (await h.ask()).verdict is Verdict.TRUE
    assert len(h.crm.calls) == 2


@pytest.mark.parametrize(
    ("answer", "ttl"), [(TRUE, 300.0), (destination(1, 2), 300.0), (FALSE, 60.0)]
)
async def test_positive_and_negative_answers_get_their_own_ttl(
    answer: CrmAnswer, ttl: float
) -> None:
    """true and destination are kept for cache_ttl_positive, false for cache_ttl_negative."""
    h = harness([answer], nodes=[make_node(cache_ttl_positive=300, cache_ttl_negative=60)])
    await h.ask("777")
    assert h.cache.puts == [("1", "777", answer, ttl)]


async def test_ttl_zero_disables_that_kind_of_caching() -> None:
    """With cache_ttl_negative 0, false answers are not stored and are asked again."""
    h = harness(default=FALSE, nodes=[make_node(cache_ttl_negative=0)])
    await h.ask()
    await h.ask()
    assert h.cache.puts == []
    assert len(h.crm.calls) == 2


async def test_node_without_any_ttl_does_not_read_the_cache() -> None:
    """A node with both TTLs 0 neither reads nor writes the cache."""
    h = harness(nodes=[make_node(cache_ttl_positive=0, cache_ttl_negative=0)])
    await h.ask()
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 0
    assert h.cache.puts == []


async def test_cached_answer_expires() -> None:
    """After the TTL, the CRM is asked again."""
    h = harness(nodes=[make_node(cache_ttl_positive=10)])
    await h.ask()
    h.clock.advance(9.9)
    assert (await h.ask()).source is Source.CACHE
    h.clock.advance(0.2)
    assert (await h.ask()).source is Source.CRM
    assert len(h.crm.calls) == 2


async def test_broken_cache_is_counted_and_the_crm_answers() -> None:
    """A failing cache counts result=error and the request is still answered by the CRM."""
    h = harness(broken_cache=True)
    reply = await h.ask()
    assert reply.verdict is Verdict.TRUE
    assert h.sample("callerid_cache_lookups_total", node="gold", result="error") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 0


def test_default_jitter_stays_within_ten_percent() -> None:
    """The default TTL jitter spreads TTLs, within ±10 %."""
    values = {jitter_ttl(100.0) for _ in range(200)}
    assert all(90.0 <= v <= 110.0 for v in values)
    assert len(values) > 1


# --- single-flight ----------------------------------------------------------------------------


async def test_identical_concurrent_lookups_share_one_crm_call() -> None:
    """50 identical lookups in flight at once make ONE CRM call and all get the same answer."""
    h = harness()
    gate = h.crm.hold()
    tasks = [asyncio.create_task(h.ask("424242")) for _ in range(50)]
    await h.crm.entered.wait()
    assert h.sample("callerid_resolver_in_flight") == 50
    gate.set()
    replies = await asyncio.gather(*tasks)
    assert len(h.crm.calls) == 1
    assert {(r.verdict, r.source) for r in replies} == {(Verdict.TRUE, Source.CRM)}
    assert len({r.request_id for r in replies}) == 50
    assert h.sample("callerid_crm_lookups_merged_total", node="gold") == 49
    assert h.sample("callerid_crm_requests_total", node="gold", result="true") == 1
    assert h.sample("callerid_resolver_requests_total", node="gold", verdict="true") == 50
    assert h.sample("callerid_resolver_in_flight") == 0


async def test_different_customers_are_not_merged() -> None:
    """Lookups of different customer ids each make their own CRM call."""
    h = harness()
    gate = h.crm.hold()
    tasks = [asyncio.create_task(h.ask(str(n))) for n in range(5)]
    await h.crm.entered.wait()
    gate.set()
    await asyncio.gather(*tasks)
    assert sorted(c.customer_id for c in h.crm.calls) == ["0", "1", "2", "3", "4"]


# --- merging across resolver processes (flight lock) -------------------------------------------
# Two `Harness`es from `peer()` are two resolver processes sharing one cache, as resolver
# processes share Redis; the memory cache's flight lock follows the Redis adapter's rules
# (tests/integration/test_cache_contract.py runs the same cases against both).


def _event_hook(event: asyncio.Event) -> Callable[[], Awaitable[None]]:
    async def hook() -> None:
        event.set()

    return hook


async def _a_asks_while_b_waits(
    a: Harness, b: Harness
) -> tuple[asyncio.Event, asyncio.Task[IdentifyReply], asyncio.Task[IdentifyReply]]:
    """A asks the CRM (held at its gate), and B, another process, is waiting on A's lock."""
    gate = a.crm.hold()
    first = asyncio.create_task(a.ask())
    await a.crm.entered.wait()
    waiting = asyncio.Event()
    b.view.on_peek = _event_hook(waiting)
    second = asyncio.create_task(b.ask())
    async with asyncio.timeout(5):  # B never waiting means it did not see A's lock
        await waiting.wait()
    return gate, first, second


def _tick_hook(clock: FakeClock, seconds: float) -> Callable[[], Awaitable[None]]:
    async def hook() -> None:
        clock.advance(seconds)

    return hook


def _gate_hook(entered: asyncio.Event, gate: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """A hook that says it was reached, then waits for the test to open the gate."""

    async def hook() -> None:
        entered.set()
        await gate.wait()

    return hook


async def test_a_miss_takes_the_flight_lock_for_the_budget_and_releases_it() -> None:
    """On a miss the CRM is asked while holding the lookup's lock, taken for the time left
    plus LOCK_MARGIN by the one `lead` that was also the cache read (no separate read), and
    given back with the answer stored, by one `settle`."""
    h = harness()
    gate = h.crm.hold()
    task = asyncio.create_task(h.ask("777", left=3.0))
    await h.crm.entered.wait()
    assert h.cache.locked("1", "777")
    assert h.cache.puts == []
    gate.set()
    reply = await task
    assert (reply.verdict, reply.source) == (Verdict.TRUE, Source.CRM)
    await h.resolver.close()
    ((node_id, customer_id, ttl),) = h.view.leads
    assert (node_id, customer_id) == ("1", "777")
    assert ttl == pytest.approx(3.0 + LOCK_MARGIN)
    assert h.view.fetches == 0
    ((lease, answer, answer_ttl),) = h.view.settled
    assert (lease.customer_id, answer, answer_ttl) == ("777", TRUE, 300.0)
    assert not h.cache.locked("1", "777")
    assert h.cache.puts == [("1", "777", TRUE, 300.0)]
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="hit") == 0
    assert h.sample("callerid_crm_lookups_merged_total", node="gold") == 0


async def test_a_hit_is_one_lead_and_no_other_cache_call() -> None:
    """A cached answer comes back from the one `lead`: no separate cache read, no lock
    taken, no settle; counted as a hit, not merged. A node with both TTLs 0 neither reads
    the cache nor touches the lock."""
    h = harness()
    await h.cache.put("1", "12345", destination(1, 9), 60)
    reply = await h.ask()
    assert (reply.destination, reply.source, reply.crm_ms) == (
        Destination(type=1, id=9),
        Source.CACHE,
        None,
    )
    assert len(h.view.leads) == 1
    assert h.view.fetches == 0
    await h.resolver.close()
    assert h.view.settled == []
    assert not h.cache.locked("1", "12345")
    assert h.crm.calls == []
    assert h.sample("callerid_cache_lookups_total", node="gold", result="hit") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 0
    assert h.sample("callerid_crm_lookups_merged_total", node="gold") == 0

    u = harness(nodes=[make_node(cache_ttl_positive=0, cache_ttl_negative=0)])
    await u.ask()
    assert u.view.leads == []
    assert u.view.fetches == 0
    assert len(u.crm.calls) == 1


async def test_the_memory_cache_settles_before_the_reply() -> None:
    """The in-process cache carries a settle out at once: a miss has stored its answer and
    released its lock by the time its reply is returned, and the next request hits."""
    h = harness()
    assert (await h.ask()).source is Source.CRM
    assert h.cache.puts == [("1", "12345", TRUE, 300.0)]
    assert not h.cache.locked("1", "12345")
    assert (await h.ask()).source is Source.CACHE
    assert h.view.fetches == 0


async def test_identical_hits_in_flight_share_one_lead() -> None:
    """Identical requests arriving while a `lead` is in flight join it: one round trip for
    all, each counted as a hit (and none as merged: a hit saves no CRM call)."""
    h = harness()
    await h.cache.put("1", "12345", FALSE, 60)
    entered, gate = asyncio.Event(), asyncio.Event()
    h.view.on_lead = _gate_hook(entered, gate)
    tasks = [asyncio.create_task(h.ask()) for _ in range(5)]
    await entered.wait()
    gate.set()
    replies = await asyncio.gather(*tasks)
    assert {(r.verdict, r.source) for r in replies} == {(Verdict.FALSE, Source.CACHE)}
    assert len(h.view.leads) == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="hit") == 5
    assert h.sample("callerid_crm_lookups_merged_total", node="gold") == 0


async def test_the_reply_does_not_wait_for_the_store_and_release() -> None:
    """The reply is returned while the `settle` (store + release) is still running (as with
    Redis); a lookup arriving meanwhile finds the lock held and gets the answer by polling
    once it is stored (merged); close() waits for the settle."""
    h = harness()
    settling, gate = asyncio.Event(), asyncio.Event()
    h.view.on_settle = _gate_hook(settling, gate)

    reply = await h.ask()
    assert (reply.verdict, reply.source) == (Verdict.TRUE, Source.CRM)
    await settling.wait()
    assert not gate.is_set()
    assert h.cache.locked("1", "12345")
    assert h.cache.puts == []

    polling = asyncio.Event()
    h.view.on_peek = _event_hook(polling)
    later = asyncio.create_task(h.ask())
    await polling.wait()
    assert not later.done()
    gate.set()
    late = await later
    assert (late.verdict, late.source) == (Verdict.TRUE, Source.CACHE)
    assert len(h.crm.calls) == 1
    assert h.sample("callerid_crm_lookups_merged_total", node="gold") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 2

    await h.resolver.close()
    assert h.cache.puts == [("1", "12345", TRUE, 300.0)]
    assert not h.cache.locked("1", "12345")


async def test_close_waits_for_a_store_still_running() -> None:
    """close() returns only once a settle still running after its reply has ended."""
    h = harness()
    settling, gate = asyncio.Event(), asyncio.Event()
    h.view.on_settle = _gate_hook(settling, gate)
    await h.ask()
    await settling.wait()
    gate.set()  # the settle can go on now, but only once this test yields to the loop
    await h.resolver.close()
    assert h.cache.puts == [("1", "12345", TRUE, 300.0)]
    assert not h.cache.locked("1", "12345")


async def test_close_gives_up_on_a_store_that_never_ends(caplog: pytest.LogCaptureFixture) -> None:
    """A settle stuck past close_timeout is cancelled (the lock then expires by itself) and
    close() returns, with a warning."""
    h = harness(close_timeout=0.01)
    settling, never = asyncio.Event(), asyncio.Event()
    h.view.on_settle = _gate_hook(settling, never)
    await h.ask()
    await settling.wait()
    with caplog.at_level(logging.WARNING, logger="crm_resolver.resolver"):
        async with asyncio.timeout(5):
            await h.resolver.close()
    assert h.view.settled == []
    assert h.cache.locked("1", "12345")
    assert "cache writes unfinished at close" in caplog.text


async def test_a_failing_store_after_the_reply_is_logged_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception from a settle running after the reply (a bug: adapters fail open) does
    not reach the caller nor close(); it is logged as an error."""
    h = harness()

    async def broken() -> None:
        raise RuntimeError("bug in the adapter")

    h.view.on_settle = broken
    with caplog.at_level(logging.ERROR, logger="crm_resolver.resolver"):
        reply = await h.ask()
        await h.resolver.close()
    assert (reply.verdict, reply.source) == (Verdict.TRUE, Source.CRM)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_another_process_holding_the_lock_is_waited_for_and_its_answer_served() -> None:
    """While resolver A asks the CRM, resolver B (another process) does not: it waits and
    replies A's answer from the cache, counted as merged. One CRM call in all."""
    a = harness([destination(1, 9)])
    b = a.peer()
    gate, first, second = await _a_asks_while_b_waits(a, b)
    assert len(a.crm.calls) == 1
    gate.set()
    ra, rb = await asyncio.gather(first, second)
    assert (ra.source, rb.source) == (Source.CRM, Source.CACHE)
    assert ra.destination == rb.destination == Destination(type=1, id=9)
    assert rb.crm_ms is None
    assert len(a.crm.calls) == 1
    assert b.sample("callerid_crm_lookups_merged_total", node="gold") == 1
    assert b.sample("callerid_cache_lookups_total", node="gold", result="miss") == 1
    assert b.sample("callerid_crm_requests_total", node="gold", result="destination") == 0
    await a.resolver.close()
    await b.resolver.close()
    assert [answer for _, answer, _ in a.view.settled] == [destination(1, 9)]
    assert b.view.settled == []


async def test_lock_released_without_an_answer_means_the_waiter_asks_itself() -> None:
    """A's CRM call fails (errors are not cached) and A lets go, storing nothing: B, which
    was waiting, takes the lock and asks the CRM itself, once, and gets the CRM's answer."""
    a = harness([CrmStatusFail("fail")])
    b = a.peer()
    gate, first, second = await _a_asks_while_b_waits(a, b)
    gate.set()
    ra, rb = await asyncio.gather(first, second)
    assert ra.error is ErrorCode.CRM_STATUS_FAIL
    assert (rb.verdict, rb.source) == (Verdict.TRUE, Source.CRM)
    await a.resolver.close()
    await b.resolver.close()
    assert len(a.crm.calls) == 2
    assert (len(a.view.leads), len(b.view.leads)) == (1, 2)  # B found it held, then took it
    assert [(answer, ttl) for _, answer, ttl in a.view.settled] == [(None, 0.0)]
    assert [(answer, ttl) for _, answer, ttl in b.view.settled] == [(TRUE, 300.0)]
    assert not a.cache.locked("1", "12345")
    assert b.sample("callerid_crm_lookups_merged_total", node="gold") == 0


async def test_a_dead_holder_delays_the_others_only_until_its_lock_expires() -> None:
    """A lock nobody will release (its holder was killed) expires after its TTL; then the
    waiter takes it and asks the CRM, within its own budget."""
    h = harness()
    await h.other_holds(ttl=0.5)
    h.view.on_peek = _tick_hook(h.clock, 0.125)
    start = h.clock()
    reply = await h.ask(left=4.0)
    assert (reply.verdict, reply.source) == (Verdict.TRUE, Source.CRM)
    assert h.view.peeks == 4
    assert h.clock() - start == 0.5
    assert h.crm.calls[0].budget == 3.5


async def test_deadline_passing_while_waiting_for_another_process_is_crm_timeout() -> None:
    """A waiter whose deadline passes before the holder answers replies crm_timeout, without
    asking the CRM and without taking the holder's lock; its lookup counts as a miss."""
    h = harness()
    other = await h.other_holds(ttl=30)
    h.view.on_peek = _tick_hook(h.clock, 0.25)
    reply = await h.ask(left=1.0)
    assert reply.error is ErrorCode.CRM_TIMEOUT
    assert h.crm.calls == []
    assert h.view.peeks == 4
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 1
    assert h.cache.locked("1", "12345")
    await h.cache.settle(other)  # still the other's lock: its lease releases it
    assert not h.cache.locked("1", "12345")


async def test_a_request_giving_up_before_its_shared_lookup_ends_counts_a_miss() -> None:
    """A caller that joined a longer shared lookup and gives up at its own deadline is
    counted once, as a miss (it was not answered from the cache)."""
    h = harness()
    gate = h.crm.hold()
    leader = asyncio.create_task(h.ask(left=30.0))
    await h.crm.entered.wait()
    joiner = await h.ask(left=0.05)
    assert joiner.error is ErrorCode.CRM_TIMEOUT
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 1
    gate.set()
    assert (await leader).verdict is Verdict.TRUE
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 2
    await h.resolver.close()


async def test_answer_stored_after_the_lock_came_free_is_served_as_merged() -> None:
    """If another process stores the answer after this one saw its lock go (FREE), taking
    the lock returns that answer instead of a lease: no CRM call, counted miss and merged."""
    h = harness()
    other = await h.other_holds(ttl=30)

    async def other_lets_go() -> None:
        await h.cache.settle(other)

    async def other_answers_on_second_lead() -> None:
        if len(h.view.leads) == 2:
            await h.cache.put("1", "12345", FALSE, 60)

    h.view.on_peek = other_lets_go
    h.view.on_lead = other_answers_on_second_lead
    reply = await h.ask()
    assert (reply.verdict, reply.source) == (Verdict.FALSE, Source.CACHE)
    assert h.crm.calls == []
    assert len(h.view.leads) == 2
    assert not h.cache.locked("1", "12345")
    assert h.sample("callerid_crm_lookups_merged_total", node="gold") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="hit") == 0


async def test_a_cached_answer_the_node_no_longer_accepts_is_a_miss_and_overwritten() -> None:
    """`lead` returning an answer the node's config now refuses is a miss: the CRM is asked
    (without the lock, as the answer blocks it) and its answer overwrites the old one after
    the reply."""
    h = harness(nodes=[make_node(allowed_destination_types={1})])
    await h.cache.put("1", "12345", destination(5, 1), 60)
    reply = await h.ask()
    assert (reply.verdict, reply.source) == (Verdict.TRUE, Source.CRM)
    await h.resolver.close()
    assert h.cache.puts[-1] == ("1", "12345", TRUE, 300.0)
    assert await h.cache.fetch("1", "12345") == TRUE
    assert h.view.settled == []
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="hit") == 0


async def test_lock_backend_failure_fails_open_and_counts_as_a_cache_error() -> None:
    """When `lead` fails (Redis down) the request's lookup is an error (not also a miss), and
    the CRM is asked anyway; its answer is put after the reply."""
    h = harness(broken_cache=True)
    reply = await h.ask()
    assert (reply.verdict, reply.source) == (Verdict.TRUE, Source.CRM)
    assert len(h.crm.calls) == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 0
    assert h.sample("callerid_cache_lookups_total", node="gold", result="error") == 1
    await h.resolver.close()
    assert h.cache.puts == [("1", "12345", TRUE, 300.0)]
    assert h.view.settled == []


async def test_backend_failure_while_waiting_fails_open() -> None:
    """Redis failing while waiting on another holder: stop waiting and ask the CRM; the
    request counts its lookup (a miss) and the failed round trip (an error)."""
    h = harness()
    await h.other_holds(ttl=30)

    async def breaks() -> None:
        h.cache.broken = True

    h.view.on_peek = breaks
    reply = await h.ask()
    assert (reply.verdict, reply.source) == (Verdict.TRUE, Source.CRM)
    assert len(h.crm.calls) == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="miss") == 1
    assert h.sample("callerid_cache_lookups_total", node="gold", result="error") == 1


async def test_stopping_mid_call_still_releases_the_lock() -> None:
    """close() cancels a lock holder's CRM call; the lock is given back (storing nothing),
    not left to expire, before close() returns."""
    h = harness()
    h.crm.hold()
    task = asyncio.create_task(h.ask())
    await h.crm.entered.wait()
    await h.resolver.close()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [(answer, ttl) for _, answer, ttl in h.view.settled] == [(None, 0.0)]
    assert not h.cache.locked("1", "12345")


# --- retry ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error", [CrmUnreachable("refused"), CrmHttpStatus(502), CrmTimeout("slow")]
)
async def test_outage_errors_are_retried_once_when_time_allows(error: CrmError) -> None:
    """Timeout, unreachable and 5xx get one retry when enough time is left; it can succeed."""
    h = harness([error, TRUE], nodes=[make_node(crm_timeout=1)])
    reply = await h.ask(left=4.0)
    assert reply.verdict is Verdict.TRUE
    assert len(h.crm.calls) == 2
    assert h.sample("callerid_crm_request_duration_seconds_count", node="gold") == 2


async def test_retry_happens_at_most_once() -> None:
    """Two outage errors in a row: two calls, then the second error is the reply."""
    h = harness([CrmUnreachable("a"), CrmHttpStatus(503), TRUE])
    reply = await h.ask()
    assert reply.error is ErrorCode.CRM_HTTP_STATUS
    assert len(h.crm.calls) == 2


@pytest.mark.parametrize(
    "error", [CrmHttpStatus(404), CrmStatusFail("fail"), CrmBadResponse("junk")]
)
async def test_answers_from_a_working_crm_are_not_retried(error: CrmError) -> None:
    """4xx, status fail and bad bodies come from a CRM that is up: no retry."""
    h = harness([error, TRUE])
    assert (await h.ask()).error is error.code
    assert len(h.crm.calls) == 1


async def test_no_retry_when_the_time_left_is_too_short() -> None:
    """After a timeout that used 3 of 4 s, 1 s is less than half the first budget: no retry."""
    h = harness([CrmTimeout("slow"), TRUE], nodes=[make_node(crm_timeout=3)])
    reply = await h.ask(left=4.0)
    assert reply.error is ErrorCode.CRM_TIMEOUT
    assert reply.crm_ms == pytest.approx(3000)
    assert len(h.crm.calls) == 1


async def test_no_retry_below_the_minimum_budget() -> None:
    """A retry would get less than RETRY_MIN_BUDGET: it is not attempted."""
    first = 0.06
    h = harness([CrmTimeout("slow"), TRUE], nodes=[make_node(crm_timeout=0.1)])
    reply = await h.ask(left=first + RETRY_MIN_BUDGET * 0.9)
    assert reply.error is ErrorCode.CRM_TIMEOUT
    assert len(h.crm.calls) == 1


async def test_retry_gets_the_time_left() -> None:
    """The retry's budget is min(crm_timeout, what is left after the first attempt)."""
    h = harness([CrmTimeout("slow"), TRUE], nodes=[make_node(crm_timeout=2)])
    await h.ask(left=3.5)
    assert [c.budget for c in h.crm.calls] == [2.0, 1.5]


async def test_retry_can_be_switched_off() -> None:
    """With retry=False an outage error is answered at once after one call."""
    h = harness([CrmUnreachable("refused"), TRUE], retry=False)
    assert (await h.ask()).error is ErrorCode.CRM_UNREACHABLE
    assert len(h.crm.calls) == 1


# --- circuit breaker --------------------------------------------------------------------------


async def test_open_breaker_fails_fast_then_a_half_open_probe_closes_it() -> None:
    """After N outages the CRM is not called (circuit_open at once); after the wait one probe
    goes through and its success closes the breaker. The gauge follows, by node name."""
    h = harness(default=CrmUnreachable("down"), retry=False, failure_threshold=2)
    gauge = "callerid_crm_circuit_state"
    await h.ask("1")
    await h.ask("2")
    assert h.sample(gauge, node="gold") == 2

    reply = await h.ask("3")
    assert reply.error is ErrorCode.CRM_CIRCUIT_OPEN
    assert reply.crm_ms is None
    assert len(h.crm.calls) == 2
    assert h.sample("callerid_crm_requests_total", node="gold", result="crm_circuit_open") == 1

    h.crm.default = TRUE
    h.breaker_clock.advance(5.0)
    assert (await h.ask("4")).verdict is Verdict.TRUE
    assert len(h.crm.calls) == 3
    assert h.sample(gauge, node="gold") == 0
    assert (await h.ask("5")).verdict is Verdict.TRUE


async def test_breaker_is_shared_by_nodes_with_the_same_crm() -> None:
    """Two nodes on one CRM URL share its breaker and both gauges move."""
    nodes = [make_node(), make_node(id="2", name="silver")]
    h = harness(nodes=nodes, default=CrmUnreachable("down"), retry=False, failure_threshold=1)
    await h.ask(node_id="1")
    assert (await h.ask(node_id="2")).error is ErrorCode.CRM_CIRCUIT_OPEN
    assert h.sample("callerid_crm_circuit_state", node="silver") == 2
    assert h.sample("callerid_crm_circuit_state", node="gold") == 2


async def test_a_failing_first_attempt_that_opens_the_breaker_is_not_retried() -> None:
    """The failure that opens the breaker leaves no retry: the breaker refuses it."""
    h = harness([CrmUnreachable("down"), TRUE], failure_threshold=1)
    assert (await h.ask()).error is ErrorCode.CRM_UNREACHABLE
    assert len(h.crm.calls) == 1


async def test_bad_bodies_do_not_trip_the_breaker() -> None:
    """A CRM answering nonsense is up: its breaker stays closed."""
    h = harness(default=CrmBadResponse("junk"), failure_threshold=1)
    for n in range(3):
        assert (await h.ask(str(n))).error is ErrorCode.CRM_BAD_RESPONSE
    assert len(h.crm.calls) == 3


# --- what the breaker is told: only failures the CRM caused ----------------------------------


@pytest.mark.parametrize("left", [4.0, 3.7])
async def test_timeouts_with_the_crms_full_time_open_the_breaker(left: float) -> None:
    """A CRM that does not answer within the node's crm_timeout (4 s) is down: its timeouts
    count, also when the request lost a little of its budget on the way (3.7 s of 4: within
    the FULL_ATTEMPT allowance for the request's trip)."""
    h = harness(default=CrmTimeout("slow"), retry=False, failure_threshold=2)
    assert (await h.ask("1", left=left)).error is ErrorCode.CRM_TIMEOUT
    assert (await h.ask("2", left=left)).error is ErrorCode.CRM_TIMEOUT
    assert (await h.ask("3", left=left)).error is ErrorCode.CRM_CIRCUIT_OPEN
    assert len(h.crm.calls) == 2
    assert h.sample("callerid_crm_circuit_state", node="gold") == 2


async def test_a_timeout_with_less_than_the_crms_full_time_is_not_counted() -> None:
    """A request that reaches the resolver with less than FULL_ATTEMPT of crm_timeout left
    (3 s of 4) and times out says nothing about the CRM: it is not retried, the breaker (one
    failure would open it) stays closed, and every later request still reaches the CRM; a
    timeout with the full time then opens it."""
    h = harness(default=CrmTimeout("slow"), failure_threshold=1)
    for n in range(3):
        reply = await h.ask(str(n), left=FULL_ATTEMPT * 4.0 - 0.6)
        assert reply.error is ErrorCode.CRM_TIMEOUT
    assert len(h.crm.calls) == 3
    assert h.sample("callerid_crm_requests_total", node="gold", result="crm_timeout") == 3
    assert h.sample("callerid_crm_circuit_state", node="gold") == 0
    assert (await h.ask("4", left=4.0)).error is ErrorCode.CRM_TIMEOUT
    assert h.sample("callerid_crm_circuit_state", node="gold") == 2


async def test_a_timeout_noticed_late_by_a_stalled_process_is_not_counted() -> None:
    """A process frozen (SIGSTOP) while its CRM call is in flight notices the timeout long
    after the budget ran out, though the CRM may have answered in the meantime: with the full
    budget, a timeout noticed more than STALL_MARGIN late is not the CRM's fault, and the
    breaker (one failure would open it) stays closed; nothing is retried."""
    h = harness([CrmTimeout("slow")], failure_threshold=1)
    gate = h.crm.hold()
    call = asyncio.create_task(h.ask("1", left=4.0))
    await h.crm.entered.wait()
    h.clock.advance(3.0)  # the process was frozen for 3 s; the CRM call then uses its budget
    gate.set()
    assert (await call).error is ErrorCode.CRM_TIMEOUT
    assert len(h.crm.calls) == 1
    assert h.sample("callerid_crm_circuit_state", node="gold") == 0
    assert (await h.ask("2")).verdict is Verdict.TRUE


async def test_no_time_left_after_the_cache_contacts_no_crm_and_counts_nothing() -> None:
    """A request whose deadline passes during its cache round trip (a stalled Redis) is
    answered crm_timeout without contacting the CRM: no CRM attempt is counted, and the
    breaker is not touched — here half-open, its one probe stays for the next request, which
    closes it."""
    h = harness([CrmUnreachable("down")], retry=False, failure_threshold=1)
    assert (await h.ask("1")).error is ErrorCode.CRM_UNREACHABLE
    h.breaker_clock.advance(5.0)  # half-open: the next allowed attempt is the probe

    async def slow_lead() -> None:
        h.clock.advance(1.5)

    h.view.on_lead = slow_lead
    reply = await h.ask("2", left=1.0)
    assert reply.error is ErrorCode.CRM_TIMEOUT
    assert reply.crm_ms is None
    assert len(h.crm.calls) == 1
    assert h.sample("callerid_crm_requests_total", node="gold", result="crm_timeout") == 0
    assert h.sample("callerid_crm_requests_total", node="gold", result="crm_circuit_open") == 0

    h.view.on_lead = None
    assert (await h.ask("3")).verdict is Verdict.TRUE
    assert len(h.crm.calls) == 2
    assert h.sample("callerid_crm_circuit_state", node="gold") == 0


async def test_a_half_open_probe_that_tested_nothing_hands_its_turn_on() -> None:
    """A half-open probe whose own time ran out (a short budget) neither closes nor re-opens
    the breaker, and the next request may probe at once instead of after another wait."""
    h = harness([CrmUnreachable("down"), CrmTimeout("slow")], retry=False, failure_threshold=1)
    assert (await h.ask("1")).error is ErrorCode.CRM_UNREACHABLE
    h.breaker_clock.advance(5.0)
    assert (await h.ask("2", left=1.0)).error is ErrorCode.CRM_TIMEOUT
    assert h.sample("callerid_crm_circuit_state", node="gold") == 1
    assert (await h.ask("3")).verdict is Verdict.TRUE
    assert len(h.crm.calls) == 3
    assert h.sample("callerid_crm_circuit_state", node="gold") == 0


# --- robustness -------------------------------------------------------------------------------


async def test_unexpected_crm_exception_is_internal_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the CRM client answers internal to every sharer and is logged once."""
    h = harness(default=RuntimeError("bug"))
    gate = h.crm.hold()
    tasks = [asyncio.create_task(h.ask()) for _ in range(3)]
    await h.crm.entered.wait()
    with caplog.at_level(logging.ERROR, logger="crm_resolver.resolver"):
        gate.set()
        replies = await asyncio.gather(*tasks)
    assert {r.error for r in replies} == {ErrorCode.INTERNAL}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


async def test_cancellation_propagates_and_in_flight_returns_to_zero() -> None:
    """Cancelling a request is never swallowed into a reply, and the gauge is restored."""
    h = harness()
    gate = h.crm.hold()
    task = asyncio.create_task(h.ask())
    await h.crm.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.sample("callerid_resolver_in_flight") == 0
    gate.set()
    await h.resolver.close()


async def test_circuit_state_gauge_follows_the_breaker() -> None:
    """callerid_crm_circuit_state is the breaker state's level (CircuitState.level): 2 when
    the CRM's circuit opens, 0 again once a probe succeeds."""
    h = harness([CrmUnreachable("refused")], failure_threshold=1, retry=False)
    gauge = "callerid_crm_circuit_state"
    assert h.sample(gauge, node="gold") == CircuitState.CLOSED.level
    assert (await h.ask("1")).error is ErrorCode.CRM_UNREACHABLE
    assert h.sample(gauge, node="gold") == CircuitState.OPEN.level == 2
    h.breaker_clock.advance(5.0)
    assert (await h.ask("2")).verdict is Verdict.TRUE  # the probe
    assert h.sample(gauge, node="gold") == CircuitState.CLOSED.level == 0
