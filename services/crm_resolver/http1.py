"""A lean HTTP/1.1 client over `asyncio.Protocol`: kept-alive connections, a bounded pool.

What belongs here: opening connections (names through an aiohttp-style resolver, TCP, TLS),
writing one request and waiting for its response on a connection, and the pool that keeps
connections alive between requests. What does not: the response's framing and bounds
(`http1_parse`, without I/O), what a status means, timeouts of a whole request (the caller
puts one deadline around it), and anything CRM-specific (`crm_http`).

It does one request at a time per connection (no pipelining) and never follows redirects,
reads proxies from the environment or decompresses. A request is a few hundred bytes: it is
written at once, without flow control.

The pool:
- Connections are keyed by `(scheme, host, port, TLS context)`: requests made with different
  TLS contexts (client identities) never share a connection.
- At most `max_connections` are open (connecting, busy or idle, over all keys). A request
  beyond that closes the longest-idle connection of another key, or waits for one to be
  released; waiting and connecting together take at most `connect_timeout` (TimeoutError).
- A connection goes back to the pool only when its response was read to the end, the server
  did not say `Connection: close` (an HTTP/1.0 answer must say keep-alive) and sent nothing
  after it. Anything else (an error, a cancelled or timed-out request, a body left unread)
  closes it. An idle connection is closed after `keepalive` seconds, and is forgotten as
  soon as the server closes it.
- A request on a reused connection that ends before a single byte of response is sent
  again, once, on a new connection: the server may close an idle connection just as the
  request leaves (the keep-alive race of RFC 9112 §9.3.1). Only requests the caller marks
  `retry_safe` (idempotent) are sent again.

Errors (all but TimeoutError are `HttpClientError`):

    no address, DNS failure, refused by the resolver   → NameNotResolved (a ConnectFailed)
    TCP connect failed (refused, unreachable)           → ConnectFailed
    TLS handshake or certificate verification failed    → TlsFailed (a ConnectFailed)
    the connection ended before a status line           → ConnectionLost
    the answer is not HTTP, or over a bound             → http1_parse.ProtocolError
      (BrokenBody after a valid head, BodyTooLarge)
    no connection within connect_timeout                → TimeoutError

The original exception is the `__cause__`. ConnectFailed and ConnectionLost are also
`ConnectionError`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
import ssl
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiohttp.abc import AbstractResolver
from yarl import URL

from crm_resolver.http1_parse import ProtocolError, Response, ResponseParser

__all__ = [
    "ConnectFailed",
    "ConnectionLost",
    "Http1Client",
    "HttpClientError",
    "NameNotResolved",
    "Observer",
    "Target",
    "TlsFailed",
    "target_of",
]


class HttpClientError(Exception):
    """The request failed; `__cause__` is what failed underneath."""


class ConnectFailed(HttpClientError, ConnectionError):
    """No connection could be made; nothing was sent."""


class NameNotResolved(ConnectFailed):
    """The host name did not resolve (or its resolver refused it)."""


class TlsFailed(ConnectFailed):
    """The TLS handshake failed (an `ssl.SSLCertVerificationError` cause: verification)."""


class ConnectionLost(HttpClientError, ConnectionError):
    """The connection ended (closed, reset, a TLS alert) before a complete status line."""

    def __init__(self, message: str, *, silent: bool) -> None:
        super().__init__(message)
        self.silent = silent
        """Not a single byte of response had come."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a URL means for a request: where to connect and what to write."""

    url: str
    scheme: str
    host: str
    """The host to resolve (an IP address without brackets); TLS names it without a
    trailing dot (certificates have none)."""
    port: int
    host_header: str
    """`Host:` as written: the port when it is not the scheme's, IPv6 in brackets."""
    path: str
    """The request target: path and query (no fragment)."""
    is_ip: bool
    """The host is an IP address: nothing to resolve."""

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@functools.lru_cache(maxsize=1024)
def target_of(url: str) -> Target:
    """The parsed URL (kept: a service asks a few URLs over and over); ValueError when it is
    not an absolute http(s) URL with a host."""
    parsed = URL(url)
    host, port, host_header = parsed.raw_host, parsed.port, parsed.host_port_subcomponent
    if parsed.scheme not in ("http", "https") or not host or port is None or not host_header:
        raise ValueError("not an absolute http(s) URL with a host")
    if host.endswith(".."):  # as aiohttp: one trailing dot marks a fully qualified name
        host = host.rstrip(".") + "."
    try:
        ipaddress.ip_address(host.partition("%")[0])
        is_ip = True
    except ValueError:
        is_ip = False
    return Target(url, parsed.scheme, host, port, host_header, parsed.raw_path_qs or "/", is_ip)


