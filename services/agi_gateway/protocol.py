"""The AGI wire protocol as seen by a FastAGI server: bytes in, typed events out, no I/O.

`AgiParser` is a pure state machine in the h11 manner. The session feeds it whatever the socket
produced, in any chunking, and gets back frozen events:

    Environment     the "agi_name: value" block that opens every connection
    Reply           one answer to one command (a multi-line 520 usage block is ONE Reply)
    HangupNotice    Asterisk's unprompted "HANGUP" line; may come anywhere between replies
    EndOfStream     the peer closed the connection cleanly between replies

What does not belong here: sockets, timeouts, pairing a reply with the command that caused it
(the session does that; the parser only knows that replies come after the environment), and
interpreting result values (the call flow does that).

Exception tree:

    AgiProtocolError    the peer broke the protocol; the parser is failed for good and
                        raises the same error on every later call

Choices, for a peer we do not trust to be well-formed:
- Every line is decoded as strict UTF-8: Asterisk writes caller names as it received them,
  which in practice is UTF-8, and anything that does not decode is garbage, not a name.
  A NUL byte is refused as well (Asterisk writes C strings, so it never sends one).
- Lines end with "\\n"; a "\\r" before it is dropped. `max_line` bounds a line without its
  terminator, and the parser never holds more than `max_line + 1` unparsed bytes between calls.
- Error messages quote at most `_EXCERPT` characters of peer data.
- A connection that closes before sending a single byte ends with `EndOfStream`, not an error:
  that is a TCP health probe, not a broken Asterisk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto
from types import MappingProxyType

_EXCERPT = 60

_ENV_NAME = re.compile(r"[a-z0-9_]+")
# Every line of a block `name: value`, as `_on_env_line` requires of each (names never hold
# ": ", so a line's first ": " is where its name ends).
_ENV_BLOCK = re.compile(r"[a-z0-9_]+: [^\n]*(?:\n[a-z0-9_]+: [^\n]*)*")
# `200 result=<word>[ (<data>)][ endpos=<n>]`. The data is greedy up to the last ")" before an
# optional endpos, so "200 result=1 (a (b) c)" keeps the inner parentheses. endpos is a sample
# offset (a C long): at most 18 digits, so int() never meets Python's 4300-digit limit.
_SUCCESS = re.compile(
    r"200 result=(?P<result>[^ ]*)(?: \((?P<data>.*)\))?(?: endpos=(?P<endpos>-?[0-9]{1,18}))?"
)
_FAILURE = re.compile(r"(?P<code>510|511|520)(?: .*)?")
_USAGE_START = "520-"
_USAGE_END = "520 "
_HANGUP = "HANGUP"


@dataclass(frozen=True, slots=True)
class Environment:
    """The environment block: variable name (e.g. `agi_network_script`) to value."""

    variables: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply line (or one whole 520 usage block) from Asterisk."""

    code: int  # 200, 510, 511, 520
    result: str | None  # after "result=" up to the first space ("" when empty); None if absent
    data: str | None  # inside the parentheses, e.g. "timeout"; None if absent
    endpos: int | None  # "endpos=NNN" if present
    text: str  # the whole line; for a multi-line 520, all its lines joined with "\n"


