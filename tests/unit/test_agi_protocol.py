"""The sans-I/O AGI parser: recorded Asterisk 22 transcripts, every reply form, and hostile input.

Transcripts in tests/transcripts/*.agi are the bytes Asterisk sends to a FastAGI server, exactly
(trailing spaces after empty values included). Every transcript must parse to the same events
however it is chunked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
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

TRANSCRIPTS = Path(__file__).parents[1] / "transcripts"
VALID = sorted(TRANSCRIPTS.glob("*.agi"))
ENV = b"agi_network: yes\nagi_network_script: identify/1\n\n"
DEAD = "511 Command Not Permitted on a dead channel or intercept routine"
USAGE_BLOCK = (
    b"520-Invalid command syntax.  Proper usage follows:\n"
    b"Usage: GET DATA <file to be streamed> [timeout] [maxdigits]\n"
    b"\n"
    b"200 result=1 (looks like a reply, is usage text)\n"
    b"HANGUP\n"
    b"520 End of proper usage.\n"
)

INVALID = {
    "env line without colon": b"agi_network yes\n\n",
    "env name not lowercase": b"agi_network: yes\nAGI_X: 1\n\n",
    "env name with space": b"agi network: yes\n\n",
    "env colon without space": b"agi_arg_2:\n\n",
    "env sent twice": b"agi_network: yes\nagi_network: no\n\n",
    "empty environment": b"\n200 result=1\n",
    "reply with no form": ENV + b"200 result=1\nOK then\n",
    "unknown code": ENV + b"404 Not Found\n",
    "200 without result": ENV + b"200 ok\n",
    "lowercase hangup": ENV + b"hangup\n",
    "not utf-8": ENV + b"200 result=1 (\xff\xfe)\n",
    "nul byte": ENV + b"200 result=1 (a\x00b)\n",
    "garbage after reply": ENV + b"200 result=1\n\x80\x81\x82\n200 result=0\n",
}


def parse(data: bytes, chunks: list[int] | None = None, *, eof: bool = True) -> list[Event]:
    """Feed `data` cut at the given chunk sizes (cycled); return events, raising at the end."""
    parser = AgiParser()
    events: list[Event] = []
    sizes = chunks or [len(data) or 1]
    position = index = 0
    while position < len(data):
        size = max(sizes[index % len(sizes)], 1)
        events += parser.feed(data[position : position + size])
        position += size
        index += 1
    if eof:
        events += parser.feed_eof()
    return events


def outcome(data: bytes, chunks: list[int] | None = None) -> tuple[list[Event], str | None]:
    """Events up to the error (including those the failing feed had parsed) and the error."""
    parser = AgiParser()
    events: list[Event] = []
    sizes = chunks or [len(data) or 1]
    position = index = 0
    try:
        while position < len(data):
            size = max(sizes[index % len(sizes)], 1)
            events += parser.feed(data[position : position + size])
            position += size
            index += 1
        events += parser.feed_eof()
    except AgiProtocolError as exc:
        return events + list(exc.events), str(exc)
    return events, None


def replies(*lines: bytes) -> list[Event]:
    """Events after the standard environment for the given reply bytes."""
    events = parse(ENV + b"".join(lines))
    assert isinstance(events[0], Environment)
    assert isinstance(events[-1], EndOfStream)
    return events[1:-1]


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_transcript_same_events_whole_and_one_byte_at_a_time(path: Path) -> None:
    """A recorded transcript parses to the same events fed at once or one byte at a time."""
    data = path.read_bytes()
    whole = parse(data)
    assert parse(data, [1]) == whole
    assert isinstance(whole[0], Environment)
    assert whole[-1] == EndOfStream()


@settings(max_examples=150, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=len(VALID) - 1),
    chunks=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=30),
)
def test_transcripts_any_chunking_same_events(index: int, chunks: list[int]) -> None:
    """Any chunking of a valid transcript gives exactly the events of the unchunked stream."""
    data = VALID[index].read_bytes()
    assert parse(data, chunks) == parse(data)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(INVALID)),
    chunks=st.lists(st.integers(min_value=1, max_value=16), min_size=1, max_size=20),
)
def test_invalid_streams_fail_the_same_way_in_any_chunking(name: str, chunks: list[int]) -> None:
    """An invalid stream gives the same events and the same error however it is chunked."""
    data = INVALID[name]
    whole_events, whole_error = outcome(data)
    assert whole_error is not None
    assert outcome(data, chunks) == (whole_events, whole_error)
    assert outcome(data, [1]) == (whole_events, whole_error)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_streams_raise_protocol_error(name: str) -> None:
    """Each malformed stream raises AgiProtocolError with a short message."""
    with pytest.raises(AgiProtocolError) as caught:
        parse(INVALID[name])
    assert 0 < len(str(caught.value)) <= 120


def test_identified_transcript_events() -> None:
    """The identified call parses to its environment, then one reply per command."""
    events = parse((TRANSCRIPTS / "asterisk22_identified.agi").read_bytes())
    environment = events[0]
    assert isinstance(environment, Environment)
    variables = environment.variables
    assert next(iter(variables)) == "agi_network"
    assert variables["agi_network_script"] == "identify/1"
    assert variables["agi_calleridname"] == "Juan Pérez: VIP"  # value keeps its own ": "
    assert variables["agi_accountcode"] == ""
    assert variables["agi_arg_2"] == ""
    assert len(variables) == 24
    assert events[3] == Reply(200, "", "timeout", None, "200 result= (timeout)")
    assert events[4] == Reply(200, "12345", None, None, "200 result=12345")
    assert len(events) == 1 + 10 + 1


def test_crlf_transcript_gives_the_same_events_as_lf() -> None:
    """Lines ending in CRLF parse exactly like lines ending in LF."""
    lf = parse((TRANSCRIPTS / "asterisk22_identified.agi").read_bytes())
    crlf = parse((TRANSCRIPTS / "asterisk22_identified_crlf.agi").read_bytes())
    assert crlf == lf


def test_environment_values_keep_the_space_semantics() -> None:
    """`agi_arg_2: ` is an empty value; everything after the first ': ' is the value."""
    events = parse(b"agi_arg_1: 7\nagi_arg_2: \nagi_arg_3:  x \n\n")
    assert events[0] == Environment({"agi_arg_1": "7", "agi_arg_2": "", "agi_arg_3": " x "})


def test_environment_arriving_in_several_writes_is_one_event() -> None:
    """An environment split across writes, network lines first, yields one event at the end."""
    parser = AgiParser()
    assert parser.feed(b"agi_network: yes\nagi_network_script: identify/") == []
    assert parser.feed(b"2\nagi_request: agi://h/identify/2\n") == []
    assert parser.feed(b"agi_arg_1: \n") == []
    [environment] = parser.feed(b"\n")
    assert isinstance(environment, Environment)
    assert environment.variables["agi_network_script"] == "identify/2"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"200 result=1", Reply(200, "1", None, None, "200 result=1")),
        (b"200 result=", Reply(200, "", None, None, "200 result=")),
        (b"200 result= (timeout)", Reply(200, "", "timeout", None, "200 result= (timeout)")),
        (
            b"200 result=123 (timeout)",
            Reply(200, "123", "timeout", None, "200 result=123 (timeout)"),
        ),
        (b"200 result=-1", Reply(200, "-1", None, None, "200 result=-1")),
        (b"200 result=0 endpos=12345", Reply(200, "0", None, 12345, "200 result=0 endpos=12345")),
        (
            b"200 result=1 (some data)",
            Reply(200, "1", "some data", None, "200 result=1 (some data)"),
        ),
        (b"200 result=1 (a (b) c)", Reply(200, "1", "a (b) c", None, "200 result=1 (a (b) c)")),
        (
            b"200 result=0 (timeout) endpos=80",
            Reply(200, "0", "timeout", 80, "200 result=0 (timeout) endpos=80"),
        ),
        (
            b"510 Invalid or unknown command",
            Reply(510, None, None, None, "510 Invalid or unknown command"),
        ),
        (DEAD.encode(), Reply(511, None, None, None, DEAD)),
        (
            b"520 Invalid command syntax.  Proper usage not available.",
            Reply(
                520, None, None, None, "520 Invalid command syntax.  Proper usage not available."
            ),
        ),
    ],
)
def test_reply_forms(line: bytes, expected: Reply) -> None:
    """Every reply form Asterisk 22 sends parses to the right code, result, data and endpos."""
    assert replies(line + b"\n") == [expected]


def test_multiline_520_is_one_reply_and_keeps_sync() -> None:
    """The usage block is one Reply(520) even when its text looks like replies; the next reply
    after it is parsed as the reply to the next command."""
    events = replies(USAGE_BLOCK, b"200 result=0\n")
    assert len(events) == 2
    usage, after = events
    assert isinstance(usage, Reply)
    assert usage.code == 520
    assert usage.result is None
    assert usage.text == USAGE_BLOCK.decode().rstrip("\n")
    assert after == Reply(200, "0", None, None, "200 result=0")


def test_hangup_between_replies_and_right_after_a_reply_in_the_same_chunk() -> None:
    """HANGUP is its own event wherever it arrives, even glued to a reply in one chunk."""
    parser = AgiParser()
    parser.feed(ENV)
    assert parser.feed(b"200 result=-1\nHANGUP\n") == [
        Reply(200, "-1", None, None, "200 result=-1"),
        HangupNotice(),
    ]
    assert parser.feed(b"HANGUP\n" + DEAD.encode() + b"\n") == [
        HangupNotice(),
        Reply(511, None, None, None, DEAD),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"agi_network: yes\nagi_netw", "middle of a line"),
        (b"agi_network: yes\n", "middle of the environment"),
        (ENV + b"200 resu", "middle of a line"),
        (ENV + USAGE_BLOCK[:60], "middle of a line"),
        (ENV + USAGE_BLOCK.split(b"\n", 1)[0] + b"\n", "middle of a 520 usage block"),
    ],
)
def test_eof_in_the_middle_is_an_error(data: bytes, message: str) -> None:
    """EOF mid-header, mid-line or mid-520 raises instead of ending quietly."""
    with pytest.raises(AgiProtocolError, match=message):
        parse(data)


def test_clean_eof_between_replies_and_before_any_byte() -> None:
    """EOF after a complete reply, or before any byte at all (a TCP probe), is EndOfStream."""
    assert parse(ENV + b"200 result=1\n")[-1] == EndOfStream()
    assert AgiParser().feed_eof() == [EndOfStream()]


def test_feeding_after_eof_is_a_local_error() -> None:
    """Using the parser after feed_eof() is our own bug, not the peer's: RuntimeError."""
    parser = AgiParser()
    parser.feed(ENV)
    parser.feed_eof()
    with pytest.raises(RuntimeError):
        parser.feed(b"200 result=1\n")


