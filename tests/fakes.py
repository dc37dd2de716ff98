"""Fakes behind the resolver's ports, for unit tests anywhere in the suite.

- `make_node`: a valid CRM node ("1", "gold", crm_destination), with any field overridden.
- `FakeClock`: a settable clock; pass it as a resolver's, breaker's or cache's clock.
- `FakeCrm`: a `CrmClient` that records every call and answers from a script. It can be
  held at a gate (to keep calls in flight) and can make time pass on a `FakeClock` (to play a
  slow CRM without sleeping): a scripted `CrmTimeout` uses up the whole budget it was given.
- `RecordingCache`: the real `MemoryCache` (answers and flight lock), recording every answer
  written to it (`puts`: by `put`, or by a `settle` that stores one), and breakable: every
  `fetch` then reports `CacheMiss.ERROR`, every `lead` and `peek` `Flight.ERROR`, every write
  and settle is dropped (its lock then expires by itself), as a Redis that is down does.
  tests/integration/test_cache_contract.py runs the same cases against it and real Redis.
  Several resolvers handed one cache behave like resolver processes sharing Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from crm_resolver.memory_cache import MemoryCache
from crm_resolver.ports import CacheMiss, CallContext, CrmAnswer, CrmTimeout, Flight, Lease
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

    async def lead(self, node_id: str, customer_id: str, ttl: float) -> Lease | CrmAnswer | Flight:
        if self.broken:
            return Flight.ERROR
        return await super().lead(node_id, customer_id, ttl)

    async def peek(self, node_id: str, customer_id: str) -> CrmAnswer | Flight:
        if self.broken:
            return Flight.ERROR
        return await super().peek(node_id, customer_id)

    def settle(
        self, lease: Lease, answer: CrmAnswer | None = None, ttl: float = 0.0
    ) -> asyncio.Future[None]:
        if answer is not None and ttl > 0:
            self.puts.append((lease.node_id, lease.customer_id, answer, ttl))
        if not self.broken:
            return super().settle(lease, answer, ttl)
        dropped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        dropped.set_result(None)
        return dropped
