"""The Redis answer cache shared by all resolvers (docs/design.md §7).

What belongs here: key and value formats, the Redis calls, and failing open. What does not:
what to cache and for how long (the resolver decides; `put` is told the TTL).

Keys: f"{key_prefix}{node_id}:{HMAC-SHA256(secret, customer_id)}" (hex), the secret being
`CALLERID_CACHE_KEY_PEPPER`. The customer id never appears in a key, and a keyed hash is what
keeps it from being recovered: customer ids are short digit strings, so a plain hash of one
is found by hashing every candidate (a 6-digit id in under a second). The services refuse to
start with a shared Redis and no secret (`shared.settings`). Changing the secret orphans the
old entries, which then just expire.

Values: compact JSON, {"v":"true"}, {"v":"false"} or {"v":"destination","t":1,"i":3}.

Failing open: the cache is an optimisation, so a slow or dead Redis must cost a call a few
milliseconds at most, never the call. Every operation below (`fetch`, `put`, `lead`, `peek`,
and the script that carries settles) runs under one `asyncio.timeout(timeout)`
(`CALLERID_CACHE_TIMEOUT`), which covers all of it: waiting for a pooled connection,
connecting (TCP and redis-py's handshake), sending and reading. On top of that the client
built by `from_url` has the same socket and connect timeouts, no retries (redis-py's default
retries with backoff and its 5 s timeouts do not apply) and no health-check pings, and its
pool is a `BlockingConnectionPool`: redis-py's default `ConnectionPool` connects while holding
one lock for the whole pool, so while Redis stalls (it accepts connections but answers
nothing, e.g. `DEBUG SLEEP`, a fork, a swap storm) every new connection's handshake waits out
its timeout in turn, and operations queue behind each other far past the timeout. The
blocking pool takes a connection under its lock and connects outside it; a caller waits for a
free connection at most `timeout` (and then fails open, counted). An operation cut off by the
timeout leaves no half-used connection behind: redis-py disconnects a connection whose command
or handshake was interrupted, and gives it back to the pool, which connects it afresh when it
is next taken. Every call below is one round trip: `fetch`
is a GET, `put` a SET PX, the flight lock's calls one script or MGET each (EVALSHA; the first
call of a script on a Redis that does not have it yet adds a SCRIPT LOAD), settles riding
with a lead or going in batches. Any failure — timeout, refused connection, pool exhausted,
unreadable value — makes `fetch` return `CacheMiss.ERROR` and `put` do nothing; each one
calls `on_error` and counts in `errors`, and a warning is logged at most once per
`log_every` seconds with the number of failures since the last one.

Flight lock (docs/design.md §7, identical lookups merged across resolver processes): the cache also
implements `ports.FlightLock`, because the lock is only sound when read together with the
answer it guards (`crm_resolver.memory_cache` implements the same rules in process; the same
cases run against both in tests/integration/test_cache_contract.py). Lock keys are
f"{flight_prefix}{node_id}:{digest}", the same digest as the answer's key, the value a random
token, set with PX (the holder's budget, so a killed holder blocks others at most that long).
- `lead` is one Lua script, one round trip: the cached answer if there is one, else SET NX PX
  of the lock. It is the resolver's cache read too (it does no GET before it), so a hit costs
  one round trip, and a lease is never granted after the answer was stored.
- `settle` is Lua too: SET PX of the answer (when there is one to cache; even for a lease
  that expired, as it is a real CRM answer), then the compare-and-delete of the lock, so a
  lease that outlived its PX cannot delete the lock a later holder took. It is queued, not
  sent: the next `lead` carries every queued settle in its own script (settles first), or
  they go together in one script of their own after `settle_delay` (5 ms), whichever comes
  first. So a miss answered by the CRM costs two round trips when it is alone (lead, then
  settle) and one of its own under load, where the next miss's lead carries its settle. The
  resolver queues `settle` after its reply. If it fails, nothing is stored and the lock
  expires by itself; a lead cancelled on the way queues its settles again (a settle is
  idempotent). `close()` sends what is queued first.
- `peek` is one MGET of (answer, lock): atomic, and `settle` stores and releases atomically,
  so "no answer and no lock" really means the holder let go without storing an answer.
The two keys of one lookup are different keys: on Redis Cluster they would need a hash tag;
this deployment runs one Redis (or a primary with replicas), where scripts may touch both.
Failures fail open like the cache's (Flight.ERROR, counted in `errors`).

Doubted locks: an operation that timed out was not necessarily lost. Redis carries out what it
received when it catches up (after a stall, the `lead`s sent meanwhile by every resolver), so
a lead given up on can still take its lock, which nobody then holds or releases; a settle that
failed leaves its lock behind too. A lookup finding such a lock would wait for it in vain
until it expires (its taker's budget). So a lead that finds the lock held less than its own
`ttl` (about its peers' lock time) after an operation of this cache failed says Flight.ERROR
instead of HELD (not counted in `errors`: nothing failed), and its caller goes on without the
lock as after a failure. While Redis is well, locks are trusted as always.

`purge` is an operator action, not the hot path: it raises `CacheUnavailable` (chained from
the Redis error) instead of failing open, because "0 entries purged" would be a lie.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from crm_resolver.batch import Batch
from crm_resolver.ports import CacheMiss, CrmAnswer, Flight, Lease
from shared.destination import Destination
from shared.outcomes import Verdict
from shared.redis_url import fail_fast_client, parse_redis_url

log = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "callerid:cache:"
DEFAULT_FLIGHT_PREFIX = "callerid:flight:"
DEFAULT_TIMEOUT = 0.05
"""Seconds an operation may take, all of it (CALLERID_CACHE_TIMEOUT's default)."""
_PURGE_BATCH = 500
# The longest a settle waits for a lead to carry it. Short next to the 10 ms a waiting
# resolver polls at, long next to the gap between two misses under load.
SETTLE_DELAY = 0.005

_TRUE = b'{"v":"true"}'
_FALSE = b'{"v":"false"}'
_TRUE_ANSWER = CrmAnswer(Verdict.TRUE)
_FALSE_ANSWER = CrmAnswer(Verdict.FALSE)

# What a failed Redis call can raise through redis-py's asyncio client; anything else is a bug
# and propagates.
_FAILURES = (RedisError, OSError, TimeoutError, ValueError, KeyError, TypeError)


# The settles a script carries first: for each (answer, lock) key pair from KEYS[k] on, and
# (token, answer value or '' for none, answer PX) from ARGV[a] on, store the answer (if any),
# then delete the lock only if it is still this token's.
def _settles_from(k: int, a: int) -> str:
    return f"""
for i = {k}, #KEYS, 2 do
  local a = {a} + (i - {k}) / 2 * 3
  if ARGV[a + 1] ~= '' then redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[a + 2]) end
  if redis.call('GET', KEYS[i + 1]) == ARGV[a] then redis.call('DEL', KEYS[i + 1]) end
end
"""


# KEYS: answer, lock, then the settles' pairs. ARGV: token, PX, then the settles' triples.
# Returns the answer, 1 (lease granted) or 0 (held). The settles go first: a lookup of a
# customer whose answer was just settled finds it.
_LEAD = (
    _settles_from(3, 3)
    + """
local answer = redis.call('GET', KEYS[1])
if answer then return answer end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
)
# Only settles (when no lead came to carry them).
_SETTLE = _settles_from(1, 1) + "return 0\n"

# One settle: its (answer, lock) keys, its (token, value, PX) arguments, and who waits for it.
_Settle = tuple[list[str], list[Any], "asyncio.Future[None]"]


class CacheUnavailable(Exception):
    """Redis could not carry out an explicit (non hot-path) operation such as a purge."""


class RedisCache:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        on_error: Callable[[], None] | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        flight_prefix: str = DEFAULT_FLIGHT_PREFIX,
        pepper: str = "",
        log_every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        settle_delay: float = SETTLE_DELAY,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """`timeout` bounds each operation as a whole (see the module docstring), whatever
        the client's own timeouts are."""
        if key_prefix == flight_prefix:
            raise ValueError("the answer and flight-lock key prefixes must differ")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._client = client
        self._timeout = timeout
        self._on_error = on_error
        self._prefix = key_prefix
        self._flight_prefix = flight_prefix
        self._lead = client.register_script(_LEAD)
        self._settle = client.register_script(_SETTLE)
        self._hasher = hmac.new(pepper.encode(), digestmod=hashlib.sha256)
        self._log_every = log_every
        self._clock = clock
        self._last_log: float | None = None
        self._failed_at: float | None = None  # when an operation last failed (`clock`)
        self._unlogged = 0
        self.errors = 0
        # Settles waiting for a lead to carry them; after `settle_delay` they go on their own.
        self._settles: Batch[_Settle] = Batch(settle_delay, self._run_settles)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = 64,
        on_error: Callable[[], None] | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        flight_prefix: str = DEFAULT_FLIGHT_PREFIX,
        pepper: str = "",
        log_every: float = 30.0,
    ) -> RedisCache:
        """A cache over a client built for failing fast (see the module docstring), for any
        form of `CALLERID_REDIS_URL` (`shared.redis_url`: one Redis, or a primary found
        through Sentinel); `RedisUrlError` (a ConfigError) for a URL that names none.

        `max_connections` bounds the pool: when Redis stalls, operations beyond it wait for a
        free connection within their `timeout`, then fail (counted as errors), instead of
        opening ever more connections.
        """
        client = fail_fast_client(
            parse_redis_url(url), timeout=timeout, max_connections=max_connections
        )
        return cls(
            client,
            on_error=on_error,
            key_prefix=key_prefix,
            flight_prefix=flight_prefix,
            pepper=pepper,
            log_every=log_every,
            timeout=timeout,
        )

    def key(self, node_id: str, customer_id: str) -> str:
        return self._keys(node_id, customer_id)[0]

    def flight_key(self, node_id: str, customer_id: str) -> str:
        return self._keys(node_id, customer_id)[1]

    def _keys(self, node_id: str, customer_id: str) -> list[str]:
        """[answer key, lock key] of one lookup (the KEYS of the flight-lock scripts): one
        digest, and the only place either key is spelled."""
        digest = self._digest(customer_id)
        return [f"{self._prefix}{node_id}:{digest}", f"{self._flight_prefix}{node_id}:{digest}"]

    def _digest(self, customer_id: str) -> str:
        hasher = self._hasher.copy()
        hasher.update(customer_id.encode())
        return hasher.hexdigest()

    async def fetch(self, node_id: str, customer_id: str) -> CrmAnswer | CacheMiss:
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._client.get(self.key(node_id, customer_id))
            if raw is None:
                return CacheMiss.MISS
            return _decode(raw)
        except _FAILURES as exc:
            self._failed("read", exc)
            return CacheMiss.ERROR

    async def put(self, node_id: str, customer_id: str, answer: CrmAnswer, ttl: float) -> None:
        ttl_ms = int(ttl * 1000)
        if ttl_ms <= 0:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(self.key(node_id, customer_id), _encode(answer), px=ttl_ms)
        except _FAILURES as exc:
            self._failed("write", exc)

    async def lead(self, node_id: str, customer_id: str, ttl: float) -> Lease | CrmAnswer | Flight:
        token = secrets.token_hex(8)
        settles = self._settles.take()
        keys, args = _script_input(settles)
        try:
            async with asyncio.timeout(self._timeout):
                found = await self._lead(
                    keys=[*self._keys(node_id, customer_id), *keys],
                    args=[token, max(1, int(ttl * 1000)), *args],
                )
        except _FAILURES as exc:
            # Its own timeout included: the settles failed with it, their locks expire by
            # themselves.
            self._failed("flight lock", exc)
            _settled(settles)
            return Flight.ERROR
        except asyncio.CancelledError:
            # Cancelled from outside. Sent or not, nobody knows: queue them again. A settle is
            # idempotent (the same SET, and a delete only of its own token), so carrying one
            # out twice is harmless.
            self._settles.add(settles, first=True)
            raise
        _settled(settles)
        try:
            if isinstance(found, bytes | str):
                return _decode(found)
            if found == 1:
                return Lease(node_id, customer_id, token)
        except _FAILURES as exc:
            self._failed("flight lock", exc)
            return Flight.ERROR
        if self._failed_at is not None and self._clock() - self._failed_at < ttl:
            # Maybe nobody's lock (see "Doubted locks" in the module docstring): go without.
            return Flight.ERROR
        return Flight.HELD

    async def peek(self, node_id: str, customer_id: str) -> CrmAnswer | Flight:
        try:
            async with asyncio.timeout(self._timeout):
                answer, holder = await self._client.mget(self._keys(node_id, customer_id))
            if answer is not None:
                return _decode(answer)
            return Flight.FREE if holder is None else Flight.HELD
        except _FAILURES as exc:
            self._failed("flight lock", exc)
            return Flight.ERROR

    def settle(
        self, lease: Lease, answer: CrmAnswer | None = None, ttl: float = 0.0
    ) -> asyncio.Future[None]:
        """Queue the store-and-release; the returned future is done once it has been carried
        out (or has failed: counted, and the lock expires by itself).

        It rides with the next `lead` of this cache, in the same script and round trip, or
        goes on its own after `settle_delay`, whichever comes first. Under load a miss then
        costs one round trip of its own instead of two; the lock is held at most
        `settle_delay` longer, which waiters polling every 10 ms hardly see.
        """
        ttl_ms = int(ttl * 1000)
        value = _encode(answer) if answer is not None and ttl_ms > 0 else b""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = self._keys(lease.node_id, lease.customer_id)
        self._settles.add([(keys, [lease.token, value, ttl_ms], done)])
        return done

    async def flush(self) -> None:
        """Send the queued settles now and wait until every settle sent is finished."""
        await self._settles.flush()

    async def _run_settles(self, settles: list[_Settle]) -> None:
        keys, args = _script_input(settles)
        try:
            async with asyncio.timeout(self._timeout):
                await self._settle(keys=keys, args=args)
        except _FAILURES as exc:
            self._failed("write and flight lock release", exc)
        finally:
            _settled(settles)

    async def purge(self, node_id: str, customer_id: str | None = None) -> int:
        """Delete one customer's entry, or every entry of a node; return how many went."""
        try:
            if customer_id is not None:
                return int(await self._client.unlink(self.key(node_id, customer_id)))
            pattern = f"{_glob_escape(self._prefix)}{_glob_escape(node_id)}:*"
            removed = 0
            batch: list[Any] = []
            async for key in self._client.scan_iter(match=pattern, count=_PURGE_BATCH):
                batch.append(key)
                if len(batch) >= _PURGE_BATCH:
                    removed += int(await self._client.unlink(*batch))
                    batch.clear()
            if batch:
                removed += int(await self._client.unlink(*batch))
            return removed
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(f"purging node {node_id!r}: {exc}") from exc

    async def close(self) -> None:
        await self.flush()
        await self._client.aclose()

    def _failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        if self._on_error is not None:
            self._on_error()
        now = self._failed_at = self._clock()
        if self._last_log is not None and now - self._last_log < self._log_every:
            self._unlogged += 1
            return
        suppressed, self._unlogged, self._last_log = self._unlogged, 0, now
        log.warning(
            "Redis cache %s failed, going on without the cache: %s: %s "
            "(%d more failures since the last warning)",
            what,
            type(exc).__name__,
            # The operation's own timeout says nothing of itself.
            str(exc) or f"not done within {self._timeout * 1000:.0f} ms",
            suppressed,
        )


def _script_input(settles: list[_Settle]) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV that carry `settles` in a script, in order."""
    keys: list[str] = []
    args: list[Any] = []
    for settle_keys, settle_args, _ in settles:
        keys += settle_keys
        args += settle_args
    return keys, args


def _settled(settles: list[_Settle]) -> None:
    for _, _, done in settles:
        if not done.done():
            done.set_result(None)


def _encode(answer: CrmAnswer) -> bytes:
    if answer.verdict is Verdict.TRUE:
        return _TRUE
    if answer.verdict is Verdict.FALSE:
        return _FALSE
    assert answer.destination is not None
    return (
        f'{{"v":"destination","t":{answer.destination.type},"i":{answer.destination.id}}}'
    ).encode()


def _decode(raw: bytes | str) -> CrmAnswer:
    """Raise ValueError/KeyError/TypeError for anything this module did not write."""
    if raw == _TRUE:
        return _TRUE_ANSWER
    if raw == _FALSE:
        return _FALSE_ANSWER
    value = json.loads(raw)
    verdict = Verdict(value["v"])
    if verdict is Verdict.DESTINATION:
        return CrmAnswer(verdict, Destination(type=value["t"], id=value["i"]))
    if verdict is Verdict.ERROR:
        raise ValueError("an error is never cached")
    return CrmAnswer(verdict)


_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)
