"""The `CrmClient` adapter: a POST per lookup, OMniLeads' format (docs/design.md §5).

What belongs here: the HTTP request, its time limits, reading the answer with a hard cap, and
turning every foreign exception into the `CrmError` tree of `crm_resolver.ports`, once, with
`from exc`. What does not: HTTP/1.1 itself (connections, the pool, parsing the answer:
`http1` and `http1_parse`), the body's meaning (`crm_response`), retries, the circuit breaker
and the allow-list of destinations (the resolver).

The request is exactly OMniLeads': `POST <node.url>`, `User-Agent: OMniLeads`,
`Content-Type: application/x-www-form-urlencoded`, body `idContact=<digits>` (and `Host`,
`Accept: */*`, `Content-Length`, as aiohttp sent them before). It also says
`Accept-Encoding: identity` and nothing is decompressed: a compressed body could expand far
past the cap before a byte of it is counted (a CRM that compresses anyway gets
`CrmBadResponse`). The optional extras of docs/design.md §5 are per node and off by default:
`crm_send_context` adds `callerNumber`, `callId` and `nodeId` to the form; the node's
`auth:` section adds credentials through `crm_auth.CrmAuth`: headers prepared for the exact
body sent (a bearer token, an OAuth2 token, Standard Webhooks signature headers), and a
client certificate for the TLS handshake. A token request of an auth method goes through
`post_form`, on the same connections, under the same rules.

Where requests may go is `address_policy`'s rule, checked at every lookup on the URL (an IP
address in the URL is never resolved: this check is its only one) and, by the
`PolicyResolver` the client resolves names with, on every address a name resolves to. A
refusal is CrmUnreachable, logged once per node (and URL) at WARNING: no connection is opened.

Limits:
- The whole lookup, connection and token request included, ends within `budget` seconds:
  one `asyncio.timeout(budget)` is put around everything. Getting a connection (a free
  pooled one, or a new one: DNS, TCP and TLS) also ends within `connect_timeout`, capped by
  the budget.
- At most `MAX_BODY` bytes are read: a Content-Length over it is refused before reading, and
  a body without one (chunked, or until close) is refused as soon as it passes `MAX_BODY`.
  The head is bounded by `http1_parse` (8 KiB a line, 100 fields).
- TLS is always verified against the system store plus `ca_bundle`; redirects are not
  followed (a 3xx is just a non-2xx status); proxies from the environment are ignored.
- A node with a client certificate (`mutual_tls`) gets its own `ssl.SSLContext` (the same
  verification, plus the certificate), built once per distinct certificate: the pool keys
  connections by their TLS context, so connections made with one identity are never reused
  for another.
- Connections are kept alive (`_KEEPALIVE_SECONDS` idle at most). The body of a status
  outside 2xx is not waited for: what came with the head is taken, and the connection is
  kept only if that was all of it. A lookup whose reused connection the CRM closed just as
  the request left is sent once more on a new connection (`http1`: a lookup is idempotent).

Exception mapping (nothing from asyncio, ssl, sockets or `http1` escapes `lookup`):

    TimeoutError (the budget, or connect_timeout)   → CrmTimeout
    AddressRefused (URL or resolved address         → CrmUnreachable
      refused by the policy), unusable node
      credentials, no OAuth2 token (CrmTokenUnavailable, a CrmUnreachable)
    http1.ConnectFailed (refused, DNS: NameNotResolved, → CrmUnreachable
      TLS: TlsFailed), http1.ConnectionLost (closed or reset before the status line),
      any other OSError
    status outside 200-299 (3xx included)           → CrmHttpStatus(status); a 401 also tells
                                                      the node's auth (`CrmAuth.rejected`)
    http1_parse.ProtocolError (status line, headers → CrmBadResponse
      or chunk framing that are not HTTP, a header line over 8 KiB, over 100 fields),
      BrokenBody (body cut short of its Content-Length), BodyTooLarge (Content-Length or
      body over MAX_BODY)
    whatever `parse_crm_response` raises            → as raised (CrmBadResponse, CrmStatusFail)

`fetch` is `lookup` without that last step: the body's bytes, for `tools.crm_check`.

The line between unreachable and bad response: before the CRM has sent a status line it may
be down (CrmUnreachable, an outage: the resolver retries and the breaker counts it); once it
has answered, whatever is wrong with the answer is the CRM speaking badly (CrmBadResponse).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from crm_resolver.address_policy import AddressPolicy, AddressRefused, PolicyResolver
from crm_resolver.crm_auth import ClientCertificate, CrmCredentials, Headers
from crm_resolver.crm_response import MAX_BODY, parse_crm_response
from crm_resolver.http1 import Http1Client, HttpClientError, NameNotResolved, Observer, target_of
from crm_resolver.http1_parse import BodyTooLarge, BrokenBody, ProtocolError
from crm_resolver.ports import (
    CallContext,
    CrmAnswer,
    CrmBadResponse,
    CrmError,
    CrmHttpStatus,
    CrmTimeout,
    CrmUnreachable,
)
from shared.nodes import ConfigError, NodeConfig

log = logging.getLogger(__name__)

_FORM = "application/x-www-form-urlencoded"
# An idle kept-alive connection is reused for this long; CRMs behind a load balancer
# commonly close idle connections after 60 s, so stay under that.
_KEEPALIVE_SECONDS = 30.0
TOKEN_REQUEST = "callerid: a token request of a CRM auth method"
"""The `tag` an `http1.Observer` sees on `post_form`'s requests, for observers that watch
only the CRM's (`tools.crm_check`); a lookup's tag is None."""


@dataclass(frozen=True)
class CrmHttpSettings:
    ca_bundle: str | None = None
    """An extra CA file (PEM) trusted besides the system store; TLS is always verified."""
    connect_timeout: float = 1.0
    """Longest wait for a connection: a free pooled one, or a new one (TCP and TLS); capped
    by the lookup's budget. Running out of it is CrmTimeout."""
    max_connections: int = 200
    """Open connections per client, over all CRMs; a lookup beyond it waits for a free one
    (up to connect_timeout)."""
    user_agent: str = "OMniLeads"
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    """Allowed hosts and the metadata-address rule (`address_policy`)."""


