"""Ask a CRM about one customer id exactly as callerid does during a call, and say whether
callerid would accept the answer, what the call would do with it, and what to fix if not.

What it sends: the request the product sends, built and sent by the product's own HTTP
client (crm_resolver.crm_http): POST <URL>, User-Agent: OMniLeads, Content-Type:
application/x-www-form-urlencoded, Accept-Encoding: identity, body idContact=<id>. When the
node asks for them (its auth: section, or the older crm_token_env / crm_signing_secret_env):
Authorization: Bearer <token> (a token from the environment, or from an OAuth2 token
endpoint: that request is sent first, through the same client, and not shown), Standard
Webhooks signature headers (webhook-id, webhook-timestamp, webhook-signature), a client
certificate (mutual_tls), and callerNumber, callId and nodeId in the form
(crm_send_context). TLS is always verified (system store plus
CALLERID_CRM_CA_BUNDLE or --ca-bundle); redirects are not followed; proxy variables are
ignored; CALLERID_CRM_ALLOWED_HOSTS and CALLERID_CRM_ALLOW_METADATA apply as in the service.
The CRM is asked once, whatever the cache or circuit breaker would say: the service asks once
more after a timeout, a connection failure or a 5xx when time is left.

What it shows: the request (the token masked), the raw answer (status, headers, body, cut
after --max-body characters), how the answer parses (which accepted variant each part used:
"destination" or "response", JSON booleans, "(1,3)", [1, 3], case and spaces...), the
decision a node would take (outcome and destination), timing (DNS, connect, first byte,
total) and TLS (protocol, cipher, the CRM's certificate, verification). When the answer is
not accepted it says why and what to change: not 2xx, not JSON, over 64 KiB, "status":
"fail", an unknown destination form, a destination type the node does not allow, no answer
within the node's crm_timeout, TLS verification failure, connection refused...

The node: --node ID (or name) from --nodes (a YAML file or redis:// URL; default
CALLERID_NODES, as the service), or a node described by --interaction and friends. The same
answer can be right for one node and wrong for another: a crm_true_false node (OMniLeads type
2) takes only true/false, a crm_destination node (type 3) also a destination of an allowed
type.

Exit codes: 0 the answer is accepted; 1 it is not (the report says what to fix); 2 the check
could not run (bad arguments, node not found, a secret the node names is not set, an
unreadable CA bundle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import logging
import os
import socket
import ssl
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp.resolver import DefaultResolver
from pydantic import ValidationError
from yarl import URL

from agi_gateway.decisions import Decision, reply_decision
from crm_resolver.address_policy import AddressPolicy, AddressRefused, PolicyResolver
from crm_resolver.crm_auth import CrmCredentials
from crm_resolver.crm_http import TOKEN_REQUEST, CrmHttpSettings, HttpCrmClient
from crm_resolver.crm_response import MAX_BODY, parse_crm_response
from crm_resolver.http1 import ConnectionLost, NameNotResolved, Observer, TlsFailed
from crm_resolver.http1_parse import Response
from crm_resolver.oauth2_client import CrmTokenUnavailable
from crm_resolver.ports import (
    CallContext,
    CrmAnswer,
    CrmBadResponse,
    CrmError,
    CrmHttpStatus,
    CrmStatusFail,
    CrmTimeout,
    CrmUnreachable,
)
from crm_resolver.resolver import _is_outage
from shared.crm_answer import judge
from shared.destination import DEFAULT_ALLOWED_TYPES, Destination
from shared.messages import IdentifyReply
from shared.node_auth import (
    BearerAuth,
    MutualTlsAuth,
    OAuth2ClientCredentialsAuth,
    WebhookSignatureAuth,
)
from shared.node_sources import source_from_setting
from shared.nodes import ConfigError, NodeConfig
from shared.outcomes import ErrorCode, Interaction, Outcome, Source
from shared.settings import CommonSettings

EPILOG = """\
examples:
  callerid-crm-check https://crm.example.com/callerid --id 12345 --interaction crm_true_false
  callerid-crm-check --node gold-customers --nodes /etc/callerid/nodes.yaml --id 12345
  CALLERID_CRM_TOKEN_GOLD=... callerid-crm-check --node 1 --nodes nodes.yaml --id 12345 \\
      https://staging-crm.example.com/callerid    # the node's rules, another URL
