"""The Redis cache against the real Redis, in what is its own: key and value formats, TTLs in
milliseconds, purge in batches, the flight lock's keys and batched settles, doubted locks, and
failing open fast. What every cache adapter does alike (answers, leases, expiry, settles) is
the contract, run against Redis and the memory cache: tests/integration/test_cache_contract.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from crm_resolver.ports import CacheMiss, Flight, Lease
from crm_resolver.redis_cache import RedisCache
from tests.fakes import FALSE, TRUE, FakeClock, destination
from tools.stack import Proc, redis_server

pytestmark = pytest.mark.integration


@pytest.fixture
async def cache(
    redis_base_url: str, unique_name: str, raw: redis.asyncio.Redis
) -> AsyncIterator[RedisCache]:
    cache = RedisCache.from_url(
        redis_base_url, key_prefix=f"{unique_name}:", flight_prefix=f"{unique_name}:flight:"
    )
    yield cache
    await cache.close()


async def test_value_is_compact_json(cache: RedisCache, raw: redis.asyncio.Redis) -> None:
    """Values are the documented compact JSON."""
    await cache.put("n1", "1", destination(1, 3), 60)
    await cache.put("n1", "2", TRUE, 60)
    assert await raw.get(cache.key("n1", "1")) == b'{"v":"destination","t":1,"i":3}'
    assert await raw.get(cache.key("n1", "2")) == b'{"v":"true"}'


async def test_ttl_is_set_in_milliseconds(cache: RedisCache, raw: redis.asyncio.Redis) -> None:
    """The entry expires after the TTL given (SET PX), and a TTL under 1 ms stores nothing."""
    await cache.put("n1", "12345", TRUE, 12.5)
    pttl = await raw.pttl(cache.key("n1", "12345"))
    assert 12_000 < pttl <= 12_500
    await cache.put("n1", "999", TRUE, 0.0001)
    assert await raw.exists(cache.key("n1", "999")) == 0


async def test_key_hides_the_customer_id(
    cache: RedisCache, raw: redis.asyncio.Redis, unique_name: str
) -> None:
    """The key is prefix + node + sha256 hex: the customer id does not appear in it."""
    customer = "98765432109876"
    await cache.put("n1", customer, TRUE, 60)
    keys = [k.decode() async for k in raw.scan_iter(match=f"{unique_name}:*")]
    assert len(keys) == 1
    assert customer not in keys[0]
    prefix, node, digest = keys[0].rsplit(":", 2)
    assert (prefix, node, len(digest)) == (unique_name, "n1", 64)


async def test_pepper_changes_the_key(redis_base_url: str, unique_name: str) -> None:
    """Keys depend on the pepper, so without it an id cannot be found by hashing guesses."""
    plain = RedisCache.from_url(redis_base_url, key_prefix=f"{unique_name}:")
    peppered = RedisCache.from_url(redis_base_url, key_prefix=f"{unique_name}:", pepper="s3")
    try:
        assert plain.key("n1", "123") != peppered.key("n1", "123")
        assert peppered.key("n1", "123") == peppered.key("n1", "123")
        # A keyed hash: neither a plain hash of the id nor of secret + id gives the key.
        digest = peppered.key("n1", "123").rsplit(":", 1)[1]
        assert digest == hmac.new(b"s3", b"123", hashlib.sha256).hexdigest()
        assert digest != hashlib.sha256(b"s3123").hexdigest()
    finally:
        await plain.close()
        await peppered.close()


async def test_purge_one_customer_and_a_whole_node(cache: RedisCache) -> None:
    """purge(node, id) drops one entry; purge(node) drops all of that node's, in batches."""
    for n in range(1_100):
        await cache.put("big", str(n), TRUE, 60)
    await cache.put("other", "1", TRUE, 60)

    assert await cache.purge("big", "7") == 1
    assert await cache.purge("big", "7") == 0
    assert await cache.fetch("big", "7") is CacheMiss.MISS
    assert await cache.purge("big") == 1_099
    assert await cache.fetch("big", "8") is CacheMiss.MISS
    assert await cache.fetch("other", "1") == TRUE


