"""A simulated Asterisk 22 FastAGI client, for tests and for load from the command line.

It does what Asterisk does when the dialplan runs `AGI(agi://host:port/identify/<node>)`:
connect, send the environment in several writes, answer every command the way res_agi.c
would, and, when the gateway closes the socket, report where the dialplan would continue.

The emulation is split like the gateway's own code: `SimulatedChannel` is the channel and
res_agi's command handling with no I/O (a command line in, reply text out); `run_call` does the
socket, the timers and the script's hang-ups around it.

The load generator runs this on the same cores as the gateway it measures, so the socket side
is an `asyncio.Protocol`, not streams: the commands in each chunk that arrives are answered
there and then, one `write` per reply as res_agi does, with no coroutine, drain or timeout per
read. A call has one timeout (its deadline) and, in "lookup" mode, one timer for the hang-up.
Backpressure is kept: while the transport's buffer is over its high-water mark, nothing more is
answered or read (res_agi blocks on its write the same way).

Asterisk behaviour reproduced here (from res_agi.c and pbx.c):
- Arguments are split by `parse_args`: spaces and tabs separate, double quotes group, a
  backslash escapes. Only the trailing "\\n" is stripped, so a "\\r" ends up inside the last
  argument. Commands are matched word by word, case-insensitively.
- After the caller hangs up, Asterisk sends one unprompted "HANGUP" line and then answers 511
  to every command not marked dead-safe. Dead-safe are SET VARIABLE, EXEC, VERBOSE, NOOP,
  GET VARIABLE and GET FULL VARIABLE (and DATABASE, not emulated).
- `EXEC Goto` and `SET PRIORITY` go through ast_explicit_goto, which stores priority-1 while
  the channel runs in the dialplan; when AGI() returns, the pbx loop adds 1. SET CONTEXT and
  SET EXTENSION set the field directly. With no jump, the dialplan continues at priority+1.
- `EXEC MSet "A=1,__B=2"` (pbx_builtin_setvar_multiple) splits its argument the way every
  application's is split (`app_separate_args`: commas outside quotes, parentheses and
  brackets; quotes and backslashes removed, a backslash keeping the next character), at most
  99 parts, then each part on its first `=`, and sets the pairs in order, as SET VARIABLE does;
  a part without `=` is ignored with a warning. It answers `200 result=0`.

Anything the gateway sends that real Asterisk would reject or misread is recorded in
`CallResult.protocol_errors`, so a test can assert there is none.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from tools.stats import percentile

HangupMode = Literal[None, "prompt", "lookup", "before_env_end"]

OUTCOME_VARIABLE = "OML_IDENT_OUTCOME"
AGI_BUF_LEN = 2048  # res_agi reads a command into a buffer this size
MSET_MAX_PARTS = 99  # pbx_builtin_setvar_multiple: AST_APP_ARG(pair)[99]
STREAM_ENDPOS = 8000  # what a fully played 1 s prompt reports at 8 kHz

DEAD_CHANNEL = "511 Command Not Permitted on a dead channel or intercept routine"
UNKNOWN_COMMAND = "510 Invalid or unknown command"


@dataclass
class CallScript:
    """What the simulated caller does on one call."""

    node: str = "1"  # in agi_network_script as "identify/<node>", or agi_arg_1 if node_in_arg
    node_in_arg: bool = False
    # One per GET DATA: "12345" typed; None nothing typed; "12~" typed 12 then the inter-digit
    # timeout; "12#" typed 12 then the terminator. GET DATA beyond the list times out empty.
    entries: list[str | None] = field(default_factory=lambda: ["12345"])
    channel_up: bool = False
    # "prompt": hang up during the first GET DATA / STREAM FILE (result -1, then HANGUP);
    # "lookup": hang up hangup_delay s after the reply to the last scripted GET DATA;
    # "before_env_end": drop the connection half-way through the environment.
    hangup: HangupMode = None
    hangup_delay: float = 0.05
    missing_prompt: bool = False  # GET DATA / STREAM FILE answer -1 with the channel still up
    caller_number: str = "5551234"
    caller_name: str = "Test Caller"
    uniqueid: str = "1700000000.1"
    context: str = "from-pstn"
    extension: str = "s"
    priority: int = 1


@dataclass
class CallResult:
    variables: dict[str, str]  # every variable set (SET VARIABLE, EXEC Set/MSet), last wins
    commands: list[str]  # every command line received, in order
    context: str  # where the dialplan continues after AGI() returns
    extension: str
    priority: int
    hung_up: bool  # the simulated caller hung up
    closed_by_gateway: bool  # False if we gave up waiting for the gateway to close
    last_digit_at: float | None  # monotonic time the last GET DATA reply with digits was sent
    decided_at: float | None  # monotonic time OML_IDENT_OUTCOME was set (SET VARIABLE, MSet)
    protocol_errors: list[str]  # what real Asterisk would have rejected or misread


# With no backslash in the line, parse_args reduces to this: a word is a run of characters
# other than space and tab, where a double-quoted stretch (possibly left open) may hold them.
_PLAIN_WORD = re.compile(r'(?:"[^"]*+"?|[^ \t"]++)++')


def parse_args(line: str) -> tuple[list[str], bool]:
    """Split a command line as res_agi's parse_args does; also say if a quote or escape is
    left open (Asterisk accepts that silently, which is how injected text goes unnoticed)."""
    if "\\" in line:
        return _parse_args_by_char(line)
    words = [word.replace('"', "") for word in _PLAIN_WORD.findall(line)]
    return words, line.count('"') % 2 == 1


def _parse_args_by_char(line: str) -> tuple[list[str], bool]:
    """parse_args one character at a time, as res_agi.c does it (lines with a backslash)."""
    words: list[list[str]] = []
    quoted = escaped = False
    whitespace = True
    for char in line:
        if char == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                words.append([])
                whitespace = False
            continue
        if char in " \t" and not quoted and not escaped:
            whitespace = True
            continue
        if char == "\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            words.append([])
            whitespace = False
        words[-1].append(char)
        escaped = False
    return ["".join(word) for word in words], quoted or escaped


def app_separate_args(data: str, delim: str, limit: int) -> list[str]:
    """Split an application's argument as Asterisk's __ast_app_separate_args does with
    remove_chars set (AST_STANDARD_APP_ARGS, AST_NONSTANDARD_APP_ARGS).

    `delim` separates, except inside parentheses, brackets or double quotes; quotes are
    removed; a backslash is removed and the character after it kept as it is. At most `limit`
    parts: the last one takes the rest of the text unsplit and untouched. A delimiter at the
    very end makes one more, empty, part.
    """
    if not _APP_ARG_SPECIAL.search(data):  # nothing groups or escapes: a plain split
        return data.split(delim, limit - 1) if data else []
    return _app_separate_args_by_char(data, delim, limit)


_APP_ARG_SPECIAL = re.compile(r'[()\[\]"\\]')


def _app_separate_args_by_char(data: str, delim: str, limit: int) -> list[str]:
    """app_separate_args one character at a time, as Asterisk's C loop does it."""
    parts: list[str] = []
    index, end = 0, len(data)
    paren = bracket = 0
    quoted = ended_by_delim = False
    while index < end and len(parts) < limit - 1:
        part: list[str] = []
        ended_by_delim = False
        while index < end:
            char = data[index]
            index += 1
            if char == "(":
                paren += 1
            elif char == ")":
                paren -= 1 if paren else 0
            elif char == "[":
                bracket += 1
            elif char == "]":
                bracket -= 1 if bracket else 0
            elif char == '"' and delim != '"':
                quoted = not quoted
                continue
            elif char == "\\":
                # Asterisk steps past the next character without looking at it; a backslash
                # at the very end is simply dropped here (C reads past the string there).
                if index < end:
                    part.append(data[index])
                    index += 1
                continue
            elif char == delim and not (paren or quoted or bracket):
                ended_by_delim = True
                break
            part.append(char)
        parts.append("".join(part))
    if index < end:
        parts.append(data[index:])
    elif ended_by_delim:
        parts.append("")
    return parts


