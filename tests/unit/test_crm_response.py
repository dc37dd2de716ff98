"""The CRM answer parser: accepted variants, hostile bodies, and any bytes at all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_resolver.crm_response import MAX_BODY, parse_crm_response
from crm_resolver.ports import CrmAnswer, CrmBadResponse, CrmError, CrmStatusFail
from shared.destination import Destination
from shared.outcomes import Verdict

TRUE = CrmAnswer(Verdict.TRUE)
FALSE = CrmAnswer(Verdict.FALSE)


def dest(type_: int, id_: int) -> CrmAnswer:
    return CrmAnswer(Verdict.DESTINATION, Destination(type=type_, id=id_))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"status": "ok", "destination": "true"}', TRUE),
        (b'{"status": "ok", "destination": "false"}', FALSE),
        (b'{"status": "ok", "destination": "1,3"}', dest(1, 3)),
        (b'{"status": "ok", "response": "true"}', TRUE),
        (b'{"status": "ok", "response": "2,8"}', dest(2, 8)),
        (b'{"status": "ok", "destination": "1,3", "response": "(1, 3)"}', dest(1, 3)),
        (b'{"status": "ok", "destination": true}', TRUE),
        (b'{"status": "ok", "destination": false}', FALSE),
        (b'{"status": "ok", "destination": "True "}', TRUE),
        (b'{"status": "ok", "destination": " FALSE"}', FALSE),
        (b'{"status": "ok", "destination": "tRuE"}', TRUE),
        (b'{"status": "ok", "destination": "(1,3)"}', dest(1, 3)),
        (b'{"status": "ok", "destination": "1, 3"}', dest(1, 3)),
        (b'{"status": "ok", "destination": " 1 , 3 "}', dest(1, 3)),
        (b'{"status": "ok", "destination": "[1,3]"}', dest(1, 3)),
        (b'{"status": "ok", "destination": [1, 3]}', dest(1, 3)),
        (b'{"status": "ok", "destination": "0,0"}', dest(0, 0)),
        (b'{"status": "ok", "destination": "999,999999999"}', dest(999, 999_999_999)),
        (b'{"status": "ok", "destination": [999, 2147483647]}', dest(999, 2_147_483_647)),
        (b'{"status": "OK", "destination": "true"}', TRUE),
        (b'{"status": " Ok ", "destination": "true"}', TRUE),
        (b'{"destination": "true"}', TRUE),
        (b'{"response": "5,1"}', dest(5, 1)),
        (b'\xef\xbb\xbf{"status": "ok", "destination": "true"}', TRUE),
        (b' \r\n{"status": "ok", "destination": "false"}\n', FALSE),
        (b'{"status": "ok", "destination": "9,4", "extra": {"any": [1, 2]}}', dest(9, 4)),
    ],
)
def test_accepted_variants(body: bytes, expected: CrmAnswer) -> None:
    """OMniLeads' answer and the variants real CRMs send parse to the answer they mean."""
    assert parse_crm_response(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"true", id="bare-true"),
        pytest.param(b"<html>garbage</html>", id="html"),
        pytest.param(b'"{\\"destination\\": \\"true\\"}"', id="double-encoded"),
        pytest.param(b'[{"destination": "true"}]', id="list"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"status": "ok"}', id="no-destination"),
        pytest.param(b"{}", id="empty-object"),
        pytest.param(b'{"Destination": "true"}', id="key-case"),
        pytest.param(b'{"destination": "yes"}', id="unknown-word"),
        pytest.param(b'{"destination": ""}', id="empty-string"),
        pytest.param(b'{"destination": "1"}', id="one-number"),
        pytest.param(b'{"destination": "1,2,3"}', id="three-numbers"),
        pytest.param(b'{"destination": "-1,3"}', id="negative"),
        pytest.param(b'{"destination": "1,-3"}', id="negative-id"),
        pytest.param(b'{"destination": "1000,3"}', id="type-too-big"),
        pytest.param(b'{"destination": "1,2147483648"}', id="id-too-big"),
        pytest.param(b'{"destination": "1,99999999999999999999"}', id="huge"),
        pytest.param(b'{"destination": "1.5,3"}', id="float-string"),
        pytest.param(b'{"destination": [1.0, 3]}', id="float-in-list"),
        pytest.param(b'{"destination": [true, false]}', id="bools-in-list"),
        pytest.param(b'{"destination": ["1", "3"]}', id="strings-in-list"),
        pytest.param(b'{"destination": [1, 3, 4]}', id="three-in-list"),
        pytest.param(b'{"destination": [-1, 3]}', id="negative-in-list"),
        pytest.param(b'{"destination": 1}', id="int"),
        pytest.param(b'{"destination": 1.5}', id="float"),
        pytest.param(b'{"destination": null}', id="null-destination"),
        pytest.param(b'{"destination": {"type": 1, "id": 3}}', id="object"),
        pytest.param(b'{"destination": [[1, 3]]}', id="nested-list"),
        pytest.param(b'{"destination": NaN}', id="nan"),
        pytest.param(b'{"destination": [Infinity, 1]}', id="infinity"),
        pytest.param(b'{"destination": [-Infinity, 1]}', id="minus-infinity"),
        pytest.param('{"destination": "١,٣"}'.encode(), id="arabic-digits"),
        pytest.param('{"destination": "1,3"}'.encode("utf-16"), id="utf-16"),
        pytest.param(b'{"destination": "\xff"}', id="not-utf8"),
        pytest.param(b'{"destination": "1,3\\r\\nHANGUP"}', id="crlf-injection"),
        pytest.param(b'{"destination": "true", "response": "false"}', id="keys-disagree"),
        pytest.param(b'{"destination": "true", "response": "garbage"}', id="second-bad"),
        pytest.param(b'{"status": true, "destination": "true"}', id="status-bool"),
        pytest.param(b'{"status": "success", "destination": "true"}', id="status-success"),
        pytest.param(b'{"status": null, "destination": "true"}', id="status-null"),
        pytest.param(b'{"status": "error", "destination": "true"}', id="status-error"),
        pytest.param(b"[" * 50_000 + b"]" * 50_000, id="deep-nesting-oversized"),
        pytest.param(b"[" * 30_000 + b"]" * 30_000, id="deep-nesting"),
        pytest.param(b'{"a":' * 10_000 + b"1" + b"}" * 10_000, id="deep-objects"),
        pytest.param(b'{"destination": ' + b"9" * 5000 + b"}", id="int-beyond-digit-limit"),
        pytest.param(b'{"destination": "true", "pad": "' + b"x" * MAX_BODY + b'"}', id="oversized"),
    ],
)
def test_hostile_bodies_are_bad_responses(body: bytes) -> None:
    """Anything outside the protocol is CrmBadResponse, with a short message."""
    with pytest.raises(CrmBadResponse) as caught:
        parse_crm_response(body)
    assert len(str(caught.value)) <= 100