async def test_unreadable_value_is_an_error_not_an_answer(
    cache: RedisCache, raw: redis.asyncio.Redis
) -> None:
    """A value this module did not write is reported as a cache error."""
    await raw.set(cache.key("n1", "5"), b'{"v":"error"}', px=60_000)
    await raw.set(cache.key("n1", "6"), b"not json", px=60_000)
    assert await cache.fetch("n1", "5") is CacheMiss.ERROR
    assert await cache.fetch("n1", "6") is CacheMiss.ERROR
    assert cache.errors == 2


async def test_a_lease_is_a_lock_key_set_with_px_of_the_ttl(
    cache: RedisCache, raw: redis.asyncio.Redis
) -> None:
    """A lease is the lock key holding the lease's token, with PX = ttl; a release deletes
    it. (What leases, HELD and FREE mean is the contract: tests/integration/
    test_cache_contract.py.)"""
    lease = await cache.lead("n1", "12345", 2.5)
    assert isinstance(lease, Lease)
    key = cache.flight_key("n1", "12345")
    assert await raw.get(key) == lease.token.encode()
    assert 2_000 < await raw.pttl(key) <= 2_500
    await cache.settle(lease)
    assert await raw.exists(key) == 0
    assert cache.errors == 0


async def test_settle_stores_the_answer_and_releases_the_lock_at_once(
    cache: RedisCache, raw: redis.asyncio.Redis
) -> None:
    """settle with an answer: the answer is stored as `put` stores it (compact JSON, PX =
    ttl) and the lock key is gone, in one script."""
    lease = await cache.lead("n1", "12345", 5)
    assert isinstance(lease, Lease)
    await cache.settle(lease, destination(1, 3), 12.5)
    key = cache.key("n1", "12345")
    assert await raw.get(key) == b'{"v":"destination","t":1,"i":3}'
    assert 12_000 < await raw.pttl(key) <= 12_500
    assert await raw.exists(cache.flight_key("n1", "12345")) == 0
    assert cache.errors == 0


@pytest.fixture
async def slow_settling(
    redis_base_url: str, unique_name: str, raw: redis.asyncio.Redis
) -> AsyncIterator[RedisCache]:
    """A cache whose settles never go on their own within a test: only a lead or a flush
    sends them."""
    cache = RedisCache(
        redis.asyncio.Redis.from_url(redis_base_url),
        key_prefix=f"{unique_name}:",
        flight_prefix=f"{unique_name}:flight:",
        settle_delay=3600.0,
    )
    yield cache
    await cache.close()


async def test_queued_settles_ride_with_the_next_lead_and_go_first(
    slow_settling: RedisCache, raw: redis.asyncio.Redis
) -> None:
    """Settles wait for the next lead and are carried out by its script before the lead
    itself: a lead for a customer just settled finds the answer, and every settle it
    carried is done, with its answer stored and its own lock gone."""
    cache = slow_settling
    first, second = await cache.lead("n1", "100", 5), await cache.lead("n1", "200", 5)
    assert isinstance(first, Lease)
    assert isinstance(second, Lease)
    stored = cache.settle(first, destination(1, 3), 60)
    released = cache.settle(second)
    assert not stored.done()
    assert not released.done()
    assert await raw.exists(cache.flight_key("n1", "100"), cache.flight_key("n1", "200")) == 2

    assert await cache.lead("n1", "100", 5) == destination(1, 3)
    assert stored.done()
    assert released.done()
    assert await raw.exists(cache.flight_key("n1", "100"), cache.flight_key("n1", "200")) == 0
    assert await cache.peek("n1", "200") is Flight.FREE
    assert cache.errors == 0