"""

EXIT_ACCEPTED = 0
EXIT_REJECTED = 1
EXIT_CANNOT_CHECK = 2

DEFAULT_MAX_BODY = 2000
"""Characters of a body shown by default."""
_MAX_BODY_LINES = 40
_WIDTH = 96
# A node made from the command line has no real destinations: these stand for its fields.
_PLACEHOLDERS = {
    "on_identified": Destination(type=0, id=1),
    "on_not_identified": Destination(type=0, id=2),
    "on_error": Destination(type=0, id=3),
}
_CRM_INTERACTIONS = (Interaction.CRM_TRUE_FALSE.value, Interaction.CRM_DESTINATION.value)
_NODE_SHAPING = ("interaction", "allowed_types", "token_env", "signing_secret_env", "send_context")


class CheckError(Exception):
    """The check cannot run; the message says why (exit 2)."""


# --------------------------------------------------------------------------- what was seen


@dataclass(frozen=True)
class Certificate:
    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    names: list[str]


@dataclass
class Tls:
    protocol: str | None = None
    cipher: str | None = None
    certificate: Certificate | None = None
    verified: bool = False
    problem: str | None = None
    """Why verification failed (OpenSSL's words), when it did."""
    probed: bool = False
    """The details come from a second handshake without verification (no request sent)."""


@dataclass
class Wire:
    """What the product's HTTP client did, as its observer (`http1.Observer`) reported it."""

    started: float = 0.0
    dns: tuple[float, float | None] | None = None
    connect: tuple[float, float | None] | None = None
    headers_sent: float | None = None
    first_byte: float | None = None
    ended: float | None = None
    method: str = "POST"
    url: str = ""
    request_headers: list[tuple[str, str]] | None = None
    request_body: bytearray = field(default_factory=bytearray)
    request_complete: bool = False
    status: int | None = None
    reason: str = ""
    version: str = ""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    early_body: bytes | None = None
    """What of a non-2xx body had arrived with its headers (the service never reads it)."""
    peer: str | None = None
    tls: Tls | None = None

    def since(self, moment: float | None) -> float | None:
        return None if moment is None else moment - self.started


class _WireObserver(Observer):
    """Fills a `Wire` from the product's HTTP client as the CRM request goes; an auth
    method's token request (an OAuth2 node) goes through the same client and is not the
    request the report describes: its events are left out."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    def request_start(
        self, tag: object, method: str, url: str, headers: Sequence[tuple[str, str]]
    ) -> None:
        if tag != TOKEN_REQUEST:
            self.wire.method, self.wire.url = method, url
            self.wire.request_headers = list(headers)

    def dns_start(self, tag: object, host: str) -> None:
        if tag != TOKEN_REQUEST:
            self.wire.dns = (time.perf_counter(), None)

    def dns_end(self, tag: object, host: str) -> None:
        if tag != TOKEN_REQUEST and self.wire.dns is not None:
            self.wire.dns = (self.wire.dns[0], time.perf_counter())

    def connect_start(self, tag: object) -> None:
        if tag != TOKEN_REQUEST:
            self.wire.connect = (time.perf_counter(), None)

    def connect_end(self, tag: object, transport: asyncio.BaseTransport) -> None:
        if tag != TOKEN_REQUEST and self.wire.connect is not None:
            self.wire.connect = (self.wire.connect[0], time.perf_counter())

    def request_sent(self, tag: object, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        if tag != TOKEN_REQUEST:
            wire = self.wire
            wire.headers_sent = time.perf_counter()
            wire.request_headers = list(headers)
            wire.request_body += body
            wire.request_complete = True

    def response_head(
        self, tag: object, response: Response, transport: asyncio.BaseTransport
    ) -> None:
        if tag == TOKEN_REQUEST:
            return
        wire = self.wire
        wire.first_byte = time.perf_counter()
        wire.status, wire.reason = response.status, response.reason
        wire.version = response.version
        wire.response_headers = list(response.headers)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            wire.peer = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            wire.tls = _tls_of(ssl_object, verified=True)

    def early_body(self, tag: object, body: bytes) -> None:
        # The service stops at a status outside 2xx and never waits for its body: this is
        # what of it came with the headers, so the check cannot time out where it does not.
        if tag != TOKEN_REQUEST:
            self.wire.early_body = body


def _tls_of(ssl_object: ssl.SSLObject | ssl.SSLSocket, *, verified: bool) -> Tls:
    cipher = ssl_object.cipher()
    der = ssl_object.getpeercert(binary_form=True)
    return Tls(
        protocol=ssl_object.version(),
        cipher=cipher[0] if cipher else None,
        certificate=parse_certificate(der) if der else None,
        verified=verified,
    )


# --------------------------------------------------------------------------- certificates

_NAME_OIDS = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
}
_SUBJECT_ALT_NAME = "2.5.29.17"
_Element = tuple[int, int, int]  # tag, first content byte, end


def _element(der: bytes, pos: int) -> _Element:
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(der: bytes, start: int, end: int) -> list[_Element]:
    found = []
    while start < end:
        element = _element(der, start)
        found.append(element)
        start = element[2]
    return found


def _oid(raw: bytes) -> str:
    parts = [min(raw[0] // 40, 2), raw[0] - 40 * min(raw[0] // 40, 2)]
    value = 0
    for byte in raw[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(str(part) for part in parts)


def _name(der: bytes, start: int, end: int) -> str:
    parts = []
    for _, set_start, set_end in _children(der, start, end):
        for _, pair_start, pair_end in _children(der, set_start, set_end):
            (_, oid_start, oid_end), (tag, value_start, value_end) = _children(
                der, pair_start, pair_end
            )[:2]
            oid = _oid(der[oid_start:oid_end])
            raw = der[value_start:value_end]
            value = raw.decode("utf-16-be" if tag == 0x1E else "utf-8", "replace")
            parts.append(f"{_NAME_OIDS.get(oid, oid)}={value}")
    return ", ".join(parts) or "(empty)"


def _time(der: bytes, element: _Element) -> datetime:
    tag, start, end = element
    layout = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"
    return datetime.strptime(der[start:end].decode("ascii"), layout).replace(tzinfo=UTC)


def _alt_names(der: bytes, extensions: _Element) -> list[str]:
    names: list[str] = []
    _, start, end = _element(der, extensions[1])
    for _, ext_start, ext_end in _children(der, start, end):
        parts = _children(der, ext_start, ext_end)
        if _oid(der[parts[0][1] : parts[0][2]]) != _SUBJECT_ALT_NAME:
            continue
        _, list_start, list_end = _element(der, parts[-1][1])
        for tag, name_start, name_end in _children(der, list_start, list_end):
            raw = der[name_start:name_end]
            if tag == 0x82:
                names.append("DNS:" + raw.decode("ascii", "replace"))
            elif tag == 0x87 and len(raw) in (4, 16):
                names.append(f"IP:{ipaddress.ip_address(raw)}")
    return names


def parse_certificate(der: bytes) -> Certificate | None:
    """Subject, issuer, validity and subject alternative names of an X.509 certificate in
    DER; None when it cannot be read (the check then just does not show them)."""
    try:
        _, start, end = _element(der, 0)
        _, tbs_start, tbs_end = _children(der, start, end)[0]
        fields = _children(der, tbs_start, tbs_end)
        if fields[0][0] == 0xA0:  # explicit version
            fields = fields[1:]
        # serial, signature algorithm, issuer, validity, subject, key, optional [1] [2] [3]
        not_before, not_after = _children(der, fields[3][1], fields[3][2])[:2]
        extensions = [element for element in fields[6:] if element[0] == 0xA3]
        return Certificate(
            subject=_name(der, fields[4][1], fields[4][2]),
            issuer=_name(der, fields[2][1], fields[2][2]),
            not_before=_time(der, not_before),
            not_after=_time(der, not_after),
            names=_alt_names(der, extensions[0]) if extensions else [],
        )
    except (IndexError, ValueError):
        return None


async def _probe_certificate(url: URL, policy: AddressPolicy, timeout: float) -> Tls | None:
    """The certificate the CRM presents, from a handshake that does not verify it and sends
    nothing: only after the product's verified connection failed, to show what to fix.
    Addresses go through the same address policy as the product's requests."""
    host, port = url.raw_host, url.port or 443
    if host is None:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    resolver = PolicyResolver(policy, DefaultResolver())
    try:
        async with asyncio.timeout(timeout):
            addresses = await resolver.resolve(host, port, socket.AF_UNSPEC)
            _, writer = await asyncio.open_connection(
                addresses[0]["host"], port, ssl=context, server_hostname=host
            )
    except (OSError, TimeoutError, IndexError):
        return None
    finally:
        await resolver.close()
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            return None
        tls = _tls_of(ssl_object, verified=False)
        tls.probed = True
        return tls
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


# --------------------------------------------------------------------------- the check


@dataclass
class Target:
    node: NodeConfig
    """The node as configured, with the URL to ask."""
    where: str | None
    """Where the node was read from; None for a node made from the command line."""
    budget: float
    budget_from: str = "crm_timeout"
    replaced_url: str | None = None
    """The node's own URL, when the command line named another one."""

    @property
    def url(self) -> str:
        assert self.node.url is not None  # a CRM node has one
        return self.node.url


@dataclass
class Result:
    wire: Wire
    body: bytes | None = None
    notes: list[str] = field(default_factory=list)
    answer: CrmAnswer | None = None
    error: CrmError | None = None
    code: ErrorCode | None = None
    decision: Decision | None = None
    total: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.decision is not None and self.decision.source is not Source.FAILOVER


async def run_check(
    target: Target,
    customer_id: str,
    *,
    settings: CrmHttpSettings,
    credentials: CrmCredentials,
    context: CallContext,
) -> Result:
    """Ask the CRM once through the product's client, then parse and judge as it does."""
    wire = Wire()
    client = HttpCrmClient(settings, credentials=credentials, observer=_WireObserver(wire))
    try:
        await client.start()
    except ValueError as exc:  # the CA bundle
        raise CheckError(str(exc)) from exc
    node = target.node
    result = Result(wire)
    try:
        wire.started = time.perf_counter()
        try:
            result.body = await client.fetch(
                node, customer_id, budget=target.budget, context=context
            )
            result.answer = parse_crm_response(result.body, result.notes)
        except CrmError as err:
            result.error, result.code = err, err.code
        finally:
            wire.ended = time.perf_counter()
            result.total = wire.ended - wire.started
    finally:
        await client.close()
    if result.answer is not None:
        result.code = judge(node, result.answer)
    if result.code is None:
        assert result.answer is not None
        reply = IdentifyReply(
            request_id="crm-check",
            verdict=result.answer.verdict,
            destination=result.answer.destination,
            source=Source.CRM,
            crm_ms=result.total * 1000,
        )
    else:
        reply = IdentifyReply.failure("crm-check", result.code, crm_ms=result.total * 1000)
    result.decision = reply_decision(node, reply, customer_id)
    certificate_error = _certificate_error(result.error)
    if certificate_error is not None:
        probed = await _probe_certificate(URL(target.url), settings.policy, target.budget)
        wire.tls = probed or Tls()
        wire.tls.problem = certificate_error
    return result


def _causes(error: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _certificate_error(error: CrmError | None) -> str | None:
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return str(cause.verify_message or cause.reason or cause)
    return None


# --------------------------------------------------------------------------- advice


def _problem_and_fixes(result: Result, target: Target) -> tuple[str, list[str]]:
    """What is wrong, in one line, and what to change (most likely first)."""
    error, node, wire = result.error, target.node, result.wire
    if isinstance(error, CrmHttpStatus):
        return f"the CRM answered HTTP {error.status}, not 2xx", _status_fixes(error.status, wire)
    if isinstance(error, CrmStatusFail):
        return 'the CRM answered "status": "fail"', [
            'A customer the CRM does not know is {"status": "ok", "destination": "false"}: '
            "the call then goes to the node's not-identified destination.",
            '"fail" says the CRM could not decide: the call goes to the error destination '
            "(on_error), whatever the destination says.",
        ]
    if isinstance(error, CrmBadResponse):
        return f"the answer is not in the protocol: {error}", _bad_response_fixes(str(error), wire)
    if isinstance(error, CrmTimeout):
        return _timeout_problem(wire, target.budget)
    if isinstance(error, CrmTokenUnavailable):
        return f"no OAuth2 token: {error}", [
            "Check the node's token_url, client_id and the secret in its client_secret_env "
            "(HTTP 400 or 401 from the token endpoint usually means a wrong id or secret),",
            "and that the token endpoint is reachable from the resolver and answers JSON with "
            "an access_token.",
        ]
    if isinstance(error, CrmUnreachable):
        problem, fixes = _unreachable_problem(error, target)
        if any(isinstance(method, MutualTlsAuth) for method in node.auth):
            fixes.append(
                "The node presents a client certificate (mutual_tls): a CRM that does not "
                "accept it ends the TLS session; check that the CRM trusts its issuer."
            )
        return problem, fixes
    if result.code is ErrorCode.CRM_DISALLOWED_DESTINATION:
        assert result.answer is not None
        assert result.answer.destination is not None
        kind = result.answer.destination.type
        allowed = ",".join(str(t) for t in sorted(node.allowed_destination_types))
        return f"destination type {kind} is not allowed on this node (allowed: {allowed})", [
            f"Answer a destination of type {allowed} (1 inbound campaign, 2 time validation, "
            "3 IVR, 5 hang-up, 9 another identification node),",
            f"or add {kind} to the node's allowed_destination_types.",
        ]
    if result.code is ErrorCode.CRM_BAD_RESPONSE and result.answer is not None:
        return "this crm_true_false node cannot use a destination", [
            'A crm_true_false node (OMniLeads type 2) takes only "true" or "false".',
            "To let the CRM name the destination, make it a crm_destination node (type 3)"
            " (here: --interaction crm_destination).",
        ]
    if result.decision is not None and result.decision.source is Source.FAILOVER:
        return 'the node has no "identified" destination for a bare "true"', [
            'This crm_destination node has no on_identified: answer a destination ("1,3"),',
            "or give the node an on_identified destination (OMniLeads: TRUEDST).",
        ]
    return "the answer is not accepted", []


def _status_fixes(status: int, wire: Wire) -> list[str]:
    headers = {name.lower(): value for name, value in wire.response_headers}
    if 300 <= status <= 399:
        location = headers.get("location")
        where = f" ({location[:200]})" if location else ""
        return [
            f"Redirects are never followed: set the node's URL to the final address{where}.",
            "An http:// URL redirected to https:// needs the https:// URL in the node.",
        ]
    fixes = {
        400: "The request is a form (application/x-www-form-urlencoded) with idContact=<digits>"
        " in the body, not JSON and not a query string: read it as a form.",
        401: "The endpoint refused the credentials: check the token or signature it expects "
        "against the request above (README: Securing CRM calls).",
        403: "The endpoint refused the request: check its credentials and any IP allow-list "
        "(the request comes from the resolver's address).",
        404: "No endpoint at this URL: check the path. An unknown customer is not a 404: "
        'answer 200 {"status": "ok", "destination": "false"}.',
        405: "The endpoint must accept POST.",
        415: "The endpoint must accept Content-Type application/x-www-form-urlencoded.",
        422: "The request is a form (application/x-www-form-urlencoded) with idContact=<digits>"
        ": read it as a form.",
        429: "The CRM limits request rates: allow the contact center's call rate.",
    }
    if status in fixes:
        return [fixes[status]]
    if status >= 500:
        return [
            "The CRM failed while answering: its logs say why (so may the body above).",
            "Repeated failures open the CRM's circuit breaker: calls then go to the error "
            "destination without asking until the CRM answers again.",
        ]
    return ['Answer 2xx with a JSON object: {"status": "ok", "destination": "true"}.']


_PROTOCOL = '{"status": "ok", "destination": "true" | "false" | "type,id"}'


def _bad_response_fixes(message: str, wire: Wire) -> list[str]:
    fixes = []
    headers = {name.lower(): value for name, value in wire.response_headers}
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        fixes.append(
            f"Do not compress the answer (Content-Encoding: {encoding[:40]}): the request says "
            "Accept-Encoding: identity and nothing is decompressed."
        )
    if "over" in message and str(MAX_BODY) in message:
        fixes.append(f"Keep the answer under {MAX_BODY} bytes (64 KiB): it needs two keys.")
    elif "not JSON" in message or "not UTF-8" in message:
        if "html" in headers.get("content-type", "").lower():
            fixes.append(
                "The body is an HTML page: a web server or proxy error page, a login page, or "
                "the wrong URL."
            )
        fixes.append(f"The body must be a UTF-8 JSON object: {_PROTOCOL}.")
    elif "JSON object" in message or "nested" in message:
        fixes.append(f"The top level must be a JSON object: {_PROTOCOL}.")
    elif "unknown status" in message:
        fixes.append('"status" must be "ok" or "fail" (or be left out).')
    elif "no destination" in message:
        fixes.append('Add "destination" (or "response") with "true", "false" or "type,id".')
    elif "disagree" in message:
        fixes.append('Send "destination" or "response", not both with different answers.')
    elif "unknown destination" in message:
        fixes.append(
            'The destination must be "true", "false", or a destination "type,id" of two '
            'integers ("1,3"; also "(1,3)", "[1,3]" or the list [1, 3]).'
        )
    elif "HTTP" in message or "body" in message:
        fixes.append(
            "The server's HTTP is broken (a body shorter than its Content-Length, a bad status "
            "line or header): check the CRM's web server and any proxy in between."
        )
    if not fixes:
        fixes.append(f"Answer {_PROTOCOL}.")
    return fixes


def _timeout_problem(wire: Wire, budget: float) -> tuple[str, list[str]]:
    if wire.connect is not None and wire.connect[1] is None:
        return f"no connection within {_seconds(budget)} (the service's connect limit is 1 s)", [
            "Nothing answered the connection attempt: a firewall dropping packets, or the "
            "wrong host or port. The resolver's address must be allowed to reach the CRM.",
        ]
    if wire.first_byte is None:
        return f"no answer within {_seconds(budget)} (the node's crm_timeout)", [
            "Answer faster: the caller waits in silence meanwhile (hold_music_after helps),",
            "or raise the node's crm_timeout (up to 30 s).",
        ]
    return f"the body did not end within {_seconds(budget)}", [
        "Send the whole body at once with a Content-Length (or end the chunked body): the "
        "status line came, the rest of the answer did not.",
    ]


def _unreachable_problem(error: CrmUnreachable, target: Target) -> tuple[str, list[str]]:
    try:
        url = URL(target.url)
    except ValueError:
        return f"the URL cannot be used: {error}", ["Check the URL: http(s)://host[:port]/path."]
    where = f"{url.host}:{url.port}"
    causes = _causes(error)
    certificate = _certificate_error(error)
    if certificate is not None:
        fixes = [
            "Serve a certificate for this host from a public CA, with its intermediate "
            "certificates (the full chain),",
            "or trust your private CA: CALLERID_CRM_CA_BUNDLE=/path/ca.pem for the service "
            "(here: --ca-bundle). TLS verification cannot be turned off.",
        ]
        lowered = certificate.lower()
        if "expired" in lowered:
            fixes = ["Renew the CRM's certificate: it has expired."]
        elif "mismatch" in lowered or "not valid for" in lowered:
            fixes = [
                f"The certificate does not name {url.host}: use one that does (see its names "
                "under TLS), or the URL with a name it has."
            ]
        return f"TLS verification failed: {certificate}", fixes
    for cause in causes:
        if isinstance(cause, AddressRefused):
            text = str(cause)
            if "CALLERID_CRM_ALLOWED_HOSTS" in text:
                fix = f"Add {url.host} to CALLERID_CRM_ALLOWED_HOSTS (the service's and here)."
            else:
                fix = (
                    "Point the node at the CRM's own address; CALLERID_CRM_ALLOW_METADATA is "
                    "only for a CRM that truly is link-local."
                )
            return f"the service refuses this address: {text}", [fix]
        if isinstance(cause, NameNotResolved):
            return f"{url.host} does not resolve from here", [
                "Check the host name; the resolver must be able to resolve it too."
            ]
        if isinstance(cause, TlsFailed):
            reason = str(getattr(cause.__cause__, "reason", None) or cause.__cause__)
            fixes = ["Check the CRM's TLS setup (TLS 1.2 or later, a usable cipher)."]
            words = reason.lower().replace("_", " ")
            if "wrong version" in words or "record" in words:
                fixes.insert(0, f"{where} does not speak TLS: use http://, or the HTTPS port.")
            return f"TLS handshake failed: {reason}", fixes
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused by {where}", [
                f"Nothing listens on {where}: check the host, the port and that the CRM runs."
            ]
        if isinstance(cause, ConnectionLost):
            return "the CRM closed the connection without answering", [
                "Check the CRM's logs; a proxy or a crash in the endpoint can do this. "
                f"Did {where} expect {'https' if url.scheme == 'http' else 'http'}?"
            ]
    detail = next((str(c) for c in causes[1:] if str(c)), str(error))
    return f"cannot reach the CRM: {detail[:200]}", [
        f"Check that {where} is reachable from the resolver's network."
    ]


# --------------------------------------------------------------------------- the report


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _span(span: tuple[float, float | None], ended: float | None) -> str:
    start, end = span
    if end is not None:
        return _ms(end - start)
    return f"{_ms(None if ended is None else ended - start)}, did not complete"


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _show_body(body: bytes, limit: int) -> list[str]:
    if not body:
        return ["(empty body)"]
    try:
        text = body.decode("utf-8")
        note = ""
    except UnicodeDecodeError:
        text = body.decode("latin-1")
        note = " (not UTF-8: shown byte by byte)"
    shown = text[:limit]
    cleaned = "".join(
        ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode("ascii")
        for ch in shown
    )
    lines = cleaned.split("\n")
    extra_lines = max(0, len(lines) - _MAX_BODY_LINES)
    lines = lines[:_MAX_BODY_LINES]
    rest = len(text) - len(shown)
    if rest or extra_lines:
        lines.append(f"... ({len(body)} bytes in all; --max-body N shows more){note}")
    elif note:
        lines.append(note.strip())
    return lines


def _destination_label(target: Target, decision: Decision) -> str:
    destination = decision.destination
    if destination is None:
        return "(none)"
    if decision.outcome is Outcome.CRM_DESTINATION:
        return f"{destination} (named by the CRM)"
    fields = [name for name, dest in target.node.static_destinations() if dest == destination]
    if decision.source is Source.FAILOVER and "on_error" in fields:
        fields = ["on_error"]
    if target.where is None:
        return f"the node's {' / '.join(fields)} destination"
    return f"{destination} ({', '.join(fields)})"


def _mask(name: str, value: str, node: NodeConfig) -> str:
    if name.lower() == "authorization":
        scheme, _, secret = value.partition(" ")
        return f"{scheme} <masked: {len(secret)} characters from {_token_origin(node)}>"
    return value


def _token_origin(node: NodeConfig) -> str:
    for method in node.auth:
        if isinstance(method, BearerAuth):
            return f"${method.token_env}"
        if isinstance(method, OAuth2ClientCredentialsAuth):
            return f"the OAuth2 token endpoint {method.token_url}"
    return "the node's auth"


def _signing_env(node: NodeConfig) -> str | None:
    found = (m.secret_env for m in node.auth if isinstance(m, WebhookSignatureAuth))
    return next(found, None)


def report(result: Result, target: Target, customer_id: str, *, max_body: int, out: TextIO) -> int:
    """Print what happened; the exit code."""
    node, wire = target.node, result.wire

    def say(line: str = "") -> None:
        print(line, file=out)

    def section(title: str) -> None:
        say()
        say(title)

    kind = node.interaction.value
    if target.where is None:
        say(f"CRM check: customer id {customer_id}, a {kind} node from the command line")
    else:
        say(
            f"CRM check: customer id {customer_id}, node {node.id} {node.name!r} "
            f"({kind}, from {target.where})"
        )
    if target.replaced_url is not None:
        say(f"  (URL from the command line instead of the node's {target.replaced_url})")
    if target.where is not None and not node.entry_is_valid(customer_id):
        say(f"  note: this node would not accept the entry {customer_id} (length or pattern):")
        say("  a real call with it never reaches the CRM.")

    section("REQUEST (sent by the product's own client; secrets masked)")
    if wire.request_headers is None:
        say("  not sent: refused before any connection (see RESULT)")
    else:
        say(f"  {wire.method} {wire.url}")
        for name, value in wire.request_headers:
            say(f"  {name}: {_mask(name, value, node)}")
        say()
        if wire.request_complete:
            say(f"  {bytes(wire.request_body).decode('ascii', 'replace')}")
        else:
            say("  (not sent: no connection; the headers above were prepared for it)")
        if (signing_env := _signing_env(node)) and wire.request_complete:
            say(f"  (signed with the key in ${signing_env}; key not shown)")

    section("ANSWER")
    if wire.status is None:
        say("  none")
    else:
        say(f"  {wire.version} {wire.status} {wire.reason}".rstrip())
        for name, value in wire.response_headers:
            say(f"  {name}: {value}")
        say()
        if result.body is not None:
            body_lines = _show_body(result.body, max_body)
        elif wire.early_body is not None:
            body_lines = [
                *_show_body(wire.early_body, max_body),
                "(as much of the body as came with the headers; the service does not read it)",
            ]
        else:
            body_lines = ["(body not read: see RESULT)"]
        for line in body_lines:
            say(f"  {line}")

    section("PARSING (the product's parser)")
    if result.body is None:
        if wire.status is None:
            say("  not parsed: no answer")
        elif 200 <= wire.status <= 299:
            say("  not parsed: the body was not read whole (see RESULT)")
        else:
            say("  not parsed: the service parses only 2xx answers")
    else:
        for note in result.notes:
            say(f"  {note}")
        if result.answer is not None:
            destination = result.answer.destination
            say(f"  => {result.answer.verdict.value}" + (f" {destination}" if destination else ""))
        else:
            say(f"  => rejected: {result.error}")

    decision = result.decision
    assert decision is not None
    allowed = ",".join(str(t) for t in sorted(node.allowed_destination_types))
    section(f"DECISION ({kind} node; allowed destination types {allowed})")
    say(f"  outcome      {decision.outcome.value}")
    say(f"  destination  {_destination_label(target, decision)}")
    say(f"  source       {decision.source.value}")

    section("TIMING")
    dns = wire.dns
    if dns is None:
        say("  dns          -  (no lookup: an IP address, or no connection attempted)")
    else:
        say(f"  dns          {_span(dns, wire.ended)}")
    connected = "-" if wire.connect is None else _span(wire.connect, wire.ended)
    https = target.url.lower().startswith("https:")
    tls_note = "TCP and TLS" if https else "TCP"
    say(f"  connect      {connected}  ({tls_note}{', to ' + wire.peer if wire.peer else ''})")
    say(f"  first byte   {_ms(wire.since(wire.first_byte))}  (status line and headers)")
    budget = f"budget {_seconds(target.budget)}: {target.budget_from}"
    say(f"  total        {_ms(result.total)}  ({budget})")

    section("TLS")
    tls = wire.tls
    if not https:
        say("  not used (http://): ids cross the network in clear")
    elif tls is None:
        say("  no TLS session (no connection was made)")
    else:
        if tls.probed:
            say("  (from a second handshake without verification; nothing sent on it)")
        if tls.protocol:
            say(f"  protocol     {tls.protocol}, cipher {tls.cipher}")
        cert = tls.certificate
        if cert is not None:
            now = datetime.now(UTC)
            days = (cert.not_after - now).days
            expiry = (
                f"in {days} day{'' if days == 1 else 's'}" if cert.not_after > now else "EXPIRED"
            )
            say(f"  subject      {cert.subject}")
            say(
                f"  issuer       {cert.issuer}"
                + ("  (self-signed)" if cert.subject == cert.issuer else "")
            )
            say(
                f"  valid        {cert.not_before:%Y-%m-%d} to {cert.not_after:%Y-%m-%d} ({expiry})"
            )
            if cert.names:
                say(f"  names        {', '.join(cert.names[:10])}")
        if tls.verified:
            say("  verified     yes (system store plus CA bundle; host name matches)")
        else:
            say(f"  verified     NO: {tls.problem or 'unknown'}")

    section("RESULT")
    if result.accepted:
        say(f"  ACCEPTED: {decision.outcome.value} -> {_destination_label(target, decision)}")
        return EXIT_ACCEPTED
    code = result.code.value if result.code is not None else decision.outcome.value
    problem, fixes = _problem_and_fixes(result, target)
    say(_wrap(f"NOT ACCEPTED ({code}): {problem}", "  ", "    "))
    say(f"  The call takes {decision.outcome.value} -> {_destination_label(target, decision)}.")
    if result.error is not None and _is_outage(result.error):
        say("  (The service would ask once more if the time left allows; this check asks once.)")
    if fixes:
        say("  To fix:")
        for fix in fixes:
            say(_wrap(fix, "  - ", "    "))
    return EXIT_REJECTED


def _wrap(text: str, first: str, rest: str) -> str:
    return textwrap.fill(
        text,
        width=_WIDTH,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callerid-crm-check",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url", nargs="?", help="the CRM endpoint (default with --node: the node's url)"
    )
    parser.add_argument(
        "--id", required=True, metavar="DIGITS", help="the customer id to ask about"
    )
    nodes = parser.add_argument_group("the node (its settings decide what is sent and accepted)")
    nodes.add_argument("--node", metavar="ID", help="id or name of a configured node")
    nodes.add_argument(
        "--nodes",
        metavar="FILE",
        help="nodes YAML file or redis:// URL (default: CALLERID_NODES, as the service)",
    )
    nodes.add_argument(
        "--interaction",
        choices=_CRM_INTERACTIONS,
        help="without --node: crm_true_false (OMniLeads type 2) or crm_destination (type 3)",
    )
    nodes.add_argument(
        "--allowed-types",
        metavar="1,2,3,5,9",
        help="without --node: destination types the node allows (default 1,2,3,5,9)",
    )
    nodes.add_argument(
        "--token-env", metavar="VAR", help="without --node: as crm_token_env (a variable name)"
    )
    nodes.add_argument(
        "--signing-secret-env",
        metavar="VAR",
        help="without --node: as crm_signing_secret_env (a variable name)",
    )
    nodes.add_argument(
        "--send-context",
        action="store_true",
        default=None,
        help="without --node: as crm_send_context (adds callerNumber, callId, nodeId)",
    )
    request = parser.add_argument_group("the request")
    request.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="seconds to wait (default: the node's crm_timeout, 4)",
    )
    request.add_argument(
        "--caller-number",
        default="5550100",
        metavar="DIGITS",
        help="callerNumber sent with crm_send_context",
    )
    request.add_argument(
        "--call-id", metavar="ID", help="callId sent with crm_send_context (default: <now>.1)"
    )
    request.add_argument(
        "--ca-bundle",
        metavar="PEM",
        help="extra CA file (PEM) to trust (default: CALLERID_CRM_CA_BUNDLE)",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        metavar="CHARS",
        default=DEFAULT_MAX_BODY,
        help=f"characters of a body to show (default {DEFAULT_MAX_BODY})",
    )
    return parser


