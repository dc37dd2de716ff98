"""The HTTP/1.1 client under the CRM lookups (`crm_resolver.http1`, `http1_parse`).

The parser is fed recorded answers whole and one byte at a time. The client runs against
raw asyncio servers on 127.0.0.1 written here, which count the connections they accept and
answer each request on each connection as a test scripts it (keep-alive, closing, stalling,
breaking the protocol).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import uvloop
from aiohttp.abc import AbstractResolver, ResolveResult

from crm_resolver.crm_http import CrmHttpSettings, HttpCrmClient
from crm_resolver.crm_response import MAX_BODY
from crm_resolver.http1 import ConnectionLost, Http1Client, target_of
from crm_resolver.http1_parse import (
    BodyTooLarge,
    BrokenBody,
    ProtocolError,
    ResponseParser,
)
from crm_resolver.ports import CrmBadResponse, CrmHttpStatus, CrmTimeout, CrmUnreachable
from tests.unit.test_crm_http import CONTEXT, TRUE, node, read_request
from tests.waiting import eventually

OK_BODY = b'{"status": "ok", "destination": "true"}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY)

# --- the parser, without I/O ---------------------------------------------------------------


def parse(data: bytes, *, step: int | None = None, eof: bool = False) -> ResponseParser:
    """Feed `data` whole or `step` bytes at a time, going into the body at the head."""
    parser = ResponseParser(MAX_BODY)
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        parser.feed(piece)
        if parser.response is not None:
            parser.start_body()
    if eof:
        parser.feed_eof()
    return parser


@pytest.mark.parametrize("step", [None, 1, 7])
@pytest.mark.parametrize(
    ("data", "eof", "body", "keep_alive"),
    [
        pytest.param(OK, False, OK_BODY, True, id="content-length"),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
            False,
            OK_BODY,
            True,
            id="interim-responses",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n",
            False,
            b"abcdef",
            True,
            id="chunked-with-trailers",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\nServer: old\n\nuntil the end",
            True,
            b"until the end",
            False,
            id="http10-bare-lf-until-close",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nhi",
            False,
            b"hi",
            True,
            id="http10-keep-alive",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: x, close\r\nContent-Length: 2\r\n\r\nhi",
            False,
            b"hi",
            False,
            id="connection-close",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", False, b"", True, id="204-no-body"),
    ],
)
def test_parser_frames_bodies(
    data: bytes, eof: bool, body: bytes, keep_alive: bool, step: int | None
) -> None:
    """Content-Length, chunked (extensions and trailers dropped), until close, interim 1xx
    skipped, and whether the connection may be kept: the same whole or byte by byte."""
    parser = parse(data, step=step, eof=eof)
    assert parser.complete
    assert parser.response is not None
    assert parser.response.status in (200, 204)
    assert bytes(parser.body) == body
    assert parser.response.keep_alive is keep_alive
    assert parser.extra == b""


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param(b"HELLO\r\n\r\n", ProtocolError, id="not-a-status-line"),
        pytest.param(b"HTTP/2 200 OK\r\n\r\n", ProtocolError, id="not-http-1"),
        pytest.param(b"HTTP/1.1 20 OK\r\n\r\n", ProtocolError, id="short-status"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n", ProtocolError, id="space-before-colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: y\r\n z\r\n\r\n", ProtocolError, id="folded"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", ProtocolError, id="bare-cr"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n", ProtocolError, id="nul"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            ProtocolError,
            id="two-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", ProtocolError, id="negative"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
            BodyTooLarge,
            id="declared-too-large",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n",
            BrokenBody,
            id="chunk-size-0x",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            BrokenBody,
            id="chunk-longer-than-said",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (MAX_BODY + 1),
            BodyTooLarge,
            id="chunk-too-large",
        ),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", ProtocolError, id="101"),
    ],
)
def test_parser_refuses_what_is_not_http(data: bytes, error: type[ProtocolError]) -> None:
    """Malformed heads and framings raise ProtocolError (BrokenBody once the head was good,
    BodyTooLarge over the cap), whole or byte by byte; the message quotes no peer bytes."""
    for step in (None, 1):
        with pytest.raises(error) as caught:
            parse(data, step=step)
        assert "\n" not in str(caught.value)


def test_parser_bounds_the_head() -> None:
    """A line up to 8 KiB and 100 fields pass; one byte or one field more is refused, even
    before the head's end arrives."""
    assert parse(b"HTTP/1.1 204 OK\r\nX: " + b"v" * 8189 + b"\r\n\r\n").complete
    with pytest.raises(ProtocolError, match="over 8192"):
        parse(b"HTTP/1.1 204 OK\r\nX: " + b"v" * 8190 + b"\r\n\r\n")
    with pytest.raises(ProtocolError, match="over 8192"):
        parse(b"HTTP/1.1 204 OK\r\nX: " + b"v" * 9000)  # no line end yet: refused already
    fields = b"".join(b"X-%d: 1\r\n" % n for n in range(100))
    assert parse(b"HTTP/1.1 204 OK\r\n" + fields + b"\r\n").complete
    with pytest.raises(ProtocolError, match="more than 100"):
        parse(b"HTTP/1.1 204 OK\r\n" + fields + b"X: 1\r\n\r\n")


