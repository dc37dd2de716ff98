"""Typed AGI commands: exact encodings, and nothing dangerous ever reaching the wire."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agi_gateway.commands import (
    _SAFE_TEXT,
    NARROW_PATTERNS,
    Answer,
    ChannelStatus,
    Command,
    CommandError,
    Exec,
    GetData,
    GetFullVariable,
    MultiSet,
    ReadDigits,
    SayDigits,
    SetMusic,
    SetVariable,
    StreamFile,
    Verbose,
    WaitForDigit,
)
from tools.asterisk_sim import app_separate_args, parse_args

DANGEROUS = ["\r", "\n", "\0", '"', "\\", "a\r\nHANGUP", 'x" "y', "x\\"]


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (Answer(), b"ANSWER\n"),
        (ChannelStatus(), b"CHANNEL STATUS\n"),
        (GetData("prompt", 5000, 5), b'GET DATA "prompt" 5000 5\n'),
        (GetData("custom/id-prompt.v2", 1, 64), b'GET DATA "custom/id-prompt.v2" 1 64\n'),
        (StreamFile("name", "0123456789*#"), b'STREAM FILE "name" "0123456789*#"\n'),
        (StreamFile("name"), b'STREAM FILE "name" ""\n'),
        (SayDigits("0123"), b'SAY DIGITS "0123" ""\n'),
        (SayDigits("9", "#"), b'SAY DIGITS "9" "#"\n'),
        (WaitForDigit(3000), b"WAIT FOR DIGIT 3000\n"),
        (SetVariable("OML_X", "value"), b'SET VARIABLE OML_X "value"\n'),
        (SetVariable("NAME", ""), b'SET VARIABLE NAME ""\n'),
        (SetVariable("__OMLCODCLI", "12345"), b'SET VARIABLE __OMLCODCLI "12345"\n'),
        (SetVariable("_INHERIT", "a b"), b'SET VARIABLE _INHERIT "a b"\n'),
        (SetVariable("TIMEOUT(digit)", "2.5"), b'SET VARIABLE TIMEOUT(digit) "2.5"\n'),
        (SetVariable(name="X", value="1"), b'SET VARIABLE X "1"\n'),
        (Exec("Goto", "ctx,ext,1"), b'EXEC Goto "ctx,ext,1"\n'),
        (Exec("NoOp"), b'EXEC NoOp ""\n'),
        (MultiSet([("A", "1")]), b'EXEC MSet "A=1"\n'),
        (
            MultiSet([("__OMLCODCLI", "12345"), ("OML_DEST_TYPE", ""), ("OML_X", "crm")]),
            b'EXEC MSet "__OMLCODCLI=12345,OML_DEST_TYPE=,OML_X=crm"\n',
        ),
        (
            MultiSet([("TIMEOUT(response)", "5.000"), ("TIMEOUT(digit)", "2.500")]),
            b'EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=2.500"\n',
        ),
        (
            ReadDigits("CALLERID_ENTRY", "oml/prompt", 5),
            b'EXEC Read "CALLERID_ENTRY,oml/prompt,5"\n',
        ),
        (
            GetFullVariable("${CALLERID_ENTRY},${READSTATUS}"),
            b'GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"\n',
        ),
        (SetMusic(True), b'SET MUSIC on "default"\n'),
        (SetMusic(True, "jazz-2"), b'SET MUSIC on "jazz-2"\n'),
        (SetMusic(False), b"SET MUSIC off\n"),
        (Verbose("msg here"), b'VERBOSE "msg here" 1\n'),
        (Verbose("m", 4), b'VERBOSE "m" 4\n'),
    ],
    ids=repr,
)
def test_every_command_encodes_exactly(command: Command, wire: bytes) -> None:
    """Each command encodes to exactly the line Asterisk expects."""
    assert command.encode() == wire


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        (GetData("p", 5000, 5), ["GET", "DATA", "p", "5000", "5"]),
        (StreamFile("p"), ["STREAM", "FILE", "p", ""]),
        (SetVariable("X", "a b, c"), ["SET", "VARIABLE", "X", "a b, c"]),
        (SetVariable("X", ""), ["SET", "VARIABLE", "X", ""]),
        (Exec("Goto", "c,e,1"), ["EXEC", "Goto", "c,e,1"]),
        (MultiSet([("_A", "1"), ("B", "")]), ["EXEC", "MSet", "_A=1,B="]),
    ],
    ids=repr,
)
def test_asterisk_splits_encoded_commands_into_the_intended_arguments(
    command: Command, argv: list[str]
) -> None:
    """Asterisk's own argument splitting recovers exactly the arguments we meant, empty
    ones included."""
    assert parse_args(command.encode().decode().rstrip("\n")) == (argv, False)


def test_commands_have_short_log_names() -> None:
    """`name` is the command verb, for logs."""
    assert GetData("p", 1, 1).name == "GET DATA"
    assert SetVariable("X", "1").name == "SET VARIABLE"
    assert Answer().name == "ANSWER"


def test_commands_are_immutable() -> None:
    """A built (validated) command cannot be changed afterwards."""
    command = SetVariable("X", "1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.value = 'x"\nHANGUP'  # type: ignore[misc]


STRING_BUILDERS: dict[str, Callable[[str], Command]] = {
    "GetData.prompt": lambda s: GetData(s, 5000, 5),
    "StreamFile.filename": lambda s: StreamFile(s),
    "StreamFile.escape_digits": lambda s: StreamFile("p", s),
    "SayDigits.digits": lambda s: SayDigits(s),
    "SayDigits.escape_digits": lambda s: SayDigits("1", s),
    "SetVariable.name": lambda s: SetVariable(s, "v"),
    "SetVariable.value": lambda s: SetVariable("X", s),
    "Exec.application": lambda s: Exec(s, "x"),
    "Exec.options": lambda s: Exec("Goto", s),
    "MultiSet.name": lambda s: MultiSet([(s, "v")]),
    "MultiSet.value": lambda s: MultiSet([("X", s)]),
    "ReadDigits.variable": lambda s: ReadDigits(s, "p", 5),
    "ReadDigits.prompt": lambda s: ReadDigits("V", s, 5),
    "GetFullVariable.expression": lambda s: GetFullVariable(s),
    "SetMusic.music_class": lambda s: SetMusic(True, s),
    "Verbose.message": lambda s: Verbose(s),
}


@pytest.mark.parametrize("builder", sorted(STRING_BUILDERS))
@pytest.mark.parametrize("bad", DANGEROUS, ids=repr)
def test_dangerous_characters_are_refused_in_every_string_argument(builder: str, bad: str) -> None:
    """CR, LF, NUL, quote and backslash are refused in every string argument."""
    with pytest.raises(CommandError):
        STRING_BUILDERS[builder]("ok" + bad)


@settings(max_examples=100, deadline=None)
@given(builder=st.sampled_from(sorted(STRING_BUILDERS)), text=st.text(max_size=300))
def test_any_text_either_refused_or_exactly_one_safe_line(builder: str, text: str) -> None:
    """For any text, a command is refused or encodes to one line with one trailing LF and no
    CR, and Asterisk's parser sees balanced quotes."""
    try:
        command = STRING_BUILDERS[builder](text)
    except CommandError:
        return
    wire = command.encode()
    assert wire.endswith(b"\n")
    assert wire.count(b"\n") == 1
    assert b"\r" not in wire
    assert b"\0" not in wire
    assert parse_args(wire.decode("ascii").rstrip("\n"))[1] is False