async def _target(args: argparse.Namespace, settings: CommonSettings) -> Target:
    if args.node is not None:
        given = [name for name in _NODE_SHAPING if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise CheckError(f"{flags}: the node decides this; leave it out with --node")
        where = args.nodes or settings.nodes
        if where is None:
            raise CheckError("--node needs --nodes FILE (or CALLERID_NODES, as the service)")
        source = source_from_setting(where)
        try:
            nodes = await source.load()
        finally:
            await source.close()
        found = nodes.get(args.node) or next((n for n in nodes if n.name == args.node), None)
        if found is None:
            raise CheckError(f"{where}: no node {args.node!r} (id or name)")
        if not found.uses_crm:
            raise CheckError(f"node {args.node!r} has interaction none: it never asks a CRM")
        budget = args.timeout if args.timeout is not None else found.crm_timeout
        budget_from = "crm_timeout" if args.timeout is None else "--timeout"
        if args.url is None or args.url == found.url:
            return Target(found, where, budget, budget_from)
        own_url = found.url
        try:
            found = NodeConfig.model_validate(found.model_dump() | {"url": args.url})
        except ValidationError as exc:
            raise CheckError(f"URL {args.url!r}: {_problems(exc)}") from None
        return Target(found, where, budget, budget_from, replaced_url=own_url)
    if args.url is None:
        raise CheckError("give the CRM URL, or --node (and --nodes) to use a node's")
    if args.interaction is None:
        raise CheckError(
            "say what kind of node asks: --interaction crm_true_false (OMniLeads type 2: "
            "true/false) or crm_destination (type 3: the CRM may name a destination), "
            "or --node ID --nodes FILE"
        )
    raw: dict[str, Any] = {
        "id": "crm-check",
        "name": "crm-check",
        "interaction": args.interaction,
        "url": args.url,
        "audio": "crm-check",
        **_PLACEHOLDERS,
        "crm_token_env": args.token_env,
        "crm_signing_secret_env": args.signing_secret_env,
        "crm_send_context": bool(args.send_context),
    }
    if args.allowed_types is not None:
        try:
            raw["allowed_destination_types"] = [int(t) for t in args.allowed_types.split(",")]
        except ValueError:
            raise CheckError("--allowed-types: a comma-separated list of integers") from None
    else:
        raw["allowed_destination_types"] = sorted(DEFAULT_ALLOWED_TYPES)
    if args.timeout is not None:
        raw["crm_timeout"] = args.timeout
    try:
        node = NodeConfig.model_validate(raw)
    except ValidationError as exc:
        raise CheckError(f"the options do not make a valid node: {_problems(exc)}") from None
    return Target(node, None, node.crm_timeout)


def _problems(exc: ValidationError) -> str:
    """A node validation error as `field: message; ...`, as the service words it."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


async def check(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The whole command, in the caller's event loop; the exit code."""
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    customer_id: str = args.id
    try:
        if not (customer_id.isascii() and customer_id.isdigit() and len(customer_id) <= 30):
            raise CheckError("--id: a customer id is 1 to 30 digits")
        if args.timeout is not None and not 0.1 <= args.timeout <= 30:
            raise CheckError("--timeout: 0.1 to 30 seconds (as crm_timeout)")
        try:
            settings = CommonSettings()
        except ValidationError as exc:
            raise CheckError(f"CALLERID_* settings: {exc}") from None
        target = await _target(args, settings)
        credentials = CrmCredentials(os.environ)
        credentials.for_node(target.node)  # the service would not start without them
        http = CrmHttpSettings(
            ca_bundle=args.ca_bundle or settings.crm_ca_bundle,
            policy=AddressPolicy.from_settings(
                settings.crm_allowed_hosts, settings.crm_allow_metadata
            ),
        )
        context = CallContext(args.caller_number, args.call_id or f"{int(time.time())}.1")
        result = await run_check(
            target, customer_id, settings=http, credentials=credentials, context=context
        )
    except (CheckError, ConfigError) as exc:
        print(f"callerid-crm-check: cannot check: {exc}", file=sys.stderr)
        return EXIT_CANNOT_CHECK
    return report(result, target, customer_id, max_body=max(0, args.max_body), out=out)


def main(argv: Sequence[str] | None = None) -> int:
    # The client logs a refused request once, at WARNING, for the service's operators: here
    # the report says it.
    logging.getLogger("crm_resolver").setLevel(logging.ERROR)
    out = io.StringIO()
    code = asyncio.run(check(argv, out))
    try:
        sys.stdout.write(out.getvalue())
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the exit code still says what happened
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
