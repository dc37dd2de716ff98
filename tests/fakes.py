"""Fakes behind the resolver's ports, for unit tests anywhere in the suite.

- `make_node`: a valid CRM node ("1", "gold", crm_destination), with any field overridden.
- `FakeClock`: a settable clock; pass it as a resolver's, breaker's or cache's clock.
- `FakeCrm`: a `CrmClient` that records every call and answers from a script. It can be
  held at a gate (to keep calls in flight) and can make time pass on a `FakeClock` (to play a
  slow CRM without sleeping): a scripted `CrmTimeout` uses up the whole budget it was given.
- `RecordingCache`: the real `MemoryCache`, recording every `put`, and breakable (every read
  then reports `CacheMiss.ERROR`, every write is dropped), as a failing Redis would.
- `FakeFlights`: a `FlightLock` over a cache, with what the Redis adapter promises (a lease
  only while no answer is cached; the lock expires on the given clock; `settle` stores the
  answer with the cache's `put`, then releases the lock only if it is still its lease's).
  Several resolvers handed one `FakeFlights` and one cache behave like resolver processes
  sharing Redis. Breakable; `on_lead`, `on_peek` and `on_settle` run before every lead, look
  and settle (to move a fake clock, let "another process" act, or hold a settle, at a known
  point without sleeping).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from crm_resolver.memory_cache import MemoryCache
from crm_resolver.ports import (
    Cache,
    CacheMiss,
    CallContext,
    CrmAnswer,
    CrmTimeout,
    Flight,
    Lease,
)
from shared.destination import Destination
from shared.nodes import NodeConfig
from shared.outcomes import Interaction, Verdict

CRM_URL = "https://crm.example.com/identify"

TRUE = CrmAnswer(Verdict.TRUE)
FALSE = CrmAnswer(Verdict.FALSE)


def destination(type_: int, id_: int) -> CrmAnswer:
    return CrmAnswer(Verdict.DESTINATION, Destination(type=type_, id=id_))


def make_node(**overrides: Any) -> NodeConfig:
    fields: dict[str, Any] = {
        "id": "1",
        "name": "gold",
        "interaction": Interaction.CRM_DESTINATION,
        "url": CRM_URL,
        "audio": "prompt",
        "on_identified": "1,3",
        "on_not_identified": "1,4",
    }
    fields.update(overrides)
    return NodeConfig.model_validate(fields)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class CrmCall:
    node_id: str
    customer_id: str
    budget: float
    context: CallContext


class FakeCrm:
    """Answers with the scripted results in order, then with `default` forever."""

    def __init__(
        self,
        results: Iterable[CrmAnswer | Exception] = (),
        *,
        default: CrmAnswer | Exception = TRUE,
        clock: FakeClock | None = None,
        takes: float = 0.0,
    ) -> None:
        self.script: deque[CrmAnswer | Exception] = deque(results)
        self.default = default
        self.clock = clock
        self.takes = takes
        self.calls: list[CrmCall] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def hold(self) -> asyncio.Event:
        """Keep every call waiting until the returned event is set."""
        self.gate = asyncio.Event()
        return self.gate

    async def lookup(
        self, node: NodeConfig, customer_id: str, *, budget: float, context: CallContext
    ) -> CrmAnswer:
        self.calls.append(CrmCall(node.id, customer_id, budget, context))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        result = self.script.popleft() if self.script else self.default
        if self.clock is not None:
            self.clock.advance(budget if isinstance(result, CrmTimeout) else self.takes)
        if isinstance(result, Exception):
            raise result
        return result


class RecordingCache(MemoryCache):
    def __init__(
        self,
        *,
        broken: bool = False,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_entries, clock)
        self.broken = broken
        self.puts: list[tuple[str, str, CrmAnswer, float]] = []

    async def fetch(self, node_id: str, customer_id: str) -> CrmAnswer | CacheMiss:
        if self.broken:
            return CacheMiss.ERROR
        return await super().fetch(node_id, customer_id)

    async def put(self, node_id: str, customer_id: str, answer: CrmAnswer, ttl: float) -> None:
        self.puts.append((node_id, customer_id, answer, ttl))
        if not self.broken:
            await super().put(node_id, customer_id, answer, ttl)


class FakeFlights:
    def __init__(self, cache: Cache, clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.clock = clock
        self.broken = False
        self.on_lead: Callable[[], Awaitable[None]] | None = None
        self.on_peek: Callable[[], Awaitable[None]] | None = None
        self.on_settle: Callable[[], Awaitable[None]] | None = None
        self.leads: list[tuple[str, str, float]] = []
        self.settled: list[tuple[Lease, CrmAnswer | None, float]] = []
        self.peeks = 0
        # (node id, customer id) → (token, expires at)
        self.locks: dict[tuple[str, str], tuple[str, float]] = {}
        self._tokens = itertools.count(1)

    def hold(self, node_id: str, customer_id: str, ttl: float) -> Lease:
        """Take the lock as "another process" would (one that may never release it)."""
        lease = Lease(node_id, customer_id, f"other-{next(self._tokens)}")
        self.locks[(node_id, customer_id)] = (lease.token, self.clock() + ttl)
        return lease

    def held(self, node_id: str, customer_id: str) -> bool:
        lock = self.locks.get((node_id, customer_id))
        return lock is not None and lock[1] > self.clock()

    async def lead(self, node_id: str, customer_id: str, ttl: float) -> Lease | CrmAnswer | Flight:
        self.leads.append((node_id, customer_id, ttl))
        if self.on_lead is not None:
            await self.on_lead()
        found = await self.cache.fetch(node_id, customer_id)
        if self.broken or found is CacheMiss.ERROR:
            return Flight.ERROR
        if isinstance(found, CrmAnswer):
            return found
        if self.held(node_id, customer_id):
            return Flight.HELD
        lease = Lease(node_id, customer_id, f"t{next(self._tokens)}")
        self.locks[(node_id, customer_id)] = (lease.token, self.clock() + ttl)
        return lease

    async def peek(self, node_id: str, customer_id: str) -> CrmAnswer | Flight:
        self.peeks += 1
        if self.on_peek is not None:
            await self.on_peek()
        found = await self.cache.fetch(node_id, customer_id)
        if self.broken or found is CacheMiss.ERROR:
            return Flight.ERROR
        if isinstance(found, CrmAnswer):
            return found
        return Flight.HELD if self.held(node_id, customer_id) else Flight.FREE

    async def settle(self, lease: Lease, answer: CrmAnswer | None = None, ttl: float = 0.0) -> None:
        if self.on_settle is not None:
            await self.on_settle()
        self.settled.append((lease, answer, ttl))
        if answer is not None and ttl > 0:
            await self.cache.put(lease.node_id, lease.customer_id, answer, ttl)
        key = (lease.node_id, lease.customer_id)
        lock = self.locks.get(key)
        if lock is not None and lock[0] == lease.token:
            del self.locks[key]