def test_parser_eof() -> None:
    """The end of the connection ends a body read until close; it cuts short a body with a
    length (BrokenBody), and before a head it is a ProtocolError with no response."""
    with pytest.raises(BrokenBody):
        parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", eof=True)
    with pytest.raises(BrokenBody):
        parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", eof=True)
    empty = ResponseParser(MAX_BODY)
    with pytest.raises(ProtocolError):
        empty.feed_eof()
    assert empty.response is None
    assert empty.received == 0


# --- a scripted server -----------------------------------------------------------------------

# (connection number, request number on it, writer) → keep reading requests on it?
Script = Callable[[int, int, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class Server:
    url: str
    accepts: int = 0
    requests: list[tuple[int, bytes]] = field(default_factory=list)
    """(connection number, the request's bytes), in arrival order."""


@asynccontextmanager
async def serve(script: Script, host: str = "127.0.0.1") -> AsyncIterator[Server]:
    server = Server(url="")
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        number = server.accepts
        server.accepts += 1
        try:
            for count in range(1000):
                request = await read_request(reader)
                server.requests.append((number, request))
                if not await script(number, count, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up
        finally:
            writer.close()
            handlers.discard(task)

    listener = await asyncio.start_server(handle, host, 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/identify"
    try:
        yield server
    finally:
        listener.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await listener.wait_closed()


def answers(reply: bytes, *, keep: bool = True) -> Script:
    """Every request gets `reply`; `keep` False closes the connection after it."""

    async def answer(_: int, __: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply)
        await writer.drain()
        return keep

    return answer


@asynccontextmanager
async def crm_client(**settings: float) -> AsyncIterator[HttpCrmClient]:
    client = HttpCrmClient(CrmHttpSettings(**settings))  # type: ignore[arg-type]
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def lookup(client: HttpCrmClient, url: str, budget: float = 2.0) -> object:
    return await client.lookup(node(url), "1", budget=budget, context=CONTEXT)


# --- keep-alive ------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection() -> None:
    """Two lookups in a row travel over one TCP connection."""
    async with serve(answers(OK)) as server, crm_client() as client:
        assert await lookup(client, server.url) == TRUE
        assert await lookup(client, server.url) == TRUE
    assert server.accepts == 1
    assert [number for number, _ in server.requests] == [0, 0]


async def test_the_request_is_the_omnileads_request() -> None:
    """Method, target, Host with the port, and the headers aiohttp sent; no Connection."""
    async with serve(answers(OK)) as server, crm_client() as client:
        await lookup(client, server.url + "?x=1")
    [(_, request)] = server.requests
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    port = server.url.split(":")[2].split("/")[0]
    assert lines[0] == "POST /identify?x=1 HTTP/1.1"
    assert lines[1:] == [
        f"Host: 127.0.0.1:{port}",
        "User-Agent: OMniLeads",
        "Accept-Encoding: identity",
        "Content-Type: application/x-www-form-urlencoded",
        "Accept: */*",
        "Content-Length: 11",
    ]
    assert body == b"idContact=1"


async def test_a_connection_the_server_closed_while_idle_is_not_handed_out() -> None:
    """The server closes a kept-alive connection after answering: once the client has seen
    it end, the next request opens a new connection (with no retry to hide a reuse)."""
    async with serve(answers(OK, keep=False)) as server:
        http = Http1Client(_NoDns(), max_connections=4, keepalive=30)
        try:
            target = target_of(server.url)
            for _ in range(2):
                response, body = await http.request(
                    "POST", target, {}, b"", tls=None, connect_timeout=1, max_body=MAX_BODY
                )
                assert (response.status, body) == (200, OK_BODY)
                await eventually(lambda: http.open_connections == 0)
        finally:
            await http.close()
    assert server.accepts == 2


def race(*, fresh_too: bool) -> Script:
    """Connection 0 answers its first request, then closes as the second arrives; later
    connections answer, or (`fresh_too`) close as their first request arrives as well."""

    async def answer(connection: int, count: int, writer: asyncio.StreamWriter) -> bool:
        if (connection == 0 and count == 1) or (connection > 0 and fresh_too):
            return False  # read the request, answer nothing, close
        writer.write(OK)
        await writer.drain()
        return True

    return answer


async def test_a_reused_connection_closed_as_the_request_arrives_is_retried_once() -> None:
    """The keep-alive race: the lookup is sent again on a new connection and succeeds."""
    async with serve(race(fresh_too=False)) as server, crm_client() as client:
        assert await lookup(client, server.url) == TRUE
        assert await lookup(client, server.url) == TRUE
    assert server.accepts == 2
    assert [number for number, _ in server.requests] == [0, 0, 1]


async def test_the_retry_is_not_retried() -> None:
    """When the new connection also ends without a byte, the lookup is CrmUnreachable (a
    fresh connection that fails is an outage, not the race)."""
    async with serve(race(fresh_too=True)) as server, crm_client() as client:
        assert await lookup(client, server.url) == TRUE
        with pytest.raises(CrmUnreachable) as caught:
            await lookup(client, server.url)
    assert isinstance(caught.value.__cause__, ConnectionLost)
    assert server.accepts == 2


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried() -> None:
    """Only a reused connection is retried: a CRM that hangs up on a new one is asked once."""

    async def hang_up(_: int, __: int, ___: asyncio.StreamWriter) -> bool:
        return False

    async with serve(hang_up) as server, crm_client() as client:
        with pytest.raises(CrmUnreachable):
            await lookup(client, server.url)
    assert server.accepts == 1


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(OK_BODY), OK_BODY),
            id="connection-close",
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\n\r\n" + OK_BODY, id="http10-until-close"),
        pytest.param(OK + b"HTTP/1.1 200 OK\r\n", id="bytes-after-the-answer"),
    ],
)
async def test_connections_that_cannot_be_trusted_again_are_not_reused(reply: bytes) -> None:
    """`Connection: close`, a body that ends with the connection (HTTP/1.0), or bytes after
    the answer: each lookup gets its answer on a connection of its own."""
    until_close = b"Content-Length" not in reply
    async with serve(answers(reply, keep=not until_close)) as server, crm_client() as client:
        assert await lookup(client, server.url) == TRUE
        assert await lookup(client, server.url) == TRUE
    assert server.accepts == 2


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10\r\n"
            + OK_BODY[:16]
            + b"\r\n%x\r\n" % (len(OK_BODY) - 16)
            + OK_BODY[16:]
            + b"\r\n0\r\n\r\n",
            id="chunked",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
            b"%x\r\n%s\r\n0\r\nX-Checksum: abc\r\n\r\n" % (len(OK_BODY), OK_BODY),
            id="chunked-with-trailers",
        ),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
            id="100-continue",
        ),
    ],
)
async def test_chunked_and_interim_answers_keep_the_connection(reply: bytes) -> None:
    """A chunked body (with or without trailers) and an answer after 100 Continue are read
    whole, and the connection carries the next lookup."""
    async with serve(answers(reply)) as server, crm_client() as client:
        assert await lookup(client, server.url) == TRUE
        assert await lookup(client, server.url) == TRUE
    assert server.accepts == 1