def test_oversize_line_is_refused_while_the_buffer_stays_bounded() -> None:
    """A line without end is refused once it exceeds max_line, not buffered without limit."""
    parser = AgiParser(max_line=64)
    parser.feed(b"agi_network: yes\n")
    assert parser.feed(b"a" * 65) == []  # max_line plus one byte that could be "\r"
    with pytest.raises(AgiProtocolError, match="longer than 64"):
        parser.feed(b"a")


def test_a_line_of_exactly_max_line_is_accepted_with_crlf() -> None:
    """The bound is on the line's content: max_line bytes plus CRLF is fine, one more is not."""
    line = b"agi_x: " + b"v" * (64 - 7)
    assert len(line) == 64
    with pytest.raises(AgiProtocolError, match="longer than 64"):
        AgiParser(max_line=64).feed(line + b"v\n")
    assert AgiParser(max_line=64).feed(line + b"\r\n\n") != []


def test_huge_stream_without_newline_fails_within_max_line() -> None:
    """Fed byte by byte, garbage without a newline fails within max_line + 2 bytes."""
    parser = AgiParser(max_line=100)
    fed = 0
    try:
        for _ in range(10_000):
            parser.feed(b"x")
            fed += 1
    except AgiProtocolError:
        pass
    assert fed == 101  # max_line bytes plus one that could have been a "\r"


