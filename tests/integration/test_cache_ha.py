"""The answer cache on Redis Sentinel: the primary dies, calls go on, the cache comes back.

Real parts: a private Sentinel deployment (`tools.redis_sentinel`: a primary, two replicas and
three sentinels on free loopback ports, failure detection after 1 s), and for the load test a
real stack (`tools.stack.Stack`: gateway over the shared RabbitMQ with a unique name prefix,
two resolvers, a mock CRM) given `CALLERID_REDIS_URL=redis+sentinel://...`.

- Under a steady load the primary is killed with SIGKILL, twice (the second time the primary
  the first failover promoted). The cache fails open, so every call is decided right, from
  the CRM or the cache: no failover, no `crm_error`. Recovery (kill → the services' cache hits
  again, read from their /metrics) is printed and noted.
- The flight lock and the answers, through the adapter the services build
  (`RedisCache.from_url`), across a crash (SIGKILL) and a handover (`SENTINEL FAILOVER`, the
  old primary living on as a replica): a lock is exclusive again
  afterwards, an answer stored before is found, an answer stored after lands on the new
  primary.
- The URL's other parts for real: `rediss+sentinel://` against a deployment speaking only TLS
  (the certificate verified), passwords for the nodes and for the sentinels, and
  `CALLERID_NODES=redis+sentinel://...` reading OMniLeads' hashes across a failover.

Numbers are printed and appended to the file named by CALLERID_TEST_NOTES.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import redis.asyncio

from crm_resolver.ports import CacheMiss, CrmAnswer, Flight, Lease
from crm_resolver.redis_cache import RedisCache
from shared.destination import Destination
from shared.node_sources import RedisHashSource, source_from_setting
from shared.nodes import ConfigError, NodeConfig
from shared.outcomes import Verdict
from tests.integration.test_amqps import make_certificate
from tests.integration.test_node_sources import GOLD_HASHES
from tests.stack_load import SLACK, Load, check_calls, note, until
from tools.redis_sentinel import SentinelCluster, Tls
from tools.stack import Stack, metric_value

T = TypeVar("T")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# The budget and rate leave room for a box whose two cores are shared with other work: the
# test is about decisions staying right through a failover, not about latency (a starved
# stack misses a 1 s budget at 40 calls/s with no fault at all).
CRM_TIMEOUT = 2.0
RATE = 25  # calls started per second
KILLS = 2
PEPPER = "test-cache-ha-secret-0001"
TRUE = CrmAnswer(Verdict.TRUE)
ROUTE = CrmAnswer(Verdict.DESTINATION, Destination(type=1, id=7))
# The adapter tests are about following the primary, not about the 50 ms bound.
GENEROUS_TIMEOUT = 0.5


def need_sentinel() -> None:
    if shutil.which("redis-sentinel") is None:
        message = (
            "redis-sentinel is not installed: `apt-get install redis-sentinel` "
            "(tools/ensure_services.sh does it as root)"
        )
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelCluster]:
    need_sentinel()
    with SentinelCluster(tmp_path / "sentinel") as cluster:
        yield cluster


@dataclass
class CacheSamples:
    """The stack's cache lookups (gateway + resolvers) by result, sampled every `every` s."""

    stack: Stack
    every: float = 0.1
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (t, hits, errors)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def read(self) -> tuple[float, float]:
        pages = [p.metrics() for p in [self.stack.gateway, *self.stack.resolver_procs] if p]
        names = ("callerid_gateway_cache_lookups_total", "callerid_cache_lookups_total")
        hits = sum(metric_value(text, name, result="hit") for text in pages for name in names)
        errors = sum(metric_value(text, name, result="error") for text in pages for name in names)
        return hits, errors

    async def run(self) -> None:
        while not self._stopping.is_set():
            hits, errors = await asyncio.to_thread(self.read)
            self.samples.append((time.monotonic(), hits, errors))
            await asyncio.sleep(self.every)  # sampling pace, not a wait

    def stop(self) -> None:
        self._stopping.set()

    def recovered_at(self, killed_at: float) -> float | None:
        """When hits came back after the kill: the first sample, after errors were seen,
        whose hits rose while its errors did not."""
        seen_errors = False
        before = [s for s in self.samples if s[0] <= killed_at]
        if not before:
            return None
        previous = before[-1]
        for sample in self.samples[len(before) :]:
            if sample[2] > previous[2]:
                seen_errors = True
            elif seen_errors and sample[1] > previous[1]:
                return sample[0]
            previous = sample
        return None

    def last_error_at(self, killed_at: float, until_t: float) -> float:
        last = killed_at
        previous = None
        for sample in self.samples:
            rose = previous is not None and sample[2] > previous[2]
            if rose and killed_at < sample[0] <= until_t:
                last = sample[0]
            previous = sample
        return last


