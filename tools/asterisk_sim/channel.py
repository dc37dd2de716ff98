"""One channel running AGI(): res_agi's command handling, with no I/O.

Part of the simulated Asterisk; the package docstring (tools/asterisk_sim/__init__.py) says
what it reproduces and where each behaviour was checked in Asterisk's source.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from tools.asterisk_sim.args import (
    app_separate_args,
    parse_args,
)
from tools.asterisk_sim.keys import (
    _PLAIN_SECONDS,
    _atof,
    _atoi,
    parse_entry,
    read_keys,
    timeout_ms,
)
from tools.asterisk_sim.script import (
    DEAD_CHANNEL,
    DEFAULT_DIGIT_TIMEOUT_MS,
    DEFAULT_RESPONSE_TIMEOUT_MS,
    FOREVER_MS,
    GET_DATA_BETWEEN_MS,
    GET_DATA_FIRST_MS,
    GET_DATA_MAX_DIGITS,
    GETDATA_COMPLETE,
    GETDATA_EMPTY_END_TERMINATED,
    GETDATA_FAILED,
    GETDATA_TIMEOUT,
    MSET_MAX_PARTS,
    OUTCOME_VARIABLE,
    READ_MAX_DIGITS,
    READ_MAX_PARTS,
    STREAM_ENDPOS,
    UNKNOWN_COMMAND,
    CallScript,
)
from tools.asterisk_sim.usage import _USAGE

_KNOWN_APPLICATIONS = {
    "goto",
    "noop",
    "set",
    "mset",
    "read",
    "log",
    "verbose",
    "playback",
    "wait",
    "answer",
}

# ast_str_retrieve_variable (main/pbx_variables.c): names it answers before the variables.
_BUILTIN_VARIABLES = frozenset({"CONTEXT", "EXTEN", "PRIORITY", "CHANNEL", "UNIQUEID"})
# A template whose every "$" is literal or opens a ${...} with no "$", "{" or "}" inside.
_FLAT_TEMPLATE = re.compile(r"(?:[^$]++|\$(?![{\[])|\$\{[^${}]*+\})*+")
_FLAT_REFERENCE = re.compile(r"\$\{([^${}]*+)\}")
_SAY_NUMBER = re.compile(r"[ \t\n\v\f\r]*[+-]?\d")  # sscanf(argv[2], "%30d") succeeds


def channel_name(script: CallScript) -> str:
    """The channel's name, as agi_channel gives it."""
    return f"PJSIP/trunk-{script.uniqueid.replace('.', '')[-8:]}"