class HttpCrmClient:
    """One pool of kept-alive connections, reused by every lookup; `start` before use,
    `close` after."""

    def __init__(
        self,
        settings: CrmHttpSettings = CrmHttpSettings(),
        *,
        credentials: CrmCredentials | None = None,
        dns: AbstractResolver | None = None,
        observer: Observer | None = None,
    ) -> None:
        """`credentials` builds each node's `CrmAuth` (default: none can be resolved, so only
        nodes without `auth:` work); `close` closes it too. `dns` replaces aiohttp's resolver
        under the address policy (tests map names); `observer` watches the requests
        (`tools.crm_check` shows them; the service has none)."""
        self._settings = settings
        self._dns = dns
        self._observer = observer
        self._credentials = credentials if credentials is not None else CrmCredentials()
        self._http: Http1Client | None = None
        self._resolver: AbstractResolver | None = None
        self._tls: ssl.SSLContext | None = None
        self._client_tls: dict[ClientCertificate, ssl.SSLContext] = {}
        self._refusals_logged: set[tuple[str, str]] = set()

    async def start(self) -> None:
        if self._http is not None:
            return
        self._tls = _ssl_context(self._settings.ca_bundle)
        self._resolver = PolicyResolver(self._settings.policy, self._dns or DefaultResolver())
        self._http = Http1Client(
            self._resolver,
            max_connections=self._settings.max_connections,
            keepalive=_KEEPALIVE_SECONDS,
            headers=[("User-Agent", self._settings.user_agent), ("Accept-Encoding", "identity")],
        )

    async def close(self) -> None:
        await self._credentials.close()
        http, self._http = self._http, None
        if http is not None:
            await http.close()
            if self._dns is None and self._resolver is not None:
                await self._resolver.close()  # a resolver handed in is its owner's to close

    async def lookup(
        self, node: NodeConfig, customer_id: str, *, budget: float, context: CallContext
    ) -> CrmAnswer:
        """Ask the node's CRM about one customer id within `budget` seconds."""
        body = await self.fetch(node, customer_id, budget=budget, context=context)
        return parse_crm_response(body)

    async def fetch(
        self, node: NodeConfig, customer_id: str, *, budget: float, context: CallContext
    ) -> bytes:
        """`lookup` up to the body of the CRM's 2xx answer, not parsed yet (`tools.crm_check`
        shows the bytes before parsing them); raises as `lookup` does, but for the parsing."""
        http = self._http
        if http is None:
            raise RuntimeError("HttpCrmClient.lookup before start()")
        if node.url is None:
            raise ValueError(f"node {node.id!r} has no CRM url")
        # The caller validated the entry; digits only also means nothing needs escaping.
        if not (customer_id.isascii() and customer_id.isdigit()):
            raise ValueError("customer_id must be ASCII digits")
        if budget <= 0:
            raise CrmTimeout("no time left for the CRM")
        try:
            self._settings.policy.check_url(node.url)
            auth = self._credentials.for_node(node)
            tls = self._tls_for(auth.client_certificate)
        except (AddressRefused, ConfigError) as exc:
            raise self._refused(node, exc) from exc
        body = _form(node, customer_id, context)
        try:
            async with asyncio.timeout(budget):
                # Inside the budget: an OAuth2 token request is part of the lookup's time.
                headers = {"Content-Type": _FORM, **await auth.prepare(body, self)}
                try:
                    response, answer = await http.request(
                        "POST",
                        target_of(node.url),
                        headers,
                        body,
                        tls=tls,
                        connect_timeout=min(self._settings.connect_timeout, budget),
                        max_body=MAX_BODY,
                        read_error_body=False,
                        retry_safe=True,  # a lookup changes nothing: sending it twice is safe
                        observer=self._observer,
                    )
                except Exception as exc:
                    error = _crm_error(exc, lambda refused: self._refused(node, refused))
                    if error is None:
                        raise
                    raise error from exc
        except TimeoutError as exc:
            raise CrmTimeout(f"no answer within {budget:.3g} s") from exc
        status = response.status
        if not 200 <= status <= 299:
            if status == 401:
                auth.rejected(headers)
            raise CrmHttpStatus(status)
        return answer

    async def post_form(
        self, url: str, body: bytes, headers: Headers, *, timeout: float
    ) -> tuple[int, bytes]:
        """`crm_auth.AuthHttp`: POST a form for an auth method (a token request), under the
        address policy and TLS verification of the lookups; the status and the body (at
        most MAX_BODY bytes, whatever the status). Raises as `fetch` does."""
        http = self._http
        if http is None:
            raise CrmUnreachable("the CRM client is closed")
        try:
            self._settings.policy.check_url(url)
        except AddressRefused as exc:
            raise CrmUnreachable(f"refused: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                try:
                    response, answer = await http.request(
                        "POST",
                        target_of(url),
                        headers,
                        body,
                        tls=self._tls,
                        connect_timeout=min(self._settings.connect_timeout, timeout),
                        max_body=MAX_BODY,
                        observer=self._observer,
                        tag=TOKEN_REQUEST,
                    )
                except Exception as exc:
                    error = _crm_error(exc, lambda refused: CrmUnreachable(f"refused: {refused}"))
                    if error is None:
                        raise
                    raise error from exc
                return response.status, answer
        except TimeoutError as exc:
            raise CrmTimeout(f"no answer within {timeout:.3g} s") from exc

    def _tls_for(self, certificate: ClientCertificate | None) -> ssl.SSLContext | None:
        """The TLS context presenting `certificate` (one per certificate, kept: connections
        are pooled by it), or the shared one. ConfigError when it cannot load."""
        if certificate is None:
            return self._tls
        context = self._client_tls.get(certificate)
        if context is None:
            context = _ssl_context(self._settings.ca_bundle)
            try:
                certificate.load_into(context)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"client certificate {certificate.certificate_file} cannot be loaded: {exc}"
                ) from exc
            self._client_tls[certificate] = context
        return context

    def _refused(self, node: NodeConfig, exc: Exception) -> CrmUnreachable:
        """CrmUnreachable for a request the policy or the node's credentials forbid; the
        first refusal of each node and URL is logged."""
        key = (node.id, node.url or "")
        if key not in self._refusals_logged:
            self._refusals_logged.add(key)
            log.warning("CRM request of node %r refused: %s", node.name, exc)
        return CrmUnreachable(f"refused: {exc}")