def _usage(*lines: str) -> str:
    body = "".join(f"{line}\n" for line in lines)
    return f"520-Invalid command syntax.  Proper usage follows:\n{body}520 End of proper usage."


_USAGE = {
    "ANSWER": _usage(" Usage: ANSWER", "       Answers channel if not already in answer state."),
    "CHANNEL STATUS": _usage(" Usage: CHANNEL STATUS [<channelname>]"),
    "GET DATA": _usage(
        " Usage: GET DATA <file to be streamed> [timeout] [maxdigits]",
        "       Stream the given file, and receive DTMF data.",
    ),
    "STREAM FILE": _usage(
        " Usage: STREAM FILE <filename> <escape digits> [sample offset]",
        "       Send the given file, allowing playback to be interrupted by the given digits.",
    ),
    "SAY DIGITS": _usage(" Usage: SAY DIGITS <number> <escape digits>"),
    "WAIT FOR DIGIT": _usage(" Usage: WAIT FOR DIGIT <timeout>"),
    "SET VARIABLE": _usage(" Usage: SET VARIABLE <variablename> <value>"),
    "GET VARIABLE": _usage(" Usage: GET VARIABLE <variablename>"),
    "GET FULL VARIABLE": _usage(" Usage: GET FULL VARIABLE <variablename> [<channel name>]"),
    "EXEC": _usage(" Usage: EXEC <application> <options>"),
    "SET CONTEXT": _usage(" Usage: SET CONTEXT <desired context>"),
    "SET EXTENSION": _usage(" Usage: SET EXTENSION <new extension>"),
    "SET PRIORITY": _usage(" Usage: SET PRIORITY <priority>"),
    "SET MUSIC": _usage(" Usage: SET MUSIC <on|off> <class>"),
    "VERBOSE": _usage(" Usage: VERBOSE <message> <level>"),
}

