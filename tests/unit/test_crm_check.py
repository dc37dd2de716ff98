"""`callerid-crm-check` (tools/crm_check.py) against real local HTTP(S) CRMs.

Plain HTTP answers come from the mock CRM (`tools.mock_crm`); TLS, slow and oversized answers
from a small aiohttp app, HTTPS with a certificate made here by the `openssl` CLI. The check
runs in the test's event loop (`check(argv, out)`); one test runs the installed entry point.
"""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from agi_gateway.decisions import reply_decision
from crm_resolver.crm_http import HttpCrmClient
from crm_resolver.crm_response import parse_crm_response
from crm_resolver.memory_cache import MemoryCache
from crm_resolver.metrics import ResolverMetrics
from crm_resolver.ports import CrmError
from crm_resolver.resolver import Resolver
from shared.messages import IdentifyRequest
from shared.nodes import NodeSet, build_node
from tools.crm_check import check
from tools.mock_crm import MockCrm, start_mock_crm

TABLE: dict[str, Any] = {
    "default": {"destination": "false"},
    "customers": {
        "12345": {"destination": "true"},
        "20000": {"destination": " (5, 7) ", "key": "response", "status": "OK "},
        "25000": {"destination": "(1,3"},
        "30000": {"destination": [1, 3], "status": None},
        "40000": {"destination": "3,1"},
        "44444": {"status_code": 500, "raw": "Internal error: database down"},
        "55555": {"raw": "<html><body>It works!</body></html>"},
        "66666": {"status": "fail", "destination": "true"},
        "77777": {"destination": "1-3"},
    },
}


@dataclass
class Crm:
    """The mock CRM and a nodes file whose nodes point at it."""

    mock: MockCrm
    nodes: Path

    @property
    def url(self) -> str:
        return self.mock.url + "/identify"

    async def run(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = await check(list(argv), out=out)
        return code, out.getvalue()

    async def node(self, node: str, customer_id: str) -> tuple[int, str]:
        return await self.run("--id", customer_id, "--node", node, "--nodes", str(self.nodes))


def nodes_yaml(url: str) -> dict[str, Any]:
    common = {"url": url, "audio": "prompt", "on_not_identified": "1,4", "on_error": "1,9"}
    return {
        "nodes": [
            {"id": 7, "name": "gold", "interaction": "crm_true_false", "on_identified": "1,3"}
            | common,
            {
                "id": 8,
                "name": "router",
                "interaction": "crm_destination",
                "on_identified": "1,3",
                "allowed_destination_types": [1, 5],
            }
            | common,
        ]
    }


@pytest.fixture
async def crm(tmp_path: Path) -> AsyncIterator[Crm]:
    mock = await start_mock_crm(TABLE)
    try:
        path = tmp_path / "nodes.yaml"
        path.write_text(yaml.safe_dump(nodes_yaml(mock.url + "/identify")))
        yield Crm(mock, path)
    finally:
        await mock.close()


def lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines()]


def flat(output: str) -> str:
    """The report with every run of white space as one space: long lines are wrapped."""
    return " ".join(output.split())


# --- accepted ------------------------------------------------------------------------------


async def test_an_accepted_answer_shows_request_answer_parse_and_decision(crm: Crm) -> None:
    """A 200 {"status": "ok", "destination": "true"} on a true/false node exits 0 and the report
    shows the exact OMniLeads request, the raw answer, the parse, the decision (the node's
    on_identified), timing, and no TLS; the CRM is asked exactly once."""
    code, output = await crm.node("gold", "12345")
    assert code == 0, output
    seen = lines(output)
    assert f"POST {crm.url}" in seen
    assert "User-Agent: OMniLeads" in seen
    assert "Content-Type: application/x-www-form-urlencoded" in seen
    assert "Accept-Encoding: identity" in seen
    assert "idContact=12345" in seen
    assert "HTTP/1.1 200 OK" in seen
    assert '{"status": "ok", "destination": "true"}' in seen
    assert "answer key: 'destination'" in seen
    assert "=> true" in seen
    assert "outcome      identified" in seen
    assert "destination  1,3 (on_identified)" in seen
    assert any(line.startswith("total ") and "ms" in line for line in seen)
    assert "not used (http://): ids cross the network in clear" in seen
    assert "ACCEPTED: identified -> 1,3 (on_identified)" in seen
    assert (await crm.mock.stats())["calls"] == 1


