"""The aiohttp CRM client against real HTTP(S) servers on 127.0.0.1.

Well-behaved answers come from a small aiohttp app; hostile ones (endless bodies, lies in
Content-Length, not HTTP at all, silence) from a raw asyncio TCP server that writes exactly
the bytes a test gives it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from crm_resolver.crm_http import CrmHttpSettings, HttpCrmClient
from crm_resolver.crm_response import MAX_BODY
from crm_resolver.ports import (
    CallContext,
    CrmAnswer,
    CrmBadResponse,
    CrmHttpStatus,
    CrmStatusFail,
    CrmTimeout,
    CrmUnreachable,
)
from shared.destination import Destination
from shared.nodes import NodeConfig
from shared.outcomes import Verdict

TRUE = CrmAnswer(Verdict.TRUE)
FALSE = CrmAnswer(Verdict.FALSE)
CONTEXT = CallContext(caller_number="5551234", call_id="1700000000.1")
# Slack for scheduling on a loaded machine: a lookup must end within budget + this.
MARGIN = 0.25


def node(url: str) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "id": "1",
            "name": "gold-customers",
            "interaction": "crm_destination",
            "url": url,
            "audio": "customer-id-prompt",
            "on_identified": "1,3",
            "on_not_identified": "1,4",
        }
    )


@pytest.fixture
async def client() -> AsyncIterator[HttpCrmClient]:
    crm = HttpCrmClient()
    await crm.start()
    yield crm
    await crm.close()


# --- a well-behaved server -------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: Any


@dataclass
class AppServer:
    url: str
    seen: list[Seen] = field(default_factory=list)
    # path -> (status, body bytes, extra headers)
    answers: dict[str, tuple[int, bytes, dict[str, str]]] = field(default_factory=dict)


@asynccontextmanager
async def serve_app(
    ssl_context: Any = None,
) -> AsyncIterator[AppServer]:
    server = AppServer(url="")

    async def handle(request: web.Request) -> web.Response:
        server.seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.headers),
                await request.read(),
                request.transport.get_extra_info("peername") if request.transport else None,
            )
        )
        status, body, headers = server.answers.get(
            request.path, (200, b'{"status": "ok", "destination": "true"}', {})
        )
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context else "http"
        server.url = f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def app_server() -> AsyncIterator[AppServer]:
    async with serve_app() as server:
        yield server


async def test_sends_exactly_the_omnileads_request(
    client: HttpCrmClient, app_server: AppServer
) -> None:
    """POST to the node's URL, User-Agent OMniLeads, form content type, body idContact=<id>."""
    answer = await client.lookup(
        node(app_server.url + "/omnileads/identify"), "12345", budget=2, context=CONTEXT
    )
    assert answer == TRUE
    [seen] = app_server.seen
    assert (seen.method, seen.path, seen.body) == (
        "POST",
        "/omnileads/identify",
        b"idContact=12345",
    )
    assert seen.headers["User-Agent"] == "OMniLeads"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert seen.headers["Accept-Encoding"] == "identity"
    # The call's context stays out of the request unless a CRM opts in.
    assert "5551234" not in json.dumps(seen.headers)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"status": "ok", "destination": "true"}', TRUE),
        (b'{"status": "ok", "destination": "false"}', FALSE),
        (
            b'{"status": "ok", "destination": "1,7"}',
            CrmAnswer(Verdict.DESTINATION, Destination(type=1, id=7)),
        ),
    ],
)
async def test_200_answers_are_parsed(
    client: HttpCrmClient, app_server: AppServer, body: bytes, expected: CrmAnswer
) -> None:
    """A 200 with true, false or X,Y is that answer."""
    app_server.answers["/identify"] = (200, body, {"Content-Type": "application/json"})
    assert await client.lookup(
        node(app_server.url + "/identify"), "1", budget=2, context=CONTEXT
    ) == (expected)


