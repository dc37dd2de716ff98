"""CRM authentication against real servers on 127.0.0.1 (README "Securing CRM calls").

OAuth2 client credentials: one aiohttp app is both the token endpoint (it issues tok-1,
tok-2, ... and can be held, or made to fail) and a CRM that accepts only the bearer tokens
it issued and has not revoked (401 otherwise). Mutual TLS: an HTTPS CRM that requires a
client certificate from a private CA, all made here with trustme. The client is the product's
own (`HttpCrmClient` with `CrmCredentials`), and two tests run whole calls through an
embedded gateway to see the decision a caller gets.

Token lifetimes are timed on an injected clock where a test needs to stand at a given point
of a token's life; one test uses the real clock with a 2 s token.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import trustme
from aiohttp import web

from agi_gateway.app import Gateway
from agi_gateway.settings import GatewaySettings
from crm_resolver.address_policy import AddressPolicy
from crm_resolver.crm_auth import CrmCredentials
from crm_resolver.crm_http import CrmHttpSettings, HttpCrmClient
from crm_resolver.http1 import ConnectFailed, ConnectionLost
from crm_resolver.oauth2_client import FIRST_BACKOFF, CrmTokenUnavailable
from crm_resolver.ports import (
    CallContext,
    CrmAnswer,
    CrmError,
    CrmHttpStatus,
    CrmTimeout,
    CrmUnreachable,
)
from shared.nodes import NodeConfig
from shared.outcomes import Outcome, Verdict
from tests.waiting import eventually
from tools.asterisk_sim import CallScript, run_call
from tools.crm_check import check

TRUE = CrmAnswer(Verdict.TRUE)
CONTEXT = CallContext(caller_number="5551234", call_id="1700000000.1")
CLIENT_SECRET = "s3cret/with+odd:chars"
ENV = {"CALLERID_TEST_OAUTH_SECRET": CLIENT_SECRET}
OAUTH_LOG = "crm_resolver.oauth2_client"


def crm_node(url: str, auth: Any = None, node_id: str = "gold") -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "id": node_id,
            "name": f"{node_id}-customers",
            "interaction": "crm_true_false",
            "url": url,
            "audio": "customer-id-prompt",
            "on_identified": "1,3",
            "on_not_identified": "1,4",
            "auth": auth,
        }
    )


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- a token endpoint and a CRM that wants its tokens -------------------------------------


@dataclass
class TokenRequest:
    headers: dict[str, str]
    form: dict[str, list[str]]


@dataclass
class AuthServer:
    url: str = ""
    token_requests: list[TokenRequest] = field(default_factory=list)
    expires_in: float | None = 3600
    # (status, body) answered instead of a token while set
    failure: tuple[int, bytes] | None = None
    # while set and not yet released, token requests wait for it
    gate: asyncio.Event | None = None
    issued: int = 0
    # token -> real time it stops being accepted (None: never); a revoked token is deleted
    valid: dict[str, float | None] = field(default_factory=dict)
    # the token each CRM request carried, and the status it got
    crm_requests: list[tuple[str | None, int]] = field(default_factory=list)
    grace: float = 0.5

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    def oauth(self, **extra: Any) -> dict[str, Any]:
        return {
            "method": "oauth2_client_credentials",
            "token_url": self.token_url,
            "client_id": "callerid",
            "client_secret_env": "CALLERID_TEST_OAUTH_SECRET",
            **extra,
        }

    @property
    def crm_tokens(self) -> list[str | None]:
        return [token for token, _ in self.crm_requests]


@asynccontextmanager
async def serve_auth() -> AsyncIterator[AuthServer]:
    server = AuthServer()

    async def token(request: web.Request) -> web.Response:
        form = parse_qs((await request.read()).decode())
        server.token_requests.append(TokenRequest(dict(request.headers), form))
        if server.gate is not None:
            await server.gate.wait()
        if server.failure is not None:
            status, body = server.failure
            return web.Response(status=status, body=body)
        server.issued += 1
        issued = f"tok-{server.issued}"
        lifetime = server.expires_in
        server.valid[issued] = None if lifetime is None else time.monotonic() + lifetime
        answer: dict[str, Any] = {"access_token": issued, "token_type": "Bearer"}
        if lifetime is not None:
            answer["expires_in"] = lifetime
        return web.json_response(answer)

    async def crm(request: web.Request) -> web.Response:
        await request.read()
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        carried = value if scheme == "Bearer" else None
        ends = server.valid.get(carried or "", 0.0)
        accepted = carried in server.valid and (
            ends is None or time.monotonic() < ends + server.grace
        )
        status = 200 if accepted else 401
        server.crm_requests.append((carried, status))
        return web.Response(status=status, body=b'{"status": "ok", "destination": "true"}')

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_post("/crm", crm)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield server
    finally:
        if server.gate is not None:
            server.gate.set()
        await runner.cleanup()


@pytest.fixture
async def auth_server() -> AsyncIterator[AuthServer]:
    async with serve_auth() as server:
        yield server


@asynccontextmanager
async def crm_client(
    clock: FakeClock | None = None, settings: CrmHttpSettings | None = None
) -> AsyncIterator[HttpCrmClient]:
    credentials = CrmCredentials(ENV, monotonic=clock) if clock is not None else CrmCredentials(ENV)
    client = HttpCrmClient(settings or CrmHttpSettings(), credentials=credentials)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def closed_port() -> int:
    """A port nothing listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- OAuth2 client credentials -------------------------------------------------------------