@dataclass(frozen=True, slots=True)
class HangupNotice:
    """Asterisk's unprompted `HANGUP` line: the caller is gone."""


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed the connection cleanly (not in the middle of anything)."""


Event = Environment | Reply | HangupNotice | EndOfStream


class AgiProtocolError(Exception):
    """The peer broke the AGI protocol.

    `events` holds whatever the same `feed()` call had parsed before the error, so a caller that
    wants them loses nothing and the outcome does not depend on how the bytes were chunked.
    """

    def __init__(self, message: str, events: tuple[Event, ...] = ()) -> None:
        super().__init__(message)
        self.events = events


class _State(Enum):
    ENVIRONMENT = auto()
    REPLIES = auto()
    USAGE = auto()  # inside a "520-" block, up to its "520 " line
    CLOSED = auto()  # feed_eof() was called
    FAILED = auto()


def _excerpt(text: str) -> str:
    return repr(text[:_EXCERPT] + ("..." if len(text) > _EXCERPT else ""))


class AgiParser:
    def __init__(
        self, *, max_line: int = 8192, max_env_lines: int = 256, max_usage_lines: int = 256
    ) -> None:
        if max_line < 1 or max_env_lines < 1 or max_usage_lines < 1:
            raise ValueError("AgiParser limits must be positive")
        self._max_line = max_line
        self._max_env_lines = max_env_lines
        self._max_usage_lines = max_usage_lines
        self._state = _State.ENVIRONMENT
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already known to hold no "\n"
        self._seen_bytes = False
        self._env: dict[str, str] = {}
        self._usage: list[str] = []
        self._error: AgiProtocolError | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Parse `data` (any chunk of the stream) and return the events it completed."""
        self._check_usable()
        if not data:
            return []
        self._seen_bytes = True
        if self._state is _State.REPLIES and not self._buffer:
            taken = self._one_reply(data)
            if taken is not None:
                return taken
        self._buffer += data
        events: list[Event] = []
        try:
            lines = self._clean_lines()
            if lines and self._state is _State.ENVIRONMENT:
                lines = self._take_environment(lines, events)
            for clean in lines:
                event = self._on_line(clean)
                if event is not None:
                    events.append(event)
            while (line := self._next_line()) is not None:
                event = self._on_line(line)
                if event is not None:
                    events.append(event)
        except AgiProtocolError as exc:
            self._fail(exc)
            raise AgiProtocolError(str(exc), tuple(events)) from None
        return events

    def _one_reply(self, data: bytes) -> list[Event] | None:
        """The common case after the environment, one whole reply line in one segment, taken
        without the buffer: the events it completes (one, or none for a 520 block's first
        line), or None when `data` is anything else, for the general path to take exactly as
        before."""
        if (
            data.find(b"\n") != len(data) - 1
            or len(data) > self._max_line
            or b"\0" in data
            or b"\r" in data
        ):
            return None
        try:
            line = data[:-1].decode("utf-8")
        except UnicodeDecodeError:
            return None
        try:
            event = self._on_reply_line(line)
        except AgiProtocolError as exc:
            self._fail(exc)
            raise AgiProtocolError(str(exc), ()) from None
        return [] if event is None else [event]

    def feed_eof(self) -> list[Event]:
        """The peer closed the connection: `[EndOfStream()]`, or AgiProtocolError if it closed
        in the middle of a line, of the environment or of a 520 usage block."""
        self._check_usable()
        problem: str | None = None
        if self._buffer:
            problem = "connection closed in the middle of a line"
        elif self._state is _State.ENVIRONMENT and self._seen_bytes:
            problem = "connection closed in the middle of the environment"
        elif self._state is _State.USAGE:
            problem = "connection closed in the middle of a 520 usage block"
        if problem is not None:
            error = AgiProtocolError(problem)
            self._fail(error)
            raise error
        self._state = _State.CLOSED
        return [EndOfStream()]

    def _check_usable(self) -> None:
        if self._error is not None:
            raise AgiProtocolError(str(self._error))
        if self._state is _State.CLOSED:
            # Our own misuse, not the peer's: a different exception on purpose.
            raise RuntimeError("AgiParser used after feed_eof()")

    def _fail(self, error: AgiProtocolError) -> None:
        self._state = _State.FAILED
        self._error = error
        self._buffer.clear()
        self._env.clear()
        self._usage.clear()

    def _clean_lines(self) -> list[str]:
        """Every complete line in the buffer, taken in one go when none of them can be refused
        for its bytes (NUL, bad UTF-8, length); otherwise [] and `_next_line` takes them one by
        one, so errors and the events before them come out exactly as they would line by line.

        The common case, a whole environment block or a few replies in one segment, then costs
        one decode and one split instead of a search, a copy and a decode per line.
        """
        end = self._buffer.rfind(b"\n")
        if end < 0:
            return []
        chunk = self._buffer[: end + 1]
        if b"\0" in chunk:
            return []
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            return []
        lines = text.split("\n")
        lines.pop()  # the "" after the last "\n"
        limit = self._max_line
        # Lengths in bytes, as `_next_line` counts them; the text is longer than a line's
        # limit in characters only if some line might be too long in bytes.
        if len(chunk) > limit and any(
            len(line.encode()) > limit + line.endswith("\r") for line in lines
        ):
            return []
        del self._buffer[: end + 1]
        self._scanned = 0
        if "\r" not in text:  # Asterisk ends its lines with "\n" alone
            return lines
        return [line[:-1] if line.endswith("\r") else line for line in lines]

    def _take_environment(self, lines: list[str], events: list[Event]) -> list[str]:
        """The lines after the environment, its event added to `events`, when `lines` hold all
        of it (up to its blank line) and every line is well formed: one match and one dict
        for the block that starts every call. Otherwise `lines` as they are, to be taken one
        by one, which also finds the exact error."""
        try:
            end = lines.index("")
        except ValueError:
            return lines
        block = lines[:end]
        if (
            self._env  # an earlier chunk started it
            or not block
            or len(block) > self._max_env_lines
            or not _ENV_BLOCK.fullmatch("\n".join(block))
        ):
            return lines
        env = dict(line.split(": ", 1) for line in block)
        if len(env) != len(block):  # a name sent twice
            return lines
        self._state = _State.REPLIES
        events.append(Environment(MappingProxyType(env)))
        return lines[end + 1 :]

    def _next_line(self) -> str | None:
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            # One spare byte: a line of exactly max_line may still be waiting for "\r\n".
            if len(self._buffer) > self._max_line + 1:
                raise AgiProtocolError(f"line longer than {self._max_line} bytes")
            self._scanned = len(self._buffer)
            return None
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > self._max_line:
            raise AgiProtocolError(f"line longer than {self._max_line} bytes")
        if b"\0" in raw:
            raise AgiProtocolError("line contains a NUL byte")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AgiProtocolError("line is not valid UTF-8") from None

    def _on_line(self, line: str) -> Event | None:
        if self._state is _State.ENVIRONMENT:
            return self._on_env_line(line)
        if self._state is _State.USAGE:
            return self._on_usage_line(line)
        return self._on_reply_line(line)

    def _on_env_line(self, line: str) -> Environment | None:
        if not line:
            if not self._env:
                raise AgiProtocolError("empty environment block")
            self._state = _State.REPLIES
            environment = Environment(MappingProxyType(self._env))
            self._env = {}
            return environment
        if len(self._env) >= self._max_env_lines:
            raise AgiProtocolError(f"environment longer than {self._max_env_lines} lines")
        # Values may hold ": " themselves (a caller name), names never do: split once.
        name, sep, value = line.partition(": ")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise AgiProtocolError(f"bad environment line {_excerpt(line)}")
        if name in self._env:
            raise AgiProtocolError(f"environment variable {name[:_EXCERPT]!r} sent twice")
        self._env[name] = value
        return None

    def _on_reply_line(self, line: str) -> Reply | HangupNotice | None:
        if line == _HANGUP:
            return HangupNotice()
        if match := _SUCCESS.fullmatch(line):
            endpos = match["endpos"]
            return Reply(
                code=200,
                result=match["result"],
                data=match["data"],
                endpos=None if endpos is None else int(endpos),
                text=line,
            )
        if line.startswith(_USAGE_START):
            self._state = _State.USAGE
            self._usage = [line]
            return None
        if match := _FAILURE.fullmatch(line):
            return Reply(code=int(match["code"]), result=None, data=None, endpos=None, text=line)
        raise AgiProtocolError(f"unexpected reply {_excerpt(line)}")

    def _on_usage_line(self, line: str) -> Reply | None:
        # Usage text is free-form; only the "520 " line ends the block. Reading exactly up to
        # it is what keeps the next reply in sync.
        self._usage.append(line)
        if line.startswith(_USAGE_END):
            text = "\n".join(self._usage)
            self._usage = []
            self._state = _State.REPLIES
            return Reply(code=520, result=None, data=None, endpos=None, text=text)
        if len(self._usage) > self._max_usage_lines:
            raise AgiProtocolError(f"520 usage block longer than {self._max_usage_lines} lines")
        return None
