"""A node's `auth:` section: how its CRM requests prove who sends them (docs/design.md §5).

What belongs here: the configuration of each method (a pydantic model per `method`, picked by
that key), the rules across methods, and reading the older node fields (`crm_token_env`,
`crm_signing_secret_env`) as the same section. What does not: secrets (a method names the
environment variables that hold them; `crm_resolver.crm_auth` reads them once, at load) and
anything that sends a request.

`auth:` is one method, or a list of methods that combine (a bearer token and a signature,
mutual TLS and an OAuth2 token). Each method appears at most once, and only one of them may
set the Authorization header.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# RFC 6749 appendix A.4: scope tokens are printable ASCII but for space, '"' and '\'.
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+( [\x21\x23-\x5b\x5d-\x7e]+)*")
_HTTP_URL = re.compile(r"https?://[^\s/?#]+[^\s]*", re.IGNORECASE)

ENV_NAME_RULE = "must name an environment variable (letters, digits, '_')"
LEGACY_FIELDS = ("crm_token_env", "crm_signing_secret_env")


def is_env_name(value: str) -> bool:
    return _ENV_NAME.fullmatch(value) is not None


def _env_name(value: str) -> str:
    value = value.strip()
    if not is_env_name(value):
        raise ValueError(ENV_NAME_RULE)
    return value


def _http_url(value: str) -> str:
    value = value.strip()
    if not _HTTP_URL.fullmatch(value) or not (value.isascii() and value.isprintable()):
        raise ValueError("must be an http:// or https:// URL with a host, no spaces")
    return value


def _printable(value: str) -> str:
    if not value or not value.isascii() or not value.isprintable():
        raise ValueError("must be printable ASCII, not empty")
    return value


def _scope(value: str) -> str:
    if not _SCOPE.fullmatch(value):
        raise ValueError("must be space-separated scope tokens (RFC 6749 §3.3)")
    return value


def _path(value: str) -> str:
    value = value.strip()
    if not value or "\x00" in value:
        raise ValueError("must be a file path")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]


class _Method(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Set when the method was read from an older node field: messages then name that field,
    # the one the operator wrote.
    _legacy_field: str | None = PrivateAttr(default=None)

    def where(self, field: str) -> str:
        """The name of `field` in a message: "auth: <method>: <field>", or the older field."""
        if self._legacy_field is not None:
            return self._legacy_field
        method: str = getattr(self, "method")  # noqa: B009 - every subclass has one
        return f"auth: {method}: {field}"

    def env_names(self) -> tuple[str, ...]:
        """The environment variables this method reads (start-up warnings skip them)."""
        return ()


class BearerAuth(_Method):
    """`Authorization: Bearer <token>`, the token in an environment variable."""

    method: Literal["bearer"]
    token_env: EnvName

    def env_names(self) -> tuple[str, ...]:
        return (self.token_env,)


class WebhookSignatureAuth(_Method):
    """Standard Webhooks signature headers over the exact body sent (`crm_resolver.signing`)."""

    method: Literal["webhook_signature"]
    secret_env: EnvName

    def env_names(self) -> tuple[str, ...]:
        return (self.secret_env,)


class OAuth2ClientCredentialsAuth(_Method):
    """A bearer token from an OAuth2 token endpoint (RFC 6749 §4.4), cached until it expires."""

    method: Literal["oauth2_client_credentials"]
    token_url: Annotated[str, AfterValidator(_http_url)]
    client_id: Annotated[str, Field(max_length=255), AfterValidator(_printable)]
    client_secret_env: EnvName
    scope: Annotated[str, Field(max_length=1024), AfterValidator(_scope)] | None = None
    audience: Annotated[str, Field(max_length=1024), AfterValidator(_printable)] | None = None
    client_authentication: Literal["client_secret_basic", "client_secret_post"] = (
        "client_secret_basic"
    )

    def env_names(self) -> tuple[str, ...]:
        return (self.client_secret_env,)


class MutualTlsAuth(_Method):
    """A client certificate presented in the TLS handshake (PEM files, key unencrypted)."""

    method: Literal["mutual_tls"]
    certificate_file: Annotated[str, AfterValidator(_path)]
    key_file: Annotated[str, AfterValidator(_path)] | None = None
    """None: the key is in `certificate_file` too."""


AuthMethod = Annotated[
    BearerAuth | WebhookSignatureAuth | OAuth2ClientCredentialsAuth | MutualTlsAuth,
    Field(discriminator="method"),
]
AuthMethods = tuple[AuthMethod, ...]
# The `method:` names, in the union's order (read from it, so a new method is listed here).
METHODS: tuple[str, ...] = tuple(
    name
    for model in get_args(get_args(AuthMethod)[0])
    for name in get_args(model.model_fields["method"].annotation)
)

# Methods that write the Authorization header: a node may use one of them.
_AUTHORIZATION = ("bearer", "oauth2_client_credentials")


def as_list(value: Any) -> Any:
    """`auth:` as written (one mapping, a list, or nothing) as the list the model holds;
    ValueError for an entry whose `method` is missing or unknown (pydantic's own message
    for that speaks of tags and discriminators)."""
    if value is None:
        return ()
    if isinstance(value, dict | BaseModel):
        value = (value,)
    if isinstance(value, list | tuple):
        for entry in value:
            if isinstance(entry, dict) and entry.get("method") not in METHODS:
                raise ValueError(f"each method needs `method:`, one of {', '.join(METHODS)}")
    return value


def check_methods(methods: AuthMethods) -> AuthMethods:
    """ValueError when the methods cannot be combined."""
    names = [method.method for method in methods]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{name} is given twice; give each method once")
    both = [name for name in names if name in _AUTHORIZATION]
    if len(both) > 1:
        raise ValueError(
            f"{' and '.join(both)} both set the Authorization header; give one of them"
        )
    return methods


def legacy_auth(data: Any) -> Any:
    """Raw node fields with `crm_token_env` / `crm_signing_secret_env` read as `auth:`.

    A node that gives both forms is refused: which one wins would be a guess."""
    if not isinstance(data, dict) or data.keys().isdisjoint(LEGACY_FIELDS):
        return data
    given = {field: data[field] for field in LEGACY_FIELDS if _is_set(data.get(field))}
    rest = {key: value for key, value in data.items() if key not in LEGACY_FIELDS}
    if given:
        if rest.get("auth") not in (None, [], (), {}):
            raise ValueError(
                f"auth: given together with {' and '.join(given)}; write the method in auth: "
                f"alone (the older {' / '.join(LEGACY_FIELDS)} fields still work without it)"
            )
        rest["auth"] = tuple(_legacy_method(field, value) for field, value in given.items())
    return rest


def _is_set(value: Any) -> bool:
    return value is not None and str(value).strip() != ""


def _legacy_method(field: str, value: Any) -> _Method:
    name = value.strip() if isinstance(value, str) else ""
    if not is_env_name(name):
        raise ValueError(f"{field}: {ENV_NAME_RULE}")
    method: _Method
    if field == "crm_token_env":
        method = BearerAuth(method="bearer", token_env=name)
    else:
        method = WebhookSignatureAuth(method="webhook_signature", secret_env=name)
    method._legacy_field = field
    return method


def url_problem(methods: AuthMethods, url: str | None) -> str | None:
    """Why these methods cannot work with the node's URL, or None."""
    tls = next((m for m in methods if isinstance(m, MutualTlsAuth)), None)
    if tls is not None and url is not None and not url.lower().startswith("https://"):
        return "auth: mutual_tls needs an https:// url (a client certificate is sent over TLS)"
    return None


def env_names(methods: AuthMethods) -> set[str]:
    return {name for method in methods for name in method.env_names()}