class Observer:
    """Watches requests of a client (`tools.crm_check` shows them); every method does
    nothing here. `tag` is the request's, as its caller passed it. Called synchronously:
    an observer must not block."""

    def request_start(
        self, tag: object, method: str, url: str, headers: Sequence[tuple[str, str]]
    ) -> None:
        """Before anything is done: the headers that will be sent."""

    def dns_start(self, tag: object, host: str) -> None:
        """A name is about to be resolved (not for an IP address or a pooled connection)."""

    def dns_end(self, tag: object, host: str) -> None:
        """The name resolved (and its addresses passed the resolver's checks)."""

    def connect_start(self, tag: object) -> None:
        """A new connection is being made: its name resolved, TCP, and TLS for https (as
        aiohttp's connection_create_start, the span includes DNS)."""

    def connect_end(self, tag: object, transport: asyncio.BaseTransport) -> None:
        """It is made (TLS handshake included)."""

    def request_sent(self, tag: object, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        """The whole request was handed to the connection."""

    def response_head(
        self, tag: object, response: Response, transport: asyncio.BaseTransport
    ) -> None:
        """The status line and headers of the final response came (`transport` tells the
        peer's address and the TLS session: `get_extra_info("peername" / "ssl_object")`)."""

    def early_body(self, tag: object, body: bytes) -> None:
        """The request stopped at the head (a status whose body is not read): the part of
        the body that came with the head."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; at most one request in flight."""

    def __init__(self, pool: Http1Client, key: tuple[Any, ...], loop: asyncio.AbstractEventLoop):
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self.counted = True
        """It holds one of the pool's `max_connections` places."""
        self.reused = False
        self.idle_since = 0.0
        self.closed: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._parser: ResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read_error_body = False
        self._observer: Observer | None = None
        self._tag: object = None

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            # A stream transport (uvloop's do not subclass asyncio.Transport).
            self.transport = cast(asyncio.Transport, transport)
            self.alive = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        waiter, parser = self._waiter, self._parser
        if waiter is not None and parser is not None and not waiter.done():
            try:
                parser.feed_eof()
            except ProtocolError as error:
                if parser.response is None:
                    silent = parser.received == 0
                    lost = ConnectionLost(
                        "the connection ended before a status line"
                        if silent
                        else "the connection ended in the middle of the status line or headers",
                        silent=silent,
                    )
                    lost.__cause__ = exc or error
                    waiter.set_exception(lost)
                else:
                    error.__cause__ = exc
                    waiter.set_exception(error)
            else:
                waiter.set_result(None)  # a body read until close ends here
        if not self.closed.done():
            self.closed.set_result(None)
        self.pool._lost(self)

    def data_received(self, data: bytes) -> None:
        parser, waiter = self._parser, self._waiter
        if parser is None or waiter is None or waiter.done():
            self.abort()  # bytes nobody asked for: the connection cannot be trusted
            return
        try:
            head_before = parser.response
            parser.feed(data)
            response = parser.response
            if response is not None and head_before is None:
                if self._observer is not None:
                    assert self.transport is not None
                    self._observer.response_head(self._tag, response, self.transport)
                if not (self._read_error_body or 200 <= response.status <= 299):
                    # The caller stops at this status: take what of the body came with it
                    # (the connection stays usable if that is all of it), and do not wait.
                    with contextlib.suppress(ProtocolError):
                        parser.start_body()
                    waiter.set_result(None)
                    return
                parser.start_body()
        except ProtocolError as error:
            waiter.set_exception(error)
            return
        if parser.complete:
            waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost ends the response if it can

    # --- used by the client ------------------------------------------------------------------

    def send(
        self,
        data: bytes,
        parser: ResponseParser,
        read_error_body: bool,
        observer: Observer | None,
        tag: object,
    ) -> asyncio.Future[None]:
        """Write a request; the future is done when its response ends (or stops at the head
        of a status outside 2xx, unless `read_error_body`), or fails."""
        assert self.transport is not None
        self._parser = parser
        self._read_error_body = read_error_body
        self._observer = observer
        self._tag = tag
        self._waiter = waiter = self._loop.create_future()
        if not self.alive:  # ended between connecting and now: connection_lost has been
            waiter.set_exception(ConnectionLost("the connection ended", silent=True))
            return waiter
        self.transport.write(data)
        return waiter

    def finished(self) -> bool:
        """Whether the connection can carry another request (the response was read whole)."""
        parser = self._parser
        self._parser = self._waiter = self._observer = self._tag = None
        return (
            self.alive
            and parser is not None
            and parser.complete
            and parser.response is not None
            and parser.response.keep_alive
            and not parser.extra
        )

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()


class Http1Client:
    """Connections and their pool; one per service (`close` ends them all)."""

    def __init__(
        self,
        resolver: AbstractResolver,
        *,
        max_connections: int,
        keepalive: float,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`resolver` resolves names (aiohttp's interface; the caller closes it); `headers`
        go on every request, after Host."""
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._resolver = resolver
        self._limit = max_connections
        self._keepalive = keepalive
        self._default_headers = tuple(headers)
        self._loop = asyncio.get_running_loop()
        self._open = 0
        self._idle: dict[tuple[Any, ...], list[_Connection]] = {}
        self._connections: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._heads: dict[tuple[str, Target], bytes] = {}
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections holding a place: connecting, busy or idle."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def request(
        self,
        method: str,
        target: Target,
        headers: Mapping[str, str],
        body: bytes,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        max_body: int,
        read_error_body: bool = True,
        retry_safe: bool = False,
        observer: Observer | None = None,
        tag: object = None,
    ) -> tuple[Response, bytes]:
        """Send one request and read its response: the final head and the body (at most
        `max_body` bytes). With `read_error_body` False a status outside 200-299 returns at
        its head, with only what of the body came with it. `tls` is required for https.
        Raises as the module docstring says; a caller's deadline cancels it cleanly (the
        connection is closed)."""
        if self._closed:
            raise ConnectFailed("the HTTP client is closed")
        data = self._encode(method, target, headers, body)
        if observer is not None:
            observer.request_start(
                tag, method, target.url, self._header_list(target, headers, body)
            )
        key = (target.scheme, target.host, target.port, tls)
        retry = retry_safe
        while True:
            connection = self._take_idle(key)
            if connection is None:
                connection = await self._new_connection(
                    key, target, tls, connect_timeout, observer, tag
                )
            parser = ResponseParser(max_body)
            try:
                waiter = connection.send(data, parser, read_error_body, observer, tag)
                if observer is not None:
                    observer.request_sent(tag, self._header_list(target, headers, body), body)
                await waiter
            except ConnectionLost as lost:
                self._drop(connection)
                if retry and connection.reused and lost.silent:
                    # Safe only because the caller said the request is idempotent: the
                    # server closed the idle connection as the request left, and saw none of it.
                    retry = False
                    continue
                raise
            except BaseException:
                self._drop(connection)  # an error, a timeout or a cancel mid-response
                raise
            response = parser.response
            assert response is not None
            if observer is not None and not (read_error_body or 200 <= response.status <= 299):
                observer.early_body(tag, bytes(parser.body))
            self._release(connection)
            return response, bytes(parser.body)

    async def close(self) -> None:
        """Close every connection (waiting briefly for them to end) and fail waiters."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the HTTP client is closed"))
        connections = list(self._connections)
        self._idle.clear()
        for connection in connections:
            connection.close()
        pending = [c.closed for c in connections if not c.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        for connection in connections:
            if not connection.closed.done():
                connection.abort()

    # --- the request's bytes -----------------------------------------------------------------

    def _encode(
        self, method: str, target: Target, headers: Mapping[str, str], body: bytes
    ) -> bytes:
        head = self._heads.get((method, target))
        if head is None:
            lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host_header}"]
            lines += [f"{name}: {value}" for name, value in self._default_headers]
            _check_headers(self._default_headers)
            head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
            if len(self._heads) < 1024:
                self._heads[(method, target)] = head
        _check_headers(headers.items())
        extra = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        tail = extra + f"Accept: */*\r\nContent-Length: {len(body)}\r\n\r\n"
        return head + tail.encode("utf-8") + body

    def _header_list(
        self, target: Target, headers: Mapping[str, str], body: bytes
    ) -> list[tuple[str, str]]:
        return [
            ("Host", target.host_header),
            *self._default_headers,
            *headers.items(),
            ("Accept", "*/*"),
            ("Content-Length", str(len(body))),
        ]

    # --- the pool ----------------------------------------------------------------------------

    def _take_idle(self, key: tuple[Any, ...]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_usable = self._loop.time() - self._keepalive
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            if connection.alive and connection.idle_since > oldest_usable:
                return connection
            self._drop(connection)
        return None

    async def _new_connection(
        self,
        key: tuple[Any, ...],
        target: Target,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        observer: Observer | None,
        tag: object,
    ) -> _Connection:
        async with asyncio.timeout(connect_timeout):
            while self._open >= self._limit:
                if self._evict_idle():
                    continue
                waiter = self._loop.create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                        self._wake_one()  # woken but leaving: pass the turn on
                    else:
                        with contextlib.suppress(ValueError):
                            self._waiters.remove(waiter)
                    raise
                found = self._take_idle(key)
                if found is not None:
                    return found
            self._open += 1
            try:
                connection = await self._connect(key, target, tls, observer, tag)
            except BaseException:
                self._open -= 1
                self._wake_one()
                raise
        self._connections.add(connection)
        return connection

    async def _connect(
        self,
        key: tuple[Any, ...],
        target: Target,
        tls: ssl.SSLContext | None,
        observer: Observer | None,
        tag: object,
    ) -> _Connection:
        if target.tls and tls is None:
            raise ValueError("an https request needs a TLS context")
        if observer is not None:
            observer.connect_start(tag)
        if target.is_ip:
            addresses = [target.host]
        else:
            if observer is not None:
                observer.dns_start(tag, target.host)
            try:
                found = await self._resolver.resolve(target.host, target.port, socket.AF_UNSPEC)
            except OSError as exc:
                raise NameNotResolved(f"cannot resolve {target.host[:80]!r}") from exc
            addresses = [result["host"] for result in found]
            if not addresses:
                raise NameNotResolved(f"{target.host[:80]!r} has no address")
            if observer is not None:
                observer.dns_end(tag, target.host)
        loop = self._loop
        failure: BaseException | None = None
        for address in addresses:  # in the resolver's order, one after the other
            try:
                transport, connection = await loop.create_connection(
                    lambda: _Connection(self, key, loop),
                    address,
                    target.port,
                    ssl=tls if target.tls else None,
                    server_hostname=target.host.rstrip(".") if target.tls else None,
                )
            except (ssl.SSLError, ssl.CertificateError) as exc:
                failure = TlsFailed(f"TLS with {target.host[:80]!r} failed")
                failure.__cause__ = exc
            except OSError as exc:
                failure = ConnectFailed(f"cannot connect to {target.host[:80]!r}")
                failure.__cause__ = exc
            else:
                if connection.transport is None:  # uvloop calls connection_made later
                    connection.connection_made(transport)
                if observer is not None:
                    observer.connect_end(tag, transport)
                return connection
        assert failure is not None
        raise failure

    def _release(self, connection: _Connection) -> None:
        if not connection.finished() or self._closed:
            self._drop(connection)
            return
        connection.reused = True
        connection.idle_since = self._loop.time()
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweeper is None:
            self._sweeper = self._loop.call_at(connection.idle_since + self._keepalive, self._sweep)
        if self._waiters:
            self._wake_one()

    def _drop(self, connection: _Connection) -> None:
        """Close a connection that will not be used again and free its place."""
        connection.abort()
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        self._forget(connection)

    def _lost(self, connection: _Connection) -> None:
        """The connection ended (whoever closed it): it is never handed out again."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        self._forget(connection)

    def _forget(self, connection: _Connection) -> None:
        if connection.counted:
            connection.counted = False
            self._open -= 1
            self._connections.discard(connection)
            if self._waiters:
                self._wake_one()

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection of any key, to open one for another key."""
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._drop(oldest)
        return True

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle for `keepalive` seconds; again when the next one will be."""
        self._sweeper = None
        expired = self._loop.time() - self._keepalive
        next_due: float | None = None
        for idle in list(self._idle.values()):
            for connection in list(idle):
                if connection.idle_since <= expired:
                    idle.remove(connection)
                    connection.close()
                    self._forget(connection)
                elif next_due is None or connection.idle_since < next_due:
                    next_due = connection.idle_since
        if next_due is not None and not self._closed:
            self._sweeper = self._loop.call_at(next_due + self._keepalive, self._sweep)


def _check_headers(headers: Iterable[tuple[str, str]]) -> None:
    """ValueError when a header name or value would break its line (a CR, LF or NUL)."""
    for name, value in headers:
        for text in (name, value):
            if "\r" in text or "\n" in text or "\0" in text:
                raise ValueError(f"request header {name[:40]!r} holds a line break or NUL")
