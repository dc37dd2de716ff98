"""Typed AGI commands: the only place where AGI command text is written.

Each command is a frozen dataclass that validates its arguments when it is built and knows how
to encode itself as exactly one line. Flow code builds these and hands them to the session; it
never formats AGI text itself. Interpreting the reply belongs to the caller, not here.

Why the rules are strict: Asterisk splits a command line on spaces and tabs, groups words in
double quotes and treats a backslash as an escape (res_agi.c `parse_args`), and it reads
commands line by line. So a `"`, a `\\`, a CR, LF or NUL in an argument could end the argument
or the command early and inject the next one. Rather than escape, we refuse: every string
argument must be printable ASCII without `"` or `\\`, and most have a tighter pattern still.
`encode()` re-checks the finished line as a last line of defence.

`MultiSet` has a second parser to satisfy: Asterisk's MSet application splits its one argument
again, on commas (honouring quotes, backslashes, parentheses and brackets, and removing quotes
and backslashes), then each pair on its first `=`. Its names and values are therefore held to
patterns with none of those characters, not merely to `_SAFE_TEXT`.

Exception tree:

    CommandError(ValueError)    an argument is not acceptable; raised by the constructor
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from shared.asterisk_words import MAX_MUSIC_CLASS, MAX_SOUND, MUSIC_CLASS, SOUND

# Printable ASCII minus the two characters parse_args gives a meaning inside quotes.
_SAFE_TEXT = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]*")
_DIGITS = re.compile(r"[0-9]+")
_ESCAPE_DIGITS = re.compile(r"[0-9*#]*")
_VARIABLE = re.compile(r"_{0,2}[A-Za-z][A-Za-z0-9_]*")
_FUNCTION = re.compile(r"[A-Z_]+\([a-z_]+\)")
# The only functions MSet writes: the channel's entry timeouts (Read() waits by them).
_MSET_NAME = re.compile(f"{_VARIABLE.pattern}|TIMEOUT\\((?:response|digit)\\)")
_APPLICATION = re.compile(r"[A-Za-z]+")
# What GET FULL VARIABLE may evaluate: plain `${NAME}` references and separators. No dialplan
# functions: some have side effects, and none is needed to read what Read() left behind.
_EXPRESSION = re.compile(r"(?:\$\{[A-Za-z_][A-Za-z0-9_]*\}|[,:|])+")
# Nothing MSet's argument splitter gives a meaning to (, " \ ( ) [ ] and = and the old
# separator |), and no space: Asterisk would keep it, but no value here ever needs one.
_MSET_VALUE = re.compile(r"[A-Za-z0-9_.:+\-*#@/]*")
# What could end an argument or a line early: named in the refusal when a value has one.
_DANGEROUS = re.compile(r'[\r\n\0"\\]')
_LINE_BREAK = re.compile(r"[\r\n\0]")

MAX_TIMEOUT_MS = 600_000
MAX_DIGITS = 64
MAX_READ_DIGITS = 255  # Read() takes 1..255 and quietly reads 255 for anything else
MAX_NAME = 80
MAX_VALUE = 255
MAX_OPTIONS = 1000  # Asterisk reads a command into a 2048-byte buffer
MAX_MESSAGE = 200
MAX_MSET_PAIRS = 99  # MSet splits its argument into at most 99 parts; the 99th takes the rest

# Patterns whose every match is also a match of _SAFE_TEXT (ASCII classes without `"` or `\`):
# no second check after one of these. tests/unit/test_agi_commands.py proves it for each.
NARROW_PATTERNS = (
    _SAFE_TEXT,
    _DIGITS,
    _ESCAPE_DIGITS,
    _VARIABLE,
    _FUNCTION,
    _MSET_NAME,
    _APPLICATION,
    _EXPRESSION,
    _MSET_VALUE,
    SOUND,
    MUSIC_CLASS,
)
_NARROW_IDS = frozenset(id(pattern) for pattern in NARROW_PATTERNS)


# MSet names that passed the check: the same few (OML_*, TIMEOUT(...)) on every call, so each
# is matched once per process. Only a name that passed goes in (a str compared by value).
_CHECKED_NAMES: set[str] = set()
MAX_CHECKED_NAMES = 256


class CommandError(ValueError):
    """A command argument was refused; nothing was sent."""


def _text(field: str, value: object, *, max_len: int, pattern: re.Pattern[str] = _SAFE_TEXT) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{field}: must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise CommandError(f"{field}: longer than {max_len} characters")
    # One match decides for the values every call sends (a second for a pattern that could
    # let through more than _SAFE_TEXT); only a refusal looks closer.
    if pattern.fullmatch(value) and (id(pattern) in _NARROW_IDS or _SAFE_TEXT.fullmatch(value)):
        return value
    # Checked separately so the message names the actual danger.
    if _DANGEROUS.search(value):
        raise CommandError(f"{field}: CR, LF, NUL, quote and backslash are not allowed")
    raise CommandError(f"{field}: {value[:40]!r} is not allowed here")


def _int(field: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandError(f"{field}: must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise CommandError(f"{field}: must be in {low}..{high}, got {value}")
    return value


def _quoted(value: str) -> str:
    # Safe only because every string was checked by _text: no quote or backslash inside.
    return f'"{value}"'


class Command:
    """Base of every AGI command: `name` for logs, `encode()` for the wire."""

    __slots__ = ()
    name: ClassVar[str]

    def _arguments(self) -> tuple[str, ...]:
        return ()

    def encode(self) -> bytes:
        """The command as one line ending in a single "\\n"."""
        line = " ".join((self.name, *self._arguments()))
        if _LINE_BREAK.search(line):  # unreachable while the validators hold
            raise CommandError(f"{self.name}: refusing to encode a line break")
        return line.encode("ascii") + b"\n"


@dataclass(frozen=True, slots=True)
class Answer(Command):
    name: ClassVar[str] = "ANSWER"


@dataclass(frozen=True, slots=True)
class ChannelStatus(Command):
    """Result 6 means up; on a hung-up channel Asterisk answers 511."""

    name: ClassVar[str] = "CHANNEL STATUS"


@dataclass(frozen=True, slots=True)
class GetData(Command):
    """Play `prompt` and collect up to `max_digits` DTMF digits ("#" ends the entry)."""

    name: ClassVar[str] = "GET DATA"
    prompt: str
    timeout_ms: int
    max_digits: int

    def __post_init__(self) -> None:
        _text("prompt", self.prompt, max_len=MAX_SOUND, pattern=SOUND)
        _int("timeout_ms", self.timeout_ms, 1, MAX_TIMEOUT_MS)
        _int("max_digits", self.max_digits, 1, MAX_DIGITS)

    def _arguments(self) -> tuple[str, ...]:
        return (_quoted(self.prompt), str(self.timeout_ms), str(self.max_digits))


@dataclass(frozen=True, slots=True)
class StreamFile(Command):
    name: ClassVar[str] = "STREAM FILE"
    filename: str
    escape_digits: str = ""

    def __post_init__(self) -> None:
        _text("filename", self.filename, max_len=MAX_SOUND, pattern=SOUND)
        _text("escape_digits", self.escape_digits, max_len=12, pattern=_ESCAPE_DIGITS)

    def _arguments(self) -> tuple[str, ...]:
        # Asterisk requires the escape-digits argument, so it is written even when empty.
        return (_quoted(self.filename), _quoted(self.escape_digits))


@dataclass(frozen=True, slots=True)
class SayDigits(Command):
    name: ClassVar[str] = "SAY DIGITS"
    digits: str
    escape_digits: str = ""

    def __post_init__(self) -> None:
        _text("digits", self.digits, max_len=MAX_DIGITS, pattern=_DIGITS)
        _text("escape_digits", self.escape_digits, max_len=12, pattern=_ESCAPE_DIGITS)

    def _arguments(self) -> tuple[str, ...]:
        return (_quoted(self.digits), _quoted(self.escape_digits))


@dataclass(frozen=True, slots=True)
class WaitForDigit(Command):
    """Asterisk accepts -1 (wait forever); we refuse it so no command can hold a call forever."""

    name: ClassVar[str] = "WAIT FOR DIGIT"
    timeout_ms: int

    def __post_init__(self) -> None:
        _int("timeout_ms", self.timeout_ms, 1, MAX_TIMEOUT_MS)

    def _arguments(self) -> tuple[str, ...]:
        return (str(self.timeout_ms),)


@dataclass(frozen=True, slots=True)
class ReadDigits(Command):
    """`EXEC Read "<variable>,<prompt>,<max_digits>"`: play the prompt, collect digits into the
    variable and set READSTATUS.

    With no timeout argument, Read() waits the channel's TIMEOUT(response) for the first digit
    and TIMEOUT(digit) between digits (`ast_app_getdata_terminator`, main/app.c); GET DATA has
    one timeout for both. `#` ends the entry. Read() answers the channel if it is not up. The
    prompt's pattern has no `&` (Read's list of prompts), comma, quote or parenthesis, so
    Read's argument splitter sees exactly three parts.
    """

    name: ClassVar[str] = "EXEC"
    application: ClassVar[str] = "Read"
    variable: str
    prompt: str
    max_digits: int

    def __post_init__(self) -> None:
        _text("variable", self.variable, max_len=MAX_NAME, pattern=_VARIABLE)
        _text("prompt", self.prompt, max_len=MAX_SOUND, pattern=SOUND)
        _int("max_digits", self.max_digits, 1, MAX_READ_DIGITS)

    def _arguments(self) -> tuple[str, ...]:
        return (self.application, _quoted(f"{self.variable},{self.prompt},{self.max_digits}"))


@dataclass(frozen=True, slots=True)
class GetFullVariable(Command):
    """Evaluate `${A},${B}` on the channel: `200 result=1 (<value>)`. Works after a hang-up."""

    name: ClassVar[str] = "GET FULL VARIABLE"
    expression: str

    def __post_init__(self) -> None:
        _text("expression", self.expression, max_len=MAX_VALUE, pattern=_EXPRESSION)

    def _arguments(self) -> tuple[str, ...]:
        return (_quoted(self.expression),)


@dataclass(frozen=True, slots=True)
class SetVariable(Command):
    """`name` is a variable (with "_"/"__" for inheritance) or a function like TIMEOUT(digit).

    The name is written unquoted: its pattern has no space or quote to protect.
    """

    name: ClassVar[str] = "SET VARIABLE"
    variable: str
    value: str

    def __init__(self, name: str, value: str) -> None:
        # The positional order of the brief, `SetVariable(name, value)`; `name` itself is taken
        # by the command's log name, so the field is called `variable`.
        object.__setattr__(self, "variable", name)
        object.__setattr__(self, "value", value)
        self.__post_init__()

    def __post_init__(self) -> None:
        variable = _text("name", self.variable, max_len=MAX_NAME)
        if not (_VARIABLE.fullmatch(variable) or _FUNCTION.fullmatch(variable)):
            raise CommandError(f"name: {variable[:40]!r} is not a variable or function name")
        _text("value", self.value, max_len=MAX_VALUE)

    def _arguments(self) -> tuple[str, ...]:
        return (self.variable, _quoted(self.value))


@dataclass(frozen=True, slots=True)
class Exec(Command):
    """Run a dialplan application, e.g. `Exec("Goto", "ctx,ext,1")`."""

    name: ClassVar[str] = "EXEC"
    application: str
    options: str = ""

    def __post_init__(self) -> None:
        _text("application", self.application, max_len=MAX_NAME, pattern=_APPLICATION)
        _text("options", self.options, max_len=MAX_OPTIONS)

    def _arguments(self) -> tuple[str, ...]:
        return (self.application, _quoted(self.options))


@dataclass(frozen=True, slots=True)
class MultiSet(Command):
    """Set several channel variables with one command: `EXEC MSet "A=1,__B=2"`.

    Asterisk's MSet (pbx_builtin_setvar_multiple) sets the pairs one by one, in the order
    given, each exactly as SET VARIABLE would (so `_`/`__` inheritance works the same), and
    answers `200 result=0` once. `NAME=` sets an empty value, like `SET VARIABLE NAME ""`.
    Names are plain variables, or `TIMEOUT(response)` / `TIMEOUT(digit)`: a name ending in ")"
    is written through the dialplan function (pbx_builtin_setvar_helper), and the splitter
    keeps a balanced pair of parentheses with no comma inside together. Values are limited to
    `_MSET_VALUE`, so what Asterisk sets is exactly what was given. More than 99 pairs would
    run together in the last one: refused.
    """

    name: ClassVar[str] = "EXEC"
    application: ClassVar[str] = "MSet"
    pairs: tuple[tuple[str, str], ...]

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        object.__setattr__(self, "pairs", tuple(pairs))
        self.__post_init__()

    def __post_init__(self) -> None:
        pairs = self.pairs
        if not pairs:
            raise CommandError("pairs: at least one name/value pair is needed")
        if len(pairs) > MAX_MSET_PAIRS:
            raise CommandError(f"pairs: at most {MAX_MSET_PAIRS}, got {len(pairs)}")
        for index, pair in enumerate(pairs):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise CommandError(f"pairs[{index}]: must be a (name, value) tuple")
            variable, value = pair
            try:
                if type(variable) is not str or variable not in _CHECKED_NAMES:
                    _text("name", variable, max_len=MAX_NAME, pattern=_MSET_NAME)
                    if len(_CHECKED_NAMES) < MAX_CHECKED_NAMES:
                        _CHECKED_NAMES.add(variable)
                _text("value", value, max_len=MAX_VALUE, pattern=_MSET_VALUE)
            except CommandError as exc:  # the pair's place, named only when refused
                raise CommandError(f"pairs[{index}] {exc}") from None
        if len(self._options()) > MAX_OPTIONS:
            raise CommandError(f"pairs: longer than {MAX_OPTIONS} characters in all")

    def _options(self) -> str:
        return ",".join(f"{variable}={value}" for variable, value in self.pairs)

    def _arguments(self) -> tuple[str, ...]:
        return (self.application, _quoted(self._options()))


@dataclass(frozen=True, slots=True)
class SetMusic(Command):
    name: ClassVar[str] = "SET MUSIC"
    on: bool
    music_class: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.on, bool):
            raise CommandError(f"on: must be a bool, got {type(self.on).__name__}")
        _text("music_class", self.music_class, max_len=MAX_MUSIC_CLASS, pattern=MUSIC_CLASS)

    def _arguments(self) -> tuple[str, ...]:
        return ("on", _quoted(self.music_class)) if self.on else ("off",)


@dataclass(frozen=True, slots=True)
class Verbose(Command):
    name: ClassVar[str] = "VERBOSE"
    message: str
    level: int = 1

    def __post_init__(self) -> None:
        _text("message", self.message, max_len=MAX_MESSAGE)
        _int("level", self.level, 1, 4)

    def _arguments(self) -> tuple[str, ...]:
        return (_quoted(self.message), str(self.level))