async def test_an_error_status_with_its_whole_body_keeps_the_connection() -> None:
    """A 500 whose small body came with its head leaves the connection usable; a 500 whose
    body has not all come closes it (the lookup does not wait for it)."""
    whole = b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops"
    partial = b"HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\nbusy"

    async def answer(connection: int, count: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK if connection else partial if count else whole)
        await writer.drain()
        return True

    async with serve(answer) as server, crm_client() as client:
        for _ in range(2):
            with pytest.raises(CrmHttpStatus):
                await lookup(client, server.url)
        assert await lookup(client, server.url) == TRUE
    assert [number for number, _ in server.requests] == [0, 0, 1]


# --- answers that are not HTTP, or too big ----------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nX: " + b"x" * 8200 + b"\r\n\r\n", id="long-header"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(101)) + b"\r\n",
            id="too-many-headers",
        ),
        pytest.param(b"ICY 200 OK\r\n\r\n", id="garbage-status-line"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + OK_BODY, id="cut-short"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"x" * 100,
            id="content-length-over-cap",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * (MAX_BODY + 1),
            id="until-close-over-cap",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"1000\r\n"
            + b"x" * 4096
            + b"\r\n" * (MAX_BODY // 4096 + 1),
            id="chunked-over-cap",
        ),
    ],
)
async def test_broken_or_oversized_answers_are_bad_responses(reply: bytes) -> None:
    """Each is CrmBadResponse, with a short message free of the CRM's bytes."""
    async with serve(answers(reply, keep=False)) as server, crm_client() as client:
        with pytest.raises(CrmBadResponse) as caught:
            await lookup(client, server.url)
    assert len(str(caught.value)) < 80
    assert "x" * 10 not in str(caught.value)


