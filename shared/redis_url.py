"""Redis URLs (`CALLERID_REDIS_URL`, and `CALLERID_NODES` when it names Redis): parse one into a
typed target, and build the clients the services use from it.

What belongs here: the URL forms, their one-line errors, and how a client for each form is
put together (pool, timeouts, retries, Sentinel discovery). What does not: what the clients
are used for, and how long an operation may take as a whole (the cache bounds every
operation with `asyncio.timeout`, `crm_resolver.redis_cache`).

Forms:
- `redis://`, `rediss://`, `unix://`: one Redis, read by redis-py's own `from_url` (query
  options such as `?ssl_ca_certs=` included).
- `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]`: a
  primary with replicas watched by Redis Sentinel. The hosts are sentinels (port 26379 when
  left out); `service_name` is the name the sentinels monitor the primary by; the password
  (and user) are the data nodes'. Sentinels are asked without AUTH unless the URL says
  `?sentinel_password=...` (percent-encoded; e.g. Bitnami's Redis chart with
  `auth.sentinel: true`, its default, wants the data nodes' password there too): a sentinel
  without a password refuses an AUTH, so neither can be the default for both. The client
  asks the sentinels for the current primary whenever it opens a connection.
- `rediss+sentinel://...`: the same over TLS, to the sentinels and to the data nodes, with the
  certificate and host name verified (against the system's CAs, or the file given as
  `?ssl_ca_certs=/path`). These two are the only query options of the sentinel forms.

How a Sentinel client follows a failover (redis-py 6.4, `redis/asyncio/sentinel.py`, and the
same in `redis/sentinel.py`): `SentinelManagedConnection.connect` asks the sentinels for the
primary (`Sentinel.discover_master`: `SENTINEL MASTERS` of each sentinel in turn, skipping one
that does not answer or that sees the primary down) and connects there; when the address
changed, the pool drops its idle connections. A connection to a primary that died fails its
command and is disconnected, so it asks again next time. When the sentinels demote a live
primary they also close its clients' connections (`CLIENT KILL TYPE normal`, Redis'
sentinel.c), with the same effect; a connection that still reaches it as a replica gets
READONLY on a write (Redis 7 refuses any script there), which that connection turns into a
ConnectionError after disconnecting itself. Until the sentinels have promoted a replica
(`down-after-milliseconds`, then the election), they still name the dead primary or none:
operations fail, fast (refused connections), and the cache fails open.

Errors: a bad URL is a `RedisUrlError` (a `ConfigError`, so the services' start-up reports it
as one line), whose message names the setting and what is wrong, never the password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.nodes import ConfigError

SETTING = "CALLERID_REDIS_URL"
SENTINEL_PORT = 26379
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
EXAMPLE = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mymaster"

_SERVICE_NAME = re.compile(r"[^\s/]{1,128}")


class RedisUrlError(ConfigError):
    """A Redis URL that cannot be used; the message names the setting and the problem."""


@dataclass(frozen=True)
class PlainRedis:
    """One Redis, by a URL redis-py reads itself."""

    url: str


@dataclass(frozen=True)
class SentinelRedis:
    """The primary Sentinel names `service_name`, found through `sentinels`."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    sentinel_password: str | None = None


RedisTarget = PlainRedis | SentinelRedis