_KNOWN_APPLICATIONS = {
    "goto",
    "noop",
    "set",
    "mset",
    "log",
    "verbose",
    "playback",
    "wait",
    "answer",
}


class SimulatedChannel:
    """One channel running AGI(): res_agi's command handling without the socket."""

    def __init__(self, script: CallScript, clock: Callable[[], float] = time.monotonic) -> None:
        self.script = script
        self._clock = clock
        self.up = script.channel_up
        self.dead = False  # res_agi's `dead`: set once the HANGUP line has gone out
        self.caller_hung_up = False
        self.context = script.context
        self.extension = script.extension
        self.priority = script.priority  # the channel field, as ast_explicit_goto leaves it
        self.variables: dict[str, str] = {}
        self.commands: list[str] = []
        self.protocol_errors: list[str] = []
        self.last_digit_at: float | None = None
        self.decided_at: float | None = None
        self.get_data_count = 0
        # Set by a command when the channel is gone after its reply: the I/O side sends HANGUP.
        self.hangup_after_reply = False
        # Set after the last scripted GET DATA in "lookup" mode: the I/O side starts the timer.
        self.start_lookup_hangup = False

    def final_position(self) -> tuple[str, str, int]:
        """Where the pbx loop continues when AGI() returns: it adds 1 to the priority."""
        return self.context, self.extension, self.priority + 1

    def mark_dead(self) -> None:
        self.dead = True

    def handle(self, raw: bytes) -> str:
        """Answer one command line (without its "\\n"); returns the reply without its "\\n"."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            self._error("command line is not UTF-8")
        self.commands.append(line)
        if "\r" in line:
            self._error(f"CR inside a command line: {line[:60]!r}")
        argv, unbalanced = parse_args(line)
        if unbalanced:
            self._error(f"unbalanced quote or escape: {line[:60]!r}")
        handler = self._find(argv)
        if handler is None:
            self._error(f"unknown command: {line[:60]!r}")
            return UNKNOWN_COMMAND
        words, method, dead_safe = handler
        if self.dead and not dead_safe:
            return DEAD_CHANNEL
        reply = method(self, argv)
        if reply is None:
            self._error(f"bad arguments: {line[:60]!r}")
            return _USAGE[words]
        return reply

    def _error(self, message: str) -> None:
        self.protocol_errors.append(message)

    def _find(self, argv: Sequence[str]) -> _Handler | None:
        """The first command whose words start argv (case-insensitively), as res_agi finds it."""
        if not argv:
            return None
        for rest, handler in _COMMANDS.get(argv[0].upper(), ()):
            if not rest or [word.upper() for word in argv[1 : len(rest) + 1]] == rest:
                return handler
        return None

    def _set(self, name: str, value: str) -> None:
        """pbx_builtin_setvar_helper, as far as a test can see it: the name as written."""
        self.variables[name] = value
        if name == OUTCOME_VARIABLE:
            self.decided_at = self._clock()

    # Each handler returns the reply, or None for res_agi's RESULT_SHOWUSAGE.

    def _answer(self, argv: Sequence[str]) -> str | None:
        self.up = True
        return "200 result=0"

    def _channel_status(self, argv: Sequence[str]) -> str | None:
        return "200 result=6" if self.up else "200 result=4"

    def _prompt_fails(self) -> bool:
        """The prompt cannot play: the caller hangs up now ("prompt") or the file is missing."""
        if self.script.hangup == "prompt" and not self.caller_hung_up:
            self.caller_hung_up = True
            self.hangup_after_reply = True
            return True
        return self.script.missing_prompt

    def _get_data(self, argv: Sequence[str]) -> str | None:
        if len(argv) < 3:
            return None
        if self._prompt_fails():
            return "200 result=-1"
        max_digits = int(argv[4]) if len(argv) > 4 and argv[4].isdigit() else 1024
        index = self.get_data_count
        self.get_data_count += 1
        entries = self.script.entries
        entry = entries[index] if index < len(entries) else None
        if self.script.hangup == "lookup" and index + 1 == max(len(entries), 1):
            self.start_lookup_hangup = True
        if not entry:
            return "200 result= (timeout)"
        digits, timed_out = entry, True
        if "#" in entry:
            digits, timed_out = entry.split("#", 1)[0], False
        elif entry.endswith("~"):
            digits = entry[:-1]
        else:
            timed_out = False
        if len(digits) >= max_digits:
            digits, timed_out = digits[:max_digits], False
        if digits:
            self.last_digit_at = self._clock()
        return f"200 result={digits}" + (" (timeout)" if timed_out else "")

    def _stream_file(self, argv: Sequence[str]) -> str | None:
        if not 4 <= len(argv) <= 5:
            return None
        if self._prompt_fails():
            return "200 result=-1 endpos=0"
        return f"200 result=0 endpos={STREAM_ENDPOS}"

    def _say_digits(self, argv: Sequence[str]) -> str | None:
        return "200 result=0" if len(argv) == 4 else None

    def _wait_for_digit(self, argv: Sequence[str]) -> str | None:
        return "200 result=0" if len(argv) == 4 else None

    def _set_variable(self, argv: Sequence[str]) -> str | None:
        if len(argv) != 4:
            return None
        self._set(argv[2], argv[3])
        return "200 result=1"

    def _get_variable(self, argv: Sequence[str]) -> str | None:
        if len(argv) != 3:
            return None
        value = self.variables.get(argv[2])
        return "200 result=0" if value is None else f"200 result=1 ({value})"

    def _get_full_variable(self, argv: Sequence[str]) -> str | None:
        if len(argv) not in (4, 5):
            return None
        # Only plain "${NAME}" expressions: the simulator has no dialplan functions.
        expression = argv[3]
        name = expression[2:-1] if expression.startswith("${") and expression.endswith("}") else ""
        value = self.variables.get(name)
        return "200 result=0" if value is None else f"200 result=1 ({value})"

    def _exec(self, argv: Sequence[str]) -> str | None:
        if len(argv) < 2:
            return None
        if len(argv) > 3:
            self._error(f"EXEC options not quoted, Asterisk ignores {argv[3][:40]!r}")
        application, options = argv[1].lower(), argv[2] if len(argv) > 2 else ""
        if application not in _KNOWN_APPLICATIONS:
            self._error(f"EXEC of an application the simulator does not know: {argv[1][:40]!r}")
            return "200 result=-2"
        if application == "goto":
            return "200 result=0" if self._goto(options) else "200 result=-1"
        if application == "set":
            name, sep, value = options.partition("=")
            if not sep:
                return "200 result=-1"
            self._set(name, value)
        elif application == "mset":
            self._mset(options)
        return "200 result=0"

    def _mset(self, data: str) -> None:
        """pbx_builtin_setvar_multiple; what Asterisk only warns about is recorded as an error."""
        if not data:
            self._error("MSet without a name=value pair: Asterisk sets nothing")
            return
        parts = app_separate_args(data, ",", MSET_MAX_PARTS)
        if len(parts) == MSET_MAX_PARTS:
            every = app_separate_args(data, ",", MSET_MAX_PARTS + 1)
            if len(every) > MSET_MAX_PARTS:
                self._error(f"MSet with over {MSET_MAX_PARTS} pairs: the last ones run together")
        for part in parts:
            pair = app_separate_args(part, "=", 2)
            if len(pair) != 2:
                self._error(f"MSet ignores {part[:40]!r}: no '='")
                continue
            name, value = pair
            if not name or " " in name:
                self._error(f"MSet with an unusable variable name {name[:40]!r}")
                if not name:
                    continue
            self._set(name, value)

    def _goto(self, target: str) -> bool:
        """ast_parseable_goto: "[[context,]extension,]priority"; False if unusable."""
        parts = target.split(",")
        if not target or len(parts) > 3:
            self._error(f"Goto with an unusable target {target[:40]!r}")
            return False
        context, extension = self.context, self.extension
        if len(parts) == 3:
            context, extension = parts[0], parts[1]
        elif len(parts) == 2:
            extension = parts[0]
        priority = self._priority(parts[-1])
        if priority is None:
            return False
        self.context, self.extension = context, extension
        self._explicit_goto(priority)
        return True

    def _priority(self, text: str) -> int | None:
        relative = text[:1] in ("+", "-")
        try:
            value = int(text)
        except ValueError:
            self._error(f"priority label {text[:40]!r}: the simulator has no dialplan to look in")
            return None
        return self.priority + value if relative else value

    def _explicit_goto(self, priority: int) -> None:
        # The channel runs inside the pbx loop (autoloop), which will add 1 when AGI() returns.
        self.priority = priority - 1

    def _set_context(self, argv: Sequence[str]) -> str | None:
        if len(argv) != 3:
            return None
        self.context = argv[2]
        return "200 result=0"

    def _set_extension(self, argv: Sequence[str]) -> str | None:
        if len(argv) != 3:
            return None
        self.extension = argv[2]
        return "200 result=0"

    def _set_priority(self, argv: Sequence[str]) -> str | None:
        if len(argv) != 3:
            return None
        priority = self._priority(argv[2])
        if priority is None:
            return "200 result=-1"
        self._explicit_goto(priority)
        return "200 result=0"

    def _set_music(self, argv: Sequence[str]) -> str | None:
        if len(argv) < 3 or argv[2].lower() not in ("on", "off"):
            return None
        return "200 result=0"

    def _verbose(self, argv: Sequence[str]) -> str | None:
        return "200 result=1" if len(argv) >= 2 else None

    def _noop(self, argv: Sequence[str]) -> str | None:
        return "200 result=0"

    def _hangup(self, argv: Sequence[str]) -> str | None:
        # The gateway hangs the channel up itself: Asterisk then notices and sends HANGUP.
        self.hangup_after_reply = True
        return "200 result=1"


# (words, handler, dead-safe): res_agi's command table, in the order it is searched.
_Handler = tuple[str, Callable[[SimulatedChannel, Sequence[str]], str | None], bool]
_COMMAND_TABLE: tuple[_Handler, ...] = (
    ("ANSWER", SimulatedChannel._answer, False),
    ("CHANNEL STATUS", SimulatedChannel._channel_status, False),
    ("GET DATA", SimulatedChannel._get_data, False),
    ("STREAM FILE", SimulatedChannel._stream_file, False),
    ("SAY DIGITS", SimulatedChannel._say_digits, False),
    ("WAIT FOR DIGIT", SimulatedChannel._wait_for_digit, False),
    ("SET VARIABLE", SimulatedChannel._set_variable, True),
    ("GET VARIABLE", SimulatedChannel._get_variable, True),
    ("GET FULL VARIABLE", SimulatedChannel._get_full_variable, True),
    ("EXEC", SimulatedChannel._exec, True),
    ("SET CONTEXT", SimulatedChannel._set_context, False),
    ("SET EXTENSION", SimulatedChannel._set_extension, False),
    ("SET PRIORITY", SimulatedChannel._set_priority, False),
    ("SET MUSIC", SimulatedChannel._set_music, False),
    ("VERBOSE", SimulatedChannel._verbose, True),
    ("NOOP", SimulatedChannel._noop, True),
    ("HANGUP", SimulatedChannel._hangup, False),
)


def _index_commands() -> dict[str, tuple[tuple[list[str], _Handler], ...]]:
    """By first word, the commands starting with it and the words they need after it."""
    index: dict[str, list[tuple[list[str], _Handler]]] = {}
    for handler in _COMMAND_TABLE:
        first, *rest = handler[0].split(" ")
        index.setdefault(first, []).append((rest, handler))
    return {first: tuple(found) for first, found in index.items()}


_COMMANDS = _index_commands()


def environment_writes(script: CallScript, host: str, port: int) -> list[bytes]:
    """The environment as Asterisk 22 writes it: network lines first, several writes.

    Empty values keep the space after the colon, as Asterisk's "%s: %s\\n" writes them.
    """
    script_path = "identify" if script.node_in_arg else f"identify/{script.node}"
    uniqueid = script.uniqueid
    network = (
        "agi_network: yes\n"
        f"agi_network_script: {script_path}\n"
        f"agi_request: agi://{host}:{port}/{script_path}\n"
    )
    channel = (
        f"agi_channel: PJSIP/trunk-{uniqueid.replace('.', '')[-8:]}\n"
        "agi_language: en\n"
        "agi_type: PJSIP\n"
        f"agi_uniqueid: {uniqueid}\n"
        "agi_version: 22.1.0\n"
        f"agi_callerid: {script.caller_number}\n"
        f"agi_calleridname: {script.caller_name}\n"
        f"{_CHANNEL_TAIL}"
    )
    dialplan = (
        f"agi_context: {script.context}\n"
        f"agi_extension: {script.extension}\n"
        f"agi_priority: {script.priority}\n"
        f"{_DIALPLAN_TAIL}"
    )
    arguments = f"agi_arg_1: {script.node}\n\n" if script.node_in_arg else "\n"
    return [network.encode(), channel.encode(), dialplan.encode(), arguments.encode()]


_CHANNEL_TAIL = (
    "agi_callingpres: 0\n"
    "agi_callingani2: 0\n"
    "agi_callington: 0\n"
    "agi_callingtns: 0\n"
    "agi_dnid: unknown\n"
    "agi_rdnis: unknown\n"
)
_DIALPLAN_TAIL = "agi_enhanced: 0.0\nagi_accountcode: \nagi_threadid: 140234567890\n"


async def run_call(
    host: str,
    port: int,
    script: CallScript,
    *,
    # Running out of time after connecting is a result here (a hung channel), not an error.
    timeout: float = 30.0,
) -> CallResult:
    """Place one simulated call against a FastAGI server and report what it did.

    Raises TimeoutError if the connection is not up within `timeout`, OSError if it fails.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    channel = SimulatedChannel(script)
    call = _Call(channel, environment_writes(script, host, port), loop)
    transport: asyncio.BaseTransport | None = None
    closed_by_gateway = False
    try:
        async with asyncio.timeout_at(deadline) as scope:
            transport, _ = await loop.create_connection(lambda: call, host, port)
            closed_by_gateway = await call.finished
    except TimeoutError:
        if transport is None or not scope.expired():  # connecting, or a socket's own timeout
            raise
    finally:
        call.stop()
        if transport is not None:
            await call.close(abort=not closed_by_gateway)
    context, extension, priority = channel.final_position()
    return CallResult(
        variables=channel.variables,
        commands=channel.commands,
        context=context,
        extension=extension,
        priority=priority,
        hung_up=channel.caller_hung_up,
        closed_by_gateway=closed_by_gateway,
        last_digit_at=channel.last_digit_at,
        decided_at=channel.decided_at,
        protocol_errors=channel.protocol_errors,
    )


