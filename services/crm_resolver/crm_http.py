"""The `CrmClient` adapter over aiohttp: a POST per lookup, OMniLeads' format (docs/design.md §5).

What belongs here: the HTTP request, its time limits, reading the answer with a hard cap, and
turning every foreign exception into the `CrmError` tree of `crm_resolver.ports`, once, with
`from exc`. What does not: the body's meaning (`crm_response`), retries, the circuit breaker
and the allow-list of destinations (the resolver).

The request is exactly OMniLeads': `POST <node.url>`, `User-Agent: OMniLeads`,
`Content-Type: application/x-www-form-urlencoded`, body `idContact=<digits>`. It also says
`Accept-Encoding: identity` and nothing is decompressed: a compressed body could expand far
past the cap before a byte of it is counted (a CRM that compresses anyway gets
`CrmBadResponse`). The optional extras of docs/design.md §5 are per node and off by default:
`crm_send_context` adds `callerNumber`, `callId` and `nodeId` to the form; the node's
`auth:` section adds credentials through `crm_auth.CrmAuth`: headers prepared for the exact
body sent (a bearer token, an OAuth2 token, Standard Webhooks signature headers), and a
client certificate for the TLS handshake. A token request of an auth method goes through
`post_form`, on this session, under the same rules.

Where requests may go is `address_policy`'s rule, checked at every lookup on the URL and, by
the connector's resolver, on every address a name resolves to. A refusal is CrmUnreachable,
logged once per node (and URL) at WARNING: no connection is opened.

Limits:
- The whole lookup, connection included, ends within `budget` seconds: `asyncio.timeout(budget)`
  is put around everything. aiohttp's own timeouts would round 5 s and more up to a whole
  second, and cost timers of their own on every request: only its connect timeout is set
  (`connect_timeout`, capped by the budget); its 300 s default is never used.
- At most `MAX_BODY` bytes are read: a Content-Length over it is refused before reading, and
  a body without one (chunked, or until close) is read in pieces up to `MAX_BODY + 1`.
- TLS is always verified against the system store plus `ca_bundle`; redirects are not
  followed (a 3xx is just a non-2xx status); proxies from the environment are ignored.
- A node with a client certificate (`mutual_tls`) gets its own `ssl.SSLContext` (the same
  verification, plus the certificate), built once per distinct certificate and passed as the
  request's `ssl=`: aiohttp then uses it instead of the connector's, and keys its pool of
  kept-alive connections by it, so connections made with one identity are never reused for
  another (aiohttp's `ConnectionKey` holds the request's `ssl`).

Exception mapping (nothing from aiohttp, asyncio or ssl escapes `lookup`):

    TimeoutError / asyncio.TimeoutError        → CrmTimeout
      (aiohttp ServerTimeoutError, ConnectionTimeoutError, SocketTimeoutError are both)
    AddressRefused (URL or resolved address    → CrmUnreachable
      refused by the policy), unusable node
      credentials, no OAuth2 token (CrmTokenUnavailable, a CrmUnreachable)
    ClientConnectorError (refused, DNS),       → CrmUnreachable
      ClientConnectorCertificateError, ClientSSLError,
      ClientOSError (reset), ServerDisconnectedError before the status line,
      InvalidURL, any other ClientError or OSError
    status outside 200-299 (3xx included)      → CrmHttpStatus(status); a 401 also tells the
                                                 node's auth (`CrmAuth.rejected`)
    ClientResponseError (status line, headers  → CrmBadResponse
      or chunk framing that are not HTTP, a header line over 8 KiB),
      ClientPayloadError (body cut short of its Content-Length),
      Content-Length or body over MAX_BODY
    whatever `parse_crm_response` raises       → as raised (CrmBadResponse, CrmStatusFail)

`fetch` is `lookup` without that last step: the body's bytes, for `tools.crm_check`.

The line between unreachable and bad response: before the CRM has sent a status line it may
be down (CrmUnreachable, an outage: the resolver retries and the breaker counts it); once it
has answered, whatever is wrong with the answer is the CRM speaking badly (CrmBadResponse).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from crm_resolver.address_policy import AddressPolicy, AddressRefused, PolicyResolver
from crm_resolver.crm_auth import ClientCertificate, CrmAuth, CrmCredentials, Headers
from crm_resolver.crm_response import MAX_BODY, parse_crm_response
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
"""The `trace_request_ctx` of `post_form`'s requests, for trace configs that watch only the
CRM's (`tools.crm_check`)."""


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
    """One aiohttp session, reused by every lookup; `start` before use, `close` after."""

    def __init__(
        self,
        settings: CrmHttpSettings = CrmHttpSettings(),
        *,
        credentials: CrmCredentials | None = None,
        dns: AbstractResolver | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        """`credentials` builds each node's `CrmAuth` (default: none can be resolved, so only
        nodes without `auth:` work); `close` closes it too. `dns` replaces aiohttp's resolver
        under the address policy (tests map names); `trace_configs` watch the requests
        (`tools.crm_check` shows them; the service has none)."""
        self._settings = settings
        self._dns = dns
        self._trace_configs = list(trace_configs)
        self._credentials = credentials if credentials is not None else CrmCredentials()
        self._session: aiohttp.ClientSession | None = None
        self._client_tls: dict[ClientCertificate, ssl.SSLContext] = {}
        self._refusals_logged: set[tuple[str, str]] = set()

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self._settings.max_connections,
            ssl=_ssl_context(self._settings.ca_bundle),
            keepalive_timeout=_KEEPALIVE_SECONDS,
            resolver=PolicyResolver(self._settings.policy, self._dns or DefaultResolver()),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={
                "User-Agent": self._settings.user_agent,
                "Accept-Encoding": "identity",
            },
            trust_env=False,
            auto_decompress=False,
            # The reader stops taking bytes from the socket once about this much is buffered.
            read_bufsize=MAX_BODY,
            trace_configs=self._trace_configs or None,
        )

    async def close(self) -> None:
        await self._credentials.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

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
        if self._session is None:
            raise RuntimeError("HttpCrmClient.lookup before start()")
        if node.url is None:
            raise ValueError(f"node {node.id!r} has no CRM url")
        # The caller validated the entry; digits only also means nothing needs escaping.
        if not (customer_id.isascii() and customer_id.isdigit()):
            raise ValueError("customer_id must be ASCII digits")
        if budget <= 0:
            raise CrmTimeout("no time left for the CRM")
        timeout = aiohttp.ClientTimeout(
            total=None, connect=min(self._settings.connect_timeout, budget), sock_read=None
        )
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
                with _crm_errors(lambda refused: self._refused(node, refused)):
                    return await self._post(
                        self._session, node.url, body, headers, timeout, tls, auth
                    )
        except TimeoutError as exc:
            raise CrmTimeout(f"no answer within {budget:.3g} s") from exc

    async def post_form(
        self, url: str, body: bytes, headers: Headers, *, timeout: float
    ) -> tuple[int, bytes]:
        """`crm_auth.AuthHttp`: POST a form for an auth method (a token request), under the
        address policy and TLS verification of the lookups; the status and the body (at
        most MAX_BODY bytes, whatever the status). Raises as `fetch` does."""
        if self._session is None:
            raise CrmUnreachable("the CRM client is closed")
        try:
            self._settings.policy.check_url(url)
        except AddressRefused as exc:
            raise CrmUnreachable(f"refused: {exc}") from exc
        client_timeout = aiohttp.ClientTimeout(
            total=None, connect=min(self._settings.connect_timeout, timeout), sock_read=None
        )
        try:
            async with asyncio.timeout(timeout):
                with _crm_errors(lambda refused: CrmUnreachable(f"refused: {refused}")):
                    async with self._session.post(
                        url,
                        data=body,
                        headers=headers,
                        timeout=client_timeout,
                        allow_redirects=False,
                        trace_request_ctx=TOKEN_REQUEST,
                    ) as response:
                        length = response.content_length
                        if length is not None and length > MAX_BODY:
                            raise CrmBadResponse(f"Content-Length over {MAX_BODY} bytes")
                        return response.status, await _read_capped(response.content)
        except TimeoutError as exc:
            raise CrmTimeout(f"no answer within {timeout:.3g} s") from exc

    def _tls_for(self, certificate: ClientCertificate | None) -> ssl.SSLContext | None:
        """The TLS context presenting `certificate` (one per certificate, kept: connections
        are pooled by it), or None for the connector's. ConfigError when it cannot load."""
        if certificate is None:
            return None
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

    async def _post(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: bytes,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        tls: ssl.SSLContext | None,
        auth: CrmAuth,
    ) -> bytes:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            ssl=tls if tls is not None else True,
        ) as response:
            if not 200 <= response.status <= 299:
                if response.status == 401:
                    auth.rejected(headers)
                raise CrmHttpStatus(response.status)
            if response.content_length is not None and response.content_length > MAX_BODY:
                raise CrmBadResponse(f"Content-Length over {MAX_BODY} bytes")
            return await _read_capped(response.content)


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