def parse_redis_url(url: str, setting: str = SETTING) -> RedisTarget:
    """The target `url` names; `RedisUrlError` naming `setting` when it names none."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in PLAIN_SCHEMES + SENTINEL_SCHEMES:
        raise RedisUrlError(
            f"{setting}: {redacted(url)!r} is not a Redis URL: expected redis://, rediss://, "
            f"unix://, redis+sentinel:// or rediss+sentinel:// (e.g. {EXAMPLE})"
        )
    if scheme.lower() in PLAIN_SCHEMES:
        return _plain(url, setting)
    return _sentinel(url, scheme.lower() == "rediss+sentinel", setting)


def _plain(url: str, setting: str) -> PlainRedis:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is asked for
    except ValueError:
        raise RedisUrlError(
            f"{setting}: {redacted(url)!r}: the port must be a number 0-65535"
        ) from None
    if parts.scheme != "unix":
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise RedisUrlError(
                f"{setting}: {redacted(url)!r}: the path is the db number (e.g. /0), not {db!r}"
            )
    return PlainRedis(url)


def _sentinel(url: str, tls: bool, setting: str) -> SentinelRedis:
    where = f"{setting}: {redacted(url)!r}"
    rest = url.partition("://")[2]
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    if fragment:
        raise RedisUrlError(f"{where}: a '#' fragment means nothing here; remove it")
    options = _options(query, tls, where)
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise RedisUrlError(
                f"{where}: write the password as ':password@' (or 'user:password@') "
                "before the sentinels"
            )
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels = tuple(_sentinel_address(item, where) for item in hosts.split(","))
    segments = path.split("/") if path else []
    if not segments or not segments[0]:
        raise RedisUrlError(
            f"{where}: the service name Sentinel monitors the primary by must follow the "
            f"sentinels (e.g. {EXAMPLE})"
        )
    if len(segments) > 2 or (len(segments) == 2 and not segments[1]):
        raise RedisUrlError(
            f"{where}: after the sentinels comes /service_name or /service_name/db, nothing more"
        )
    service = unquote(segments[0])
    if not _SERVICE_NAME.fullmatch(service):
        raise RedisUrlError(
            f"{where}: service name {service!r}: 1-128 characters, no spaces or '/'"
        )
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit() or len(segments[1]) > 5:
            raise RedisUrlError(f"{where}: the db after the service name must be a number")
        db = int(segments[1])
    return SentinelRedis(
        sentinels,
        service,
        db,
        username,
        password,
        tls,
        options.get("ssl_ca_certs"),
        options.get("sentinel_password"),
    )


def _sentinel_address(item: str, where: str) -> tuple[str, int]:
    item = item.strip()
    if not item:
        raise RedisUrlError(
            f"{where}: name at least one sentinel as host:port, the hosts separated by "
            f"commas (e.g. {EXAMPLE})"
        )
    if item.startswith("["):  # [v6]:port
        host, bracket, port_text = item[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise RedisUrlError(f"{where}: sentinel {item!r}: write an IPv6 host as [::1]:26379")
        port_text = port_text[1:]
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise RedisUrlError(f"{where}: sentinel {item!r} has no host")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisUrlError(f"{where}: sentinel {item!r}: the port must be a number 1-65535")
    return host, int(port_text)


def _options(query: str, tls: bool, where: str) -> dict[str, str]:
    """The sentinel forms' query options (the last of each), checked."""
    if not query:
        return {}
    try:
        given = {name: values[-1] for name, values in parse_qs(query, strict_parsing=True).items()}
    except ValueError:
        raise RedisUrlError(f"{where}: cannot read the query (name=value&...)") from None
    unknown = sorted(set(given) - {"ssl_ca_certs", "sentinel_password"})
    if unknown:
        raise RedisUrlError(
            f"{where}: unknown option(s) {', '.join(unknown)}: the sentinel forms take only "
            "sentinel_password=... and (with rediss+sentinel://) ssl_ca_certs=FILE"
        )
    if "ssl_ca_certs" in given and not tls:
        raise RedisUrlError(f"{where}: ssl_ca_certs=FILE is for rediss+sentinel:// (TLS) only")
    return given


_SENTINEL_PASSWORD = re.compile(r"(sentinel_password=)[^&#]*")


def redacted(url: str) -> str:
    """The URL without its passwords, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return _SENTINEL_PASSWORD.sub(r"\1***", f"{scheme}{sep}{authority}{slash}{path}")


# --------------------------------------------------------------------------- clients


def _fail_fast(timeout: float) -> dict[str, Any]:
    """Connection options for a client that gives up at once: `timeout` for connecting and for
    each read, no retries, no health-check pings."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry_on_error": [],
        "health_check_interval": 0,
    }