async def test_status_fail_is_crm_status_fail(client: HttpCrmClient, app_server: AppServer) -> None:
    """A 200 carrying "status": "fail" raises CrmStatusFail."""
    app_server.answers["/identify"] = (200, b'{"status": "fail", "destination": "false"}', {})
    with pytest.raises(CrmStatusFail):
        await client.lookup(node(app_server.url + "/identify"), "1", budget=2, context=CONTEXT)


@pytest.mark.parametrize("status", [500, 503, 404, 204])
async def test_non_2xx_is_http_status(
    client: HttpCrmClient, app_server: AppServer, status: int
) -> None:
    """Any status outside 2xx is CrmHttpStatus carrying it (204 is 2xx but has no body)."""
    app_server.answers["/identify"] = (status, b"", {})
    target = node(app_server.url + "/identify")
    if status == 204:
        with pytest.raises(CrmBadResponse):
            await client.lookup(target, "1", budget=2, context=CONTEXT)
        return
    with pytest.raises(CrmHttpStatus) as caught:
        await client.lookup(target, "1", budget=2, context=CONTEXT)
    assert caught.value.status == status


async def test_redirect_is_not_followed(client: HttpCrmClient, app_server: AppServer) -> None:
    """A 302 is CrmHttpStatus(302) and its Location is never requested."""
    app_server.answers["/identify"] = (302, b"", {"Location": app_server.url + "/elsewhere"})
    with pytest.raises(CrmHttpStatus) as caught:
        await client.lookup(node(app_server.url + "/identify"), "1", budget=2, context=CONTEXT)
    assert caught.value.status == 302
    assert [seen.path for seen in app_server.seen] == ["/identify"]


async def test_connections_are_reused(client: HttpCrmClient, app_server: AppServer) -> None:
    """Sequential lookups to one CRM travel over one kept-alive connection."""
    target = node(app_server.url + "/identify")
    for _ in range(5):
        await client.lookup(target, "1", budget=2, context=CONTEXT)
    assert len(app_server.seen) == 5
    assert len({seen.peer for seen in app_server.seen}) == 1


async def test_proxy_environment_is_ignored(
    client: HttpCrmClient, app_server: AppServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY in the environment cannot divert CRM requests."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert await client.lookup(node(app_server.url + "/x"), "1", budget=2, context=CONTEXT) == TRUE


async def test_no_budget_means_no_request(client: HttpCrmClient, app_server: AppServer) -> None:
    """A budget already spent is CrmTimeout at once, without contacting the CRM."""
    with pytest.raises(CrmTimeout):
        await client.lookup(node(app_server.url + "/x"), "1", budget=0, context=CONTEXT)
    assert app_server.seen == []


@pytest.mark.parametrize("customer_id", ["", "12a", "1&x=2", "١٢"])
async def test_customer_id_must_be_digits(
    client: HttpCrmClient, app_server: AppServer, customer_id: str
) -> None:
    """An id that is not ASCII digits is a caller bug: ValueError, nothing sent."""
    with pytest.raises(ValueError, match="digits"):
        await client.lookup(node(app_server.url + "/x"), customer_id, budget=2, context=CONTEXT)
    assert app_server.seen == []


async def test_lookup_before_start_is_an_error(app_server: AppServer) -> None:
    """Using the client before start() is a RuntimeError, not a CRM error."""
    with pytest.raises(RuntimeError):
        await HttpCrmClient().lookup(node(app_server.url), "1", budget=1, context=CONTEXT)


async def test_missing_ca_bundle_fails_at_start() -> None:
    """A CA bundle that cannot be loaded stops start() with a message naming it."""
    crm = HttpCrmClient(CrmHttpSettings(ca_bundle="/nonexistent/ca.pem"))
    with pytest.raises(ValueError, match="nonexistent"):
        await crm.start()
    await crm.close()


# --- hostile servers ---------------------------------------------------------------------

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    url: str
    requests: list[bytes] = field(default_factory=list)
    got_request: asyncio.Event = field(default_factory=asyncio.Event)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@asynccontextmanager
async def serve_raw(behaviour: Behaviour) -> AsyncIterator[RawServer]:
    """A TCP server on 127.0.0.1 that reads one request, then runs `behaviour`."""
    handlers: set[asyncio.Task[None]] = set()
    raw = RawServer(url="")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            raw.requests.append(await read_request(reader))
            raw.got_request.set()
            await behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, which is what several tests expect
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/identify"
    try:
        yield raw
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def forever() -> Awaitable[None]:
    """Block until cancelled (the server's teardown cancels it)."""
    return asyncio.get_running_loop().create_future()


async def timed(coro: Awaitable[CrmAnswer]) -> tuple[BaseException | CrmAnswer, float]:
    started = time.monotonic()
    try:
        result: BaseException | CrmAnswer = await coro
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


async def test_silent_server_times_out_within_budget(client: HttpCrmClient) -> None:
    """A CRM that accepts the request and never answers is CrmTimeout, at the budget."""

    async def silent(_: asyncio.StreamReader, __: asyncio.StreamWriter) -> None:
        await forever()

    async with serve_raw(silent) as raw:
        result, took = await timed(client.lookup(node(raw.url), "1", budget=0.3, context=CONTEXT))
    assert isinstance(result, CrmTimeout)
    assert 0.25 <= took < 0.3 + MARGIN


async def test_trickling_body_times_out_within_budget(client: HttpCrmClient) -> None:
    """Headers at once and then a byte at a time still ends at the budget: it covers the body."""

    async def trickle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while True:
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with serve_raw(trickle) as raw:
        result, took = await timed(client.lookup(node(raw.url), "1", budget=0.4, context=CONTEXT))
    assert isinstance(result, CrmTimeout)
    assert took < 0.4 + MARGIN


async def test_connection_refused_is_unreachable(client: HttpCrmClient) -> None:
    """Nothing listening on the port is CrmUnreachable, quickly."""
    # A bound socket that does not listen: the port cannot be taken by anyone else meanwhile.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        result, took = await timed(
            client.lookup(node(f"http://127.0.0.1:{port}/x"), "1", budget=2, context=CONTEXT)
        )
    assert isinstance(result, CrmUnreachable)
    assert isinstance(result.__cause__, Exception)
    assert took < 1