@contextmanager
def _crm_errors(refused: Callable[[AddressRefused], CrmError]) -> Iterator[None]:
    """aiohttp's and the socket's exceptions raised inside, as the `CrmError` they mean;
    `refused` makes the one for an address the policy refused at connect time."""
    try:
        yield
    except TimeoutError:
        raise  # aiohttp's own timeouts are ClientErrors too: the caller makes them CrmTimeout
    except aiohttp.ClientResponseError as exc:
        # Raised for a status line, headers or chunk framing that are not HTTP (never for
        # a status: raise_for_status is off), so the peer answered, badly. Its message
        # quotes the CRM's bytes, newlines included: it stays in the chained cause.
        raise CrmBadResponse("not a valid HTTP answer") from exc
    except aiohttp.ClientPayloadError as exc:
        raise CrmBadResponse("broken HTTP body") from exc
    except aiohttp.ClientConnectorError as exc:
        # Also ClientConnectorCertificateError and ClientSSLError (its subclasses), and
        # ClientConnectorDNSError carrying the resolver's AddressRefused.
        if isinstance(exc.os_error, AddressRefused):
            raise refused(exc.os_error) from exc
        raise CrmUnreachable(f"cannot connect: {type(exc).__name__}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise CrmUnreachable(f"connection failed: {type(exc).__name__}") from exc


async def _read_capped(stream: aiohttp.StreamReader) -> bytes:
    """The body, reading at most MAX_BODY + 1 bytes; CrmBadResponse when there is more."""
    body = bytearray()
    while len(body) <= MAX_BODY:
        chunk = await stream.read(MAX_BODY + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    # Leaving the response unread makes aiohttp close the connection instead of reusing it.
    raise CrmBadResponse(f"body over {MAX_BODY} bytes")


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"CRM CA bundle {ca_bundle!r} cannot be loaded: {exc}") from exc
    return context
