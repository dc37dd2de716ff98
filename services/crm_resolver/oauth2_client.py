"""OAuth2 client credentials (RFC 6749 §4.4): a bearer token from a token endpoint, cached.

What belongs here: asking the token endpoint, reading its answer (§5.1, §5.2), keeping the
token until shortly before it expires, and what happens when no token can be had. What does
not: the HTTP session (the `AuthHttp` handed in by `crm_http`, under the same address policy
and TLS verification as the CRM requests) and the configuration (`shared.node_auth`).

The request: `POST <token_url>`, form body `grant_type=client_credentials` (plus `scope` and
`audience` when configured), the client id and secret in HTTP Basic (`client_secret_basic`,
each form-encoded first, §2.3.1) or in the body (`client_secret_post`).

The token:
- is fetched once for all the calls that need it at the same time (one request in flight;
  the others wait for its answer, each within its own budget: a call giving up does not
  cancel the request the others wait for);
- is used until `expires_in` runs out; from `REFRESH_MARGIN` before that (at most 10 % of its
  lifetime) the next call starts a new request in the background and goes on with the
  current token, so warm calls never wait for the token endpoint;
- is forgotten when the CRM answers 401 to a request that carried it: the next call fetches
  a new one.

When no token can be had (the endpoint down or slow, a non-2xx answer, not JSON, no usable
`access_token`), the calls waiting for it fail with `CrmTokenUnavailable`, a CrmUnreachable:
`crm_error` for the call, counted by the CRM's circuit breaker. The endpoint is then left
alone for a while (1 s, doubling up to 30 s while it keeps failing): calls in that time fail
at once with the same reason instead of asking again. A failing streak is logged once at
WARNING (the rest at DEBUG), and its end once at INFO. Secrets are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, urlencode

from crm_resolver.ports import CrmError, CrmUnreachable
from crm_resolver.signing import is_bearer_token
from shared.node_auth import OAuth2ClientCredentialsAuth

if TYPE_CHECKING:
    from crm_resolver.crm_auth import AuthHttp, Headers

log = logging.getLogger(__name__)

TOKEN_TIMEOUT = 10.0
"""Longest a token request may take; the calls waiting for it end at their own budgets."""
REFRESH_MARGIN = 30.0
"""A token is renewed this long before it expires, or at 90 % of its lifetime if shorter."""
DEFAULT_LIFETIME = 300.0
"""How long a token is used when the endpoint does not say (`expires_in` is optional)."""
MAX_LIFETIME = 86_400.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0

_FORM = "application/x-www-form-urlencoded"
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")  # RFC 6749 §5.2 error


class CrmTokenUnavailable(CrmUnreachable):
    """No OAuth2 token for the CRM request: the call takes `crm_error`."""


class TokenRefused(Exception):
    """The token endpoint answered, but not with a usable token (the message says why)."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    refresh_at: float
    expires_at: float


def read_token(status: int, body: bytes, *, asked_at: float) -> Token:
    """The token in a token endpoint's answer; TokenRefused saying what is wrong with it.

    Times are on the clock `asked_at` is on: the lifetime counts from when the request was
    sent, so a slow answer shortens it rather than stretching it past the real expiry."""
    try:
        answer: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not 200 <= status <= 299:
        raise TokenRefused(_refusal(status, answer))
    if not isinstance(answer, dict):
        raise TokenRefused("the answer is not a JSON object")
    value = answer.get("access_token")
    if not isinstance(value, str) or not value:
        raise TokenRefused("the answer has no access_token")
    if not is_bearer_token(value):
        raise TokenRefused("access_token holds characters a bearer token cannot have")
    kind = answer.get("token_type", "Bearer")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise TokenRefused("token_type is not Bearer")
    lifetime = _lifetime(answer.get("expires_in"))
    margin = min(REFRESH_MARGIN, lifetime / 10)
    return Token(value, asked_at + lifetime - margin, asked_at + lifetime)


def _refusal(status: int, answer: Any) -> str:
    """A non-2xx answer in a few words: its status, and the §5.2 error code if it has one
    (not its description: free text from a server goes into no log line)."""
    error = answer.get("error") if isinstance(answer, dict) else None
    code = f" ({error})" if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else ""
    return f"HTTP {status}{code}"


