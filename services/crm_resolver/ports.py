"""Ports of the resolver logic: the CRM client and the cache, with their value types.

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

from shared.destination import Destination
from shared.nodes import NodeConfig
from shared.outcomes import ErrorCode, Verdict


@dataclass(frozen=True, slots=True)
class CrmAnswer:
    """A CRM's usable answer: true, false, or a destination."""

    verdict: Verdict
    destination: Destination | None = None

    def __post_init__(self) -> None:
        if self.verdict is Verdict.ERROR:
            raise ValueError("a CrmAnswer is never an error; raise CrmError instead")
        if (self.verdict is Verdict.DESTINATION) != (self.destination is not None):
            raise ValueError("destination is set exactly when verdict is 'destination'")

    @property
    def positive(self) -> bool:
        return self.verdict is not Verdict.FALSE


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


class CacheMiss(Enum):
    """Why a cache read has no answer; the value is the `cache_lookups` result label.

    A miss and a broken backend look the same to the call (no answer) but not to the
    operator, and a sentinel keeps the hot path free of allocations.
    """

    MISS = "miss"
    ERROR = "error"


class Cache(Protocol):
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
    """The right to ask the CRM about one (node, customer id); hand it back to `release`."""

    node_id: str
    customer_id: str
    token: str


class FlightLock(Protocol):
    """Merges identical lookups across resolver processes (docs/design.md §7): one asks the CRM, the
    others wait for its answer in the cache. In-process merging is `SingleFlight`'s job; this
    is consulted by the one in-process call per (node, customer id), instead of a separate
    cache read: `lead` is the read.

    Answers are read from the cache's own entries, so an adapter implementing this is the
    adapter of the shared cache: the cached answer and the lock are read in one atomic step,
    a lease is granted only while no answer is cached, and `settle` stores the answer and
    drops the lock in one atomic step (so "no answer and no lock" means the holder let go
    without an answer).
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