async def test_one_token_request_serves_concurrent_calls_and_is_cached(
    auth_server: AuthServer,
) -> None:
    """20 calls needing a token at once make one token request; a call that gives up while
    it is in flight does not cancel it for the others; later calls reuse the token. The
    request is RFC 6749 §4.4: grant_type and scope in the form, the client in HTTP Basic
    (each part form-encoded first, §2.3.1)."""
    auth_server.gate = asyncio.Event()
    node = crm_node(auth_server.url + "/crm", auth_server.oauth(scope="crm.read crm.calls"))
    async with crm_client() as client:
        calls = [
            asyncio.create_task(client.lookup(node, str(n), budget=10, context=CONTEXT))
            for n in range(1, 21)
        ]
        await eventually(lambda: len(auth_server.token_requests) == 1)
        with pytest.raises(CrmTimeout):
            await client.lookup(node, "99", budget=0.05, context=CONTEXT)
        auth_server.gate.set()
        assert await asyncio.gather(*calls) == [TRUE] * 20
        for n in range(5):
            assert await client.lookup(node, str(n + 100), budget=5, context=CONTEXT) == TRUE
    assert len(auth_server.token_requests) == 1
    assert auth_server.crm_tokens == ["tok-1"] * 25
    [request] = auth_server.token_requests
    assert request.form == {"grant_type": ["client_credentials"], "scope": ["crm.read crm.calls"]}
    assert request.headers["Authorization"] == basic("callerid", "s3cret%2Fwith%2Bodd%3Achars")
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_client_secret_post_and_audience(auth_server: AuthServer) -> None:
    """client_authentication: client_secret_post puts the client in the form, not a header."""
    node = crm_node(
        auth_server.url + "/crm",
        auth_server.oauth(client_authentication="client_secret_post", audience="https://crm"),
    )
    async with crm_client() as client:
        assert await client.lookup(node, "1", budget=5, context=CONTEXT) == TRUE
    [request] = auth_server.token_requests
    assert "Authorization" not in request.headers
    assert request.form == {
        "grant_type": ["client_credentials"],
        "audience": ["https://crm"],
        "client_id": ["callerid"],
        "client_secret": [CLIENT_SECRET],
    }


async def test_the_token_is_renewed_before_it_expires(auth_server: AuthServer) -> None:
    """With expires_in 100: used as is until 90 s (the margin is 10 % of a short lifetime);
    from then the next call still goes with it while a new one is fetched in the background;
    once a token has expired, the next call waits for a new one."""
    auth_server.expires_in = 100
    clock = FakeClock()
    start = clock.now
    node = crm_node(auth_server.url + "/crm", auth_server.oauth())
    async with crm_client(clock) as client:

        async def call() -> None:
            assert await client.lookup(node, "1", budget=5, context=CONTEXT) == TRUE

        await call()
        clock.now = start + 89
        await call()
        assert len(auth_server.token_requests) == 1
        clock.now = start + 95
        await call()  # goes with tok-1 and starts the renewal
        await eventually(lambda: len(auth_server.token_requests) == 2)
        await eventually(lambda: auth_server.issued == 2)
        await call()
        assert auth_server.crm_tokens == ["tok-1", "tok-1", "tok-1", "tok-2"]
        clock.now = start + 95 + 100  # tok-2, asked for at 95, has expired
        await call()
    assert auth_server.crm_tokens[-1] == "tok-3"
    assert len(auth_server.token_requests) == 3
    assert {status for _, status in auth_server.crm_requests} == {200}


