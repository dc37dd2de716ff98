"""Limits that keep the gateway from being a customer-id oracle.

A call to a CRM node tells the caller, by where it is routed, whether the CRM knows the id
they typed; a caller who can try ids fast can learn which ones exist. These limits bound how
fast anyone can try, without slowing down real callers (who try an id once or twice):

- per calling number: CRM lookups per hour (`CALLERID_CALLER_LOOKUPS_PER_HOUR`) and failed
  tries per hour (`CALLERID_CALLER_FAILURES_PER_HOUR`: entries that were invalid or that the
  CRM did not know). Callers without a number (withheld, `anonymous`, `unknown`) share one
  allowance per node (`CALLERID_ANONYMOUS_LOOKUPS_PER_HOUR`), so withholding the number does not
  lift the limit;
- per node: CRM lookups per second (`CALLERID_NODE_LOOKUPS_PER_SECOND`, off by default), which
  also keeps a flood from opening the CRM's circuit breaker for everyone.

A call over a limit is not looked up: it takes the node's failover (`crm_error`, source
`failover`), is counted in `callerid_identifications_limited_total{node, limit}`, and logged at
most once a minute per node. Counts are per gateway process and windows are fixed (an hour, a
second): a rough, cheap bound, not an exact rate. Memory is bounded: at most `max_callers`
calling numbers are remembered, the oldest forgotten first.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger(__name__)

HOUR = 3600.0
LOG_INTERVAL = 60.0
# What Asterisk and carriers put in the calling number when there is none to show.
_NO_NUMBER = re.compile(r"(?i)(?:|anonymous|unknown|restricted|private|unavailable|withheld)")


class Limit(StrEnum):
    """Which limit stopped a lookup: the `limit` label of the metric."""

    CALLER_LOOKUPS = "caller_lookups"
    CALLER_FAILURES = "caller_failures"
    ANONYMOUS_LOOKUPS = "anonymous_lookups"
    NODE_RATE = "node_rate"


@dataclass(frozen=True, slots=True)
class LimitSettings:
    caller_lookups_per_hour: int = 30
    caller_failures_per_hour: int = 10
    anonymous_lookups_per_hour: int = 600
    node_lookups_per_second: int = 0  # 0: off
    max_callers: int = 100_000


@dataclass(slots=True)
class _Window:
    start: float
    lookups: int = 0
    failures: int = 0


def caller_key(number: str) -> str | None:
    """The calling number limits are counted under; None when the call has no number."""
    number = number.strip()
    return None if _NO_NUMBER.fullmatch(number) else number[:64]


class Limits:
    def __init__(
        self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._clock = clock
        # Insertion order, the oldest first. OrderedDict, not dict: evicting the oldest of a
        # full table is then O(1). On a dict, `next(iter(table))` after deleting from the front
        # walks every deleted slot until the next resize: measured 0.4 -> 104 us per call as
        # 100,000 distinct callers turn over (one insert and one eviction each, a CPython dict),
        # i.e. many calling numbers (or spoofed ones) would have slowed every call.
        self._callers: OrderedDict[str, _Window] = OrderedDict()
        self._anonymous: OrderedDict[str, _Window] = OrderedDict()  # per node id
        self._node_second: dict[str, tuple[int, int]] = {}  # node id -> (second, lookups)
        self._last_log: dict[str, float] = {}

    def check(self, node_id: str, caller: str | None) -> Limit | None:
        """Whether a lookup for this call may go ahead; if so, it is counted."""
        now = self._clock()
        limit = self._node_limit(node_id, now) or self._caller_limit(node_id, caller, now)
        if limit is not None:
            self._log(node_id, limit, now)
            return limit
        self._count_lookup(node_id, caller, now)
        return None

    def failed(self, caller: str | None) -> None:
        """The caller's entry was invalid, or the CRM did not know it."""
        if caller is not None:
            self._window(self._callers, caller, self._clock()).failures += 1

    def _node_limit(self, node_id: str, now: float) -> Limit | None:
        per_second = self._settings.node_lookups_per_second
        if not per_second:
            return None
        second, lookups = self._node_second.get(node_id, (-1, 0))
        if second == int(now) and lookups >= per_second:
            return Limit.NODE_RATE
        return None

    def _caller_limit(self, node_id: str, caller: str | None, now: float) -> Limit | None:
        settings = self._settings
        if caller is None:
            window = self._window(self._anonymous, node_id, now)
            full = window.lookups >= settings.anonymous_lookups_per_hour
            return Limit.ANONYMOUS_LOOKUPS if full else None
        window = self._window(self._callers, caller, now)
        if window.lookups >= settings.caller_lookups_per_hour:
            return Limit.CALLER_LOOKUPS
        if window.failures >= settings.caller_failures_per_hour:
            return Limit.CALLER_FAILURES
        return None

    def _count_lookup(self, node_id: str, caller: str | None, now: float) -> None:
        if self._settings.node_lookups_per_second:
            second, lookups = self._node_second.get(node_id, (-1, 0))
            self._node_second[node_id] = (int(now), lookups + 1 if second == int(now) else 1)
        table, key = (self._anonymous, node_id) if caller is None else (self._callers, caller)
        self._window(table, key, now).lookups += 1

    def _window(self, table: OrderedDict[str, _Window], key: str, now: float) -> _Window:
        window = table.get(key)
        if window is None or now - window.start >= HOUR:
            table.pop(key, None)  # re-inserted last: the oldest stay first
            window = table[key] = _Window(now)
            if len(table) > self._settings.max_callers:
                table.popitem(last=False)
        return window

    def _log(self, node_id: str, limit: Limit, now: float) -> None:
        last = self._last_log.get(node_id)
        if last is not None and now - last < LOG_INTERVAL:
            return
        self._last_log[node_id] = now
        log.warning(
            "node %s: lookups refused by the %s limit (an id-guessing attempt, or a limit set "
            "too low); those calls take the node's failover without asking the CRM",
            node_id,
            limit.value,
        )
