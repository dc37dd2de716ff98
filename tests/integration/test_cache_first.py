"""The gateway answers repeat callers from the answer cache and asks a resolver only on a miss."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agi_gateway.cache_first import LEARN_WEIGHT, READ_ABOVE, CacheFirstIdentifier
from agi_gateway.metrics import GatewayMetrics
from crm_resolver.app import build_cache
from shared.crm_answer import CrmAnswer
from shared.messages import IdentifyReply, IdentifyRequest
from shared.nodes import NodeConfig, NodeSet
from shared.outcomes import CacheLookup, Interaction, Source, Verdict
from shared.settings import CommonSettings
from tests import fakes
from tests.fakes import FALSE, TRUE, RecordingCache, destination
from tools.stack import redis_server


def make_node(**overrides: Any) -> NodeConfig:
    return fakes.make_node(**{"allowed_destination_types": [1, 2], **overrides})


class RecordingIdentifier:
    """The identifier behind the cache: records what reaches it and answers from the CRM."""

    def __init__(self) -> None:
        self.requests: list[IdentifyRequest] = []
        self.pending = 0
        self.source = Source.CRM  # where the resolver says its answer came from

    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        self.requests.append(request)
        return IdentifyReply(
            request_id=request.request_id, verdict=Verdict.FALSE, source=self.source
        )


class CountingCache(RecordingCache):
    def __init__(self, *, broken: bool = False) -> None:
        super().__init__(broken=broken)
        self.fetches = 0

    async def fetch(self, node_id: str, customer_id: str) -> CrmAnswer | CacheLookup:
        self.fetches += 1
        return await super().fetch(node_id, customer_id)


class Harness:
    def __init__(self, node: NodeConfig, *, broken: bool = False) -> None:
        self.cache = CountingCache(broken=broken)
        self.inner = RecordingIdentifier()
        self.metrics = GatewayMetrics(CollectorRegistry())
        nodes = NodeSet([node])
        self.identifier = CacheFirstIdentifier(
            self.inner, self.cache, lambda: nodes, self.metrics.cache_lookups
        )

    async def ask(self, node_id: str = "1", customer_id: str = "12345") -> IdentifyReply:
        request = IdentifyRequest(
            request_id="r1", node_id=node_id, customer_id=customer_id, deadline=time.time() + 4
        )
        return await self.identifier.identify(request)

    def lookups(self, result: str, node: str = "gold") -> float:
        return self.metrics.cache_lookups.labels(node, result)._value.get()


async def test_a_cached_answer_is_the_reply_and_no_resolver_is_asked() -> None:
    h = Harness(make_node())
    await h.cache.put("1", "12345", destination(2, 7), 60)
    reply = await h.ask()
    assert (reply.verdict, reply.destination, reply.source) == (
        Verdict.DESTINATION,
        destination(2, 7).destination,
        Source.CACHE,
    )
    assert reply.request_id == "r1"
    assert h.inner.requests == []
    assert (h.lookups("hit"), h.lookups("miss")) == (1, 0)


@pytest.mark.parametrize("answer", [TRUE, FALSE])
async def test_true_and_false_answers_come_from_the_cache_too(answer: Any) -> None:
    h = Harness(make_node(interaction=Interaction.CRM_TRUE_FALSE))
    await h.cache.put("1", "12345", answer, 60)
    reply = await h.ask()
    assert (reply.verdict, reply.source) == (answer.verdict, Source.CACHE)
    assert h.inner.requests == []


async def test_a_miss_goes_to_the_resolver_and_is_counted() -> None:
    h = Harness(make_node())
    reply = await h.ask()
    assert reply.source is Source.CRM
    assert [r.customer_id for r in h.inner.requests] == ["12345"]
    assert (h.lookups("hit"), h.lookups("miss"), h.lookups("error")) == (0, 1, 0)


async def test_a_broken_cache_is_counted_and_the_resolver_answers() -> None:
    h = Harness(make_node(), broken=True)
    reply = await h.ask()
    assert reply.source is Source.CRM
    assert len(h.inner.requests) == 1
    assert (h.lookups("error"), h.lookups("miss")) == (1, 0)


async def test_an_answer_the_node_no_longer_accepts_is_a_miss() -> None:
    # Cached when type 9 was allowed; the node's allow-list has changed since.
    h = Harness(make_node())
    await h.cache.put("1", "12345", destination(9, 2), 60)
    reply = await h.ask()
    assert reply.source is Source.CRM
    assert len(h.inner.requests) == 1
    assert h.lookups("miss") == 1


async def test_a_destination_cached_for_a_true_false_node_is_a_miss() -> None:
    h = Harness(make_node(interaction=Interaction.CRM_TRUE_FALSE))
    await h.cache.put("1", "12345", destination(1, 3), 60)
    await h.ask()
    assert len(h.inner.requests) == 1


async def test_a_node_that_caches_nothing_is_not_looked_up() -> None:
    h = Harness(make_node(cache_ttl_positive=0, cache_ttl_negative=0))
    await h.cache.put("1", "12345", TRUE, 60)  # left over from before the change
    await h.ask()
    assert len(h.inner.requests) == 1
    assert (h.lookups("hit"), h.lookups("miss")) == (0, 0)


async def test_unknown_nodes_go_to_the_resolver_without_a_lookup() -> None:
    h = Harness(make_node())
    await h.ask(node_id="77")
    assert [r.node_id for r in h.inner.requests] == ["77"]
    assert h.lookups("miss") == 0


async def test_pending_is_the_inner_identifiers() -> None:
    h = Harness(make_node())
    h.inner.pending = 3
    assert h.identifier.pending == 3


# Requests until a share starting at 1 falls below READ_ABOVE when none is in the cache.
TO_STOP = next(n for n in range(1, 10_000) if (1 - LEARN_WEIGHT) ** n < READ_ABOVE)


async def test_reads_stop_while_nothing_is_in_the_cache_and_are_counted_skipped() -> None:
    h = Harness(make_node())
    for n in range(TO_STOP + 50):
        await h.ask(customer_id=str(10_000 + n))
    assert h.cache.fetches == TO_STOP
    assert (h.lookups("miss"), h.lookups("skipped")) == (TO_STOP, 50)
    assert len(h.inner.requests) == TO_STOP + 50  # skipped or not, every request is answered


async def test_reads_resume_when_the_resolvers_answer_from_the_cache() -> None:
    h = Harness(make_node())
    for n in range(TO_STOP):
        await h.ask(customer_id=str(10_000 + n))
    await h.cache.put("1", "12345", TRUE, 60)
    assert (await h.ask()).source is Source.CRM  # skipped: the resolver was asked
    h.inner.source = Source.CACHE  # repeat callers again, found by the resolvers
    asked = len(h.inner.requests)
    for _ in range(20):
        await h.ask()
    # Once the share is back above the line the gateway reads, and answers them itself.
    assert h.lookups("hit") > 0
    assert len(h.inner.requests) < asked + 20


async def test_a_dead_cache_stops_the_reads_too() -> None:
    h = Harness(make_node(), broken=True)
    for _ in range(TO_STOP + 10):
        await h.ask()
    assert h.cache.fetches == TO_STOP
    assert h.lookups("skipped") == 10


@pytest.mark.integration
async def test_a_stalled_redis_holds_each_read_at_most_the_cache_timeout(tmp_path: Path) -> None:
    """The gateway's read, through the cache the gateway builds (`build_cache`), of a stalled
    Redis (this test's own, SIGSTOPped: it accepts connections and answers nothing), 20
    callers at once: each read ends at its CALLERID_CACHE_TIMEOUT, connecting included —
    nobody waits out the stall or another caller's connection — is counted as an error, and
    the request goes on to the resolver."""
    timeout = 0.05
    server = redis_server(tmp_path)
    try:
        settings = CommonSettings(
            redis_url=f"redis://127.0.0.1:{server.tcp_port}/0",
            cache_timeout=timeout,
            cache_key_pepper="test-cache-secret-0001",
        )
        async with contextlib.AsyncExitStack() as exits:
            cache = build_cache(exits, settings)
            inner = RecordingIdentifier()
            metrics = GatewayMetrics(CollectorRegistry())
            nodes = NodeSet([make_node()])
            identifier = CacheFirstIdentifier(inner, cache, lambda: nodes, metrics.cache_lookups)
            assert await cache.fetch("1", "1") is CacheLookup.MISS  # connected before the stall
            server.pause()

            async def timed(n: int) -> tuple[IdentifyReply, float]:
                request = IdentifyRequest(
                    request_id=f"r{n}",
                    node_id="1",
                    customer_id=str(10_000 + n),
                    deadline=time.time() + 4,
                )
                started = time.monotonic()
                reply = await identifier.identify(request)
                return reply, time.monotonic() - started

            results = await asyncio.gather(*(timed(n) for n in range(20)))
            server.resume()
        assert all(reply.source is Source.CRM for reply, _ in results)
        assert len(inner.requests) == 20
        assert metrics.cache_lookups.labels("gold", "error")._value.get() == 20
        # Bounded by the timeout (a generous multiple of it), not by the stall.
        assert max(took for _, took in results) < 10 * timeout
    finally:
        server.stop()