def _tls(target: SentinelRedis) -> dict[str, Any]:
    if not target.tls:
        return {}
    return {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": target.ca_file}


def _sentinel_options(target: SentinelRedis, retry: Any, timeout: float) -> dict[str, Any]:
    """How the sentinels themselves are asked: the same timeouts, no retries, TLS when the
    data nodes have it, and their own password when they want one."""
    auth = {"password": target.sentinel_password} if target.sentinel_password else {}
    return {**_fail_fast(timeout), "retry": retry, **_tls(target), **auth}


class _AsyncSentinelAsker(redis.asyncio.Redis):
    """A sentinel's client, shown by its address alone: redis-py writes the clients it asked
    into its MasterNotFoundError, which ends up in log lines, and a client's own repr shows
    its password (`?sentinel_password=`)."""

    def __repr__(self) -> str:
        options = self.connection_pool.connection_kwargs
        return f"<sentinel {options.get('host')}:{options.get('port')}>"


class _SyncSentinelAsker(redis.Redis):
    """`_AsyncSentinelAsker`, synchronous (the node source's)."""

    def __repr__(self) -> str:
        options = self.connection_pool.connection_kwargs
        return f"<sentinel {options.get('host')}:{options.get('port')}>"


class _AsyncSentinel(redis.asyncio.sentinel.Sentinel):
    """redis-py's Sentinel manager, asking through `_AsyncSentinelAsker`s."""

    def __init__(self, sentinels: tuple[tuple[str, int], ...], **options: Any) -> None:
        super().__init__(sentinels, **options)  # type: ignore[no-untyped-call]
        # Replaced before any was used: building a client opens no connection.
        self.sentinels = [
            _AsyncSentinelAsker(host=host, port=port, **self.sentinel_kwargs)
            for host, port in sentinels
        ]


class _SyncSentinel(redis.sentinel.Sentinel):
    """redis-py's Sentinel manager (synchronous), asking through `_SyncSentinelAsker`s."""

    def __init__(self, sentinels: tuple[tuple[str, int], ...], **options: Any) -> None:
        super().__init__(sentinels, **options)  # type: ignore[no-untyped-call]
        self.sentinels = [
            _SyncSentinelAsker(host=host, port=port, **self.sentinel_kwargs)
            for host, port in sentinels
        ]


class _BlockingSentinelPool(
    redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool
):
    """Sentinel's pool (connections that ask the sentinels where the primary is) with the
    blocking pool's `get_connection`: a connection is taken under the pool's lock and
    connected outside it, and a caller waits for a free one at most `timeout`
    (`crm_resolver.redis_cache` says why the default pool's connect-under-lock is not
    acceptable). Both `__init__`s take their own arguments and pass the rest on along the MRO
    (this pool's `service_name` and `sentinel_manager`, then the blocking pool's
    `max_connections` and `timeout`); beyond that, neither overrides what the other defines."""


class _AsyncSentinelClient(redis.asyncio.Redis):
    """The primary's client, which closes the sentinels' clients with itself."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                await sentinel.aclose()


class _SyncSentinelClient(redis.Redis):
    """The primary's client (synchronous), which closes the sentinels' clients with itself."""

    def close(self) -> None:
        super().close()
        pool = self.connection_pool
        if isinstance(pool, redis.sentinel.SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                sentinel.close()


def fail_fast_client(
    target: RedisTarget, *, timeout: float, max_connections: int
) -> redis.asyncio.Redis:
    """An asyncio client that fails within `timeout` instead of retrying or waiting, over a
    blocking pool of at most `max_connections` (`crm_resolver.redis_cache` says why).

    With Sentinel, the sentinels are asked with the same timeouts and no retries: a sentinel
    that is down costs a refused connection, and the next one is asked."""
    options = {**_fail_fast(timeout), "retry": AsyncRetry(NoBackoff(), 0)}
    if isinstance(target, PlainRedis):
        try:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                target.url,
                max_connections=max_connections,
                timeout=timeout,  # the longest wait for a free connection
                **options,
            )
        except ValueError as exc:
            raise RedisUrlError(f"{SETTING}: {redacted(target.url)!r}: {exc}") from exc
        return redis.asyncio.Redis.from_pool(pool)  # the client closes the pool with itself
    sentinel = _AsyncSentinel(
        target.sentinels,
        sentinel_kwargs=_sentinel_options(target, AsyncRetry(NoBackoff(), 0), timeout),
    )
    client: redis.asyncio.Redis = sentinel.master_for(
        target.service_name,
        redis_class=_AsyncSentinelClient,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=timeout,
        db=target.db,
        username=target.username,
        password=target.password,
        **options,
        **_tls(target),
    )
    return client


def sync_client(
    target: RedisTarget, *, timeout: float, setting: str = SETTING, **options: Any
) -> redis.Redis:
    """A synchronous client with `timeout` for connecting and reading and no retries (the
    node source polls: its next poll is the retry); `options` go to redis-py as they are."""
    fail_fast = {**_fail_fast(timeout), "retry": Retry(NoBackoff(), 0), **options}
    if isinstance(target, PlainRedis):
        try:
            return redis.Redis.from_url(target.url, **fail_fast)
        except ValueError as exc:
            raise RedisUrlError(f"{setting}: {redacted(target.url)!r}: {exc}") from exc
    sentinel = _SyncSentinel(
        target.sentinels,
        sentinel_kwargs=_sentinel_options(target, Retry(NoBackoff(), 0), timeout),
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service_name,
        redis_class=_SyncSentinelClient,
        db=target.db,
        username=target.username,
        password=target.password,
        **fail_fast,
        **_tls(target),
    )
    return client
