"""The in-process answer cache and flight lock: embedded mode without Redis, and unit tests.

What belongs here: expiry, a bound on size, and the flight lock (`ports.FlightLock`) with the
same rules as the Redis adapter's Lua scripts, so the resolver runs one algorithm whichever
cache it has. Answers are stored as the `CrmAnswer` objects themselves (immutable, shared),
with no serialisation, because in embedded mode this sits on the hot path of every call. It
never fails, so it never answers `CacheMiss.ERROR` or `Flight.ERROR`.

Eviction is least-recently-used: a hit moves the entry to the young end, and when the cache is
full the oldest entry goes. Expired entries are dropped when they are next looked at, or
evicted by age like any other.

The flight lock, as `crm_resolver.redis_cache` does it (tests/integration/test_cache_contract.py
runs the same cases against both):
- `lead`: the cached answer if there is one; else, if a live lock is there, HELD; else a new
  lock (a fresh token, expiring `ttl` from now) and its lease.
- `peek`: the cached answer, else HELD while a live lock is there, else FREE.
- `settle`: store the answer (when there is one and a TTL of at least a millisecond, also for a
  lease whose lock expired: it is a real CRM answer), then delete the lock only if it still
  carries the lease's token. It is carried out at once, so the resolver's reply never finds
  it pending.
- A lock expires `ttl` after it was taken (a holder that never settles blocks the others that
  long), and is dropped when next looked at. Locks live only while their lookup is in flight
  (the resolver settles every lease, also when cancelled), so the map stays that small.
TTLs below one millisecond store nothing, as in Redis, which keeps TTLs in whole milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from typing import TypeVar

from crm_resolver.ports import CacheMiss, CrmAnswer, Flight, Lease

_Key = tuple[str, str]
_V = TypeVar("_V")

_MIN_TTL = 0.001
"""Seconds: the shortest TTL that stores anything (Redis counts in whole milliseconds)."""


class MemoryCache:
    def __init__(
        self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        # (node id, customer id) → (expires at, answer)
        self._entries: OrderedDict[_Key, tuple[float, CrmAnswer]] = OrderedDict()
        # (node id, customer id) → (expires at, token): the flight locks
        self._locks: dict[_Key, tuple[float, str]] = {}
        self._tokens = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def locked(self, node_id: str, customer_id: str) -> bool:
        """Whether a live flight lock is held for the lookup (what Redis shows of a lock key)."""
        return self._holder((node_id, customer_id)) is not None

    async def fetch(self, node_id: str, customer_id: str) -> CrmAnswer | CacheMiss:
        answer = self._answer((node_id, customer_id))
        return CacheMiss.MISS if answer is None else answer

    async def put(self, node_id: str, customer_id: str, answer: CrmAnswer, ttl: float) -> None:
        self._store((node_id, customer_id), answer, ttl)

    async def lead(self, node_id: str, customer_id: str, ttl: float) -> Lease | CrmAnswer | Flight:
        key = (node_id, customer_id)
        answer = self._answer(key)
        if answer is not None:
            return answer
        if self._holder(key) is not None:
            return Flight.HELD
        token = str(next(self._tokens))
        self._locks[key] = (self._clock() + max(ttl, _MIN_TTL), token)
        return Lease(node_id, customer_id, token)

    async def peek(self, node_id: str, customer_id: str) -> CrmAnswer | Flight:
        key = (node_id, customer_id)
        answer = self._answer(key)
        if answer is not None:
            return answer
        return Flight.FREE if self._holder(key) is None else Flight.HELD

    def settle(
        self, lease: Lease, answer: CrmAnswer | None = None, ttl: float = 0.0
    ) -> asyncio.Future[None]:
        """Store and release now; the returned future is already done."""
        key = (lease.node_id, lease.customer_id)
        if answer is not None:
            self._store(key, answer, ttl)
        if self._holder(key) == lease.token:
            del self._locks[key]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

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
        self._locks.clear()

    def _answer(self, key: _Key) -> CrmAnswer | None:
        """The live answer under `key` (now the most recently used), or None."""
        answer = self._live(self._entries, key)
        if answer is not None:
            self._entries.move_to_end(key)
        return answer

    def _store(self, key: _Key, answer: CrmAnswer, ttl: float) -> None:
        if ttl < _MIN_TTL:
            return
        self._entries[key] = (self._clock() + ttl, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _holder(self, key: _Key) -> str | None:
        """The token of the live lock under `key`, or None."""
        return self._live(self._locks, key)

    def _live(self, table: MutableMapping[_Key, tuple[float, _V]], key: _Key) -> _V | None:
        """What `table` holds under `key` while it has not expired; an expired entry is
        dropped."""
        entry = table.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del table[key]
            return None
        return entry[1]
