"""The seam between a CRM request and its credentials: `CrmAuth`, and its builder per node.

What belongs here: the interface `crm_http` asks for a request's credentials (headers, a
signature over the body, a client certificate), one implementation per `auth:` method of
`shared.node_auth`, and `CrmCredentials`, which builds them per node from the node's section
and an environment read once (the composition root hands it in; nothing here calls
`os.environ`). What does not: the request itself, the session and server verification
(`crm_http`), the byte formats (`signing`), the OAuth2 token cache (`oauth2_client`).

A method is built when a node is loaded (at start-up, and on each reload through
`shared.node_sources.CheckedSource`): a secret that is not set, is empty or is unusable, or a
certificate that cannot be loaded, is a `ConfigError` naming the node and the field, so the
service does not start, or the reload keeps the node's last good version. Methods are cached
by their configuration: nodes configured alike share one (one OAuth2 token, one TLS
identity), and a reload that keeps a node's section keeps its token.

To add a method: its configuration model in `shared.node_auth` (and in its `AuthMethod`
union), a class here (or in a module of its own) with the three members of `CrmAuth`, and
its case in `_build`.
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from crm_resolver.oauth2_client import OAuth2ClientCredentials
from crm_resolver.signing import is_bearer_token, parse_signing_secret, signature_headers
from shared.node_auth import (
    AuthMethod,
    AuthMethods,
    BearerAuth,
    MutualTlsAuth,
    OAuth2ClientCredentialsAuth,
    WebhookSignatureAuth,
)
from shared.nodes import ConfigError, NodeConfig

Headers = Mapping[str, str]


class AuthHttp(Protocol):
    """What a method may send on its own (a token request): `crm_http`'s session, under the
    same address policy and TLS verification as the CRM requests."""

    async def post_form(
        self, url: str, body: bytes, headers: Headers, *, timeout: float
    ) -> tuple[int, bytes]:
        """POST a form; the status and the body (at most `crm_response.MAX_BODY` bytes).
        Raises the `CrmError` a lookup would (CrmUnreachable, CrmTimeout, CrmBadResponse)."""
        ...


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A TLS client identity: PEM files (the key unencrypted; in the certificate file when
    `key_file` is None). Equal identities share one TLS context and its connections."""

    certificate_file: str
    key_file: str | None = None

    def load_into(self, context: ssl.SSLContext) -> None:
        """Raises OSError or ssl.SSLError when a file is missing, unreadable or not a
        matching certificate and key."""
        context.load_cert_chain(self.certificate_file, self.key_file)


class CrmAuth(Protocol):
    """How one node's CRM requests carry credentials."""

    @property
    def client_certificate(self) -> ClientCertificate | None:
        """The identity to present in the TLS handshake, or None."""
        ...

    async def prepare(self, body: bytes, http: AuthHttp) -> Headers:
        """The headers to add to a request with this exact body. Raises a `CrmError` when
        no credentials can be had (the call then takes `crm_error`)."""
        ...

    def rejected(self, sent: Headers) -> None:
        """The CRM answered 401 to a request that carried `sent`: forget what it refused."""
        ...


class NoAuth:
    """A node without `auth:`: the plain OMniLeads request."""

    client_certificate = None

    async def prepare(self, body: bytes, http: AuthHttp) -> Headers:
        return {}

    def rejected(self, sent: Headers) -> None:
        return None

    def __repr__(self) -> str:
        return "NoAuth()"


NO_AUTH = NoAuth()


class BearerToken:
    """`Authorization: Bearer <token>`, a fixed token."""

    client_certificate = None

    def __init__(self, token: str) -> None:
        self._headers = {"Authorization": f"Bearer {token}"}

    async def prepare(self, body: bytes, http: AuthHttp) -> Headers:
        return self._headers

    def rejected(self, sent: Headers) -> None:
        return None  # a fixed token: nothing to forget

    def __repr__(self) -> str:
        return "BearerToken(token=set)"


class WebhookSignature:
    """Standard Webhooks headers: a fresh id and the time, signed with the body."""

    client_certificate = None

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    async def prepare(self, body: bytes, http: AuthHttp) -> Headers:
        return signature_headers(
            self._key, body, message_id=f"msg_{uuid.uuid4().hex}", timestamp=int(self._clock())
        )

    def rejected(self, sent: Headers) -> None:
        return None

    def __repr__(self) -> str:
        return "WebhookSignature(signing_key=set)"