# --- limits --------------------------------------------------------------------------------


@asynccontextmanager
async def gated() -> AsyncIterator[tuple[Server, asyncio.Event]]:
    """A server that answers only once the event is set."""
    gate = asyncio.Event()

    async def answer(_: int, __: int, writer: asyncio.StreamWriter) -> bool:
        await gate.wait()
        writer.write(OK)
        await writer.drain()
        return True

    async with serve(answer) as server:
        yield server, gate


async def test_beyond_max_connections_a_lookup_waits_for_a_free_one() -> None:
    """max_connections=2, three lookups at once to a slow CRM: two connect, the third waits
    and then rides on a connection the first two released."""
    async with gated() as (server, gate), crm_client(max_connections=2) as client:
        lookups = [asyncio.ensure_future(lookup(client, server.url, 5)) for _ in range(3)]
        await eventually(lambda: len(server.requests) == 2)
        assert server.accepts == 2
        gate.set()
        assert await asyncio.gather(*lookups) == [TRUE] * 3
    assert server.accepts == 2
    assert len(server.requests) == 3


async def test_waiting_for_a_connection_ends_at_connect_timeout() -> None:
    """The third lookup gives up after connect_timeout (CrmTimeout); the two it waited
    behind still get their answers."""
    async with (
        gated() as (server, gate),
        crm_client(max_connections=2, connect_timeout=0.2) as client,
    ):
        first = [asyncio.ensure_future(lookup(client, server.url, 5)) for _ in range(2)]
        await eventually(lambda: len(server.requests) == 2)
        with pytest.raises(CrmTimeout):
            await lookup(client, server.url, 5)
        gate.set()
        assert await asyncio.gather(*first) == [TRUE] * 2
    assert server.accepts == 2


async def test_a_timeout_mid_body_closes_the_connection() -> None:
    """The budget ends while the body trickles: CrmTimeout, and the half-read connection is
    closed, never reused: the next lookup opens a new one."""

    async def answer(connection: int, _: int, writer: asyncio.StreamWriter) -> bool:
        if connection == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n{" % len(OK_BODY))
            await writer.drain()
            await asyncio.get_running_loop().create_future()  # until the teardown
        writer.write(OK)
        await writer.drain()
        return True

    async with serve(answer) as server, crm_client() as client:
        with pytest.raises(CrmTimeout):
            await lookup(client, server.url, 0.3)
        assert await lookup(client, server.url) == TRUE
    assert server.accepts == 2


# --- IPv6 ------------------------------------------------------------------------------------


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no ::1 on this machine")
async def test_an_ipv6_literal_is_bracketed_in_host() -> None:
    """http://[::1]:port/ connects to ::1 without DNS and says Host: [::1]:port."""
    async with serve(answers(OK), host="::1") as server, crm_client() as client:
        assert await lookup(client, server.url) == TRUE
    [(_, request)] = server.requests
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in request


class _NoDns(AbstractResolver):
    """A resolver that must not be asked (the tests use IP addresses)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        raise AssertionError(f"asked to resolve {host}")

    async def close(self) -> None:
        return None


def test_the_client_runs_on_uvloop() -> None:
    """The service runs on uvloop, whose transports differ from asyncio's (their
    `connection_made` comes after `create_connection` returns): keep-alive, the race retry,
    an error status and a timeout mid-body behave the same there."""

    async def scenario() -> tuple[list[object], int]:
        async def answer(connection: int, count: int, writer: asyncio.StreamWriter) -> bool:
            if connection == 0 and count == 2:
                return False  # the keep-alive race
            if connection == 1 and count == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{")
                await writer.drain()
                await asyncio.get_running_loop().create_future()  # until the teardown
            writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n" if count == 1 else OK)
            await writer.drain()
            return True

        seen: list[object] = []
        async with serve(answer) as server, crm_client() as client:
            for budget in (2.0, 2.0, 2.0, 0.3, 2.0):
                try:
                    seen.append(await lookup(client, server.url, budget))
                except (CrmHttpStatus, CrmTimeout) as exc:
                    seen.append(type(exc))
        return seen, server.accepts

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        seen, accepts = runner.run(scenario())
    assert seen == [TRUE, CrmHttpStatus, TRUE, CrmTimeout, TRUE]
    assert accepts == 3
