"""The cache and flight-lock contract (`crm_resolver.ports.Cache`), run twice: against the
in-process adapter (`MemoryCache`) and against the real Redis (`RedisCache`, on the shared
Redis with a key prefix of the test's own). Every case runs against both, so the resolver's
one algorithm behaves the same in embedded mode and scaled out, and the unit tests of the
resolver (tests/unit/test_resolver.py, which run on the memory adapter) speak for Redis too.

The last case runs twice as well: the breakable test cache (`tests.fakes.RecordingCache`,
broken, as the resolver's unit tests use it) against a Redis that is not there, both failing
open the same way.

Expiry is real time on both sides (Redis expires keys by its own clock): the cases give a
lock or an answer a short TTL and wait, with a generous deadline, until it is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio

from crm_resolver.memory_cache import MemoryCache
from crm_resolver.ports import Cache, CacheMiss, CrmAnswer, Flight, Lease
from crm_resolver.redis_cache import RedisCache
from tests.fakes import FALSE, TRUE, RecordingCache, destination

pytestmark = pytest.mark.integration

SHORT = 0.2
"""Seconds: a TTL short enough to wait out in a test."""

Adapter = MemoryCache | RedisCache


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest, unique_name: str) -> AsyncIterator[Adapter]:
    """Each implementation of the port in turn (FastStream's twin-run style)."""
    if request.param == "memory":
        memory = MemoryCache()
        yield memory
        await memory.close()
        return
    # Asked for here, not as an argument: the memory runs need no Redis.
    url: str = request.getfixturevalue("redis_base_url")
    shared = RedisCache.from_url(
        url,
        key_prefix=f"{unique_name}:",
        flight_prefix=f"{unique_name}:flight:",
        timeout=1.0,  # about the contract, not failing open: a loaded box must not fail it
    )
    yield shared
    await shared.close()
    # The test's keys, answers and locks, as the `raw` fixture cleans up (requesting `raw`
    # would make the memory runs need Redis too).
    client = redis.asyncio.Redis.from_url(url)
    keys = [key async for key in client.scan_iter(match=f"{unique_name}:*", count=1000)]
    if keys:
        await client.unlink(*keys)
    await client.aclose()


async def lease_of(cache: Cache, node_id: str, customer_id: str, ttl: float = 5.0) -> Lease:
    lease = await cache.lead(node_id, customer_id, ttl)
    assert isinstance(lease, Lease), lease
    return lease


T = TypeVar("T")


async def poll(look: Callable[[], Awaitable[T]], until: Callable[[T], bool]) -> T:
    """Look every 10 ms until what is seen satisfies `until`; return it (TimeoutError after
    5 s). What is waited for is the backend's doing (an expiry, another holder's settle)."""
    async with asyncio.timeout(5):
        while not until(seen := await look()):  # noqa: ASYNC110 - the backend's doing
            await asyncio.sleep(0.01)
    return seen


async def until_not_held(cache: Cache, node_id: str, customer_id: str) -> None:
    await poll(lambda: cache.peek(node_id, customer_id), lambda seen: seen is not Flight.HELD)


async def until_expired(cache: Cache, node_id: str, customer_id: str) -> None:
    await poll(lambda: cache.fetch(node_id, customer_id), lambda found: found is CacheMiss.MISS)


# --- answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [TRUE, FALSE, destination(3, 42)])
async def test_what_is_put_comes_back_from_fetch_lead_and_peek(
    cache: Adapter, answer: CrmAnswer
) -> None:
    """An answer put is returned equal by fetch, by lead (instead of a lease) and by peek; a
    false answer (a negative entry) is an answer like the others, not a miss. Another
    customer or node is a miss."""
    await cache.put("n1", "12345", answer, 60)
    assert await cache.fetch("n1", "12345") == answer
    assert await cache.lead("n1", "12345", 5) == answer
    assert await cache.peek("n1", "12345") == answer
    assert await cache.fetch("n1", "54321") is CacheMiss.MISS
    assert await cache.fetch("n2", "12345") is CacheMiss.MISS


async def test_an_answer_expires_after_its_ttl(cache: Adapter) -> None:
    """An entry lives its TTL and no longer: then fetch misses and lead grants a lease."""
    started = time.monotonic()
    await cache.put("n1", "7", FALSE, SHORT)
    assert await cache.fetch("n1", "7") == FALSE
    await until_expired(cache, "n1", "7")
    assert time.monotonic() - started >= SHORT - 0.01
    await lease_of(cache, "n1", "7")


@pytest.mark.parametrize("ttl", [0.0, 0.0004, -1.0])
async def test_a_ttl_under_a_millisecond_stores_nothing(cache: Adapter, ttl: float) -> None:
    await cache.put("n1", "1", TRUE, ttl)
    assert await cache.fetch("n1", "1") is CacheMiss.MISS


async def test_a_newer_put_replaces_the_answer(cache: Adapter) -> None:
    await cache.put("n1", "1", TRUE, 60)
    await cache.put("n1", "1", destination(1, 2), 60)
    assert await cache.fetch("n1", "1") == destination(1, 2)


async def test_purge_one_customer_and_a_whole_node(cache: Adapter) -> None:
    """Purge removes one customer's answer or every answer of a node, and says how many."""
    for customer in ("1", "2", "3"):
        await cache.put("n1", customer, TRUE, 60)
    await cache.put("n2", "1", FALSE, 60)
    assert await cache.purge("n1", "1") == 1
    assert await cache.purge("n1", "1") == 0
    assert await cache.purge("n1") == 2
    assert await cache.fetch("n1", "2") is CacheMiss.MISS
    assert await cache.fetch("n2", "1") == FALSE


# --- the flight lock --------------------------------------------------------------------------


async def test_one_lease_at_a_time_and_a_release_frees_the_lock(cache: Adapter) -> None:
    """The first lead gets a lease; while it holds, others are HELD and peek says HELD;
    another customer or node has a lock of its own. Settled without an answer (a plain
    release), the lock is FREE and the next lead gets a new lease."""
    lease = await lease_of(cache, "n1", "12345")
    assert await cache.lead("n1", "12345", 5) is Flight.HELD
    assert await cache.peek("n1", "12345") is Flight.HELD
    await lease_of(cache, "n1", "other")
    await lease_of(cache, "n2", "12345")
    await cache.settle(lease)
    assert await cache.peek("n1", "12345") is Flight.FREE
    assert await cache.fetch("n1", "12345") is CacheMiss.MISS
    again = await lease_of(cache, "n1", "12345")
    assert again.token != lease.token


async def test_an_answer_comes_before_the_lock(cache: Adapter) -> None:
    """With an answer cached, lead hands it back and takes no lock; peek returns the answer
    whether or not a lock is held."""
    held = await lease_of(cache, "n1", "1")
    await cache.put("n1", "1", destination(1, 3), 60)
    assert await cache.peek("n1", "1") == destination(1, 3)
    assert await cache.lead("n1", "1", 5) == destination(1, 3)
    await cache.settle(held)
    assert await cache.lead("n1", "1", 5) == destination(1, 3)
    await cache.purge("n1", "1")
    assert await cache.peek("n1", "1") is Flight.FREE  # the lead above took no lock


async def test_settle_stores_the_answer_for_its_ttl_and_releases(cache: Adapter) -> None:
    """settle with an answer: it is stored and the lock is gone at once; the answer lives
    its TTL, and then the next lead gets a lease (the lock, taken for 5 s, was released)."""
    lease = await lease_of(cache, "n1", "12345", ttl=5)
    await cache.settle(lease, FALSE, SHORT)
    assert await cache.peek("n1", "12345") == FALSE
    assert await cache.lead("n1", "12345", 5) == FALSE
    await until_expired(cache, "n1", "12345")
    assert await cache.peek("n1", "12345") is Flight.FREE
    await lease_of(cache, "n1", "12345")


@pytest.mark.parametrize(
    ("answer", "ttl"), [(None, 0.0), (None, 60.0), (TRUE, 0.0), (TRUE, 0.0004)]
)
async def test_settle_with_nothing_to_cache_only_releases(
    cache: Adapter, answer: CrmAnswer | None, ttl: float
) -> None:
    """No answer, or a TTL under 1 ms: nothing is stored, the lock goes, peek says FREE."""
    lease = await lease_of(cache, "n1", "12345")
    await cache.settle(lease, answer, ttl)
    assert await cache.fetch("n1", "12345") is CacheMiss.MISS
    assert await cache.peek("n1", "12345") is Flight.FREE


async def test_a_waiter_gets_the_holders_answer(cache: Adapter) -> None:
    """A lookup that found the lock HELD and polls with peek sees the holder's answer as soon
    as the holder settles with it."""
    lease = await lease_of(cache, "n1", "5")
    assert await cache.lead("n1", "5", 5) is Flight.HELD

    waiter = asyncio.create_task(
        poll(lambda: cache.peek("n1", "5"), lambda seen: seen is not Flight.HELD)
    )
    await cache.settle(lease, destination(2, 8), 60)
    assert await waiter == destination(2, 8)


async def test_a_waiter_sees_free_when_the_holder_lets_go_without_an_answer(
    cache: Adapter,
) -> None:
    """The holder's call failed (errors are not cached): the waiter sees FREE, not HELD, and
    its lead then gets the lease."""
    lease = await lease_of(cache, "n1", "5")
    assert await cache.lead("n1", "5", 5) is Flight.HELD
    await cache.settle(lease)
    assert await cache.peek("n1", "5") is Flight.FREE
    await lease_of(cache, "n1", "5")


async def test_a_lock_nobody_releases_expires_after_its_ttl(cache: Adapter) -> None:
    """A holder that never settles (killed) blocks the others for its lock's TTL, no longer:
    then peek says FREE and another lead gets a lease."""
    started = time.monotonic()
    await lease_of(cache, "n1", "9", ttl=SHORT)
    assert await cache.lead("n1", "9", 5) is Flight.HELD
    await until_not_held(cache, "n1", "9")
    assert time.monotonic() - started >= SHORT - 0.01
    assert await cache.peek("n1", "9") is Flight.FREE
    await lease_of(cache, "n1", "9")


async def test_a_lease_that_outlived_its_lock_stores_its_answer_but_frees_no_one_elses(
    cache: Adapter,
) -> None:
    """A holder slower than its lock's TTL: the lock expires and another takes it. The late
    settle still stores its answer (a real CRM answer) but does not release the new
    holder's lock."""
    stale = await lease_of(cache, "n1", "7", ttl=SHORT)
    await until_not_held(cache, "n1", "7")
    current = await lease_of(cache, "n1", "7")
    await cache.settle(stale, FALSE, 60)
    assert await cache.fetch("n1", "7") == FALSE
    await cache.purge("n1", "7")
    assert await cache.peek("n1", "7") is Flight.HELD
    await cache.settle(current)
    assert await cache.peek("n1", "7") is Flight.FREE


async def test_a_release_by_a_non_holder_is_ignored(cache: Adapter) -> None:
    """Only the lease's own token releases a lock: another token, an old lease of the same
    lookup, or a lease of another lookup leave it held."""
    old = await lease_of(cache, "n1", "3")
    await cache.settle(old)
    lease = await lease_of(cache, "n1", "3")
    await cache.settle(Lease("n1", "3", "not-the-token"))
    await cache.settle(old)
    await cache.settle(Lease("n1", "4", lease.token))
    assert await cache.peek("n1", "3") is Flight.HELD
    await cache.settle(lease)
    assert await cache.peek("n1", "3") is Flight.FREE


# --- a backend that is down -------------------------------------------------------------------


@pytest.fixture(params=["broken test cache", "redis not there"])
async def dead(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    """The unit tests' broken cache, and a Redis adapter with nothing listening."""
    if request.param == "broken test cache":
        yield RecordingCache(broken=True)
        return
    down = RedisCache.from_url("redis://127.0.0.1:1/0", timeout=0.5, log_every=3600)
    yield down
    await down.close()


async def test_a_dead_backend_fails_open(dead: Cache) -> None:
    """Reads say ERROR (CacheMiss.ERROR, Flight.ERROR), never an answer, a lease, HELD or
    FREE; writes and settles are dropped without raising, so a settle's lock (if any)
    expires by itself."""
    await dead.put("n1", "1", TRUE, 60)
    assert await dead.fetch("n1", "1") is CacheMiss.ERROR
    assert await dead.lead("n1", "1", 5) is Flight.ERROR
    assert await dead.peek("n1", "1") is Flight.ERROR
    async with asyncio.timeout(5):
        await dead.settle(Lease("n1", "1", "token"), TRUE, 60)
    assert await dead.fetch("n1", "1") is CacheMiss.ERROR