class SimulatedChannel:
    """One channel running AGI(): res_agi's command handling without the socket."""

    def __init__(self, script: CallScript, clock: Callable[[], float] = time.monotonic) -> None:
        self.script = script
        self._clock = clock
        self.name = channel_name(script)
        self.up = script.channel_up
        self.dead = False  # res_agi's `dead`: set once the HANGUP line has gone out
        self.caller_hung_up = False
        self.context = script.context
        self.extension = script.extension
        self.priority = script.priority  # the channel field, as ast_explicit_goto leaves it
        self.variables: dict[str, str] = {}  # by the name as written
        self._written: dict[str, str] = {}  # the name without leading "_"/"__" -> as written
        self.response_timeout_ms = DEFAULT_RESPONSE_TIMEOUT_MS
        self.digit_timeout_ms = DEFAULT_DIGIT_TIMEOUT_MS
        self.commands: list[str] = []
        self.protocol_errors: list[str] = []
        self.last_digit_at: float | None = None
        self.decided_at: float | None = None
        self.entries_used = 0  # digit collections so far (GET DATA, Read attempts)
        # Set by a command when the channel is gone after its reply: the I/O side sends HANGUP.
        self.hangup_after_reply = False
        # Set after the last scripted entry in "lookup" mode: the I/O side starts the timer.
        self.start_lookup_hangup = False
        # When that timer fires (this channel's clock), so realtime entries can end by it.
        self.lookup_hangup_at: float | None = None
        # Realtime only: how long the last command's reply waits (the entries' time), and
        # whether bytes from the gateway end that command meanwhile (GET DATA watches the
        # socket, Read does not).
        self.reply_delay = 0.0
        self.reply_interruptible = False

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
        self.reply_delay = 0.0
        self.reply_interruptible = False
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

    # Variables and functions (main/pbx_variables.c, main/chanvars.c, funcs/func_timeout.c).

    def _set(self, name: str, value: str) -> None:
        """pbx_builtin_setvar_helper: a function if the name ends in ")", else a variable."""
        if name[-1:] == ")":
            self._function_write(name, value)
            return
        tail = name if name[:1] != "_" else name[2:] if name[1:2] == "_" else name[1:]
        written = self._written
        old = written.get(tail)
        if old != name:
            if old is not None:  # the same variable under another inheritance prefix
                del self.variables[old]
            written[tail] = name
        self.variables[name] = value
        if name == OUTCOME_VARIABLE:
            self.decided_at = self._clock()

    def _lookup(self, name: str) -> str | None:
        """ast_str_retrieve_variable: the built-in names, then the channel's variables."""
        if name in _BUILTIN_VARIABLES:
            return self._builtin(name)
        written = self._written.get(name)
        return None if written is None else self.variables[written]

    def _builtin(self, name: str) -> str:
        if name == "CONTEXT":
            return self.context
        if name == "EXTEN":
            return self.extension
        if name == "PRIORITY":
            return str(self.priority)
        if name == "CHANNEL":
            return self.name
        return self.script.uniqueid

    def _timeout_kind(self, function: str) -> str | None:
        """ "r" or "d" for TIMEOUT(response|digit); None (recorded) for anything else."""
        kind, error = _timeout_kind(function)
        if error is not None:
            self._error(error)
        return kind

    def _function_write(self, function: str, value: str) -> None:
        """ast_func_write; only TIMEOUT(response) and TIMEOUT(digit) are known."""
        kind = self._timeout_kind(function)
        if kind is None:
            return
        ms = timeout_ms(value)
        if not _PLAIN_SECONDS.fullmatch(value):
            self._error(f"{function} value {value[:20]!r} is read by sscanf as {ms} ms")
        if kind == "r":
            self.response_timeout_ms = ms
        else:
            self.digit_timeout_ms = ms

    def _function_read(self, function: str) -> str | None:
        """ast_func_read: TIMEOUT(response|digit) as "%.3f" seconds; None if it fails."""
        kind = self._timeout_kind(function)
        if kind is None:
            return None
        ms = self.response_timeout_ms if kind == "r" else self.digit_timeout_ms
        return f"{ms / 1000:.3f}"

    def _substitute(self, template: str) -> str:
        """ast_str_substitute_variables: every ${...} replaced, nested ones first."""
        if "$" not in template:
            return template
        pieces = _flat_pieces(template)
        if pieces is None:
            return self._substitute_by_char(template)
        out = list(pieces)  # literal, reference, literal, ...: no nesting, no $[...]
        for index in range(1, len(out), 2):
            out[index] = self._reference(out[index])
        return "".join(out)

    def _substitute_by_char(self, template: str) -> str:
        """ast_str_substitute_variables_full2's loop, as the C code scans the template."""
        out: list[str] = []
        index, end = 0, len(template)
        while index < end:
            dollar = template.find("$", index)
            if dollar < 0:
                out.append(template[index:])
                break
            opener = template[dollar + 1 : dollar + 2]
            if opener not in ("{", "["):
                out.append(template[index : dollar + 1])
                index = dollar + 1
                continue
            out.append(template[index:dollar])
            close = "}" if opener == "{" else "]"
            start = cursor = dollar + 2
            depth, nested = 1, False
            while depth and cursor < end:
                char = template[cursor]
                if char == "$" and template[cursor + 1 : cursor + 2] in ("{", "["):
                    nested = True
                    if template[cursor + 1] == opener:
                        depth += 1
                    cursor += 1
                elif char == opener:
                    depth += 1
                elif char == close:
                    depth -= 1
                cursor += 1
            inner = template[start : cursor - 1] if depth == 0 else template[start:cursor]
            if depth:
                self._error(f"missing {close!r} in {template[:40]!r}")
            index = cursor
            if nested:
                inner = self._substitute(inner)
            if opener == "[":
                self._error(f"$[...] expression the simulator cannot evaluate: {inner[:40]!r}")
            else:
                out.append(self._reference(inner))
        return "".join(out)

    def _reference(self, inner: str) -> str:
        """The value of one ${inner}: a function if it has "(", else a variable; '' if none."""
        if "(" in inner:
            return self._function_read(inner) or ""
        if ":" in inner:
            self._error(f"substring ${{{inner[:40]}}} the simulator cannot evaluate")
            return ""
        return self._lookup(inner) or ""

    # Each handler returns the reply, or None for res_agi's RESULT_SHOWUSAGE.

    def _answer(self, argv: Sequence[str]) -> str | None:
        self.up = True
        return "200 result=0"

    def _channel_status(self, argv: Sequence[str]) -> str | None:
        if len(argv) > 3:
            return None
        if len(argv) == 3 and argv[2] != self.name:  # a channel by name: none other exists here
            self._error(f"CHANNEL STATUS of another channel: {argv[2][:40]!r}")
            return "200 result=-1"
        return "200 result=6" if self.up else "200 result=4"

    def _prompt_fails(self, plays: bool = True) -> bool:
        """The prompt cannot play: the caller hangs up now ("prompt") or the file is missing
        (`plays` False: there is no file to miss)."""
        if self.script.hangup == "prompt" and not self.caller_hung_up:
            self.caller_hung_up = True
            self.hangup_after_reply = True
            return True
        return plays and self.script.missing_prompt

    def _collect(
        self, first_ms: int, between_ms: int, max_digits: int, enders: str
    ) -> tuple[int, str]:
        """Collect the next scripted entry with these timeouts: (GETDATA_* result, digits).

        Marks the hang-up ("entry" mode, or a realtime "lookup" hang-up inside the entry),
        starts "lookup" after the last scripted entry, and sets reply_delay when realtime.
        """
        script = self.script
        index = self.entries_used
        self.entries_used += 1
        entries = script.entries
        entry = parse_entry(entries[index] if index < len(entries) else None)
        last = index + 1 == max(len(entries), 1)
        hangup_at: float | None = None
        if script.hangup == "entry" and last:
            hangup_at = entry.duration
        elif script.realtime and self.lookup_hangup_at is not None:
            hangup_at = max(0.0, self.lookup_hangup_at - self._clock())
        result, digits, took = read_keys(
            entry, first_ms / 1000, between_ms / 1000, max_digits, enders, hangup_at
        )
        if (script.hangup == "entry" and last) or result == GETDATA_FAILED:
            self.caller_hung_up = True  # during the entry, or right after it ended
            self.hangup_after_reply = True
        elif script.hangup == "lookup" and last:
            self.start_lookup_hangup = True
        if script.realtime:
            self.reply_delay += took  # Read may take several entries (attempts)
        if digits:
            self.last_digit_at = self._clock() + (took if script.realtime else 0.0)
        return result, digits

    def _get_data(self, argv: Sequence[str]) -> str | None:
        if len(argv) < 3:
            return None
        timeout = _atoi(argv[3]) if len(argv) > 3 else 0
        max_digits = _atoi(argv[4]) if len(argv) > 4 else GET_DATA_MAX_DIGITS
        if len(argv) > 4 and not 0 < max_digits < GET_DATA_MAX_DIGITS:
            self._error(f"GET DATA maxdigits {argv[4][:20]!r}: Asterisk takes 1..1023")
        if self._prompt_fails(bool(argv[2])) or self.caller_hung_up:
            return "200 result=-1"
        if max_digits == 0:  # ast_readstring_full refuses a zero length
            return "200 result=-1"
        if timeout > 0:
            first = between = timeout
        elif timeout < 0:
            first = between = FOREVER_MS
        else:
            first, between = GET_DATA_FIRST_MS, GET_DATA_BETWEEN_MS
        result, digits = self._collect(first, between, max_digits, "#")
        self.reply_interruptible = self.reply_delay > 0
        if result == GETDATA_FAILED:
            return "200 result=-1"
        if result == GETDATA_TIMEOUT:
            return f"200 result={digits} (timeout)"
        return f"200 result={digits}"

    def _read(self, data: str) -> None:
        """read_exec (apps/app_read.c); EXEC answers 200 result=0 whatever happens here."""
        self._set("READSTATUS", "ERROR")
        if not data:
            self._error("Read without a variable: Asterisk reads nothing")
            return
        args = _read_arguments(data)
        if args.errors:
            self.protocol_errors.extend(args.errors)
        variable, flags, tries = args.variable, args.flags, args.tries
        if not variable:
            return
        status = "ERROR"
        # ast_check_hangup at its end: the caller was gone before, or went during an attempt
        # (not if it hangs up only after this entry has ended: "entry" mode).
        hung_up = self.caller_hung_up
        failed = False
        if not self.up:
            if "s" in flags:
                self._set(variable, "")
                self._set("READSTATUS", "SKIPPED")
                return
            if "n" not in flags:
                failed = hung_up  # ast_answer fails on a hung-up channel: nothing is read
                self.up = not failed
        while tries and not failed:
            if self.caller_hung_up or self._prompt_fails(bool(args.prompt)):
                result, digits = GETDATA_FAILED, ""
            else:  # its own timeout for both, or TIMEOUT(response) then TIMEOUT(digit)
                first = args.own_ms or self.response_timeout_ms
                between = args.own_ms or self.digit_timeout_ms
                result, digits = self._collect(first, between, args.max_digits, args.terminator)
            if result == GETDATA_COMPLETE:
                status = "OK"
            elif result == GETDATA_EMPTY_END_TERMINATED:
                status = "OK"
                if "e" in flags:
                    digits = args.terminator
            elif result == GETDATA_TIMEOUT:
                status = "TIMEOUT"
            self._set(variable, digits)
            if result == GETDATA_FAILED:
                failed = True
                hung_up = hung_up or self.caller_hung_up
            else:
                tries = 0 if digits else tries - 1
        if hung_up:
            status = "HANGUP"
        self._set("READSTATUS", status)

    def _stream_file(self, argv: Sequence[str]) -> str | None:
        if not 4 <= len(argv) <= 5:
            return None
        if self._prompt_fails():
            return "200 result=-1 endpos=0"
        return f"200 result=0 endpos={STREAM_ENDPOS}"

    def _say_digits(self, argv: Sequence[str]) -> str | None:
        if len(argv) != 4 or not _SAY_NUMBER.match(argv[2]):
            return None
        return "200 result=0"

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
        name = argv[2]
        value = self._function_read(name) if name.endswith(")") else self._lookup(name)
        return "200 result=0" if value is None else f"200 result=1 ({value})"

    def _get_full_variable(self, argv: Sequence[str]) -> str | None:
        if len(argv) not in (4, 5):
            return None
        if len(argv) == 5 and argv[4] != self.name:
            self._error(f"GET FULL VARIABLE on another channel: {argv[4][:40]!r}")
            return "200 result=0"
        return f"200 result=1 ({self._substitute(argv[3])})"

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
        if application == "read":
            self._read(options)
        elif application == "set":
            name, sep, value = options.partition("=")
            if sep:
                self._set(name, value)
            else:
                self._error(f"Set without '=': Asterisk sets nothing: {options[:40]!r}")
        elif application == "mset":
            self._mset(options)
        return "200 result=0"

    def _mset(self, data: str) -> None:
        """pbx_builtin_setvar_multiple; what Asterisk only warns about is recorded as an error."""
        pairs, errors = _mset_pairs(data)
        if errors:
            self.protocol_errors.extend(errors)
        for name, value in pairs:
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