def _lifetime(expires_in: Any) -> float:
    if expires_in is None:
        return DEFAULT_LIFETIME
    if isinstance(expires_in, str) and expires_in.strip().isdigit():
        expires_in = int(expires_in)  # some servers quote it
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not math.isfinite(expires_in)
        or expires_in <= 0
    ):
        raise TokenRefused("expires_in is not a positive number of seconds")
    return min(float(expires_in), MAX_LIFETIME)


class OAuth2ClientCredentials:
    """A `CrmAuth`: `Authorization: Bearer <token>` with a token from the token endpoint."""

    client_certificate = None

    def __init__(
        self,
        config: OAuth2ClientCredentialsAuth,
        client_secret: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = config.token_url
        self._clock = clock
        fields = [("grant_type", "client_credentials")]
        if config.scope is not None:
            fields.append(("scope", config.scope))
        if config.audience is not None:
            fields.append(("audience", config.audience))
        headers = {"Content-Type": _FORM, "Accept": "application/json"}
        if config.client_authentication == "client_secret_basic":
            pair = f"{quote_plus(config.client_id)}:{quote_plus(client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            fields += [("client_id", config.client_id), ("client_secret", client_secret)]
        self._request = (urlencode(fields).encode("ascii"), headers)
        self._what = f"OAuth2 token from {config.token_url} (client {config.client_id!r})"
        self._token: Token | None = None
        self._fetching: asyncio.Task[Token] | None = None
        self._retry_at = -math.inf
        self._backoff = FIRST_BACKOFF
        self._failure = ""
        self._failing = False

    async def prepare(self, body: bytes, http: AuthHttp) -> Headers:
        return {"Authorization": f"Bearer {(await self._current(http)).value}"}

    def rejected(self, sent: Headers) -> None:
        token = self._token
        if token is not None and sent.get("Authorization") == f"Bearer {token.value}":
            self._token = None
            log.info(
                "the CRM refused the %s (HTTP 401): the next call fetches a new one", self._what
            )

    async def close(self) -> None:
        task, self._fetching = self._fetching, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _current(self, http: AuthHttp) -> Token:
        now = self._clock()
        token = self._token
        if token is not None and now < token.expires_at:
            if now >= token.refresh_at and now >= self._retry_at:
                self._fetch(http)  # in the background: this call goes on with `token`
            return token
        if now < self._retry_at:
            raise CrmTokenUnavailable(f"{self._what}: {self._failure} (not asked again yet)")
        # Shielded: a call whose budget runs out stops waiting, the request goes on for the
        # others (and for the next call).
        return await asyncio.shield(self._fetch(http))

    def _fetch(self, http: AuthHttp) -> asyncio.Task[Token]:
        """The token request in flight, started if there is none."""
        if self._fetching is None:
            task = asyncio.create_task(self._ask(http), name="oauth2-token")
            # A background refresh may have nobody awaiting it: its failure is logged by
            # `_ask`; retrieving it here keeps asyncio from reporting it again.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._fetching = task
        return self._fetching

    async def _ask(self, http: AuthHttp) -> Token:
        asked_at = self._clock()
        body, headers = self._request
        try:
            async with asyncio.timeout(TOKEN_TIMEOUT):
                status, answer = await http.post_form(
                    self._url, body, headers, timeout=TOKEN_TIMEOUT
                )
            token = read_token(status, answer, asked_at=asked_at)
        except TimeoutError as exc:
            raise self._failed(f"no answer within {TOKEN_TIMEOUT:g} s") from exc
        except (CrmError, TokenRefused) as exc:
            raise self._failed(str(exc) or type(exc).__name__) from exc
        finally:
            self._fetching = None
        self._token = token
        self._retry_at = -math.inf
        self._backoff = FIRST_BACKOFF
        if self._failing:
            self._failing = False
            log.info("%s: available again", self._what)
        return token

    def _failed(self, reason: str) -> CrmTokenUnavailable:
        """Record a failed request: wait before the next, log the first of a streak."""
        self._failure = reason
        self._retry_at = self._clock() + self._backoff
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(
            level,
            "%s unavailable: %s; calls of its nodes take crm_error, next try in %g s",
            self._what,
            reason,
            self._backoff,
        )
        self._failing = True
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        return CrmTokenUnavailable(f"{self._what}: {reason}")

    def __repr__(self) -> str:
        return f"OAuth2ClientCredentials({self._url!r}, client_secret=set)"