async def test_a_cancelled_lead_queues_its_settles_again(
    redis_base_url: str, unique_name: str, raw: redis.asyncio.Redis
) -> None:
    """Cancelled on the way, a lead cannot tell whether the settles it carried were carried
    out: they are queued again (a settle is idempotent) and the next flush finishes them."""

    class CancelledOnce(redis.asyncio.Redis):
        armed = False

        async def evalsha(self, *args: Any) -> Any:  # type: ignore[override]
            if self.armed:
                self.armed = False
                raise asyncio.CancelledError
            return await super().evalsha(*args)

    client = CancelledOnce.from_url(redis_base_url)
    cache = RedisCache(
        client,
        key_prefix=f"{unique_name}:",
        flight_prefix=f"{unique_name}:flight:",
        settle_delay=3600.0,
    )
    try:
        lease = await cache.lead("n1", "7", 5)
        assert isinstance(lease, Lease)
        settled = cache.settle(lease, FALSE, 60)
        client.armed = True
        with pytest.raises(asyncio.CancelledError):
            await cache.lead("n1", "8", 5)
        assert not settled.done()
        await cache.flush()
        assert settled.done()
        assert await cache.fetch("n1", "7") == FALSE
        assert await raw.exists(cache.flight_key("n1", "7")) == 0
    finally:
        await cache.close()


async def test_flight_key_hides_the_customer_id_and_has_its_own_prefix(
    cache: RedisCache, unique_name: str
) -> None:
    """The lock key is the flight prefix + node + the answer key's digest; prefixes differ."""
    customer = "98765432109876"
    key = cache.flight_key("n1", customer)
    assert customer not in key
    assert key == f"{unique_name}:flight:n1:{cache.key('n1', customer).rsplit(':', 1)[1]}"
    with pytest.raises(ValueError, match="must differ"):
        RedisCache(redis.asyncio.Redis(), key_prefix="x:", flight_prefix="x:")


async def test_closed_port_fails_open_quickly(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listening: reads are errors (CacheMiss.ERROR), writes are dropped, all fast,
    each failure counted and reported to on_error, but only one warning logged."""
    reported: list[None] = []
    cache = RedisCache.from_url(
        "redis://127.0.0.1:1/0", on_error=lambda: reported.append(None), log_every=60
    )
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="crm_resolver.redis_cache"):
            assert await cache.fetch("n1", "1") is CacheMiss.ERROR
            assert await cache.fetch("n1", "1") is CacheMiss.ERROR
            await cache.put("n1", "1", TRUE, 60)
            assert await cache.lead("n1", "1", 4) is Flight.ERROR
            assert await cache.peek("n1", "1") is Flight.ERROR
            await cache.settle(Lease("n1", "1", "token"), TRUE, 60)
        assert time.monotonic() - started < 0.5
    finally:
        await cache.close()
    assert cache.errors == 6
    assert len(reported) == 6
    assert len(caplog.records) == 1


async def test_silent_redis_fails_open_within_the_timeout() -> None:
    """A server that accepts and never answers costs a read about `timeout`, not 5 s."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = RedisCache.from_url(f"redis://127.0.0.1:{port}/0", timeout=0.05)
    try:
        started = time.monotonic()
        assert await cache.fetch("n1", "1") is CacheMiss.ERROR
        elapsed = time.monotonic() - started
        await cache.put("n1", "1", TRUE, 60)
        assert 0.04 <= elapsed < 0.5
        assert cache.errors == 2
    finally:
        await cache.close()
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Proc]:
    """A redis-server of this test's own, which it may stall (never the shared one)."""
    server = redis_server(tmp_path)
    yield server
    server.stop()  # wakes it first if it is still paused


