"""Reading a token endpoint's answer (RFC 6749 §5.1, §5.2): what is a usable token, when it
is renewed, and what each unusable answer is called. The requests themselves, against a
real token endpoint, are tests/integration/test_crm_auth.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from crm_resolver.oauth2_client import (
    DEFAULT_LIFETIME,
    MAX_LIFETIME,
    REFRESH_MARGIN,
    Token,
    TokenRefused,
    read_token,
)


def answer(**fields: Any) -> bytes:
    return json.dumps({"access_token": "tok-1", "token_type": "Bearer", **fields}).encode()


@pytest.mark.parametrize(
    ("fields", "lifetime"),
    [
        ({"expires_in": 3600}, 3600),
        ({"expires_in": "120"}, 120),  # quoted by some servers
        ({"expires_in": 2.5}, 2.5),
        ({}, DEFAULT_LIFETIME),  # expires_in is optional
        ({"expires_in": 10 * MAX_LIFETIME}, MAX_LIFETIME),
        ({"token_type": "bearer", "expires_in": 60}, 60),  # case-insensitive (§5.1)
    ],
)
def test_a_usable_token_and_its_times(fields: dict[str, Any], lifetime: float) -> None:
    """Expiry counts from when the request was sent; renewal starts 30 s before it, or at
    90 % of a shorter lifetime."""
    token = read_token(200, answer(**fields), asked_at=1000.0)
    margin = min(REFRESH_MARGIN, lifetime / 10)
    assert token == Token("tok-1", 1000.0 + lifetime - margin, 1000.0 + lifetime)


def test_no_token_type_is_taken_as_bearer() -> None:
    body = json.dumps({"access_token": "tok-1", "expires_in": 60}).encode()
    assert read_token(200, body, asked_at=0).value == "tok-1"


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (401, b'{"error": "invalid_client"}', "HTTP 401 (invalid_client)"),
        (400, b'{"error": "bad\\nline"}', "HTTP 400"),  # not quoted: not an error code
        (503, b"<html>down</html>", "HTTP 503"),
        (200, b"<html>login</html>", "not a JSON object"),
        (200, b"[1, 2]", "not a JSON object"),
        (200, b'{"token_type": "Bearer"}', "no access_token"),
        (200, b'{"access_token": 7}', "no access_token"),
        (200, b'{"access_token": "a b"}', "characters a bearer token cannot have"),
        (200, b'{"access_token": "t", "token_type": "mac"}', "token_type is not Bearer"),
        (200, b'{"access_token": "t", "expires_in": 0}', "expires_in is not a positive"),
        (200, b'{"access_token": "t", "expires_in": true}', "expires_in is not a positive"),
        (200, b'{"access_token": "t", "expires_in": "soon"}', "expires_in is not a positive"),
    ],
)
def test_unusable_answers_say_why(status: int, body: bytes, reason: str) -> None:
    with pytest.raises(TokenRefused) as caught:
        read_token(status, body, asked_at=0)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
