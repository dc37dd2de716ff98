"""Identical lookups merged across resolver processes, through the real Redis (docs/design.md §7),
and what a lookup costs in Redis round trips.

Each "process" here is a `Resolver` with its own Redis client (`RedisCache`), metrics and
breakers, as in separate `crm-resolver` processes consuming one queue; they share only Redis
and the CRM, which counts the calls it receives.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from crm_resolver.metrics import ResolverMetrics
from crm_resolver.ports import CrmAnswer, CrmStatusFail, Flight, Lease
from crm_resolver.redis_cache import RedisCache
from crm_resolver.resolver import LOCK_MARGIN, Resolver
from shared.messages import IdentifyReply, IdentifyRequest
from shared.nodes import NodeSet
from shared.outcomes import Source, Verdict
from tests.fakes import FakeCrm, destination, make_node

pytestmark = pytest.mark.integration

NODES = NodeSet([make_node()])


class WatchedCache(RedisCache):
    """The real adapter, telling the test when its resolver is waiting on another's lock."""

    waiting: asyncio.Event

    async def peek(self, node_id: str, customer_id: str) -> CrmAnswer | Flight:
        seen = await super().peek(node_id, customer_id)
        if seen is Flight.HELD:
            self.waiting.set()
        return seen


@dataclass
class Process:
    resolver: Resolver
    cache: WatchedCache
    crm: FakeCrm
    registry: CollectorRegistry

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


_ids = itertools.count(1)


FLIGHT_TEST_CACHE_TIMEOUT = 1.0


def request(customer_id: str, left: float) -> IdentifyRequest:
    return IdentifyRequest(
        request_id=f"r{next(_ids)}",
        node_id="1",
        customer_id=customer_id,
        deadline=time.time() + left,
    )


@pytest.fixture
async def processes(
    redis_base_url: str, unique_name: str, raw: redis.asyncio.Redis
) -> AsyncIterator[list[Process]]:
    """Three resolver "processes" on one Redis key space (unique to the test), sharing one
    CRM gate and entry event so that the test can hold whichever one calls the CRM."""
    gate = asyncio.Event()
    entered = asyncio.Event()
    made: list[Process] = []
    for _ in range(3):
        # A generous cache timeout: these tests are about the lock, not about failing open (a
        # 50 ms bound that a loaded CI box misses would skip the lock; test_redis_stall and
        # test_redis_cache test the timeout).
        cache = WatchedCache.from_url(
            redis_base_url,
            key_prefix=f"{unique_name}:",
            flight_prefix=f"{unique_name}:flight:",
            timeout=FLIGHT_TEST_CACHE_TIMEOUT,
        )
        assert isinstance(cache, WatchedCache)
        cache.waiting = asyncio.Event()
        crm = FakeCrm(default=destination(1, 7))
        crm.gate, crm.entered = gate, entered
        registry = CollectorRegistry()
        metrics = ResolverMetrics(registry)
        metrics.init_nodes(NODES.names())
        resolver = Resolver(lambda: NODES, crm, cache, metrics)
        made.append(Process(resolver, cache, crm, registry))
    yield made
    gate.set()
    for process in made:
        await process.resolver.close()
        await process.cache.close()


async def test_fifty_identical_requests_over_three_resolvers_make_one_crm_call(
    processes: list[Process],
) -> None:
    """50 identical lookups at once, spread round-robin over three resolvers sharing Redis:
    exactly one CRM call; the resolvers that did not call waited on the lock and replied the
    caller's answer from the cache; all 50 replies are that answer."""
    tasks = [
        asyncio.create_task(processes[n % 3].resolver(request("4242", left=5.0))) for n in range(50)
    ]
    gate, entered = processes[0].crm.gate, processes[0].crm.entered
    assert gate is not None
    async with asyncio.timeout(5):  # fails here if a second resolver called the CRM instead
        await entered.wait()
        (caller,) = [p for p in processes if p.crm.calls]
        for other in processes:
            if other is not caller:
                await other.cache.waiting.wait()
    gate.set()
    replies: list[IdentifyReply] = await asyncio.gather(*tasks)

    assert sum(len(p.crm.calls) for p in processes) == 1
    assert {(r.verdict, r.destination) for r in replies} == {
        (Verdict.DESTINATION, destination(1, 7).destination)
    }
    assert len({r.request_id for r in replies}) == 50
    from_caller = [r for n, r in enumerate(replies) if processes[n % 3] is caller]
    assert {r.source for r in from_caller} == {Source.CRM}
    assert {r.source for r in replies if r not in from_caller} == {Source.CACHE}
    merged = sum(p.sample("callerid_crm_lookups_merged_total", node="gold") for p in processes)
    hits = sum(
        p.sample("callerid_cache_lookups_total", node="gold", result="hit") for p in processes
    )
    assert merged + hits == 49
    assert sum(p.cache.errors for p in processes) == 0