async def test_primary_killed_under_load_calls_right_and_cache_back(
    sentinels: SentinelCluster, tmp_path: Path, amqp_url: str
) -> None:
    """RATE (25) calls/s over a gateway and two resolvers whose cache is the Sentinel
    deployment; its primary is killed with SIGKILL KILLS (2) times. Every call, before,
    during and after, is decided right within its budget (the cache fails open to the CRM:
    no failover allowed); after each kill the cache errors stop and hits come back once a
    replica is promoted. Recovery times are noted."""
    stack = Stack(
        tmp_path / "stack",
        amqp_url=amqp_url,
        redis_url=sentinels.url,
        resolvers=2,
        crm_timeout=CRM_TIMEOUT,
        crm_latency_ms=10,
        crm_latency_jitter_ms=20,
        extra_env={"CALLERID_CACHE_TIMEOUT": "0.05"},
    )
    with stack:
        load = Load(stack, rate=RATE, concurrency=40)
        samples = CacheSamples(stack)
        runner = asyncio.create_task(load.run())
        sampler = asyncio.create_task(samples.run())
        figures: list[str] = []
        try:
            await until(lambda: load.ended_in("before") >= 60, 30, "load before the kill")
            await until(lambda: samples.read()[0] > 0, 10, "cache hits before the kill")
            for kill in range(1, KILLS + 1):
                phase = f"fault{kill}"
                load.phase = phase
                killed_at = time.monotonic()
                old = await asyncio.to_thread(sentinels.kill_primary)
                new = await asyncio.to_thread(sentinels.wait_promoted, old, 30)
                promoted = time.monotonic() - killed_at
                await until(
                    lambda k=killed_at: samples.recovered_at(k) is not None,
                    30,
                    f"cache hits after kill {kill}",
                )
                back = samples.recovered_at(killed_at)
                assert back is not None
                load.phase = f"after{kill}"
                await until(lambda p=f"after{kill}": load.ended_in(p) >= 60, 30, "load after")
                errors_until = samples.last_error_at(killed_at, time.monotonic())
                figures.append(
                    f"kill {kill}: primary {old} -> {new} promoted after {promoted:.2f} s, "
                    f"cache hits again after {back - killed_at:.2f} s, "
                    f"last cache error {errors_until - killed_at:.2f} s after the kill"
                )
                if kill < KILLS:
                    await asyncio.to_thread(sentinels.wait_healthy, new)
        finally:
            load.stop()
            samples.stop()
            await runner
            await sampler

        calls = load.calls
        hits, errors = samples.read()
        assert stack.gateway is not None
        gateway_hits = metric_value(
            stack.gateway.metrics(), "callerid_gateway_cache_lookups_total", result="hit"
        )
        during = [c for c in calls if c.during_fault]
        note(
            f"sentinel primary SIGKILL x{KILLS} at {RATE} calls/s: calls={len(calls)} "
            f"during_faults={len(during)} cache_hits={hits:.0f} (gateway {gateway_hits:.0f}) "
            f"cache_errors={errors:.0f} | " + "; ".join(figures)
        )
        problems = check_calls(calls, CRM_TIMEOUT + SLACK, ())
        assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"
        assert errors > 0  # the kills really reached the services' cache
        assert gateway_hits > 0  # the gateway's cache-first read goes through Sentinel too


def primary_client(cluster: SentinelCluster) -> redis.Redis:
    return redis.Redis(port=cluster.primary_port())


def replicated(cluster: SentinelCluster) -> None:
    """Until every live replica has what the primary acknowledged (WAIT): the test is about
    following the primary, not about what asynchronous replication may lose."""
    client = primary_client(cluster)
    try:
        replicas = sum(1 for p in cluster.data.values() if p.alive) - 1
        assert client.execute_command("WAIT", replicas, 5000) >= replicas
    finally:
        client.close()