async def test_a_short_lived_token_on_the_real_clock(auth_server: AuthServer) -> None:
    """expires_in 2 on the real clock: calls back to back see tok-1, then tok-2 from the
    one renewal, and the CRM (which refuses a token 0.5 s after its expiry) never says 401."""
    auth_server.expires_in = 2
    node = crm_node(auth_server.url + "/crm", auth_server.oauth())
    async with crm_client() as client:
        async with asyncio.timeout(20):
            while "tok-2" not in auth_server.crm_tokens:
                assert await client.lookup(node, "1", budget=5, context=CONTEXT) == TRUE
    assert len(auth_server.token_requests) == 2
    assert {status for _, status in auth_server.crm_requests} == {200}


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ((500, b"oops"), "HTTP 500"),
        ((400, b'{"error": "invalid_client"}'), "HTTP 400 (invalid_client)"),
        ((200, b"<html>sign in</html>"), "not a JSON object"),
        ((200, b'{"token_type": "Bearer", "expires_in": 60}'), "no access_token"),
    ],
)
async def test_a_failing_token_endpoint_is_crm_error_and_is_not_hammered(
    auth_server: AuthServer,
    caplog: pytest.LogCaptureFixture,
    failure: tuple[int, bytes],
    reason: str,
) -> None:
    """Every call gets CrmTokenUnavailable (crm_error) and the CRM is not asked; 10 calls in
    the back-off make one token request and one WARNING; once the back-off has passed and the
    endpoint works, the next call gets a token (logged once at INFO)."""
    caplog.set_level(logging.DEBUG, logger=OAUTH_LOG)
    auth_server.failure = failure
    clock = FakeClock()
    node = crm_node(auth_server.url + "/crm", auth_server.oauth())
    async with crm_client(clock) as client:
        for n in range(10):
            with pytest.raises(CrmTokenUnavailable) as caught:
                await client.lookup(node, str(n + 1), budget=5, context=CONTEXT)
            assert reason in str(caught.value)
            assert caught.value.code.outcome is Outcome.CRM_ERROR
        assert len(auth_server.token_requests) == 1
        auth_server.failure = None
        clock.now += FIRST_BACKOFF
        assert await client.lookup(node, "1", budget=5, context=CONTEXT) == TRUE
    assert len(auth_server.token_requests) == 2
    assert auth_server.crm_tokens == ["tok-1"]
    records = [r for r in caplog.records if r.name == OAUTH_LOG]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert reason in warnings[0].getMessage()
    assert CLIENT_SECRET not in caplog.text
    assert [r.getMessage().endswith("available again") for r in records][-1]


async def test_a_401_makes_the_next_call_fetch_a_new_token(auth_server: AuthServer) -> None:
    """The CRM revokes tok-1: the call that carried it gets HTTP 401 (crm_error), and the
    next call fetches tok-2 instead of sending tok-1 again."""
    node = crm_node(auth_server.url + "/crm", auth_server.oauth())
    async with crm_client() as client:
        assert await client.lookup(node, "1", budget=5, context=CONTEXT) == TRUE
        del auth_server.valid["tok-1"]
        with pytest.raises(CrmHttpStatus) as caught:
            await client.lookup(node, "2", budget=5, context=CONTEXT)
        assert caught.value.status == 401
        assert caught.value.code.outcome is Outcome.CRM_ERROR
        assert await client.lookup(node, "3", budget=5, context=CONTEXT) == TRUE
    assert auth_server.crm_requests == [("tok-1", 200), ("tok-1", 401), ("tok-2", 200)]
    assert len(auth_server.token_requests) == 2


async def test_the_token_url_is_under_the_address_policy(auth_server: AuthServer) -> None:
    """CALLERID_CRM_ALLOWED_HOSTS applies to the token request too: refused, never sent."""
    port = auth_server.url.rsplit(":", 1)[1]
    node = crm_node(
        auth_server.url + "/crm", auth_server.oauth(token_url=f"http://localhost:{port}/token")
    )
    policy = AddressPolicy.from_settings(["127.0.0.1"], False)
    async with crm_client(settings=CrmHttpSettings(policy=policy)) as client:
        with pytest.raises(CrmTokenUnavailable, match="not in CALLERID_CRM_ALLOWED_HOSTS"):
            await client.lookup(node, "1", budget=5, context=CONTEXT)
    assert auth_server.token_requests == []
    assert auth_server.crm_requests == []