class _Call(asyncio.Protocol):
    """The socket side of one call: the environment out, then every command line answered.

    `finished` is True when the gateway closed (EOF, reset, or a write failed because it
    was gone) and False when the caller went away first ("before_env_end"); run_call cancels
    it at the deadline.
    """

    def __init__(
        self, channel: SimulatedChannel, writes: list[bytes], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._channel = channel
        self._writes = writes
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._stopped = False  # no more answers: the call is over for run_call
        self._paused = False  # over the high-water mark: answer nothing more until resumed
        self._eof = False
        self._hangup_timer: asyncio.TimerHandle | None = None
        self._hangup_due = False  # the "lookup" hang-up came while answers were held back
        self.finished: asyncio.Future[bool] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport = cast(asyncio.Transport, transport)
        if self._channel.script.hangup == "before_env_end":
            transport.write(self._writes[0])
            self._channel.caller_hung_up = True
            self._finish(False)
            return
        for chunk in self._writes:  # one write each, as Asterisk sends them
            transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self._buffer += data
        self._answer()

    def _answer(self) -> None:
        """Answer every complete line, one write per reply; then check the unfinished one."""
        transport = self._transport
        assert transport is not None
        channel = self._channel
        buffer = self._buffer
        start = 0
        while not self._paused and (end := buffer.find(b"\n", start)) >= 0:
            reply = channel.handle(bytes(buffer[start:end]))
            start = end + 1
            transport.write(reply.encode() + b"\n")
            if transport.is_closing():  # the write failed: the gateway is gone
                break
            if channel.hangup_after_reply:
                channel.hangup_after_reply = False
                if not channel.dead:
                    self._send_hangup()
                    if transport.is_closing():
                        break
            if channel.start_lookup_hangup:
                channel.start_lookup_hangup = False
                self._start_hangup_timer()
        del buffer[:start]
        if self._paused or transport.is_closing():
            return
        if len(buffer) >= AGI_BUF_LEN:
            channel.protocol_errors.append(f"command line longer than {AGI_BUF_LEN} bytes")
            buffer.clear()
        if self._hangup_due:
            self._hangup_due = False
            self._lookup_hangup()
        if self._eof:
            self._end_of_stream()

    def _send_hangup(self) -> None:
        # res_agi sends this once, when it notices the hang-up; from then on `dead` holds.
        assert self._transport is not None
        self._channel.mark_dead()
        self._transport.write(b"HANGUP\n")

    def _start_hangup_timer(self) -> None:
        if self._hangup_timer is not None:
            self._hangup_timer.cancel()
        delay = self._channel.script.hangup_delay
        self._hangup_timer = self._loop.call_later(delay, self._lookup_hangup)

    def _lookup_hangup(self) -> None:
        self._hangup_timer = None
        if self._stopped:
            return
        if self._paused:  # noticed once the held-back answers are out, as at the next read
            self._hangup_due = True
            return
        self._channel.caller_hung_up = True
        self._send_hangup()

    def eof_received(self) -> bool:
        self._eof = True
        if not self._paused and not self._stopped:
            self._end_of_stream()
        return True  # run_call closes the socket, as Asterisk does when AGI() returns

    def _end_of_stream(self) -> None:
        if self._buffer:
            self._channel.protocol_errors.append("unterminated command line at end of stream")
            self._buffer.clear()
        self._finish(True)

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is None or self._transport.is_closing() or self._stopped:
            return
        self._transport.resume_reading()
        self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None or isinstance(exc, ConnectionError):
            self._finish(True)
        elif not self.finished.done():
            self.finished.set_exception(exc)
        self.stop()
        if not self._closed.done():
            self._closed.set_result(None)

    def _finish(self, closed_by_gateway: bool) -> None:
        self._stopped = True
        if not self.finished.done():
            self.finished.set_result(closed_by_gateway)

    def stop(self) -> None:
        """Answer nothing more and drop the hang-up timer."""
        self._stopped = True
        if self._hangup_timer is not None:
            self._hangup_timer.cancel()
            self._hangup_timer = None

    async def close(self, *, abort: bool) -> None:
        """Close and wait until closed; `abort` drops unsent replies (no one reads them)."""
        transport = self._transport
        assert transport is not None
        if abort and transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()
        await self._closed


def _summary_line(index: int, result: CallResult | BaseException, elapsed_ms: float) -> str:
    if isinstance(result, BaseException):
        return f"call {index}: error {type(result).__name__}: {result}"
    variables = result.variables
    outcome = variables.get(OUTCOME_VARIABLE, "-")
    dest = f"{variables.get('OML_DEST_TYPE', '')},{variables.get('OML_DEST_ID', '')}"
    source = variables.get("OML_IDENT_SOURCE", "-")
    notes = "" if result.closed_by_gateway else " (gateway never closed the socket)"
    if result.protocol_errors:
        notes += f" protocol_errors={result.protocol_errors}"
    return (
        f"call {index}: outcome={outcome} dest={dest.strip(',') or '-'} source={source} "
        f"continue={result.context},{result.extension},{result.priority} "
        f"elapsed_ms={elapsed_ms:.1f}{notes}"
    )


async def _run_many(args: argparse.Namespace) -> int:
    semaphore = asyncio.Semaphore(args.concurrency)
    decided = 0
    outcomes: Counter[str] = Counter()
    elapsed: list[float] = []
    entries: list[str | None] = [None if e == "" else e for e in (args.entries or ["12345"])]

    async def one(index: int) -> None:
        nonlocal decided
        script = CallScript(
            node=args.node,
            node_in_arg=args.node_in_arg,
            entries=list(entries),
            hangup=args.hangup,
            caller_number=args.caller_number,
            uniqueid=f"{time.time():.0f}.{index}",
        )
        async with semaphore:
            started = time.monotonic()
            result: CallResult | BaseException
            try:
                result = await run_call(args.host, args.port, script, timeout=args.timeout)
            except OSError as exc:
                result = exc
            took = (time.monotonic() - started) * 1000
        elapsed.append(took)
        if isinstance(result, CallResult) and OUTCOME_VARIABLE in result.variables:
            decided += 1
            outcomes[result.variables[OUTCOME_VARIABLE]] += 1
        print(_summary_line(index, result, took), flush=True)

    async with asyncio.TaskGroup() as group:
        for index in range(1, args.calls + 1):
            group.create_task(one(index))
    print(
        f"summary: calls={args.calls} decided={decided} "
        f"outcomes={dict(sorted(outcomes.items()))} "
        f"p50_ms={percentile(elapsed, 0.5):.1f} p95_ms={percentile(elapsed, 0.95):.1f} "
        f"max_ms={max(elapsed):.1f}"
    )
    return 0 if decided == args.calls else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="callerid-asterisk-sim", description="Place simulated Asterisk FastAGI calls."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4573)
    parser.add_argument("--node", default="1")
    parser.add_argument("--node-in-arg", action="store_true", help="pass the node as agi_arg_1")
    parser.add_argument(
        "--entries",
        action="append",
        help="one per GET DATA: digits, '' for nothing, '12~' for an inter-digit timeout",
    )
    parser.add_argument("--hangup", choices=["prompt", "lookup", "before_env_end"])
    parser.add_argument("--caller-number", default="5551234")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="per call, seconds")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.concurrency < 1:
        parser.error("--calls and --concurrency must be at least 1")
    return asyncio.run(_run_many(args))


if __name__ == "__main__":
    sys.exit(main())
