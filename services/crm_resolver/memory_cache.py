"""The in-process answer cache: embedded mode without Redis, and unit tests.

What belongs here: expiry and a bound on size, nothing else. Answers are stored as the
`CrmAnswer` objects themselves (immutable, shared), with no serialisation, because in
embedded mode this sits on the hot path of every call. It never fails, so `fetch` never
returns `CacheMiss.ERROR`.

Eviction is least-recently-used: a hit moves the entry to the young end, and when the cache is
full the oldest entry goes. Expired entries are dropped when they are next looked at, or
evicted by age like any other.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from crm_resolver.ports import CacheMiss, CrmAnswer


class MemoryCache:
    def __init__(
        self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        # (node id, customer id) → (expires at, answer)
        self._entries: OrderedDict[tuple[str, str], tuple[float, CrmAnswer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def fetch(self, node_id: str, customer_id: str) -> CrmAnswer | CacheMiss:
        key = (node_id, customer_id)
        entry = self._entries.get(key)
        if entry is None:
            return CacheMiss.MISS
        if entry[0] <= self._clock():
            del self._entries[key]
            return CacheMiss.MISS
        self._entries.move_to_end(key)
        return entry[1]

    async def put(self, node_id: str, customer_id: str, answer: CrmAnswer, ttl: float) -> None:
        if ttl <= 0:
            return
        key = (node_id, customer_id)
        self._entries[key] = (self._clock() + ttl, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def purge(self, node_id: str, customer_id: str | None = None) -> int:
        """Forget one customer's answer, or every answer of a node; return how many."""
        if customer_id is not None:
            return 1 if self._entries.pop((node_id, customer_id), None) is not None else 0
        doomed = [key for key in self._entries if key[0] == node_id]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    async def close(self) -> None:
        self._entries.clear()
