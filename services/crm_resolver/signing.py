"""The formats of CRM request credentials: bearer tokens and Standard Webhooks signatures.

Pure functions, no I/O and no state: `crm_auth` turns a node's `auth:` section into the
headers of each request and uses these for the bytes. A secret never appears in a message.

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


def is_bearer_token(token: str) -> bool:
    """Whether `token` may go in `Authorization: Bearer <token>` (RFC 6750 b64token)."""
    return len(token) <= _MAX_TOKEN and _TOKEN.fullmatch(token) is not None


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
