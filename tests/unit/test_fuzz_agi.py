"""Fuzzing the AGI parser: grammar-shaped streams with mutations, and the saved corpus.

Beyond test_agi_protocol.py's arbitrary bytes, the streams here look like AGI (environment
lines, every reply form, 520 blocks, HANGUP) and are then damaged (bytes inserted, CR/LF/NUL
sprinkled, cut short), which reaches far deeper into the state machine. Invariants for any
input and any chunking:

- only `AgiProtocolError` is raised, and the same events and error come out however the
  bytes are chunked;
- the parser never holds more than `max_line + 1` unparsed bytes, nor more environment or
  usage lines than its limits;
- no reply field or environment value carries LF or NUL (a 520 block's lines are joined with
  LF by design and never written anywhere); a lone CR may stay inside a value, as Asterisk
  may pass one on, and everything the flow uses is validated to a fixed form after parsing;
  environment names are clean.

tests/corpus/agi/ holds inputs worth keeping (found by these runs or by atheris, and
boundary cases); `test_corpus_replays` runs every file through the same checks.
`CALLERID_FUZZ_EXAMPLES` raises the number of examples for a long run (marker `slow`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agi_gateway.protocol import (
    AgiParser,
    AgiProtocolError,
    EndOfStream,
    Environment,
    Event,
    HangupNotice,
    Reply,
)

CORPUS = sorted((Path(__file__).parents[1] / "corpus" / "agi").glob("*.agi"))
EXAMPLES = int(os.environ.get("CALLERID_FUZZ_EXAMPLES", "300"))

_names = st.from_regex(r"agi_[a-z0-9_]{1,12}", fullmatch=True) | st.text(max_size=8)
_values = st.text(max_size=40).map(lambda t: t.replace("\n", " "))
_env_line = st.builds(lambda n, v: f"{n}: {v}".encode(errors="surrogatepass"), _names, _values)
_reply_line = st.one_of(
    st.builds(
        lambda r, d, e: (
            f"200 result={r}" + (f" ({d})" if d is not None else "") + (f" endpos={e}" if e else "")
        ).encode(),
        st.text(alphabet="-0123456789*#ab", max_size=8),
        st.none() | st.text(max_size=20).map(lambda t: t.replace("\n", "")),
        st.none() | st.integers(-(10**6), 10**30),
    ),
    st.sampled_from(
        [
            b"HANGUP",
            b"511 Command Not Permitted on a dead channel or intercept routine",
            b"510 Invalid or unknown command",
            b"520-Invalid command syntax.  Proper usage follows:",
            b"520 End of proper usage.",
            b"Usage: GET DATA <file> [timeout] [maxdigits]",
            b"",
        ]
    ),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
)
_mutation = st.tuples(
    st.integers(0, 10_000), st.sampled_from([b"\r", b"\n", b"\0", b"\r\n", b"\xff", b": ", b""])
)


@st.composite
def agi_streams(draw: st.DrawFn) -> bytes:
    env = draw(st.lists(_env_line, max_size=6))
    replies = draw(st.lists(_reply_line, max_size=12))
    terminator = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = terminator.join([*env, b"", *replies]) + terminator
    for position, insert in draw(st.lists(_mutation, max_size=3)):
        position %= len(data) + 1
        data = data[:position] + insert + data[position:]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


def run(
    data: bytes, chunks: list[int], parser: AgiParser, *, max_line: int
) -> tuple[list[Event], str | None]:
    """Feed `data` in the given chunk sizes (cycled) then EOF, checking the bounds after every
    call; return the events and the protocol error's message (None if there was none)."""
    events: list[Event] = []
    position = index = 0
    try:
        while position < len(data):
            size = chunks[index % len(chunks)]
            try:
                events += parser.feed(data[position : position + size])
            finally:
                # White-box bounds: what a hostile peer could make the gateway hold.
                assert len(parser._buffer) <= max_line + 1
                assert len(parser._env) <= parser._max_env_lines
                assert len(parser._usage) <= parser._max_usage_lines + 1
            position += size
            index += 1
        events += parser.feed_eof()
    except AgiProtocolError as exc:
        events += exc.events
        return events, str(exc)
    return events, None