async def test_disconnect_without_answer_is_unreachable(client: HttpCrmClient) -> None:
    """A CRM that closes the connection after reading the request is CrmUnreachable."""

    async def hang_up(_: asyncio.StreamReader, __: asyncio.StreamWriter) -> None:
        return

    async with serve_raw(hang_up) as raw:
        with pytest.raises(CrmUnreachable):
            await client.lookup(node(raw.url), "1", budget=2, context=CONTEXT)


def sends(data: bytes) -> Behaviour:
    async def send(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return send


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HELLO WORLD\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", id="cut-short"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n", id="bad-chunk"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (
                len(gzip.compress(b'{"destination": "true"}')),
                gzip.compress(b'{"destination": "true"}'),
            ),
            id="gzip-not-decompressed",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Bad: " + b"x" * 20_000 + b"\r\n\r\n", id="huge-header"),
    ],
)
async def test_broken_http_is_bad_response(client: HttpCrmClient, reply: bytes) -> None:
    """Once the CRM has answered, a reply that is not proper HTTP is CrmBadResponse."""
    async with serve_raw(sends(reply)) as raw:
        with pytest.raises(CrmBadResponse) as caught:
            await client.lookup(node(raw.url), "1", budget=2, context=CONTEXT)
    # The CRM's bytes stay out of the message (it is logged); the cause keeps the detail.
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 80