async def first(within: float, what: str, attempt: Callable[[], Awaitable[T | None]]) -> T:
    """What `attempt` returns once it returns something (it is retried every 50 ms): for
    operations that fail open while the sentinels promote a replica."""
    deadline = time.monotonic() + within
    while True:
        value = await attempt()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(0.05)  # the other party is the sentinels' election


async def lease_of(cache: RedisCache, node: str, customer: str) -> Lease:
    async def attempt() -> Lease | None:
        found = await cache.lead(node, customer, 5.0)
        return found if isinstance(found, Lease) else None

    return await first(15, f"a lease on {customer}", attempt)


async def held(cache: RedisCache, node: str, customer: str) -> bool:
    """Until this cache's `lead` says HELD (a cache that failed lately says ERROR for a lock it
    finds, for the lock's ttl: see "Doubted locks" in crm_resolver.redis_cache)."""

    async def attempt() -> bool | None:
        return True if await cache.lead(node, customer, 0.3) is Flight.HELD else None

    return await first(15, f"{customer} held", attempt)


async def check_lock_and_answers(a: RedisCache, b: RedisCache, customer: str) -> None:
    """Two resolvers' caches: the lock is exclusive, released with the answer, and both
    read the answer."""
    lease = await lease_of(a, "n", customer)
    assert await held(b, "n", customer)
    assert await b.peek("n", customer) is Flight.HELD
    await a.settle(lease, ROUTE, 30)
    assert await b.peek("n", customer) == ROUTE
    assert await b.lead("n", customer, 5.0) == ROUTE
    assert await a.fetch("n", customer) == ROUTE