def check(data: bytes, chunks: list[int], *, max_line: int = 8192, lines: int = 256) -> None:
    def parser() -> AgiParser:
        return AgiParser(max_line=max_line, max_env_lines=lines, max_usage_lines=lines)

    whole = run(data, [max(len(data), 1)], parser(), max_line=max_line)
    chunked = run(data, chunks, parser(), max_line=max_line)
    assert whole == chunked
    events, _error = whole
    assert sum(isinstance(event, Environment) for event in events) <= 1
    for event in events:
        if isinstance(event, Environment):
            # A lone CR may stay inside a value (a caller name is Asterisk's to pass on, and
            # refusing the call over it would skip identification); values never reach the
            # socket, and those that reach a CRM request are stripped of control characters.
            for name, value in event.variables.items():
                assert not any(c in name for c in "\r\n\0")
                assert not any(c in value for c in "\n\0")
        elif isinstance(event, Reply):
            # A lone CR may sit inside a reply (GET VARIABLE returns whatever a variable
            # holds); the flow validates every value it uses to a fixed form anyway.
            assert event.code in {200, 510, 511, 520}
            forbidden = "\0" if event.code == 520 else "\n\0"
            assert not any(c in event.text for c in forbidden)
            for part in (event.result, event.data):
                assert part is None or not any(c in part for c in "\n\0")
        else:
            assert isinstance(event, HangupNotice | EndOfStream)
    assert not any(isinstance(event, EndOfStream) for event in events[:-1])


_chunks = st.lists(st.integers(1, 64), min_size=1, max_size=6)
_settings = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_settings
@given(data=agi_streams(), chunks=_chunks)
def test_agi_shaped_streams_keep_every_invariant(data: bytes, chunks: list[int]) -> None:
    """Damaged AGI streams: only protocol errors, chunking-independent, bounded, clean."""
    check(data, chunks)


@_settings
@given(data=agi_streams(), chunks=_chunks, max_line=st.integers(1, 40), lines=st.integers(1, 4))
def test_tight_limits_are_enforced_exactly(
    data: bytes, chunks: list[int], max_line: int, lines: int
) -> None:
    """With tiny limits every bound is hit often; the buffer never outgrows max_line + 1."""
    check(data, chunks, max_line=max_line, lines=lines)


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_replays(path: Path) -> None:
    """Every saved input keeps the invariants, whole, one byte at a time and in 7s."""
    data = path.read_bytes()
    for chunks in ([1], [7], [4096]):
        check(data, chunks)


def test_corpus_is_not_empty() -> None:
    """The corpus directory is found (a wrong path would make the replay vacuous)."""
    assert len(CORPUS) >= 10


def long_form_wanted(config: pytest.Config) -> None:
    """Skip a long form unless asked for: `-m slow` or CALLERID_TEST_SLOW=1 (as test_faults)."""
    if "slow" in str(config.getoption("markexpr") or "").replace("not slow", ""):
        return
    if os.environ.get("CALLERID_TEST_SLOW") == "1":
        return
    pytest.skip("long form: run with -m slow or CALLERID_TEST_SLOW=1")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_long_fuzz_run(request: pytest.FixtureRequest) -> None:
    """The long form (marker `slow`): 20,000+ damaged streams, normal and tight limits."""
    long_form_wanted(request.config)

    @settings(max_examples=max(EXAMPLES, 20_000), deadline=None)
    @given(data=agi_streams(), chunks=_chunks, max_line=st.integers(1, 9000))
    def run_long(data: bytes, chunks: list[int], max_line: int) -> None:
        check(data, chunks)
        check(data, chunks, max_line=max_line, lines=4)

    run_long()
