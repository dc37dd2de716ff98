"""The CRM's answer body (docs/design.md §5) parsed into a `CrmAnswer`: pure, no I/O.

What belongs here: the rules that turn the bytes a CRM sent into true / false / a destination,
or into `CrmBadResponse` / `CrmStatusFail`. What does not: HTTP (status codes, reading with a
cap, timeouts live in `crm_http`) and the node's allow-list of destination types (the resolver
judges whether a node may use an answer).

The protocol is OMniLeads': a JSON object `{"status": "ok" | "fail", "destination": "true" |
"false" | "X,Y"}`. Variants real CRMs send, and that are accepted:
- `response` as the key instead of `destination` (OMniLeads' own docs name both); when both
  are present, both must parse and mean the same answer;
- JSON booleans; strings in any case with surrounding whitespace ("True ", " FALSE");
- destinations written "1,3", " 1 , 3 ", "(1,3)", "[1,3]", or a two-element list of integers;
- `status` in any case with surrounding whitespace, or absent when a destination is present;
- a UTF-8 byte order mark.

Chosen to be conservative, because a wrong guess routes a caller somewhere nobody decided:
- `status` must be "ok" or "fail" when present. `true`, "success", "error", null... are not
  guessed at: they are `CrmBadResponse` (the call takes `on_error` either way; only the
  outcome label differs).
- `"status": "fail"` is `CrmStatusFail` whatever the destination says, even if it is missing
  or malformed: the CRM said it failed.
- Keys are matched exactly (lowercase); other keys are ignored.
- A destination must be ASCII digits within `Destination`'s bounds; floats, booleans inside a
  list, strings inside a list, numbers alone, null, objects, Unicode digits are rejected.
- Not JSON, not an object, over `MAX_BODY` bytes, not UTF-8, NaN/Infinity, or nested deeply
  enough to exhaust the parser: `CrmBadResponse`.

Error messages are short and quote at most a few dozen characters of what the CRM sent: they
end up in logs, and a hostile CRM must not be able to fill them.

`parse_crm_response(body, notes)` also says, in `notes`, which of the accepted variants each
part of the answer used (`tools.crm_check` shows them to CRM developers); without `notes` it
is the same parse.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from crm_resolver.ports import CrmAnswer, CrmBadResponse, CrmStatusFail
from shared.destination import Destination
from shared.outcomes import Verdict

MAX_BODY = 65536
"""Largest CRM body accepted, in bytes (64 KiB); a longer one is `CrmBadResponse`."""

_BOM = b"\xef\xbb\xbf"
_DESTINATION_KEYS = ("destination", "response")
_TRUE = CrmAnswer(Verdict.TRUE)
_FALSE = CrmAnswer(Verdict.FALSE)
_WORDS = {"true": _TRUE, "false": _FALSE}
_SNIPPET_CHARS = 40
_SNIPPET_MAX = 60


def parse_crm_response(body: bytes, notes: list[str] | None = None) -> CrmAnswer:
    """The CRM's answer in `body`; raise CrmBadResponse or CrmStatusFail (see module doc).

    `notes`, when given, receives one line per variant the answer used, as far as it was read.
    """
    document = _decode(body, notes)
    if not isinstance(document, dict):
        _bad(f"expected a JSON object, got {type(document).__name__}")
    status = _status(document, notes)
    if status == "fail":
        raise CrmStatusFail("CRM answered status fail")
    return _destination(document, notes)


def _decode(body: bytes, notes: list[str] | None) -> Any:
    if len(body) > MAX_BODY:
        _bad(f"body over {MAX_BODY} bytes")
    if notes is not None and body.startswith(_BOM):
        notes.append("UTF-8 byte order mark: skipped")
    try:
        text = body.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CrmBadResponse("body is not UTF-8") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        # The C scanner recurses once per nesting level: "[[[[..." within 64 KiB is enough.
        raise CrmBadResponse("body is nested too deeply") from exc
    except ValueError as exc:
        # JSONDecodeError, NaN/Infinity, and integers beyond Python's digit limit.
        raise CrmBadResponse(f"body is not JSON: {_snippet(text)}") from exc


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _status(document: dict[str, Any], notes: list[str] | None) -> str:
    """'ok' or 'fail'; an absent status is 'ok' (the destination is checked after)."""
    if "status" not in document:
        if notes is not None:
            notes.append('status: absent, taken as "ok"')
        return "ok"
    value = document["status"]
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("ok", "fail"):
            if notes is not None:
                notes.append(_as_written("status", value, word))
            return word
    _bad(f"unknown status {_snippet(value)}")


def _destination(document: dict[str, Any], notes: list[str] | None) -> CrmAnswer:
    keys = [key for key in _DESTINATION_KEYS if key in document]
    if notes is not None and keys:
        notes.append(f"answer key: {' and '.join(repr(key) for key in keys)}")
    answers = [_answer(document[key], notes) for key in keys]
    if not answers:
        _bad("no destination (or response) in the answer")
    if len(answers) == 2 and answers[0] != answers[1]:
        _bad("destination and response disagree")
    return answers[0]


def _answer(value: Any, notes: list[str] | None) -> CrmAnswer:
    if isinstance(value, bool):
        if notes is not None:
            notes.append(f"answer: JSON boolean {str(value).lower()}")
        return _TRUE if value else _FALSE
    if isinstance(value, str):
        text = value.strip()
        word = _WORDS.get(text.lower())
        if word is not None:
            if notes is not None:
                notes.append(_as_written("answer", value, text.lower()))
            return word
        # Destination.parse's pattern uses \d, which also matches non-ASCII digits.
        if text.isascii():
            try:
                destination = Destination.parse(text)
            except ValueError:
                pass
            else:
                if notes is not None:
                    notes.append(_as_written("answer", value, str(destination)))
                return CrmAnswer(Verdict.DESTINATION, destination)
        _bad(f"unknown destination {_snippet(value)}")
    if isinstance(value, list) and len(value) == 2:
        type_, id_ = value
        # bool is an int subclass: [true, false] is not a destination.
        if all(isinstance(part, int) and not isinstance(part, bool) for part in value):
            try:
                destination = Destination(type=type_, id=id_)
            except ValueError:
                pass
            else:
                if notes is not None:
                    notes.append(f"answer: JSON list [{type_}, {id_}], read as {destination}")
                return CrmAnswer(Verdict.DESTINATION, destination)
    _bad(f"unknown destination {_snippet(value)}")


def _as_written(part: str, value: str, canonical: str) -> str:
    """A note on a string the CRM sent: as is, or which tolerance read it as `canonical`."""
    if value == canonical:
        return f"{part}: string {_snippet(value)}"
    return f"{part}: string {_snippet(value)}, read as {canonical!r}"


def _snippet(value: Any) -> str:
    """A bounded quotation of something the CRM sent, for an error message."""
    if isinstance(value, str):
        text = repr(value[:_SNIPPET_CHARS])
    elif isinstance(value, dict | list):
        text = type(value).__name__
    else:
        text = repr(value)
    return text if len(text) <= _SNIPPET_MAX else text[: _SNIPPET_MAX - 3] + "..."


def _bad(message: str) -> NoReturn:
    raise CrmBadResponse(message)
