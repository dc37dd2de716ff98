"""The Redis cache against the real Redis: formats, TTLs, purge, and failing open fast."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from crm_resolver.ports import CacheMiss, CrmAnswer
from crm_resolver.redis_cache import RedisCache
from tests.fakes import FALSE, TRUE, destination

pytestmark = pytest.mark.integration


@pytest.fixture
async def raw(redis_base_url: str, unique_name: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client to look at what the cache wrote; deletes the test's keys afterwards."""
    client = redis.asyncio.Redis.from_url(redis_base_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{unique_name}:*", count=1000)]
    if keys:
        await client.unlink(*keys)
    await client.aclose()


@pytest.fixture
async def cache(
    redis_base_url: str, unique_name: str, raw: redis.asyncio.Redis
) -> AsyncIterator[RedisCache]:
    cache = RedisCache.from_url(redis_base_url, key_prefix=f"{unique_name}:")
    yield cache
    await cache.close()


@pytest.mark.parametrize("answer", [TRUE, FALSE, destination(3, 42)])
async def test_round_trip(cache: RedisCache, answer: CrmAnswer) -> None:
    """What is put comes back equal; another customer or node is a miss."""
    await cache.put("n1", "12345", answer, 60)
    assert await cache.fetch("n1", "12345") == answer
    assert await cache.fetch("n1", "12345") == answer
    assert await cache.fetch("n1", "54321") is CacheMiss.MISS
    assert await cache.fetch("n2", "12345") is CacheMiss.MISS
    assert cache.errors == 0


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
        assert time.monotonic() - started < 0.5
    finally:
        await cache.close()
    assert cache.errors == 3
    assert len(reported) == 3
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