async def test_flight_lock_and_answers_right_after_primary_killed(
    sentinels: SentinelCluster,
) -> None:
    """Two caches built like the resolvers' (`RedisCache.from_url` on the sentinel URL):
    an answer stored and replicated before the primary's SIGKILL is read after it; while no
    primary is promoted the operations fail open (ERROR, never a wrong answer); afterwards
    a lock is exclusive again, released with its answer, and the answer is on the new
    primary."""
    a = RedisCache.from_url(sentinels.url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
    b = RedisCache.from_url(sentinels.url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
    try:
        await check_lock_and_answers(a, b, "10001")
        await a.put("n", "10002", TRUE, 30)
        await asyncio.to_thread(replicated, sentinels)

        old = await asyncio.to_thread(sentinels.kill_primary)
        # Failing open until a replica is promoted (or already the right thing after it).
        assert await a.fetch("n", "10002") in (CacheMiss.ERROR, TRUE)
        claim = await b.lead("n", "10003", 5.0)
        assert claim is Flight.ERROR or isinstance(claim, Lease)
        new = await asyncio.to_thread(sentinels.wait_promoted, old)

        async def fetched() -> bool | None:
            return True if await a.fetch("n", "10002") == TRUE else None

        assert await first(15, "the answer stored before the kill", fetched)
        await check_lock_and_answers(a, b, "10004")
        raw = redis.Redis(port=new)
        try:
            assert raw.get(a.key("n", "10004")) is not None
        finally:
            raw.close()
    finally:
        await a.close()
        await b.close()


async def test_flight_lock_right_after_handover_to_a_replica(
    sentinels: SentinelCluster,
) -> None:
    """`SENTINEL FAILOVER`: the old primary lives on as a replica (the sentinels close its
    clients' connections as they demote it; one that reached it later would get READONLY on
    a write, which redis-py's Sentinel connection turns into a disconnect): the next
    operations ask the sentinels and go to the new primary. The lock and the answers are
    right there, and what was written after the handover is on the new primary, not stuck
    on the old one."""
    a = RedisCache.from_url(sentinels.url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
    b = RedisCache.from_url(sentinels.url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
    try:
        await check_lock_and_answers(a, b, "20001")  # pooled connections to the old primary
        await asyncio.to_thread(replicated, sentinels)
        old = await asyncio.to_thread(sentinels.failover)
        new = await asyncio.to_thread(sentinels.wait_promoted, old)
        await asyncio.to_thread(sentinels.wait_healthy, new)
        assert sentinels.role(old) == "slave"
        assert await a.fetch("n", "20001") == ROUTE
        await check_lock_and_answers(a, b, "20002")
        raw = redis.Redis(port=new)
        try:
            assert raw.get(a.key("n", "20002")) is not None
            assert raw.get(a.flight_key("n", "20002")) is None  # released with the answer
        finally:
            raw.close()
    finally:
        await a.close()
        await b.close()


async def test_rediss_sentinel_url_speaks_tls_to_sentinels_and_primary(tmp_path: Path) -> None:
    """`rediss+sentinel://...?ssl_ca_certs=FILE` against a deployment that speaks only TLS
    (sentinels, primary, replicas; a certificate for 127.0.0.1 made for this test): the lock
    and the answers work through it; without the CA file (the certificate not trusted) or
    through `redis+sentinel://` (no TLS) the same deployment gets nowhere, and fails open."""
    need_sentinel()
    cert, key = make_certificate(tmp_path)
    with SentinelCluster(tmp_path / "sentinel", tls=Tls(cert, key)) as cluster:
        assert cluster.url.startswith("rediss+sentinel://")
        a = RedisCache.from_url(cluster.url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
        b = RedisCache.from_url(cluster.url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
        plain_url = cluster.url.replace("rediss+", "redis+").partition("?")[0]
        plain = RedisCache.from_url(plain_url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
        # Without the test's CA the certificate is not trusted (the system's CAs are used).
        untrusted_url = cluster.url.partition("?")[0]
        untrusted = RedisCache.from_url(untrusted_url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
        try:
            await check_lock_and_answers(a, b, "30001")
            for failing in (plain, untrusted):
                assert await failing.fetch("n", "30001") is CacheMiss.ERROR
                assert failing.errors == 1
        finally:
            for cache in (a, b, plain, untrusted):
                await cache.close()


async def test_omnileads_hashes_read_through_sentinel_across_a_failover(
    sentinels: SentinelCluster,
) -> None:
    """`CALLERID_NODES=redis+sentinel://...`: OMniLeads' hashes are read from the primary the
    sentinels name, and again from the promoted replica after the primary's SIGKILL (a
    failed read in between is a ConfigError, which keeps the last good set on reload)."""
    client = primary_client(sentinels)
    try:
        with client.pipeline() as pipe:
            for key, fields in GOLD_HASHES.items():
                pipe.hset(key, mapping=fields)
            pipe.execute()
    finally:
        client.close()
    await asyncio.to_thread(replicated, sentinels)
    source = source_from_setting(sentinels.url, omnileads_confirm=False)
    assert isinstance(source, RedisHashSource)
    try:
        before = list(await source.load())
        assert len(before) == len(GOLD_HASHES)
        old = await asyncio.to_thread(sentinels.kill_primary)
        await asyncio.to_thread(sentinels.wait_promoted, old)

        async def after() -> list[NodeConfig] | None:
            try:
                return list(await source.load())
            except ConfigError:
                return None

        assert await first(15, "the hashes from the promoted replica", after) == before
    finally:
        await source.close()


async def test_passwords_of_data_nodes_and_of_sentinels(tmp_path: Path) -> None:
    """A deployment whose data nodes and sentinels all want a password (one with characters a
    URL must percent-encode): the URL's password goes to the data nodes and
    `?sentinel_password=` to the sentinels, and the lock and answers work. Without the
    sentinels' password (they refuse to name the primary) or with a wrong one for the data
    nodes, the cache fails open."""
    need_sentinel()
    password = "p@ss&w:rd/1"
    with SentinelCluster(tmp_path / "sentinel", password=password) as cluster:
        url = cluster.url
        assert "sentinel_password=" in url
        a = RedisCache.from_url(url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
        b = RedisCache.from_url(url, timeout=GENEROUS_TIMEOUT, pepper=PEPPER)
        no_sentinel_password = RedisCache.from_url(
            url.partition("?")[0], timeout=GENEROUS_TIMEOUT, pepper=PEPPER
        )
        wrong = RedisCache.from_url(
            url.replace(url.partition("@")[0], "redis+sentinel://:wrong"),
            timeout=GENEROUS_TIMEOUT,
            pepper=PEPPER,
        )
        try:
            await check_lock_and_answers(a, b, "40001")
            for failing in (no_sentinel_password, wrong):
                assert await failing.fetch("n", "40001") is CacheMiss.ERROR
                assert failing.errors == 1
        finally:
            for cache in (a, b, no_sentinel_password, wrong):
                await cache.close()