NODES_YAML = """
nodes:
{nodes}
"""
NODE_YAML = """
  - id: {id}
    name: {id}-customers
    interaction: crm_true_false
    url: {url}
    audio: customer-id-prompt
    on_identified: "1,3"
    on_not_identified: "1,4"
    on_error: "5,1"
    crm_timeout: 3
    auth: {auth}
"""


@asynccontextmanager
async def embedded_gateway(
    tmp_path: Path, nodes: list[dict[str, Any]], **settings: Any
) -> AsyncIterator[Gateway]:
    """A gateway running its resolver in-process, on a nodes file made of `nodes`."""
    path = tmp_path / "nodes.yaml"
    body = "".join(
        NODE_YAML.format(id=node["id"], url=node["url"], auth=json.dumps(node["auth"]))
        for node in nodes
    )
    path.write_text(NODES_YAML.format(nodes=body))
    gateway = Gateway(
        GatewaySettings(
            nodes=str(path),
            embedded=True,
            agi_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            **settings,
        )
    )
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop()


async def call(gateway: Gateway, node: str) -> dict[str, str]:
    assert gateway.server is not None
    host, port = gateway.server.address
    result = await run_call(host, port, CallScript(node=node, entries=["12345"]), timeout=15)
    return result.variables


@pytest.fixture
def oauth_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client secret in this process's environment, where a gateway reads it."""
    monkeypatch.setenv("CALLERID_TEST_OAUTH_SECRET", CLIENT_SECRET)


@pytest.mark.usefixtures("oauth_secret")
async def test_a_token_endpoint_that_is_down_gives_the_call_crm_error(
    auth_server: AuthServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end: the token URL refuses connections; two calls end with crm_error at the
    node's on_error destination, the CRM is never asked, and one WARNING says why."""
    caplog.set_level(logging.DEBUG, logger=OAUTH_LOG)
    down = auth_server.oauth(token_url=f"http://127.0.0.1:{closed_port()}/token")
    node = {"id": "gold", "url": auth_server.url + "/crm", "auth": down}
    async with embedded_gateway(tmp_path, [node]) as gateway:
        results = [await call(gateway, "gold") for _ in range(2)]
    for variables in results:
        assert variables["OML_IDENT_OUTCOME"] == "crm_error"
        assert (variables["OML_DEST_TYPE"], variables["OML_DEST_ID"]) == ("5", "1")
    assert auth_server.crm_requests == []
    warnings = [r for r in caplog.records if r.name == OAUTH_LOG and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unavailable" in warnings[0].getMessage()


@pytest.mark.usefixtures("oauth_secret")
async def test_crm_check_reports_the_crm_request_not_the_token_request(
    auth_server: AuthServer, tmp_path: Path
) -> None:
    """callerid-crm-check on an OAuth2 node: the token request rides on the same session,
    but the report shows the CRM request alone, its token masked."""
    node = {"id": "gold", "url": auth_server.url + "/crm", "auth": auth_server.oauth()}
    path = tmp_path / "nodes.yaml"
    path.write_text(
        NODES_YAML.format(
            nodes=NODE_YAML.format(id="gold", url=node["url"], auth=json.dumps(node["auth"]))
        )
    )
    out = io.StringIO()
    assert await check(["--node", "gold", "--nodes", str(path), "--id", "123"], out) == 0
    report = out.getvalue()
    assert f"POST {auth_server.url}/crm\n" in report
    assert (
        "Authorization: Bearer <masked: 5 characters from the OAuth2 token endpoint "
        f"{auth_server.token_url}>"
    ) in report
    assert "idContact=123" in report
    assert "grant_type" not in report
    assert "tok-1" not in report
    assert CLIENT_SECRET not in report
    assert len(auth_server.token_requests) == 1


# --- mutual TLS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_bundle: Path
    server: trustme.LeafCert
    ca: trustme.CA
    client: dict[str, str]  # mutual_tls section: the CA's client certificate
    stranger: dict[str, str]  # the same, from a CA the CRM does not trust


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca_bundle = where / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_bundle))

    def client_files(issuer: trustme.CA, name: str) -> dict[str, str]:
        leaf = issuer.issue_cert(f"{name}.callerid.test", common_name=name)
        cert, key = where / f"{name}.pem", where / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return {"method": "mutual_tls", "certificate_file": str(cert), "key_file": str(key)}

    return Pki(
        ca_bundle,
        ca.issue_cert("127.0.0.1"),
        ca,
        client_files(ca, "callerid-resolver"),
        client_files(other_ca, "stranger"),
    )