async def test_tolerated_variants_are_named(crm: Crm) -> None:
    """The parse section says which accepted variant each part used: "response" as the key,
    a status in another case with spaces, "(5, 7)" with spaces, a [1, 3] list, no status."""
    code, output = await crm.node("router", "20000")
    assert code == 0, output
    seen = lines(output)
    assert "status: string 'OK ', read as 'ok'" in seen
    assert "answer key: 'response'" in seen
    assert "answer: string ' (5, 7) ', read as '5,7'" in seen
    assert "destination  5,7 (named by the CRM)" in seen

    code, output = await crm.node("router", "30000")
    assert code == 0, output
    seen = lines(output)
    assert 'status: absent, taken as "ok"' in seen
    assert "answer: JSON list [1, 3], read as 1,3" in seen
    assert "ACCEPTED: crm_destination -> 1,3 (named by the CRM)" in seen


async def test_a_node_from_the_command_line(crm: Crm) -> None:
    """Without a nodes file, --interaction describes the node; its destinations are named by
    field, since it has no real ones."""
    code, output = await crm.run(crm.url, "--id", "12345", "--interaction", "crm_destination")
    assert code == 0, output
    assert "ACCEPTED: identified -> the node's on_identified destination" in lines(output)


# --- not accepted --------------------------------------------------------------------------


async def test_http_500_is_rejected_and_its_body_shown(crm: Crm) -> None:
    """A 500 exits 1 as crm_http_status; the body that came with it is shown, the call's
    failover destination named, and the fix points at the CRM's own failure."""
    code, output = await crm.node("gold", "44444")
    assert code == 1, output
    seen = lines(output)
    assert "HTTP/1.1 500 Internal Server Error" in seen
    assert "Internal error: database down" in seen
    assert "not parsed: the service parses only 2xx answers" in seen
    assert "NOT ACCEPTED (crm_http_status): the CRM answered HTTP 500, not 2xx" in flat(output)
    assert "The call takes crm_error -> 1,9 (on_error)." in flat(output)
    assert "The CRM failed while answering" in flat(output)


async def test_a_garbage_body_is_rejected(crm: Crm) -> None:
    """An HTML page with 200 exits 1 as crm_bad_response ("not JSON") and says what the body
    must be."""
    code, output = await crm.node("gold", "55555")
    assert code == 1, output
    seen = lines(output)
    assert "<html><body>It works!</body></html>" in seen
    assert any(line.startswith("=> rejected: body is not JSON") for line in seen)
    assert any(line.startswith("NOT ACCEPTED (crm_bad_response)") for line in seen)
    assert "The call takes crm_bad_response -> 1,9 (on_error)." in flat(output)
    assert "must be a UTF-8 JSON object" in flat(output)


async def test_status_fail_is_rejected(crm: Crm) -> None:
    """ "status": "fail" exits 1 as crm_status_fail, whatever the destination says, and the
    fix tells an unknown customer apart from a failure."""
    code, output = await crm.node("gold", "66666")
    assert code == 1, output
    seen = lines(output)
    assert "status: string 'fail'" in seen
    assert 'NOT ACCEPTED (crm_status_fail): the CRM answered "status": "fail"' in flat(output)
    assert '{"status": "ok", "destination": "false"}' in flat(output)