@pytest.mark.parametrize(
    "build",
    [
        lambda: GetData("p", 0, 5),
        lambda: GetData("p", 600_001, 5),
        lambda: GetData("p", 5000, 0),
        lambda: GetData("p", 5000, 65),
        lambda: GetData("p", True, 5),
        lambda: GetData("p", "5000", 5),  # type: ignore[arg-type]
        lambda: GetData("", 5000, 5),
        lambda: GetData("has space", 5000, 5),
        lambda: GetData("x" * 256, 5000, 5),
        lambda: StreamFile("p", "a"),
        lambda: SayDigits(""),
        lambda: SayDigits("12a"),
        lambda: SayDigits("1" * 65),
        lambda: WaitForDigit(-1),
        lambda: WaitForDigit(0),
        lambda: WaitForDigit(600_001),
        lambda: SetVariable("", "v"),
        lambda: SetVariable("1ABC", "v"),
        lambda: SetVariable("___X", "v"),
        lambda: SetVariable("A B", "v"),
        lambda: SetVariable("A-B", "v"),
        lambda: SetVariable("TIMEOUT(DIGIT)", "v"),
        lambda: SetVariable("timeout(digit)", "v"),
        lambda: SetVariable("X", "v" * 256),
        lambda: SetVariable("X", "caf\u00e9"),
        lambda: SetVariable("X", "tab\there"),
        lambda: Exec("Go to", "x"),
        lambda: Exec("Goto1", "x"),
        lambda: Exec("", "x"),
        lambda: SetMusic(1, "default"),  # type: ignore[arg-type]
        lambda: SetMusic(True, ""),
        lambda: SetMusic(True, "a b"),
        lambda: Verbose("m" * 201),
        lambda: Verbose("m", 0),
        lambda: Verbose("m", 5),
        lambda: ReadDigits("V", "p", 0),
        lambda: ReadDigits("V", "p", 256),
        lambda: ReadDigits("V", "a&b", 5),  # Read() plays each of several prompts
        lambda: ReadDigits("V", "a,b", 5),
        lambda: ReadDigits("V=1", "p", 5),
        lambda: GetFullVariable("${CUT(X,a,1)}"),  # functions are not evaluated through here
        lambda: GetFullVariable("${X"),
        lambda: GetFullVariable("$[1+1]"),
        lambda: GetFullVariable(""),
    ],
)
def test_out_of_range_and_malformed_arguments_are_refused(build: Callable[[], Command]) -> None:
    """Ranges, patterns, lengths and types are enforced when the command is built."""
    with pytest.raises(CommandError):
        build()


