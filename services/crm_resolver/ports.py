"""Ports of the resolver logic: the CRM client and the cache, with their value types.

`CrmAnswer` and `CacheMiss` are the shared ones (`shared.crm_answer`, `shared.outcomes`), named
here too so the adapters import their port's types from one place.

Exception tree raised by `CrmClient.lookup` (foreign exceptions — aiohttp, asyncio, json — are
translated into these at the adapter boundary and chained with `from exc`):

    CrmError                    .code is the ErrorCode sent in the reply
    ├── CrmTimeout              no complete answer within the time given
    ├── CrmUnreachable          connection refused/reset, DNS, TLS failure
    ├── CrmHttpStatus           a non-2xx status
    ├── CrmStatusFail           a well-formed answer with "status": "fail"
    └── CrmBadResponse          anything unparseable, oversized or not in the protocol

Cache and flight-lock adapters never raise for backend failures: they fail open
(CacheMiss.ERROR, Flight.ERROR).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from shared.crm_answer import CrmAnswer as CrmAnswer  # re-exported: the port's value type
from shared.nodes import NodeConfig
from shared.outcomes import CacheLookup, ErrorCode


@dataclass(frozen=True, slots=True)
class CallContext:
    """Facts about the call a CRM may optionally receive (off by default)."""

    caller_number: str = ""
    call_id: str = ""


class CrmError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL


class CrmTimeout(CrmError):
    code = ErrorCode.CRM_TIMEOUT


class CrmUnreachable(CrmError):
    code = ErrorCode.CRM_UNREACHABLE


class CrmHttpStatus(CrmError):
    code = ErrorCode.CRM_HTTP_STATUS

    def __init__(self, status: int) -> None:
        super().__init__(f"CRM answered HTTP {status}")
        self.status = status


class CrmStatusFail(CrmError):
    code = ErrorCode.CRM_STATUS_FAIL


class CrmBadResponse(CrmError):
    code = ErrorCode.CRM_BAD_RESPONSE


class CrmClient(Protocol):
    async def lookup(
        self, node: NodeConfig, customer_id: str, *, budget: float, context: CallContext
    ) -> CrmAnswer:
        """Ask the node's CRM about one customer id within `budget` seconds (enforced here)."""
        ...


CacheMiss = CacheLookup
"""Why a cache read has no answer: `fetch` returns CacheLookup.MISS or .ERROR, never HIT (it
returns the answer) nor SKIPPED (a gateway's choice not to read). One vocabulary with the
`cache_lookups` result label, so a reader counts what `fetch` returned as it is. A miss and a
broken backend look the same to the call (no answer) but not to the operator, and a sentinel
keeps the hot path free of allocations."""


class AnswerCache(Protocol):
    """Cached CRM answers by (node id, customer id): what a reader such as the gateway needs."""

    async def fetch(self, node_id: str, customer_id: str) -> CrmAnswer | CacheMiss:
        """The cached answer, MISS, or ERROR when the backend failed (never raises)."""
        ...

    async def put(self, node_id: str, customer_id: str, answer: CrmAnswer, ttl: float) -> None:
        """Store an answer for `ttl` seconds; backend failures are counted, not raised."""
        ...


class Flight(Enum):
    """The state of a (node, customer id) lookup across resolver processes, when no answer
    is there to take."""

    HELD = "held"
    """Another process holds the lookup's lock: it is asking the CRM."""
    FREE = "free"
    """Nobody holds the lock and no answer is cached: whoever held it went away without one
    (its CRM call failed, its answer is not of a kind that is cached, or it died)."""
    ERROR = "error"
    """The backend failed: go on without coordination."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to ask the CRM about one (node, customer id); hand it back to `settle`."""

    node_id: str
    customer_id: str
    token: str


class FlightLock(Protocol):
    """Merges identical lookups across resolver processes (docs/design.md §7): one asks the CRM, the
    others wait for its answer in the cache. In-process merging is `SingleFlight`'s job; this
    is consulted by the one in-process call per (node, customer id), instead of a separate
    cache read: `lead` is the read.

    Answers are read from the cache's own entries, so an adapter implementing this is the
    adapter of the cache: the cached answer and the lock are read in one atomic step, a lease
    is granted only while no answer is cached, and `settle` stores the answer and drops the
    lock in one atomic step (so "no answer and no lock" means the holder let go without an
    answer). A lock lives `ttl` seconds at most: a holder that never settles (killed) blocks
    the others only that long, and a lease that outlived its lock releases nothing (the lock
    may be another holder's by then), though its answer is still stored.
    The same cases run against every adapter: tests/integration/test_cache_contract.py.
    """

    async def lead(self, node_id: str, customer_id: str, ttl: float) -> Lease | CrmAnswer | Flight:
        """The cached answer if there is one; else take the lock for `ttl` seconds, or say why
        not: the lock is HELD by someone else, or ERROR (never FREE). Never raises."""
        ...

    async def peek(self, node_id: str, customer_id: str) -> CrmAnswer | Flight:
        """The cached answer, or whether the lock is still HELD (or FREE, or ERROR)."""
        ...

    def settle(
        self, lease: Lease, answer: CrmAnswer | None = None, ttl: float = 0.0
    ) -> Awaitable[None]:
        """Store `answer` for `ttl` seconds (when given and `ttl` > 0), then give the lock back
        if it is still this lease's (not after it expired and was taken by another), both at
        once. Done when the awaitable is; an adapter may carry it out a little later, batched
        with its other calls. Failures are counted, not raised: the lock then expires."""
        ...


class Cache(AnswerCache, FlightLock, Protocol):
    """The resolver's cache: the answers and the flight lock that guards them, in one adapter
    (the Redis one shared by resolver processes, or the in-process one of a resolver alone).
    Every adapter implements the lock, so the resolver has one way to look an answer up."""