@dataclass
class TlsCrm:
    url: str
    # the client certificate's common name on each request that got through
    clients: list[str] = field(default_factory=list)


@pytest.fixture
async def tls_crm(pki: Pki) -> AsyncIterator[TlsCrm]:
    """An HTTPS CRM that refuses any TLS client without a certificate from the CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server.configure_cert(context)
    pki.ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    crm = TlsCrm("")

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        subject = request.transport.get_extra_info("peercert")["subject"]
        crm.clients.append(dict(pair[0] for pair in subject)["commonName"])
        return web.Response(body=b'{"status": "ok", "destination": "true"}')

    app = web.Application()
    app.router.add_post("/crm", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    crm.url = f"https://127.0.0.1:{runner.addresses[0][1]}/crm"
    try:
        yield crm
    finally:
        await runner.cleanup()


async def test_the_right_client_certificate_is_identified(pki: Pki, tls_crm: TlsCrm) -> None:
    node = crm_node(tls_crm.url, pki.client)
    async with crm_client(settings=CrmHttpSettings(ca_bundle=str(pki.ca_bundle))) as client:
        assert await client.lookup(node, "1", budget=5, context=CONTEXT) == TRUE
        assert await client.lookup(node, "2", budget=5, context=CONTEXT) == TRUE
    assert tls_crm.clients == ["callerid-resolver", "callerid-resolver"]


@pytest.mark.parametrize("certificate", ["none", "stranger"])
async def test_no_or_a_wrong_certificate_is_crm_error(
    pki: Pki, tls_crm: TlsCrm, certificate: str
) -> None:
    """The CRM ends the TLS session (TLS 1.3: its alert comes after the client's side of
    the handshake, when the request is read): CrmUnreachable, crm_error for the call; the
    HTTP client's error it came from is a connection error, never an HTTP answer."""
    node = crm_node(tls_crm.url, pki.stranger if certificate == "stranger" else None)
    async with crm_client(settings=CrmHttpSettings(ca_bundle=str(pki.ca_bundle))) as client:
        with pytest.raises(CrmUnreachable) as caught:
            await client.lookup(node, "1", budget=5, context=CONTEXT)
    assert caught.value.code.outcome is Outcome.CRM_ERROR
    cause = caught.value.__cause__
    assert isinstance(cause, ConnectFailed | ConnectionLost)
    assert isinstance(cause, ConnectionError)
    assert tls_crm.clients == []


async def test_identities_never_share_a_connection(pki: Pki, tls_crm: TlsCrm) -> None:
    """One client, one CRM, nodes with and without the certificate, interleaved: the node
    without it is refused every time, so it never rode on a kept-alive connection made
    with the certificate (`http1` pools connections by the request's TLS context)."""
    with_cert = crm_node(tls_crm.url, pki.client)
    without = crm_node(tls_crm.url, None, node_id="plain")
    async with crm_client(settings=CrmHttpSettings(ca_bundle=str(pki.ca_bundle))) as client:
        for n in range(3):
            assert await client.lookup(with_cert, str(n + 1), budget=5, context=CONTEXT) == TRUE
            with pytest.raises(CrmError):
                await client.lookup(without, str(n + 1), budget=5, context=CONTEXT)
    assert tls_crm.clients == ["callerid-resolver"] * 3


async def test_mutual_tls_calls_end_to_end(pki: Pki, tls_crm: TlsCrm, tmp_path: Path) -> None:
    """Through an embedded gateway: the node with the CA's certificate identifies the
    caller; the node with a stranger's takes crm_error and its on_error destination."""
    nodes = [
        {"id": "gold", "url": tls_crm.url, "auth": pki.client},
        {"id": "bronze", "url": tls_crm.url, "auth": pki.stranger},
    ]
    async with embedded_gateway(tmp_path, nodes, crm_ca_bundle=str(pki.ca_bundle)) as gateway:
        gold = await call(gateway, "gold")
        bronze = await call(gateway, "bronze")
    assert gold["OML_IDENT_OUTCOME"] == "identified"
    assert (gold["OML_DEST_TYPE"], gold["OML_DEST_ID"]) == ("1", "3")
    assert bronze["OML_IDENT_OUTCOME"] == "crm_error"
    assert (bronze["OML_DEST_TYPE"], bronze["OML_DEST_ID"]) == ("5", "1")
    assert tls_crm.clients == ["callerid-resolver"]