def _form(node: NodeConfig, customer_id: str, context: CallContext) -> bytes:
    """The form body of one lookup (what a signature is computed over)."""
    if node.crm_send_context:
        fields = [
            ("idContact", customer_id),
            ("callerNumber", context.caller_number),
            ("callId", context.call_id),
            ("nodeId", node.id),
        ]
        return urlencode(fields).encode("ascii")
    return f"idContact={customer_id}".encode("ascii")


def _crm_error(exc: Exception, refused: Callable[[AddressRefused], CrmError]) -> CrmError | None:
    """The `CrmError` the HTTP client's or the socket's `exc` means, or None for one to raise
    as it is (a TimeoutError: the caller makes it CrmTimeout; anything not of the client's).
    `refused` makes the error for an address the policy refused at connect time. (A function
    the except clause calls, not a context manager: this runs on every lookup.)"""
    if isinstance(exc, TimeoutError):
        return None  # an OSError too
    if isinstance(exc, BodyTooLarge):
        return CrmBadResponse(str(exc))  # our words, with the limit: no CRM bytes
    if isinstance(exc, BrokenBody):
        return CrmBadResponse("broken HTTP body")
    if isinstance(exc, ProtocolError):
        # A status line or headers that are not HTTP: the peer answered, badly.
        return CrmBadResponse("not a valid HTTP answer")
    if isinstance(exc, NameNotResolved):
        if isinstance(exc.__cause__, AddressRefused):
            return refused(exc.__cause__)
        return CrmUnreachable(f"cannot connect: {type(exc).__name__}")
    if isinstance(exc, HttpClientError | OSError):
        # ConnectFailed, TlsFailed, ConnectionLost (OSErrors too), and what the resolver or
        # the socket raised on their own.
        return CrmUnreachable(f"connection failed: {type(exc).__name__}")
    return None


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"CRM CA bundle {ca_bundle!r} cannot be loaded: {exc}") from exc
    return context