async def test_a_disallowed_destination_type_is_rejected(crm: Crm) -> None:
    """A destination of a type outside the node's allowed_destination_types exits 1 as
    crm_disallowed_destination (outcome crm_bad_response) and names the allowed types."""
    code, output = await crm.node("router", "40000")
    assert code == 1, output
    seen = lines(output)
    assert "=> destination 3,1" in seen
    assert (
        "NOT ACCEPTED (crm_disallowed_destination): destination type 3 is not allowed on this "
        "node (allowed: 1,5)" in flat(output)
    )
    assert "The call takes crm_bad_response -> 1,9 (on_error)." in flat(output)
    assert "- or add 3 to the node's allowed_destination_types." in flat(output)


async def test_a_destination_on_a_true_false_node_is_rejected(crm: Crm) -> None:
    """The same destination answer that a crm_destination node takes is refused by a
    crm_true_false node, and the fix says so."""
    code, output = await crm.node("gold", "30000")
    assert code == 1, output
    assert "NOT ACCEPTED (crm_bad_response): this crm_true_false node cannot use a destination" in (
        lines(output)
    )


async def test_an_unknown_destination_form_is_rejected(crm: Crm) -> None:
    """ "1-3" is no destination form: crm_bad_response, with the accepted forms listed."""
    code, output = await crm.node("router", "77777")
    assert code == 1, output
    assert "=> rejected: unknown destination '1-3'" in lines(output)
    assert '"1,3"; also "(1,3)", "[1,3]" or the list [1, 3]' in flat(output)