@pytest.mark.parametrize("length", [MAX_BODY + 1, 10_000_000])
async def test_declared_oversized_body_is_refused_before_reading(
    client: HttpCrmClient, length: int
) -> None:
    """A Content-Length over 64 KiB is CrmBadResponse at once, without waiting for the body."""

    async def declare_huge(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n{" % length)
        await writer.drain()
        await forever()

    async with serve_raw(declare_huge) as raw:
        result, took = await timed(client.lookup(node(raw.url), "1", budget=2, context=CONTEXT))
    assert isinstance(result, CrmBadResponse)
    assert took < 1  # it would have waited the whole budget for a body that never comes


def endless(head: bytes, *, chunked: bool) -> Behaviour:
    async def stream(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        piece = b'{"destination": "true", "pad": "' + b"x" * 16_000
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()  # paced by the client: a client that stops reading stops us
            piece = b"x" * 16_000

    return stream


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(
            endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunked=True),
            id="chunked",
        ),
        pytest.param(
            endless(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", chunked=False),
            id="until-close",
        ),
    ],
)
async def test_endless_body_is_cut_at_the_cap(client: HttpCrmClient, behaviour: Behaviour) -> None:
    """A body with no length that never ends is CrmBadResponse long before the budget."""
    async with serve_raw(behaviour) as raw:
        result, took = await timed(client.lookup(node(raw.url), "1", budget=3, context=CONTEXT))
    assert isinstance(result, CrmBadResponse)
    assert took < 1.5


@pytest.mark.parametrize(("size", "ok"), [(MAX_BODY, True), (MAX_BODY + 1, False)])
@pytest.mark.parametrize("chunked", [False, True])
async def test_body_cap_is_exact(
    client: HttpCrmClient, app_server: AppServer, size: int, ok: bool, chunked: bool
) -> None:
    """A valid body of exactly 64 KiB is accepted; one byte more is refused, chunked or not."""
    head = b'{"destination": "true", "pad": "'
    body = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(body) == size
    if chunked:
        half = size // 2
        reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])
        )
        reply += b"0\r\n\r\n"
    else:
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (size, body)
    async with serve_raw(sends(reply)) as raw:
        result, _ = await timed(client.lookup(node(raw.url), "1", budget=2, context=CONTEXT))
    if ok:
        assert result == TRUE
    else:
        assert isinstance(result, CrmBadResponse)


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (EC, so it takes milliseconds), and its key."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_server(self_signed: tuple[Path, Path]) -> AsyncIterator[AppServer]:
    import ssl

    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with serve_app(ssl_context=context) as server:
        yield server


async def test_untrusted_certificate_is_unreachable(
    client: HttpCrmClient, tls_server: AppServer
) -> None:
    """TLS is verified: a self-signed CRM certificate is CrmUnreachable and nothing is sent."""
    with pytest.raises(CrmUnreachable):
        await client.lookup(node(tls_server.url + "/identify"), "1", budget=2, context=CONTEXT)
    assert tls_server.seen == []


async def test_ca_bundle_makes_the_certificate_trusted(
    tls_server: AppServer, self_signed: tuple[Path, Path]
) -> None:
    """With the CRM's CA in ca_bundle, the same HTTPS CRM answers normally."""
    crm = HttpCrmClient(CrmHttpSettings(ca_bundle=str(self_signed[0])))
    await crm.start()
    try:
        answer = await crm.lookup(
            node(tls_server.url + "/identify"), "12345", budget=2, context=CONTEXT
        )
    finally:
        await crm.close()
    assert answer == TRUE
    assert [seen.body for seen in tls_server.seen] == [b"idContact=12345"]


async def test_waiting_for_a_pooled_connection_is_bounded_by_connect_timeout() -> None:
    """With the pool full, a lookup waits at most connect_timeout for a connection: CrmTimeout."""

    async def silent(_: asyncio.StreamReader, __: asyncio.StreamWriter) -> None:
        await forever()

    crm = HttpCrmClient(CrmHttpSettings(max_connections=1, connect_timeout=0.2))
    await crm.start()
    try:
        async with serve_raw(silent) as raw:
            holder = asyncio.ensure_future(
                crm.lookup(node(raw.url), "1", budget=0.6, context=CONTEXT)
            )
            try:
                # Once the server has the request, the first lookup holds the only connection.
                async with asyncio.timeout(5):
                    await raw.got_request.wait()
                result, took = await timed(
                    crm.lookup(node(raw.url), "2", budget=1.5, context=CONTEXT)
                )
            finally:
                held, _ = await timed(holder)
    finally:
        await crm.close()
    assert isinstance(result, CrmTimeout)
    assert took < 0.2 + MARGIN
    assert isinstance(held, CrmTimeout)
    assert len(raw.requests) == 1