def test_too_many_environment_lines() -> None:
    """An environment longer than max_env_lines is refused before it ends."""
    block = b"".join(b"agi_arg_%d: x\n" % i for i in range(5))
    with pytest.raises(AgiProtocolError, match="environment longer than 4"):
        AgiParser(max_env_lines=4).feed(block)
    assert AgiParser(max_env_lines=5).feed(block + b"\n") != []


def test_too_many_usage_lines() -> None:
    """A 520 block longer than max_usage_lines is refused instead of swallowing the stream."""
    parser = AgiParser(max_usage_lines=3)
    parser.feed(ENV)
    with pytest.raises(AgiProtocolError, match="usage block longer than 3"):
        parser.feed(b"520-Invalid\nline\nline\nline\n")


def test_error_is_sticky() -> None:
    """After an error the parser stays failed: later feeds raise the same error again."""
    parser = AgiParser()
    with pytest.raises(AgiProtocolError) as first:
        parser.feed(b"not an env line\n")
    with pytest.raises(AgiProtocolError) as again:
        parser.feed(b"agi_network: yes\n\n")
    assert str(again.value) == str(first.value)
    with pytest.raises(AgiProtocolError):
        parser.feed_eof()


def test_error_message_never_echoes_much_peer_data() -> None:
    """A long malformed line is quoted in the error only in part."""
    with pytest.raises(AgiProtocolError) as caught:
        parse(ENV + b"X" * 5000 + b"\n")
    assert len(str(caught.value)) < 120


def test_events_before_an_error_in_the_same_feed_travel_on_the_exception() -> None:
    """Replies parsed before the bad line in the same feed are kept on the exception."""
    parser = AgiParser()
    parser.feed(ENV)
    with pytest.raises(AgiProtocolError) as caught:
        parser.feed(b"200 result=1\nHANGUP\nbogus\n")
    assert caught.value.events == (Reply(200, "1", None, None, "200 result=1"), HangupNotice())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), chunks=st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_arbitrary_bytes_only_ever_raise_protocol_errors(data: bytes, chunks: list[int]) -> None:
    """Whatever the peer sends, the parser returns events or raises AgiProtocolError."""
    outcome(ENV + data, chunks)
    outcome(data, chunks)


def test_parser_module_does_not_import_asyncio() -> None:
    """The protocol module stays free of I/O: it does not import asyncio."""
    source = (Path(__file__).parents[2] / "services/agi_gateway/protocol.py").read_text()
    assert "import asyncio" not in source
    assert "from asyncio" not in source