async def test_connection_refused(crm: Crm) -> None:
    """Nothing listening: crm_unreachable, the request prepared but not sent, exit 1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, output = await crm.run(
        f"http://127.0.0.1:{port}/x", "--id", "1", "--interaction", "crm_true_false"
    )
    assert code == 1, output
    seen = lines(output)
    assert f"NOT ACCEPTED (crm_unreachable): connection refused by 127.0.0.1:{port}" in flat(output)
    assert "(not sent: no connection; the headers above were prepared for it)" in seen
    assert "The call takes crm_error -> the node's on_error destination." in flat(output)


# --- an aiohttp CRM for what the mock does not do ----------------------------------------


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes


@dataclass
class AppCrm:
    url: str
    seen: list[Seen] = field(default_factory=list)


@asynccontextmanager
async def serve(ssl_context: Any = None, delay: float = 0.0, body: bytes | None = None) -> Any:
    crm = AppCrm("")

    async def handle(request: web.Request) -> web.Response:
        crm.seen.append(Seen(dict(request.headers), await request.read()))
        await asyncio.sleep(delay)
        return web.Response(body=body or b'{"status": "ok", "destination": "false"}')

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    # A slow answer still waiting is cancelled at the end rather than waited for.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context else "http"
        crm.url = f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/identify"
        yield crm
    finally:
        await runner.cleanup()


async def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await check(list(argv), out=out)
    return code, out.getvalue()


async def test_no_answer_within_the_budget_is_a_timeout() -> None:
    """A CRM slower than the budget is crm_timeout, reported within the budget (plus slack)."""
    async with serve(delay=2.0) as crm:
        code, output = await run(
            crm.url, "--id", "1", "--interaction", "crm_true_false", "--timeout", "0.3"
        )
    assert code == 1, output
    seen = lines(output)
    assert "NOT ACCEPTED (crm_timeout): no answer within 0.3 s (the node's crm_timeout)" in flat(
        output
    )
    total = next(line for line in seen if line.startswith("total "))
    assert float(total.split()[1]) < 1000


async def test_an_oversized_answer_is_rejected() -> None:
    """A body over 64 KiB is refused from its Content-Length, unread, with the limit named."""
    async with serve(
        body=b'{"status": "ok", "destination": "true", "x": "' + b"x" * 70_000 + b'"}'
    ) as crm:
        code, output = await run(crm.url, "--id", "1", "--interaction", "crm_true_false")
    assert code == 1, output
    seen = lines(output)
    assert "(body not read: see RESULT)" in seen
    assert "Content-Length over 65536 bytes" in flat(output)
    assert "Keep the answer under 65536 bytes" in flat(output)


async def test_secrets_are_masked_and_the_signature_is_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bearer token the node names is sent but never printed; the Standard Webhooks headers
    and the context fields are printed as sent."""
    token = "s3cr3t-token-value-0123456789"
    monkeypatch.setenv("CHECK_TOKEN", token)
    monkeypatch.setenv("CHECK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    async with serve() as crm:
        code, output = await run(
            crm.url,
            "--id", "12345",
            "--interaction", "crm_true_false",
            "--token-env", "CHECK_TOKEN",
            "--signing-secret-env", "CHECK_SECRET",
            "--send-context",
            "--caller-number", "5551234",
            "--call-id", "1700000000.1",
        )  # fmt: skip
    assert code == 0, output
    assert token not in output
    [request] = crm.seen
    assert request.headers["Authorization"] == f"Bearer {token}"
    seen = lines(output)
    assert f"Authorization: Bearer <masked: {len(token)} characters from $CHECK_TOKEN>" in seen
    assert f"webhook-signature: {request.headers['webhook-signature']}" in seen
    assert request.body.decode() in seen
    assert "idContact=12345&callerNumber=5551234&callId=1700000000.1&nodeId=crm-check" in seen


# --- TLS -----------------------------------------------------------------------------------


def make_certificate(where: Path, subject_alt_name: str) -> tuple[Path, Path]:
    """A self-signed EC certificate (milliseconds to make) and its key, by the openssl CLI."""
    cert, key = where / "cert.pem", where / "key.pem"
    try:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", "2",
                "-subj", "/CN=crm.test/O=Check Test",
                "-addext", f"subjectAltName={subject_alt_name}",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.skip("the openssl CLI is not installed")
    return cert, key


@asynccontextmanager
async def tls_crm(cert: Path, key: Path) -> AsyncIterator[AppCrm]:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with serve(ssl_context=context) as crm:
        yield crm


async def test_a_self_signed_certificate_fails_verification(tmp_path: Path) -> None:
    """A self-signed CRM certificate is crm_unreachable: nothing is sent, OpenSSL's reason is
    quoted, the certificate presented is described (from a handshake that sends nothing) and
    the fix names CALLERID_CRM_CA_BUNDLE."""
    cert, key = make_certificate(tmp_path, "IP:127.0.0.1")
    async with tls_crm(cert, key) as crm:
        code, output = await run(crm.url, "--id", "1", "--interaction", "crm_true_false")
        assert crm.seen == []
    assert code == 1, output
    seen = lines(output)
    assert "verified     NO: self-signed certificate" in seen
    assert "subject      CN=crm.test, O=Check Test" in seen
    assert "issuer       CN=crm.test, O=Check Test  (self-signed)" in seen
    assert "names        IP:127.0.0.1" in seen
    assert (
        "NOT ACCEPTED (crm_unreachable): TLS verification failed: self-signed certificate"
        in flat(output)
    )
    assert "CALLERID_CRM_CA_BUNDLE" in flat(output)


async def test_with_the_ca_bundle_the_tls_session_is_shown(tmp_path: Path) -> None:
    """With the certificate as --ca-bundle the same CRM is accepted, and the report shows the
    TLS version, cipher, certificate and a verified host name."""
    cert, key = make_certificate(tmp_path, "IP:127.0.0.1")
    async with tls_crm(cert, key) as crm:
        code, output = await run(
            crm.url, "--id", "1", "--interaction", "crm_true_false", "--ca-bundle", str(cert)
        )
    assert code == 0, output
    seen = lines(output)
    assert any(line.startswith("protocol     TLSv1.") for line in seen)
    assert "subject      CN=crm.test, O=Check Test" in seen
    assert "verified     yes (system store plus CA bundle; host name matches)" in seen
    assert "ACCEPTED: not_identified -> the node's on_not_identified destination" in seen


async def test_a_certificate_for_another_name_fails_verification(tmp_path: Path) -> None:
    """A trusted certificate that does not name the URL's host is refused, and the fix says
    the certificate must name it."""
    cert, key = make_certificate(tmp_path, "DNS:crm.test")
    async with tls_crm(cert, key) as crm:
        code, output = await run(
            crm.url, "--id", "1", "--interaction", "crm_true_false", "--ca-bundle", str(cert)
        )
    assert code == 1, output
    seen = lines(output)
    assert "names        DNS:crm.test" in seen
    assert any("mismatch" in line for line in seen if line.startswith("NOT ACCEPTED"))
    assert "does not name 127.0.0.1" in flat(output)


# --- the check agrees with the product ----------------------------------------------------


@pytest.mark.parametrize("customer_id", sorted(TABLE["customers"]))
@pytest.mark.parametrize("node_id", ["7", "8"])
async def test_the_check_agrees_with_the_resolver(crm: Crm, node_id: str, customer_id: str) -> None:
    """For every answer of the table and both nodes, the outcome the check reports is the one
    the real Resolver's reply leads to, and it exits 0 exactly when that is not a failover."""
    nodes = NodeSet(build_node(raw) for raw in yaml.safe_load(crm.nodes.read_text())["nodes"])
    node = nodes.get(node_id)
    assert node is not None
    client = HttpCrmClient()
    await client.start()
    try:
        resolver = Resolver(
            lambda: nodes, client, MemoryCache(), ResolverMetrics(CollectorRegistry())
        )
        reply = await resolver(
            IdentifyRequest(
                request_id="r1",
                node_id=node_id,
                customer_id=customer_id,
                deadline=time.time() + 5,
            )
        )
        await resolver.close()
    finally:
        await client.close()
    expected = reply_decision(node, reply, customer_id)

    code, output = await crm.node(node_id, customer_id)
    assert f"outcome      {expected.outcome.value}" in lines(output)
    assert f"source       {expected.source.value}" in lines(output)
    assert code == (1 if expected.source.value == "failover" else 0)


def test_parse_notes_do_not_change_the_parse() -> None:
    """`parse_crm_response(body, notes)` gives the answer or the error it gives without notes,
    for every body of the CRM corpus."""
    corpus = sorted((Path(__file__).parents[1] / "corpus" / "crm").iterdir())
    assert corpus
    for path in corpus:
        body = path.read_bytes()
        results = []
        for notes in (None, []):
            try:
                results.append(parse_crm_response(body, notes))
            except CrmError as exc:
                results.append((type(exc), str(exc)))
        assert results[0] == results[1], path.name


# --- cannot check, and the entry point -----------------------------------------------------


async def test_what_cannot_be_checked_exits_2(
    crm: Crm, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No node kind, an unknown node, a secret the node names that is not set: exit 2 with the
    reason on stderr, and nothing is sent."""
    monkeypatch.delenv("CHECK_MISSING", raising=False)
    assert (await crm.run(crm.url, "--id", "1"))[0] == 2
    assert "--interaction crm_true_false" in capsys.readouterr().err
    assert (await crm.node("nope", "1"))[0] == 2
    assert "no node 'nope'" in capsys.readouterr().err
    code, _ = await crm.run(
        crm.url, "--id", "1", "--interaction", "crm_true_false", "--token-env", "CHECK_MISSING"
    )
    assert code == 2
    assert "CHECK_MISSING is not set" in capsys.readouterr().err
    assert (await crm.mock.stats())["calls"] == 0


def test_the_entry_point_explains_itself() -> None:
    """The installed `callerid-crm-check --help` says what is sent, what is checked, and the
    exit codes."""
    script = Path(sys.executable).parent / "callerid-crm-check"
    if not script.exists():
        pytest.skip("not installed: pip install -e . --no-deps")
    done = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "User-Agent: OMniLeads" in done.stdout
    assert "Exit codes: 0 the answer is accepted; 1 it is not" in done.stdout
    assert "--interaction" in done.stdout