async def test_the_lock_lasts_the_budget_plus_margin_and_is_released(
    processes: list[Process], raw: redis.asyncio.Redis
) -> None:
    """While a resolver asks the CRM its lock lives for the request's time left plus
    LOCK_MARGIN; after the answer is stored the lock is gone."""
    first = processes[0]
    key = first.cache.flight_key("1", "555")
    task = asyncio.create_task(first.resolver(request("555", left=2.0)))
    await first.crm.entered.wait()
    assert 1_500 < await raw.pttl(key) <= (2.0 + LOCK_MARGIN) * 1000
    assert first.crm.gate is not None
    first.crm.gate.set()
    assert (await task).source is Source.CRM
    await first.resolver.close()  # the store and release run after the reply
    assert await raw.exists(key) == 0
    assert await first.cache.fetch("1", "555") == destination(1, 7)


async def test_a_holder_that_died_delays_others_by_at_most_its_lock_ttl(
    processes: list[Process],
) -> None:
    """A lock whose holder never releases it (killed) makes others wait until it expires,
    no longer: then one of them takes the lock and asks the CRM itself."""
    lock_ttl = 0.3
    first = processes[0]
    assert first.crm.gate is not None
    first.crm.gate.set()
    started = time.monotonic()
    dead = await first.cache.lead("1", "999", lock_ttl)
    assert isinstance(dead, Lease)
    replies = await asyncio.gather(
        *(processes[n % 3].resolver(request("999", left=3.0)) for n in range(6))
    )
    waited = time.monotonic() - started
    assert lock_ttl - 0.05 <= waited < lock_ttl + 0.3
    assert sum(len(p.crm.calls) for p in processes) == 1
    assert {r.verdict for r in replies} == {Verdict.DESTINATION}
    assert sum(r.source is Source.CRM for r in replies) == 2  # the calling process's two


async def test_a_miss_costs_two_round_trips_a_hit_one_and_misses_in_a_row_share(
    redis_base_url: str, unique_name: str, raw: redis.asyncio.Redis
) -> None:
    """Counting the commands the resolver's Redis client sends (one round trip each: the
    cache sends no pipelines): a miss answered by the CRM is exactly two, `lead` then the
    store + release; a hit is exactly one, `lead`; a miss whose CRM call fails is two too,
    the second only releasing the lock (nothing is cached). Under load the settle rides with
    the next lead, which makes it one round trip per miss."""
    sent: list[str] = []

    class CountingConnection(redis.asyncio.Connection):
        async def send_command(self, *args: Any, **kwargs: Any) -> None:
            sent.append(str(args[0]).upper())
            await super().send_command(*args, **kwargs)

    client = redis.asyncio.Redis.from_url(redis_base_url, connection_class=CountingConnection)
    cache = RedisCache(client, key_prefix=f"{unique_name}:", flight_prefix=f"{unique_name}:flight:")
    crm = FakeCrm(default=destination(1, 7))
    metrics = ResolverMetrics(CollectorRegistry())
    metrics.init_nodes(NODES.names())
    resolver = Resolver(lambda: NODES, crm, cache, metrics)
    try:
        # Connect, and load the scripts (NOSCRIPT, SCRIPT LOAD) if this Redis lacks them.
        await resolver(request("1", left=2.0))
        await resolver.close()

        sent.clear()
        miss = await resolver(request("4242", left=2.0))
        await resolver.close()
        assert (miss.source, len(crm.calls)) == (Source.CRM, 2)
        assert sent == ["EVALSHA", "EVALSHA"]
        assert 250_000 < await raw.pttl(cache.key("1", "4242")) <= 330_000
        assert await raw.exists(cache.flight_key("1", "4242")) == 0

        sent.clear()
        hit = await resolver(request("4242", left=2.0))
        await resolver.close()
        assert (hit.source, hit.destination, len(crm.calls)) == (
            Source.CACHE,
            destination(1, 7).destination,
            2,
        )
        assert sent == ["EVALSHA"]

        crm.script.append(CrmStatusFail("fail"))
        sent.clear()
        failed = await resolver(request("5151", left=2.0))
        await resolver.close()
        assert failed.verdict is Verdict.ERROR
        assert sent == ["EVALSHA", "EVALSHA"]
        assert await raw.exists(cache.key("1", "5151"), cache.flight_key("1", "5151")) == 0

        # Misses in a row: each lead carries the settle still queued before it, so two
        # misses cost three round trips (the last settle goes alone, here at the flush).
        cache._settles.delay = 3600.0  # from here on only a lead or the flush sends settles
        sent.clear()
        first = await resolver(request("6001", left=2.0))
        second = await resolver(request("6002", left=2.0))
        assert sent == ["EVALSHA", "EVALSHA"]
        await cache.flush()
        await resolver.close()
        assert (first.source, second.source) == (Source.CRM, Source.CRM)
        assert sent == ["EVALSHA", "EVALSHA", "EVALSHA"]
        for customer in ("6001", "6002"):
            assert await raw.exists(cache.key("1", customer)) == 1
            assert await raw.exists(cache.flight_key("1", customer)) == 0
        assert cache.errors == 0
    finally:
        await resolver.close()
        await cache.close()