def test_body_of_exactly_max_body_is_accepted() -> None:
    """The cap is inclusive: a valid body of exactly MAX_BODY bytes parses."""
    head = b'{"destination": "true", "pad": "'
    body = head + b"x" * (MAX_BODY - len(head) - 2) + b'"}'
    assert len(body) == MAX_BODY
    assert parse_crm_response(body) == TRUE


@pytest.mark.parametrize(
    "body",
    [
        b'{"status": "fail", "destination": "false"}',
        b'{"status": "fail", "destination": "true"}',
        b'{"status": "FAIL ", "destination": "1,3"}',
        b'{"status": "fail"}',
        b'{"status": "fail", "destination": "garbage"}',
    ],
)
def test_status_fail_wins_over_any_destination(body: bytes) -> None:
    """`"status": "fail"` is CrmStatusFail whatever the destination is, even absent or bad."""
    with pytest.raises(CrmStatusFail):
        parse_crm_response(body)


def test_error_message_quotes_little_of_a_long_value() -> None:
    """An unknown destination is quoted in the message, but only its first few dozen chars."""
    secret_tail = "Z" * 500
    body = b'{"destination": "' + ("A" * 30 + secret_tail).encode() + b'"}'
    with pytest.raises(CrmBadResponse) as caught:
        parse_crm_response(body)
    message = str(caught.value)
    assert "AAAA" in message
    assert message.count("Z") <= 30


def _json_values() -> st.SearchStrategy[str]:
    scalars = st.one_of(
        st.sampled_from(['"true"', '"false"', '"1,3"', "true", "false", "null", "NaN", '"ok"']),
        st.integers(-(10**12), 10**12).map(str),
        st.floats(allow_nan=False).map(repr),
        st.text(max_size=12).map(lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
            st.dictionaries(
                st.sampled_from(['"status"', '"destination"', '"response"', '"x"']),
                inner,
                max_size=3,
            ).map(lambda d: "{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}"),
        ),
        max_leaves=8,
    )


def _check_any(body: bytes) -> None:
    try:
        answer = parse_crm_response(body)
    except CrmError:
        return
    assert isinstance(answer, CrmAnswer)
    if answer.destination is not None:
        assert isinstance(answer.destination.type, int)
        assert isinstance(answer.destination.id, int)
        assert 0 <= answer.destination.type <= 999
        assert 0 <= answer.destination.id <= 2_147_483_647
        assert str(answer.destination).replace(",", "").isdigit()


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_give_an_answer_or_a_crm_error(body: bytes) -> None:
    """For any bytes, the parser returns a bounded answer or raises CrmError, nothing else."""
    _check_any(body)


@settings(max_examples=300)
@given(_json_values())
def test_any_json_shaped_body_gives_an_answer_or_a_crm_error(text: str) -> None:
    """JSON-like bodies near the protocol also only ever give a bounded answer or CrmError."""
    _check_any(text.encode("utf-8", "surrogatepass"))