async def test_a_stalled_redis_costs_each_operation_at_most_its_timeout(
    private_redis: Proc,
) -> None:
    """Redis stalled (SIGSTOP: the kernel still accepts connections, nothing answers), three
    rounds of four times more operations at once than the pool has connections: each one —
    fetch, put, lead, peek, settle — fails open once its own timeout fires, connecting
    included, instead of waiting out the stall or queueing behind other connections'
    handshakes; each failure is counted. Resumed, the pool has kept no connection lent out,
    and operations succeed again."""
    timeout = 0.05
    cache = RedisCache.from_url(
        f"redis://127.0.0.1:{private_redis.tcp_port}/0", timeout=timeout, max_connections=8
    )
    pool = cache._client.connection_pool
    try:
        await cache.put("n1", "warm", TRUE, 60)  # one connection made before the stall
        assert await cache.fetch("n1", "warm") == TRUE
        private_redis.pause()
        worst = 0.0

        async def timed(work: Awaitable[Any]) -> Any:
            nonlocal worst
            started = time.monotonic()
            result = await work
            worst = max(worst, time.monotonic() - started)
            return result

        for round_ in range(3):
            errors = cache.errors
            results = await asyncio.gather(
                *(
                    timed(op)
                    for n in range(8)
                    for op in (
                        cache.fetch("n1", f"{round_}{n}"),
                        cache.put("n1", f"{round_}{n}", TRUE, 60),
                        cache.lead("n1", f"{round_}{n}", 5),
                        cache.peek("n1", f"{round_}{n}"),
                        cache.settle(Lease("n1", f"{round_}{n}", "token"), TRUE, 60),
                    )
                )
            )
            assert {r for r in results if r is not None} == {CacheMiss.ERROR, Flight.ERROR}
            # One per fetch, put, lead and peek (the settles went, and failed, with leads).
            assert cache.errors - errors >= 8 * 4
        # Bounded by the timeout (a generous multiple of it), not by the stall.
        assert worst < 10 * timeout

        private_redis.resume()
        assert not pool._in_use_connections
        errors = cache.errors
        lease = await cache.lead("n1", "after", 5)
        assert isinstance(lease, Lease)
        await cache.settle(lease, FALSE, 60)
        assert await cache.fetch("n1", "after") == FALSE
        assert await cache.fetch("n1", "warm") == TRUE
        assert cache.errors == errors
    finally:
        private_redis.resume()
        await cache.close()


async def test_a_lead_given_up_on_still_takes_its_lock_which_is_then_doubted(
    private_redis: Proc,
) -> None:
    """A lead that timed out while Redis stalled is carried out when Redis catches up: its
    lock is taken, and nobody holds it. For its `ttl` after a failure the cache that failed
    does not trust a held lock (ERROR: its caller goes on without it instead of waiting for
    nobody); a cache that saw no failure trusts it (HELD), and so does the first once `ttl`
    has passed."""
    url = f"redis://127.0.0.1:{private_redis.tcp_port}/0"
    clock = FakeClock()
    cache = RedisCache(redis.asyncio.Redis.from_url(url), clock=clock, timeout=0.05)
    other = RedisCache(redis.asyncio.Redis.from_url(url))
    raw = redis.asyncio.Redis.from_url(url)
    try:
        # Connected, and the script loaded (a lead sends EVALSHA, with SCRIPT LOAD only after
        # a NOSCRIPT answer).
        assert isinstance(await cache.lead("n1", "warm", 5), Lease)
        private_redis.pause()
        try:
            assert await cache.lead("n1", "7", 5) is Flight.ERROR
        finally:
            private_redis.resume()
        deadline = time.monotonic() + 5
        while not await raw.exists(cache.flight_key("n1", "7")):
            assert time.monotonic() < deadline, "the lead given up on never took its lock"
            await asyncio.sleep(0.01)

        errors = cache.errors
        assert await cache.lead("n1", "7", 5) is Flight.ERROR
        assert await other.lead("n1", "7", 5) is Flight.HELD
        assert cache.errors == errors  # doubting is not a failure
        clock.advance(5)
        assert await cache.lead("n1", "7", 5) is Flight.HELD
    finally:
        private_redis.resume()
        await cache.close()
        await other.close()
        await raw.aclose()
