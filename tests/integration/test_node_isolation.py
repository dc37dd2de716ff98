"""One bad node never takes the others down: per-node config isolation (real Redis, files)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared.node_sources import NodeStore, RedisHashSource, YamlFileSource
from shared.nodes import ConfigError
from tests.integration.test_node_sources import (
    GOLD_HASHES,
    GOLD_YAML,
    redis_db_url,
    write,
    write_hashes,
)

REDIS_DB = 9  # this file's own db, flushed by the fixture


@pytest.fixture
async def hashes(redis_base_url: str) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    url = redis_db_url(redis_base_url, REDIS_DB)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    try:
        yield url, client
    finally:
        await client.flushdb()
        await client.aclose()


def node(number: int, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        **GOLD_HASHES["OML:CUSTOMERID:1"],
        "NAME": f"node-{number}",
        "FALSEDST": f"1,{number}",
    }
    fields.update(changes)
    return fields


@pytest.mark.integration
async def test_a_bad_hash_is_refused_alone_and_the_last_good_version_stays(
    hashes: tuple[str, aioredis.Redis], caplog: pytest.LogCaptureFixture
) -> None:
    """A NAME with a byte that is not UTF-8 and an AUDIO longer than any AGI command takes
    are refused alone, each named with node and field, once: the service starts with the other
    nodes, later edits of them apply, a good node edited into a bad one keeps its last good
    version, and a fixed node comes into service."""
    url, client = hashes
    await write_hashes(client, {f"OML:CUSTOMERID:{n}": node(n) for n in (1, 2, 3, 4)})
    await client.hset("OML:CUSTOMERID:2", "NAME", b"caf\xe9")
    await client.hset("OML:CUSTOMERID:3", "AUDIO", "oml/" + "a" * 300)
    source = RedisHashSource(url)
    store = NodeStore(source)
    try:
        with caplog.at_level(logging.INFO, logger="shared.node_sources"):
            started = await store.load_initial()
            assert [n.id for n in started] == ["1", "4"]
            assert "name (NAME): not valid UTF-8" in store.rejected["2"]
            assert "audio (AUDIO): must be an Asterisk sound name" in store.rejected["3"]
            for _ in range(3):
                await store.reload()
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 2  # once per node, not once per poll

            await client.hset("OML:CUSTOMERID:4", "FALSEDST", "1,44")  # a good edit
            await client.hset("OML:CUSTOMERID:1", "TIMEOUT", "soon")  # a bad edit
            assert await store.reload()
            current = store.current
            four, one = current.get("4"), current.get("1")
            assert four is not None
            assert str(four.on_not_identified) == "1,44"
            assert one is not None
            assert one.timeout == 5  # its last good version
            assert "timeout (TIMEOUT)" in store.rejected["1"]

            await client.hset("OML:CUSTOMERID:2", "NAME", "cafe")  # fixed
            await client.hset("OML:CUSTOMERID:1", "TIMEOUT", "7")
            assert await store.reload()
            assert sorted(n.id for n in store.current) == ["1", "2", "4"]
            assert "2" not in store.rejected
            assert "1" not in store.rejected
            messages = [r.getMessage() for r in caplog.records]
            assert any("node 2 from" in m and "valid again" in m for m in messages)
    finally:
        await source.close()


@pytest.mark.integration
async def test_a_node_stranded_by_another_is_refused_alone(
    hashes: tuple[str, aioredis.Redis],
) -> None:
    """A type-9 destination naming a node that is not in service leaves out only the node
    that names it; a second node with a name already in use is left out, the first stays."""
    url, client = hashes
    await write_hashes(
        client,
        {
            "OML:CUSTOMERID:1": node(1, TRUEDST="9,2"),
            "OML:CUSTOMERID:2": node(2, TIMEOUT="never"),
            "OML:CUSTOMERID:3": node(3),
            "OML:CUSTOMERID:4": node(4, NAME="node-3"),
        },
    )
    source = RedisHashSource(url)
    store = NodeStore(source)
    try:
        nodes = await store.load_initial()
        assert [n.id for n in nodes] == ["3"]
        assert "type 9 names node 2" in store.rejected["1"]
        assert "'node-3' is used by another node" in store.rejected["4"]
    finally:
        await source.close()


async def test_a_yaml_file_is_all_or_nothing_at_start_and_node_by_node_after(
    tmp_path: Path,
) -> None:
    """At start-up a file with a bad node fails, naming it (a deploy should fail loudly);
    once running, an edit that breaks one node keeps that node's last good version while the
    others' edits apply."""
    path = write(tmp_path / "nodes.yaml", GOLD_YAML.replace("timeout: 5", "timeout: forever"))
    with pytest.raises(ConfigError, match="timeout"):
        await NodeStore(YamlFileSource(path)).load_initial()
    write(path, GOLD_YAML)
    store = NodeStore(YamlFileSource(path))
    await store.load_initial()
    edited = GOLD_YAML.replace("timeout: 5", "timeout: forever").replace(
        "any-entry", "any-entry-renamed"
    )
    write(path, edited)
    assert await store.reload()
    assert sorted(store.current.names()) == ["any-entry-renamed", "gold-customers"]
    assert "timeout" in store.rejected["1"]


@pytest.mark.integration
async def test_polling_5000_unchanged_hashes_validates_nothing_and_keeps_the_loop_free(
    hashes: tuple[str, aioredis.Redis],
) -> None:
    """With 5,000 hashes, a poll that finds nothing changed validates no node, and the first
    load validates them off the event loop: the loop keeps answering meanwhile."""
    url, client = hashes
    async with client.pipeline(transaction=False) as pipe:
        for n in range(1, 5001):
            pipe.hset(f"OML:CUSTOMERID:{n}", mapping=node(n))
        await pipe.execute()
    source = RedisHashSource(url)
    store = NodeStore(source)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    beat = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        await store.load_initial()
        elapsed = time.monotonic() - started
        assert len(store.current) == 5000
        assert ticks > 1  # the loop ran while 5,000 nodes were validated
        first = source._builder.validations
        assert first == 5000
        await store.reload()
        assert source._builder.validations == first  # nothing changed, nothing validated
        await client.hset("OML:CUSTOMERID:77", "TIMEOUT", "9")
        await store.reload()
        assert source._builder.validations == first + 1
        print(f"5,000 hashes: first load {elapsed:.2f} s with {ticks} loop ticks")
    finally:
        stop.set()
        await beat
        await source.close()
