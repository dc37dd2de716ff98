"""The `CrmClient` adapter over aiohttp: one POST per lookup, OMniLeads' wire format (DESIGN §5).

What belongs here: the HTTP request, its time limits, reading the answer with a hard cap, and
turning every foreign exception into the `CrmError` tree of `crm_resolver.ports`, once, with
`from exc`. What does not: the body's meaning (`crm_response`), retries, the circuit breaker
and the allow-list of destinations (the resolver).

The request is exactly OMniLeads': `POST <node.url>`, `User-Agent: OMniLeads`,
`Content-Type: application/x-www-form-urlencoded`, body `idContact=<digits>`. It also says
`Accept-Encoding: identity` and nothing is decompressed: a compressed body could expand far
past the cap before a byte of it is counted (a CRM that compresses anyway gets
`CrmBadResponse`). The optional extras of DESIGN §5 (bearer token, HMAC signing, extra
fields from `CallContext`) are not sent: `NodeConfig` has no fields for them yet, and off is
their default.

Limits:
- The whole lookup, connection included, ends within `budget` seconds. aiohttp's timeouts
  are set from it (its 300 s default is never used) and `asyncio.timeout(budget)` is put
  around everything, because aiohttp rounds timeouts of 5 s and more up to a whole second.
- At most `MAX_BODY` bytes are read: a Content-Length over it is refused before reading, and
  a body without one (chunked, or until close) is read in pieces up to `MAX_BODY + 1`.
- TLS is always verified against the system store plus `ca_bundle`; redirects are not
  followed (a 3xx is just a non-2xx status); proxies from the environment are ignored.

Exception mapping (nothing from aiohttp, asyncio or ssl escapes `lookup`):

    TimeoutError / asyncio.TimeoutError        → CrmTimeout
      (aiohttp ServerTimeoutError, ConnectionTimeoutError, SocketTimeoutError are both)
    ClientConnectorError (refused, DNS),       → CrmUnreachable
      ClientConnectorCertificateError, ClientSSLError,
      ClientOSError (reset), ServerDisconnectedError before the status line,
      InvalidURL, any other ClientError or OSError
    status outside 200-299 (3xx included)      → CrmHttpStatus(status)
    ClientResponseError (status line, headers  → CrmBadResponse
      or chunk framing that are not HTTP, a header line over 8 KiB),
      ClientPayloadError (body cut short of its Content-Length),
      Content-Length or body over MAX_BODY
    whatever `parse_crm_response` raises       → as raised (CrmBadResponse, CrmStatusFail)

The line between unreachable and bad response: before the CRM has sent a status line it may
be down (CrmUnreachable, an outage: the resolver retries and the breaker counts it); once it
has answered, whatever is wrong with the answer is the CRM speaking badly (CrmBadResponse).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import aiohttp

from crm_resolver.crm_response import MAX_BODY, parse_crm_response
from crm_resolver.ports import (
    CallContext,
    CrmAnswer,
    CrmBadResponse,
    CrmHttpStatus,
    CrmTimeout,
    CrmUnreachable,
)
from shared.nodes import NodeConfig

_FORM = "application/x-www-form-urlencoded"
# An idle kept-alive connection is reused for this long; CRMs behind a load balancer
# commonly close idle connections after 60 s, so stay under that.
_KEEPALIVE_SECONDS = 30.0


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


class HttpCrmClient:
    """One aiohttp session, reused by every lookup; `start` before use, `close` after."""

    def __init__(self, settings: CrmHttpSettings = CrmHttpSettings()) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self._settings.max_connections,
            ssl=_ssl_context(self._settings.ca_bundle),
            keepalive_timeout=_KEEPALIVE_SECONDS,
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
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def lookup(
        self, node: NodeConfig, customer_id: str, *, budget: float, context: CallContext
    ) -> CrmAnswer:
        """Ask the node's CRM about one customer id within `budget` seconds."""
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
            total=budget,
            connect=min(self._settings.connect_timeout, budget),
            sock_read=budget,
        )
        try:
            async with asyncio.timeout(budget):
                body = await self._post(self._session, node.url, customer_id, timeout)
        except TimeoutError as exc:
            raise CrmTimeout(f"no answer within {budget:.3g} s") from exc
        except aiohttp.ClientResponseError as exc:
            # Raised for a status line, headers or chunk framing that are not HTTP (never for
            # a status: raise_for_status is off), so the peer answered, badly. Its message
            # quotes the CRM's bytes, newlines included: it stays in the chained cause.
            raise CrmBadResponse("not a valid HTTP answer") from exc
        except aiohttp.ClientPayloadError as exc:
            raise CrmBadResponse("broken HTTP body") from exc
        except aiohttp.ClientConnectorError as exc:
            # Also ClientConnectorCertificateError and ClientSSLError (its subclasses).
            raise CrmUnreachable(f"cannot connect: {type(exc).__name__}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise CrmUnreachable(f"connection failed: {type(exc).__name__}") from exc
        return parse_crm_response(body)

    async def _post(
        self,
        session: aiohttp.ClientSession,
        url: str,
        customer_id: str,
        timeout: aiohttp.ClientTimeout,
    ) -> bytes:
        async with session.post(
            url,
            data=f"idContact={customer_id}".encode("ascii"),
            headers={"Content-Type": _FORM},
            timeout=timeout,
            allow_redirects=False,
        ) as response:
            if not 200 <= response.status <= 299:
                raise CrmHttpStatus(response.status)
            if response.content_length is not None and response.content_length > MAX_BODY:
                raise CrmBadResponse(f"Content-Length over {MAX_BODY} bytes")
            return await _read_capped(response.content)


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
