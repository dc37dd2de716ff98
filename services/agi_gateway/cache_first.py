"""Answer repeat callers from the shared answer cache before asking a resolver.

A cached answer is the same whether the gateway or a resolver reads it, but a resolver costs
a RabbitMQ round trip (publish, confirm, delivery, reply, ack) and a resolver wake-up on top
of the one Redis GET: the benchmark measured that as about 60 % of the CPU of a cache hit.
So the gateway reads the cache itself and sends only misses on to the `inner` identifier.

What belongs here: the read and its counting. Writing the cache, merging lookups and asking
the CRM stay with the resolver, which also looks at the cache again (atomically with its
flight lock), so an answer stored between the two reads is still found.

Rules:
- Only nodes that ask the CRM and cache something (a TTL > 0) are looked up.
- An answer the node no longer accepts (its config changed since it was cached) is a miss:
  the resolver asks the CRM again and overwrites it.
- A cache failure (`CacheLookup.ERROR`: Redis down or slower than `CALLERID_CACHE_TIMEOUT`) is
  counted and the request goes on to the resolver, so a dead or stalled Redis costs the call
  one bounded timeout, never the call. The read is one `fetch` of the cache `build_cache`
  made, which the Redis adapter bounds as a whole by that timeout, waiting for a connection
  and connecting included (`crm_resolver.redis_cache`): no read waits on another's.
- The read is skipped while it does not pay. It costs a miss a Redis round trip (the
  benchmark: ~9 % of miss throughput, ~0.6 ms at one call at a time) and saves a hit about
  half its CPU, so it pays once more than about one request in ten is in the cache. Per node,
  the share of requests whose answer was in the cache is tracked as a moving average over
  roughly the last `1 / LEARN_WEIGHT` requests, read or not: a skipped request tells it too,
  by its reply's source (a resolver that answers from the cache, `cache`, found what the read
  would have). Below `READ_ABOVE` the gateway stops reading (counted as `skipped`) until the
  resolvers' replies show repeats again. A node starts out read; a cache failure counts as not
  in the cache, so a dead Redis stops the reads until the resolvers find answers there again.

The gateway knows the resolver's cache only as `AnswerReader`, and whether an answer is usable
and what reply carries it from `shared.crm_answer`: nothing here comes from `crm_resolver`
(tests/unit/test_gateway_imports.py), whose adapter the composition root (`agi_gateway.app`)
passes in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter

from shared.crm_answer import CrmAnswer, answer_reply, judge
from shared.messages import IdentifyReply, IdentifyRequest
from shared.nodes import NodeSet
from shared.outcomes import CacheLookup, Source
from shared.ports import Identifier

READ_ABOVE = 0.1
"""Share of a node's recent requests found in the cache above which the gateway reads it."""

LEARN_WEIGHT = 1 / 64
"""Weight of each request in the moving average of that share (~the last 64 requests)."""


class AnswerReader(Protocol):
    """The one thing the gateway does with the answer cache (a resolver cache adapter)."""

    async def fetch(self, node_id: str, customer_id: str) -> CrmAnswer | CacheLookup:
        """The cached answer, or CacheLookup.MISS, or .ERROR when the backend failed; never
        raises."""
        ...


class CacheFirstIdentifier:
    """An `Identifier` that answers from `cache` when it can and asks `inner` otherwise."""

    def __init__(
        self,
        inner: Identifier,
        cache: AnswerReader,
        nodes: Callable[[], NodeSet],
        lookups: Counter,
    ) -> None:
        self._inner = inner
        self._cache = cache
        self._nodes = nodes
        self._lookups = lookups
        # (node name, result) → counter child: label lookups are not free on the hot path.
        self._children: dict[tuple[str, CacheLookup], Counter] = {}
        # node id → moving average of "the answer was in the cache" (1: read; starts read).
        self._in_cache: dict[str, float] = {}

    @property
    def pending(self) -> int:
        return self._inner.pending

    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        node = self._nodes().get(request.node_id)
        if node is None or not node.caches:
            return await self._inner.identify(request)
        if self._in_cache.get(node.id, 1.0) < READ_ABOVE:
            self._count(node.name, CacheLookup.SKIPPED)
            reply = await self._inner.identify(request)
            self._learn(node.id, reply.source is Source.CACHE)
            return reply
        found = await self._cache.fetch(node.id, request.customer_id)
        if isinstance(found, CrmAnswer):
            if judge(node, found) is None:
                self._count(node.name, CacheLookup.HIT)
                self._learn(node.id, True)
                return answer_reply(request.request_id, found, Source.CACHE)
            found = CacheLookup.MISS  # an answer the node no longer accepts
        self._count(node.name, found)
        self._learn(node.id, False)
        return await self._inner.identify(request)

    def _learn(self, node_id: str, in_cache: bool) -> None:
        share = self._in_cache.get(node_id, 1.0)
        self._in_cache[node_id] = share + LEARN_WEIGHT * (in_cache - share)

    def _count(self, node_name: str, result: CacheLookup) -> None:
        key = (node_name, result)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._lookups.labels(node_name, result.value)
        child.inc()
