"""Credentials for CRM requests: bearer tokens and Standard Webhooks signatures. No I/O.

What belongs here: turning a node's `crm_token_env` / `crm_signing_secret_env` into the
secrets they name, and the signature scheme. What does not: sending anything (`crm_http`
adds the headers) and reading the process environment (the composition root hands a
mapping in once, at start-up; nothing here calls `os.environ`).

Both are off by default, so an OMniLeads CRM endpoint works unchanged. A node that names a
variable which is not set, is empty or holds something unusable is a `ConfigError` naming
the node and the field: at start-up the service does not start, and on a reload the last
good config stays (`checked_source`). Secret values never appear in a message.

Signing follows the Standard Webhooks scheme (https://www.standardwebhooks.com):

    webhook-id:         a unique id per request ("msg_" + 32 hex digits)
    webhook-timestamp:  Unix seconds, as an integer
    webhook-signature:  "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))

The secret is written "whsec_" + base64(key); the key is the decoded bytes (16 to 64 of
them; the scheme recommends 24 or more). A CRM verifies the signature with the same key,
compares in constant time and refuses timestamps too far from its own clock (replays).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shared.node_sources import NodeSource, SourceRead
from shared.nodes import ConfigError, NodeConfig, NodeSet

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
SIGNATURE_VERSION = "v1"

# RFC 6750 b64token: what a bearer token may hold; nothing that could break a header line.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_TOKEN = 4096


@dataclass(frozen=True, slots=True)
class NodeCredentials:
    """What one node's CRM requests carry; `repr` never shows the secrets."""

    token: str | None = None
    signing_key: bytes | None = None

    def __repr__(self) -> str:
        return (
            f"NodeCredentials(token={'set' if self.token else None}, "
            f"signing_key={'set' if self.signing_key else None})"
        )


NO_CREDENTIALS = NodeCredentials()


def parse_signing_secret(secret: str) -> bytes:
    """The key inside "whsec_<base64>"; ValueError (without the secret) when malformed."""
    text = secret.strip()
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {SECRET_PREFIX!r} followed by base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one request: "v1,<base64 HMAC-SHA256>"."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_headers(
    key: bytes, body: bytes, *, message_id: str, timestamp: int
) -> dict[str, str]:
    return {
        HEADER_ID: message_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: sign(key, message_id, timestamp, body),
    }


class CrmCredentials:
    """Resolves nodes' credential fields against an environment read once (a snapshot)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = dict(environ or {})
        self._resolved: dict[tuple[str | None, str | None], NodeCredentials] = {}

    def for_node(self, node: NodeConfig) -> NodeCredentials:
        """The node's credentials; ConfigError naming the node and field when unusable."""
        names = (node.crm_token_env, node.crm_signing_secret_env)
        if names == (None, None):
            return NO_CREDENTIALS
        found = self._resolved.get(names)
        if found is None:
            token = self._token(node) if node.crm_token_env else None
            key = self._signing_key(node) if node.crm_signing_secret_env else None
            found = self._resolved[names] = NodeCredentials(token, key)
        return found

    def check(self, nodes: Iterable[NodeConfig]) -> None:
        """ConfigError for the first CRM node whose credentials cannot be resolved."""
        for node in nodes:
            if node.uses_crm:
                self.for_node(node)

    def _value(self, node: NodeConfig, field: str, name: str) -> str:
        value = self._environ.get(name, "").strip()
        if not value:
            raise ConfigError(
                f"node {node.id!r}: {field}: environment variable {name} is not set or empty"
            )
        return value

    def _token(self, node: NodeConfig) -> str:
        assert node.crm_token_env is not None
        token = self._value(node, "crm_token_env", node.crm_token_env)
        if len(token) > _MAX_TOKEN or not _TOKEN.fullmatch(token):
            raise ConfigError(
                f"node {node.id!r}: crm_token_env: {node.crm_token_env} does not hold a bearer "
                "token (letters, digits and -._~+/ only)"
            )
        return token

    def _signing_key(self, node: NodeConfig) -> bytes:
        assert node.crm_signing_secret_env is not None
        name = node.crm_signing_secret_env
        secret = self._value(node, "crm_signing_secret_env", name)
        try:
            return parse_signing_secret(secret)
        except ValueError as exc:
            raise ConfigError(f"node {node.id!r}: crm_signing_secret_env: {name}: {exc}") from None


class CheckedSource:
    """A `NodeSource` whose nodes also need their CRM credentials: a node naming a secret that
    cannot be resolved is refused like any other bad node (alone, keeping its last good
    version on a reload)."""

    def __init__(self, source: NodeSource, credentials: CrmCredentials) -> None:
        self._source = source
        self._credentials = credentials
        self.description = source.description
        self.strict_start = source.strict_start

    async def load(self) -> NodeSet:
        return (await self.read()).strict()

    async def read(self) -> SourceRead:
        read = await self._source.read()
        nodes: list[NodeConfig] = []
        rejected = dict(read.rejected)
        for node in read.nodes:
            try:
                if node.uses_crm:
                    self._credentials.for_node(node)
            except ConfigError as exc:
                rejected[node.id] = f"{self.description}: {exc}"
            else:
                nodes.append(node)
        return SourceRead(tuple(nodes), rejected)

    async def changed(self) -> bool:
        return await self._source.changed()

    async def close(self) -> None:
        await self._source.close()