class MutualTls:
    """A client certificate in the TLS handshake; nothing in the request itself."""

    def __init__(self, certificate: ClientCertificate) -> None:
        self.client_certificate = certificate

    async def prepare(self, body: bytes, http: AuthHttp) -> Headers:
        return {}

    def rejected(self, sent: Headers) -> None:
        return None

    def __repr__(self) -> str:
        return f"MutualTls({self.client_certificate.certificate_file!r})"


class CombinedAuth:
    """Several methods on one request, their headers in the order the node lists them."""

    def __init__(self, methods: Sequence[CrmAuth]) -> None:
        self._methods = tuple(methods)
        self.client_certificate = next(
            (m.client_certificate for m in methods if m.client_certificate is not None), None
        )

    async def prepare(self, body: bytes, http: AuthHttp) -> Headers:
        headers: dict[str, str] = {}
        for method in self._methods:
            headers.update(await method.prepare(body, http))
        return headers

    def rejected(self, sent: Headers) -> None:
        for method in self._methods:
            method.rejected(sent)

    def __repr__(self) -> str:
        return f"CombinedAuth({', '.join(map(repr, self._methods))})"


class CrmCredentials:
    """Builds each node's `CrmAuth` from its `auth:` section and an environment read once."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` stamps signatures (Unix time); `monotonic` times token lifetimes."""
        self._environ = dict(environ or {})
        self._clock = clock
        self._monotonic = monotonic
        self._built: dict[AuthMethods, CrmAuth] = {}
        self._token_clients: list[OAuth2ClientCredentials] = []

    def for_node(self, node: NodeConfig) -> CrmAuth:
        """The node's auth; ConfigError naming the node and the field when unusable."""
        if not node.auth:
            return NO_AUTH
        found = self._built.get(node.auth)
        if found is None:
            methods = [self._build(node, method) for method in node.auth]
            found = methods[0] if len(methods) == 1 else CombinedAuth(methods)
            self._built[node.auth] = found
        return found

    def check_node(self, node: NodeConfig) -> None:
        """ConfigError when a CRM node's auth cannot be built (`CheckedSource` calls this)."""
        if node.uses_crm:
            self.for_node(node)

    def check(self, nodes: Iterable[NodeConfig]) -> None:
        """ConfigError for the first CRM node whose auth cannot be built."""
        for node in nodes:
            self.check_node(node)

    async def close(self) -> None:
        """Stop token requests in flight (they ride on a session that is closing)."""
        for client in self._token_clients:
            await client.close()

    def _build(self, node: NodeConfig, method: AuthMethod) -> CrmAuth:
        match method:
            case BearerAuth():
                token = self._secret(node, method.where("token_env"), method.token_env)
                if not is_bearer_token(token):
                    raise ConfigError(
                        f"node {node.id!r}: {method.where('token_env')}: {method.token_env} "
                        "does not hold a bearer token (letters, digits and -._~+/ only)"
                    )
                return BearerToken(token)
            case WebhookSignatureAuth():
                where = method.where("secret_env")
                secret = self._secret(node, where, method.secret_env)
                try:
                    key = parse_signing_secret(secret)
                except ValueError as exc:
                    raise ConfigError(
                        f"node {node.id!r}: {where}: {method.secret_env}: {exc}"
                    ) from None
                return WebhookSignature(key, self._clock)
            case OAuth2ClientCredentialsAuth():
                where = method.where("client_secret_env")
                client = OAuth2ClientCredentials(
                    method,
                    self._secret(node, where, method.client_secret_env),
                    clock=self._monotonic,
                )
                self._token_clients.append(client)
                return client
            case MutualTlsAuth():
                certificate = ClientCertificate(method.certificate_file, method.key_file)
                try:
                    certificate.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
                except (OSError, ssl.SSLError) as exc:
                    files = method.certificate_file + (
                        f" / {method.key_file}" if method.key_file else ""
                    )
                    raise ConfigError(
                        f"node {node.id!r}: {method.where('certificate_file')}: cannot load "
                        f"the client certificate and key from {files}: "
                        f"{exc.strerror or exc}"
                    ) from None
                return MutualTls(certificate)
        raise AssertionError(f"no implementation for auth method {method!r}")

    def _secret(self, node: NodeConfig, where: str, name: str) -> str:
        value = self._environ.get(name, "").strip()
        if not value:
            raise ConfigError(
                f"node {node.id!r}: {where}: environment variable {name} is not set or empty"
            )
        return value