def _mset_pairs(command: MultiSet) -> list[tuple[str, str]]:
    """What Asterisk sets for an encoded MSet: res_agi's split, then MSet's own two."""
    argv, unbalanced = parse_args(command.encode().decode("ascii").rstrip("\n"))
    assert not unbalanced
    assert argv[:2] == ["EXEC", "MSet"]
    assert len(argv) == 3
    pairs = []
    for part in app_separate_args(argv[2], ",", 99):
        name, value = app_separate_args(part, "=", 2)
        pairs.append((name, value))
    return pairs


def test_multiset_sets_exactly_its_pairs_in_order() -> None:
    """Asterisk's parsers give back every pair, in order: inheritance prefixes, empty values,
    the same name twice, and 99 pairs (MSet's limit) with the last one intact."""
    pairs = [
        ("__OML_CUSTOMER_ID", "0012345"),
        ("_ONE", "x"),
        ("EMPTY", ""),
        ("EMPTY", "again"),
        ("OML_IDENT_OUTCOME", "crm_destination"),
        ("TIMEOUT(response)", "5.000"),  # a function: its parentheses stay together
    ]
    assert _mset_pairs(MultiSet(pairs)) == pairs
    many = [(f"V{index}", str(index)) for index in range(99)]
    assert _mset_pairs(MultiSet(many)) == many
    assert MultiSet(iter(pairs)).pairs == tuple(pairs)


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [(f"V{index}", "1") for index in range(100)],
        [("A", "1,B=2")],
        [("A", "x|y")],
        [("A", "a=b")],
        [("A", "f(x)")],
        [("A", "[x]")],
        [("A", "a b")],
        [("A", "${X}")],
        [("A", "x'y")],
        [("A", "caf\u00e9")],
        [("A", "\x7f")],
        [("A", "v" * 256)],
        [("TIMEOUT(digit,x)", "3")],
        [("TIMEOUT(digit)x", "3")],
        [("CUT(x)", "3")],
        [("A=B", "1")],
        [("A,B", "1")],
        [("___A", "1")],
        [("1A", "1")],
        [("", "1")],
        [("A", 1)],
        [("A",)],
        [("A", "1", "2")],
        [["A", "1"]],
        [(f"VARIABLE_NUMBER_{index:02d}", "v" * 40) for index in range(20)],  # 1000+ chars
    ],
    ids=repr,
)
def test_multiset_refuses_what_msets_splitter_could_read_differently(pairs: object) -> None:
    """No pairs, over 99 pairs, and any name or value holding a separator, quote, escape,
    grouping, space, `$`, non-ASCII or control character, or too long, is refused."""
    with pytest.raises(CommandError):
        MultiSet(pairs)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(
            st.one_of(
                st.from_regex(r"_{0,2}[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True), st.text()
            ),
            st.one_of(
                st.from_regex(r"[A-Za-z0-9_.:+*#@/-]{0,12}", fullmatch=True),
                st.from_regex(r"[ -~]{0,12}", fullmatch=True),
                st.text(max_size=20),
            ),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_any_multiset_is_refused_or_set_exactly(pairs: list[tuple[str, str]]) -> None:
    """For any names and values, MultiSet is refused or Asterisk sets exactly those pairs."""
    try:
        command = MultiSet(pairs)
    except CommandError:
        return
    assert _mset_pairs(command) == pairs


def test_command_error_is_a_value_error() -> None:
    """CommandError is a ValueError, so config validation can treat it as one."""
    assert issubclass(CommandError, ValueError)


@pytest.mark.parametrize("pattern", NARROW_PATTERNS, ids=lambda p: p.pattern[:30])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_narrow_pattern_matches_nothing_safe_text_refuses(
    pattern: re.Pattern[str], data: st.DataObject
) -> None:
    """`_text` trusts one match of these patterns: each must be a subset of _SAFE_TEXT."""
    value = data.draw(st.from_regex(pattern, fullmatch=True))
    assert _SAFE_TEXT.fullmatch(value), value


def test_the_narrow_patterns_refuse_every_dangerous_character() -> None:
    """The same from the other side, exhaustively for one character in any position."""
    for pattern in NARROW_PATTERNS:
        for code in [*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100), 0x2028, 0xFFFF]:
            char = chr(code)
            for probe in (char, f"a{char}", f"{char}a", f"a{char}a", f"1{char}1", f"${{A}}{char}"):
                assert not pattern.fullmatch(probe), (pattern.pattern, probe)