@functools.lru_cache(maxsize=256)
def _mset_pairs(data: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """What pbx_builtin_setvar_multiple sets for `data`, in order, and what it warns about."""
    if not data:
        return (), ("MSet without a name=value pair: Asterisk sets nothing",)
    pairs: list[tuple[str, str]] = []
    errors: list[str] = []
    parts = app_separate_args(data, ",", MSET_MAX_PARTS)
    if len(parts) == MSET_MAX_PARTS:
        every = app_separate_args(data, ",", MSET_MAX_PARTS + 1)
        if len(every) > MSET_MAX_PARTS:
            errors.append(f"MSet with over {MSET_MAX_PARTS} pairs: the last ones run together")
    for part in parts:
        pair = app_separate_args(part, "=", 2)
        if len(pair) != 2:
            errors.append(f"MSet ignores {part[:40]!r}: no '='")
            continue
        name, value = pair
        if not name or " " in name:
            errors.append(f"MSet with an unusable variable name {name[:40]!r}")
            if not name:
                continue
        pairs.append((name, value))
    return tuple(pairs), tuple(errors)


class _ReadArguments(NamedTuple):
    """read_exec's arguments as it understands them, and what the simulator records."""

    variable: str
    prompt: str
    max_digits: int
    flags: str  # the option letters it models: s, n, t, e
    terminator: str
    tries: int
    own_ms: int  # its timeout argument, 0 for none: then the channel's TIMEOUT(...)s
    errors: tuple[str, ...]


@functools.lru_cache(maxsize=256)
def _read_arguments(data: str) -> _ReadArguments:
    variable, prompt, max_text, options, attempts, timeout = (
        app_separate_args(data, ",", READ_MAX_PARTS) + [""] * READ_MAX_PARTS
    )[:READ_MAX_PARTS]
    errors: list[str] = []
    flags, terminator = _read_options(options, errors)
    tries = max(_atoi(attempts), 1) if attempts else 1
    seconds = _atof(timeout) if timeout else 0.0
    own_ms = int(seconds * 1000) if seconds > 0 else 0
    max_digits = _atoi(max_text) if max_text else READ_MAX_DIGITS
    if not 1 <= max_digits <= READ_MAX_DIGITS:
        if max_text:
            errors.append(f"Read maxdigits {max_text[:20]!r}: Asterisk reads up to 255")
        max_digits = READ_MAX_DIGITS
    if not variable:
        errors.append("Read without a variable: Asterisk reads nothing")
    elif "&" in prompt:
        errors.append("Read with several prompts: the simulator plays them as one")
    return _ReadArguments(
        variable, prompt, max_digits, flags, terminator, tries, own_ms, tuple(errors)
    )


def _read_options(options: str, errors: list[str]) -> tuple[str, str]:
    """ast_app_parse_options for Read: (the option letters, the terminators)."""
    flags, terminator = "", "#"
    index, end = 0, len(options)
    while index < end:
        letter = options[index]
        index += 1
        argument = ""
        if index < end and options[index] == "(":
            close = options.find(")", index)
            close = end if close < 0 else close
            argument = options[index + 1 : close]
            index = close + 1
        if letter in "sne":
            flags += letter
        elif letter == "t":
            flags += letter
            terminator = argument
        else:
            errors.append(f"Read option {letter!r} the simulator does not model")
    return flags, terminator


@functools.lru_cache(maxsize=256)
def _timeout_kind(function: str) -> tuple[str | None, str | None]:
    """For a function name: "r" or "d" for TIMEOUT(response|digit) (its first letter, any
    case), or None and why the simulator records it."""
    name, _, args = function.partition("(")
    args = args[: args.rfind(")")] if ")" in args else args
    if name != "TIMEOUT":
        return None, f"function the simulator does not know: {function[:40]!r}"
    kind = args[:1].lower()
    if kind not in ("r", "d"):
        return None, f"TIMEOUT type the simulator does not model: {function[:40]!r}"
    return kind, None


@functools.lru_cache(maxsize=256)
def _flat_pieces(template: str) -> tuple[str, ...] | None:
    """A template with no nesting and no $[...] as literal, reference, literal, ...; else None."""
    if not _FLAT_TEMPLATE.fullmatch(template):
        return None
    return tuple(_FLAT_REFERENCE.split(template))


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
