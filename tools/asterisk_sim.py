"""A simulated Asterisk 22 FastAGI client, for tests and for load from the command line.

It does what Asterisk does when the dialplan runs `AGI(agi://host:port/identify/<node>)`:
connect, send the environment in several writes, answer every command the way res_agi.c
would, and, when the gateway closes the socket, report where the dialplan would continue.

The emulation is split like the gateway's own code: `SimulatedChannel` is the channel and
res_agi's command handling with no I/O (a command line in, reply text out); `run_call` does the
socket, the timers and the script's hang-ups around it.

The caller: `CallScript.entries` holds what the caller keys at each digit collection, one
entry per GET DATA or per attempt of `EXEC Read`, in order (past the end: nothing typed):

    "12345"       keys 1 2 3 4 5, each right after the one before
    "12(2.5)345"  keys 1 2, a pause of 2.5 s, then keys 3 4 5
    "(6)12345"    the first key 6 s after the prompt has played
    "12#"         keys 1 2, then the terminator
    "12" / "12~"  keys 1 2 and no more: the running timeout ends the entry (unless max digits
                  was reached); "~" at the end only says so
    None / ""     nothing typed: the first-digit timeout ends it

A pause, `(<seconds>)`, counts from the end of the prompt (before the first key) or from the
previous key; a pause at the very end only matters for `hangup="entry"`. Any other character
is a key as written: phones send 0-9 * # A-D, the others make odd replies for fuzzing. Each
command's result follows from its own timeouts exactly as in Asterisk: with
GET DATA timeout 4000, "12(2.5)345" gives 12345; with Read and TIMEOUT(digit)=1, "12(2.5)345"
gives 12 and READSTATUS TIMEOUT. With `CallScript.realtime` False (the default, and the load
generator's) every reply goes at once, whatever time the entry took in the caller's world;
with True the reply to an entry waits that long (its pauses, and the timeout that ended it),
so a test can see a timeout fire.

The load generator runs this on the same cores as the gateway it measures, so the socket side
is an `asyncio.Protocol`, not streams: each line is answered in the callback that made it
available, one `write` per reply as res_agi does, with no coroutine, drain or timeout per
read. A call has one timeout (its deadline), in "lookup" mode one timer for the hang-up, and,
only when realtime, one timer per entry. Backpressure is kept: while the transport's buffer is
over its high-water mark, nothing more is answered or read (res_agi blocks on its write).

Asterisk 22.10.1 behaviour reproduced here, with where it was checked in its source:

- One command at a time (res/res_agi.c `run_agi`): Asterisk waits with poll() on the socket
  but reads each command with fgets() from a stdio FILE made with fdopen() of it. fgets' read()
  takes every byte the socket holds, so of several commands written together only the first
  is answered; poll() then sees an empty socket and the rest wait in the stdio buffer. Each
  later arrival of bytes lets the next buffered line through (not the new bytes), one per
  loop turn while the socket still holds unread bytes. When the gateway closes, the buffered
  lines are all answered and then the AGI ends. `_Call` keeps the two buffers (its "kernel"
  and "stdio") and records every read that leaves a second whole line behind as a protocol
  error. A line is at most 2047 bytes (fgets into a 2048-byte buffer): a longer one runs as
  several commands; an unterminated line when the gateway closes still runs (fgets returns
  it at EOF). A command in progress is not interrupted by what arrives, except GET DATA (below).
- Arguments are split by `parse_args` (res_agi.c): spaces and tabs separate, double quotes
  group, a backslash escapes. Only the trailing "\\n" is stripped, so a "\\r" ends up inside
  the last argument. Commands are matched word by word, case-insensitively.
- After the caller hangs up, Asterisk sends one unprompted "HANGUP" line (after the reply of
  the command it interrupted) and then answers 511 to every command not marked dead-safe.
  Dead-safe are SET VARIABLE, EXEC, VERBOSE, NOOP, GET VARIABLE and GET FULL VARIABLE (and
  DATABASE, not emulated). When the gateway closes its side, the AGI ends with one more
  "HANGUP" line, hung up or not (the end of `run_agi`, AGISIGHUP's default); only a gateway
  that half-closes and reads on sees it.
- A malformed command gets `520-Invalid command syntax.  Proper usage follows:`, the
  command's XML description as res_agi keeps it (one line per paragraph, inline markup such
  as <literal> left in), and `520 End of proper usage.` (`agi_handle_command`).
- GET DATA <file> [timeout] [maxdigits] (`handle_getdata`; `ast_app_getdata_full`, main/app.c;
  `ast_readstring_full`, main/channel.c): ONE timeout, for the first digit and between
  digits; 0 or absent: fixed 6000 ms first / 2000 ms between; negative: forever. TIMEOUT(...)
  plays no part. `#` ends the entry and is not returned. Replies: `200 result=12345` (max
  digits, or `12345#`), `200 result=123 (timeout)`, `200 result= (timeout)`, `200 result=`
  (`#` alone), `200 result=-1` at once for a missing prompt (the channel stays up) or on a
  hang-up (then HANGUP follows). maxdigits is read with atoi, default 1024; 0 gives -1. While
  it plays or waits, GET DATA also watches the AGI socket (`ast_waitstream_full`,
  main/file.c; `ast_waitfordigit_full`, main/channel.c): bytes arriving end it with no reply
  at all (`res == 2` in handle_getdata). Only possible when realtime; recorded as an error.
- EXEC Read "<var>,<prompt>,<maxdigits>,<options>,<attempts>,<timeout>" (`read_exec`,
  apps/app_read.c; `ast_app_getdata_terminator`, main/app.c): answers the channel if it is
  not up (option n: no, option s: skip with READSTATUS SKIPPED); maxdigits 1..255, anything
  else 255; a positive timeout argument (seconds) is used for the first digit and between
  digits, otherwise the channel's TIMEOUT(response) first and TIMEOUT(digit) between; `#`
  ends the entry (option t sets the terminators). It sets the variable (the digits, '' for
  none; on a hang-up the digits typed so far, as its zeroed buffer holds them) and READSTATUS:
  OK (max digits or a terminator, also a terminator alone), TIMEOUT (with or without digits),
  HANGUP (the caller hung up: `ast_check_hangup`), ERROR (the prompt file is missing:
  nothing is read, the variable is set to ''). With attempts > 1 an empty entry is retried
  (each attempt takes the next scripted entry). EXEC answers `200 result=0` in every case,
  also after a hang-up (then HANGUP follows). INTERRUPTED never happens here: Read does not
  watch the AGI socket.
- TIMEOUT(response) and TIMEOUT(digit): `pbx_builtin_setvar_helper` (main/pbx_variables.c)
  hands any name ending in ")" to `ast_func_write` (main/pbx_functions.c, function names are
  case-sensitive), so SET VARIABLE, Set and MSet of these set the channel's pbx timeouts and
  no variable. `timeout_write` (funcs/func_timeout.c) reads the value with
  sscanf("%ld%lf") as seconds, fractions allowed ("5.000" is 5000 ms, garbage 0). Defaults,
  set by `__ast_pbx_run` (main/pbx.c): response 10000 ms, digit 5000 ms. Any other function
  is recorded as unknown to the simulator.
- Variables are stored under the name as written and found without up to two leading
  underscores (`ast_var_name`, main/chanvars.c): `__X` is read as `${X}`; setting `X`
  replaces `__X`.
- GET FULL VARIABLE <expression> (`handle_getvariablefull`; `ast_str_substitute_variables_full2`,
  main/pbx_variables.c): always `200 result=1 (<text>)`, with every `${NAME}` replaced by its
  value ('' when unset), nested ones first; CONTEXT, EXTEN, PRIORITY, CHANNEL and UNIQUEID
  are built in. GET VARIABLE answers `200 result=0` for an unset name.
- `EXEC Goto` and `SET PRIORITY` go through ast_explicit_goto, which stores priority-1 while
  the channel runs in the dialplan; when AGI() returns, the pbx loop adds 1. SET CONTEXT and
  SET EXTENSION set the field directly. With no jump, the dialplan continues at priority+1.
- `EXEC MSet "A=1,__B=2"` (pbx_builtin_setvar_multiple) splits its argument the way every
  application's is split (`app_separate_args`: commas outside quotes, parentheses and
  brackets; quotes and backslashes removed, a backslash keeping the next character), at most
  99 parts, then each part on its first `=`, and sets the pairs in order, as SET VARIABLE does;
  a part without `=` is ignored with a warning. It answers `200 result=0`, as Set does (also
  when it sets nothing). An unknown application answers `200 result=-2` (`handle_exec`).
- CHANNEL STATUS answers the channel's state (6 up, 4 ringing); with a channel name, -1
  unless it is this channel's (there are no others); with more arguments, the usage text.
- SAY DIGITS answers `200 result=0` at once (as Asterisk does when the digit sounds are
  missing); its number must start with an integer (sscanf "%d"), or the usage text comes back.

Anything the gateway sends that real Asterisk would reject or misread is recorded in
`CallResult.protocol_errors`, so a test can assert there is none.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import itertools
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, cast

from tools.stats import percentile

HangupMode = Literal[None, "prompt", "entry", "lookup", "before_env_end"]

OUTCOME_VARIABLE = "OML_IDENT_OUTCOME"
AGI_BUF_LEN = 2048  # res_agi reads a command into a buffer this size
LINE_MAX = AGI_BUF_LEN - 1  # so fgets returns at most this many bytes, "\n" included
MSET_MAX_PARTS = 99  # pbx_builtin_setvar_multiple: AST_APP_ARG(pair)[99]
READ_MAX_PARTS = 6  # read_exec: variable, filename, maxdigits, options, attempts, timeout
READ_MAX_DIGITS = 255  # read_exec: maxdigits outside 1..255 reads 255
GET_DATA_MAX_DIGITS = 1024  # handle_getdata: the default, and its buffer's size
STREAM_ENDPOS = 8000  # what a fully played 1 s prompt reports at 8 kHz
# __ast_pbx_run (main/pbx.c): a channel's TIMEOUT(response) and TIMEOUT(digit) until set.
DEFAULT_RESPONSE_TIMEOUT_MS = 10000
DEFAULT_DIGIT_TIMEOUT_MS = 5000
# ast_app_getdata_full (main/app.c): GET DATA's timeouts when its own is 0 or absent.
GET_DATA_FIRST_MS = 6000
GET_DATA_BETWEEN_MS = 2000
FOREVER_MS = 1_000_000_000  # what ast_app_getdata_full waits for a negative timeout

DEAD_CHANNEL = "511 Command Not Permitted on a dead channel or intercept routine"
UNKNOWN_COMMAND = "510 Invalid or unknown command"
PIPELINED = "commands written together: only the first was answered until more bytes came"
INTERRUPTED_GET_DATA = (
    "a command came while GET DATA was collecting digits: Asterisk ends GET DATA without a reply"
)

# ast_readstring_full's results (enum ast_getdata_result, include/asterisk/app.h).
GETDATA_FAILED = -1  # hang-up (or a prompt that cannot play, for Read)
GETDATA_COMPLETE = 0  # max digits, or a terminator after digits
GETDATA_TIMEOUT = 1
GETDATA_EMPTY_END_TERMINATED = 3  # a terminator as the first key


_CALLER_NUMBERS = itertools.count(1234)


@dataclass
class CallScript:
    """What the simulated caller does on one call."""

    node: str = "1"  # in agi_network_script as "identify/<node>", or agi_arg_1 if node_in_arg
    node_in_arg: bool = False
    # One per digit collection (GET DATA, or an attempt of EXEC Read): keys, "(seconds)"
    # pauses, "#" the terminator; None or "" nothing typed (see the module docstring).
    # Collections beyond the list get nothing typed.
    entries: list[str | None] = field(default_factory=lambda: ["12345"])
    channel_up: bool = False
    # "prompt": hang up during the first prompt (GET DATA / STREAM FILE / Read);
    # "entry": hang up while keying the last scripted entry, after its keys and its trailing
    #   pause (if the entry ended first, by max digits, '#' or a timeout, right after that);
    # "lookup": hang up hangup_delay s after the reply to the last scripted entry;
    # "before_env_end": drop the connection half-way through the environment.
    hangup: HangupMode = None
    hangup_delay: float = 0.05
    missing_prompt: bool = False  # GET DATA / STREAM FILE answer -1, Read ERROR; channel stays up
    # Delay each entry's reply by the time it takes the caller (pauses, the ending timeout).
    realtime: bool = False
    # A number of its own per call by default: real load comes from many callers, and the
    # gateway limits how many ids one calling number may try (agi_gateway.limits).
    caller_number: str = field(default_factory=lambda: f"555{next(_CALLER_NUMBERS) % 10**7:07d}")
    caller_name: str = "Test Caller"
    uniqueid: str = "1700000000.1"
    context: str = "from-pstn"
    extension: str = "s"
    priority: int = 1


@dataclass
class CallResult:
    variables: dict[str, str]  # every variable set (SET VARIABLE, Set, MSet, Read), last wins
    commands: list[str]  # every command line received, in order
    context: str  # where the dialplan continues after AGI() returns
    extension: str
    priority: int
    hung_up: bool  # the simulated caller hung up
    closed_by_gateway: bool  # False if we gave up waiting for the gateway to close
    last_digit_at: float | None  # monotonic time the last entry reply with digits was sent
    decided_at: float | None  # monotonic time OML_IDENT_OUTCOME was set (SET VARIABLE, MSet)
    protocol_errors: list[str]  # what real Asterisk would have rejected or misread
    response_timeout_ms: int = DEFAULT_RESPONSE_TIMEOUT_MS  # the channel's TIMEOUT(response)
    digit_timeout_ms: int = DEFAULT_DIGIT_TIMEOUT_MS  # the channel's TIMEOUT(digit)


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
    if delim in _APP_ARG_GROUPED and not _APP_ARG_REMOVED.search(data):
        return _app_separate_args_grouped(data, delim, limit)
    return _app_separate_args_by_char(data, delim, limit)


_APP_ARG_SPECIAL = re.compile(r'[()\[\]"\\]')
_APP_ARG_REMOVED = re.compile(r'["\\]')
# For each delimiter, what the grouped split has to look at: the delimiter and the groupers.
_APP_ARG_GROUPED = {delim: re.compile(rf"[()\[\]{delim}]") for delim in (",", "=", "|")}


def _app_separate_args_grouped(data: str, delim: str, limit: int) -> list[str]:
    """app_separate_args for an argument with parentheses or brackets but no quote or
    backslash (nothing to remove): the same cuts as the character loop, found by a regex."""
    parts: list[str] = []
    start = paren = bracket = 0
    if limit > 1:
        for match in _APP_ARG_GROUPED[delim].finditer(data):
            char = match.group()
            if char == "(":
                paren += 1
            elif char == ")":
                paren -= 1 if paren else 0
            elif char == "[":
                bracket += 1
            elif char == "]":
                bracket -= 1 if bracket else 0
            elif not (paren or bracket):
                parts.append(data[start : match.start()])
                start = match.end()
                if len(parts) == limit - 1:
                    break
    parts.append(data[start:])
    return parts


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


# res_agi's usage text is the command's XML <description> (ast_xmldoc_build_description, at
# registration): one line per paragraph, white space collapsed, inline markup such as
# <literal> left in, list items indented. As Asterisk 22.10.1 sends it (with its documentation
# installed; tests/asterisk/test_differential.py compares every reachable one).
_USAGE = {
    # Unreachable: handle_answer never asks for its usage (kept from the XML for completeness).
    "ANSWER": _usage(
        "Answers channel if not already in answer state. Returns <literal>-1</literal> on "
        "channel failure, or <literal>0</literal> if successful."
    ),
    "CHANNEL STATUS": _usage(
        "Returns the status of the specified <replaceable>channelname</replaceable>. If no "
        "channel name is given then returns the status of the current channel.",
        "Return values:",
        "    <enum>0</enum> - Channel is down and available.",
        "    <enum>1</enum> - Channel is down, but reserved.",
        "    <enum>2</enum> - Channel is off hook.",
        "    <enum>3</enum> - Digits (or equivalent) have been dialed.",
        "    <enum>4</enum> - Line is ringing.",
        "    <enum>5</enum> - Remote end is ringing.",
        "    <enum>6</enum> - Line is up.",
        "    <enum>7</enum> - Line is busy.",
    ),
    "GET DATA": _usage(
        "Stream the given <replaceable>file</replaceable>, and receive DTMF data.",
        "Returns the digits received from the channel at the other end.",
    ),
    "STREAM FILE": _usage(
        "Send the given file, allowing playback to be interrupted by the given digits, if any. "
        "Returns <literal>0</literal> if playback completes without a digit being pressed, or "
        "the ASCII numerical value of the digit if one was pressed, or <literal>-1</literal> "
        "on error or if the channel was disconnected. If musiconhold is playing before "
        "calling stream file it will be automatically stopped and will not be restarted after "
        "completion.",
        "It sets the following channel variables upon completion:",
        "<variable>PLAYBACKSTATUS</variable>: The status of the playback attempt as a text string.",
        "    <value>SUCCESS</value>",
        "    <value>FAILED</value>",
    ),
    "SAY DIGITS": _usage(
        "Say a given digit string, returning early if any of the given DTMF digits are "
        "received on the channel. Returns <literal>0</literal> if playback completes without "
        "a digit being pressed, or the ASCII numerical value of the digit if one was pressed "
        "or <literal>-1</literal> on error/hangup."
    ),
    "WAIT FOR DIGIT": _usage(
        "Waits up to <replaceable>timeout</replaceable> milliseconds for channel to receive a "
        "DTMF digit. Returns <literal>-1</literal> on channel failure, <literal>0</literal> if "
        "no digit is received in the timeout, or the numerical value of the ascii of the digit "
        "if one is received. Use <literal>-1</literal> for the <replaceable>timeout</replaceable> "
        "value if you desire the call to block indefinitely."
    ),
    "SET VARIABLE": _usage("Sets a variable to the current channel."),
    "GET VARIABLE": _usage(
        "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. "
        "Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set and "
        "returns the variable in parentheses.",
        "Example return code: 200 result=1 (testvariable)",
    ),
    "GET FULL VARIABLE": _usage(
        "Evaluates the given <replaceable>expression</replaceable> against the channel "
        "specified by <replaceable>channelname</replaceable>, or the current channel if "
        "<replaceable>channelname</replaceable> is not provided.",
        "Unlike GET VARIABLE, the <replaceable>expression</replaceable> is processed in a "
        "manner similar to dialplan evaluation, allowing complex and built-in variables to be "
        "accessed, e.g. <literal>The time is ${EPOCH}</literal>",
        "Returns <literal>0</literal> if no channel matching "
        "<replaceable>channelname</replaceable> exists, <literal>1</literal> otherwise.",
        "Example return code: 200 result=1 (The time is 1578493800)",
    ),
    "EXEC": _usage(
        "Executes <replaceable>application</replaceable> with given "
        "<replaceable>options</replaceable>.",
        "Returns whatever the <replaceable>application</replaceable> returns, or "
        "<literal>-2</literal> on failure to find <replaceable>application</replaceable>.",
        "<note>NOTE:</note> exec does not evaluate dialplan functions and variables unless it "
        "is explicitly enabled by setting the <variable>AGIEXECFULL</variable> variable to "
        "<literal>yes</literal>.",
    ),
    "SET CONTEXT": _usage("Sets the context for continuation upon exiting the application."),
    "SET EXTENSION": _usage("Changes the extension for continuation upon exiting the application."),
    "SET PRIORITY": _usage(
        "Changes the priority for continuation upon exiting the application. The priority "
        "must be a valid priority or label."
    ),
    "SET MUSIC": _usage(
        "Enables/Disables the music on hold generator. If <replaceable>class</replaceable> is "
        "not specified, then the <literal>default</literal> music on hold class will be used. "
        "This generator will be stopped automatically when playing a file.",
        "Always returns <literal>0</literal>.",
    ),
    "VERBOSE": _usage(
        "Sends <replaceable>message</replaceable> to the console via verbose message system. "
        "<replaceable>level</replaceable> is the verbose level (1-4). Always returns "
        "<literal>1</literal>"
    ),
}


class Keys(NamedTuple):
    """One scripted entry: each key with the pause before it (s), and the pause after the last."""

    keys: tuple[tuple[float, str], ...]
    trailing: float

    @property
    def duration(self) -> float:
        """From the end of the prompt to the end of the trailing pause, in seconds."""
        return sum(pause for pause, _ in self.keys) + self.trailing


_PAUSE = re.compile(r"\((\d+(?:\.\d*)?|\.\d+)\)")


@functools.lru_cache(maxsize=1024)
def parse_entry(entry: str | None) -> Keys:
    """The keys of one `CallScript.entries` item (see the module docstring for the notation).

    Never fails: a "(" that does not start a pause such as "(2.5)" is a key like any other.
    """
    if not entry:
        return Keys((), 0.0)
    if entry.endswith("~"):
        entry = entry[:-1]
    keys: list[tuple[float, str]] = []
    pause = 0.0
    index, end = 0, len(entry)
    while index < end:
        char = entry[index]
        if char == "(" and (match := _PAUSE.match(entry, index)):
            pause += float(match.group(1))
            index = match.end()
            continue
        keys.append((pause, char))
        pause = 0.0
        index += 1
    return Keys(tuple(keys), pause)


def read_keys(
    entry: Keys,
    first: float,
    between: float,
    max_digits: int,
    enders: str,
    hangup_at: float | None = None,
) -> tuple[int, str, float]:
    """ast_readstring_full (main/channel.c) against the caller's keys, no I/O.

    `first` is the first-digit timeout and `between` the one after each digit, `hangup_at`
    when the caller hangs up, all in seconds from the end of the prompt. A key exactly at the
    timeout is too late. Returns (GETDATA_* result, digits, seconds taken).
    """
    digits = ""
    now = 0.0
    wait = first
    for pause, key in entry.keys:
        if hangup_at is not None and hangup_at < now + min(pause, wait):
            return GETDATA_FAILED, digits, hangup_at
        if pause >= wait:
            return GETDATA_TIMEOUT, digits, now + wait
        now += pause
        if key in enders:
            result = GETDATA_COMPLETE if digits else GETDATA_EMPTY_END_TERMINATED
            return result, digits, now
        digits += key
        if len(digits) >= max_digits:
            return GETDATA_COMPLETE, digits, now
        wait = between
    if hangup_at is not None and hangup_at < now + wait:
        return GETDATA_FAILED, digits, max(hangup_at, now)
    return GETDATA_TIMEOUT, digits, now + wait


_C_INT = re.compile(r"[ \t\n\v\f\r]*([+-]?\d+)")
_C_DOUBLE = re.compile(r"[ \t\n\v\f\r]*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_PLAIN_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def _atoi(text: str) -> int:
    """C's atoi: leading blanks, a sign, digits; 0 when there are none."""
    match = _C_INT.match(text)
    return int(match.group(1)) if match else 0


def _atof(text: str) -> float:
    """C's atof for plain decimal numbers (no hex, inf or nan); 0.0 when there is none."""
    match = _C_DOUBLE.match(text)
    return float(match.group(1)) if match else 0.0


@functools.lru_cache(maxsize=256)
def timeout_ms(value: str) -> int:
    """What func_timeout's timeout_write makes of `value` for TIMEOUT(response|digit), in ms.

    sscanf(value, "%ld%lf", &sec, &x): whole seconds, then the rest as a double (".5" of
    "3.5"); no number or a negative one gives 0; then sec * 1000 + (long)(x * 1e6) / 1000.
    """
    whole = _C_INT.match(value)
    if whole is None or int(whole.group(1)) < 0:
        return 0
    fraction = _C_DOUBLE.match(value, whole.end())
    usec = int(float(fraction.group(1)) * 1_000_000) if fraction else 0
    return int(whole.group(1)) * 1000 + (abs(usec) // 1000) * (1 if usec >= 0 else -1)


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
        f"agi_channel: {channel_name(script)}\n"
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
        response_timeout_ms=channel.response_timeout_ms,
        digit_timeout_ms=channel.digit_timeout_ms,
    )


class _Pending(NamedTuple):
    """A realtime reply waiting for the time its entry takes, with what follows it."""

    reply: str
    hangup: bool  # send HANGUP after it
    lookup: bool  # start the "lookup" hang-up timer after it
    interruptible: bool  # GET DATA: bytes from the gateway end the command, unanswered


class _Call(asyncio.Protocol):
    """The socket side of one call: the environment out, then res_agi's read loop.

    Bytes from the gateway go to `_kernel` (what the socket holds, unread); res_agi's fgets
    moves all of it to `_stdio` (the FILE's buffer) whenever the buffer has no whole line, and
    takes one line per loop turn, and a turn happens only while the socket holds unread bytes
    (poll) or has reached its end. So lines written together wait in `_stdio`.

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
        self._kernel = bytearray()  # received, not yet read() by fgets
        self._stdio = bytearray()  # read() into the FILE buffer, not yet returned by fgets
        self._stopped = False  # no more answers: the call is over for run_call
        self._paused = False  # over the high-water mark: answer nothing more until resumed
        self._eof = False
        self._pending: _Pending | None = None  # realtime: a reply waiting for its entry's time
        self._pending_timer: asyncio.TimerHandle | None = None
        self._hangup_timer: asyncio.TimerHandle | None = None
        self._hangup_due = False  # the "lookup" hang-up came while res_agi was not in poll()
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
        self._kernel += data
        pending = self._pending
        if pending is None:
            self._run()
        elif pending.interruptible:
            self._interrupt(by_command=True)

    def eof_received(self) -> bool:
        self._eof = True
        pending = self._pending
        if not self._stopped:
            if pending is None:
                self._run()
            elif pending.interruptible:  # GET DATA sees the socket readable at its end too
                self._interrupt(by_command=False)
        return True  # run_call closes the socket, as Asterisk does when AGI() returns

    def _run(self) -> None:
        """run_agi's loop: while poll() finds the socket readable, fgets one line, answer it."""
        transport = self._transport
        assert transport is not None
        kernel, stdio = self._kernel, self._stdio
        while not self._paused and self._pending is None and not self._stopped:
            if not kernel:
                if not self._eof and not transport.is_closing():
                    break  # poll(): nothing unread on the socket; buffered lines wait
            elif not stdio and kernel.find(b"\n", 0, LINE_MAX) == len(kernel) - 1:
                # The usual case, one whole command and nothing else: fgets in short.
                whole = bytes(kernel[:-1])
                kernel.clear()
                self._answer(whole, transport)
                continue
            line = self._fgets(transport)
            if line is None:
                break
            self._answer(line, transport)
        if self._hangup_due and self._in_poll():
            self._hangup_due = False
            self._lookup_hangup()

    def _fgets(self, transport: asyncio.Transport) -> bytes | None:
        """One line as fgets returns it (without its "\\n"); None while a line is unfinished
        (fgets keeps reading) or when the stream has ended (the call is then finished)."""
        stdio = self._stdio
        end = stdio.find(b"\n", 0, LINE_MAX)
        did_read = False
        if end < 0 and len(stdio) < LINE_MAX:
            kernel = self._kernel
            if kernel:  # read() takes everything the socket holds
                stdio += kernel
                kernel.clear()
                did_read = True
                end = stdio.find(b"\n", 0, LINE_MAX)
            if end < 0 and len(stdio) < LINE_MAX:
                if not self._eof and not transport.is_closing():
                    return None
                if not stdio:  # fgets finds nothing more: the AGI ends
                    if not transport.is_closing():  # and run_agi's last word (AGISIGHUP)
                        transport.write(b"HANGUP\n")
                    self._finish(True)
                    return None
                self._channel._error("unterminated command line at end of stream: Asterisk runs it")
                line = bytes(stdio)
                stdio.clear()
                return line
        if end < 0:
            line = bytes(stdio[:LINE_MAX])
            del stdio[:LINE_MAX]
            self._channel._error(
                f"command line longer than {LINE_MAX} bytes: Asterisk runs each {LINE_MAX} "
                "bytes of it as a command"
            )
        else:
            line = bytes(stdio[:end])
            del stdio[: end + 1]
        if did_read and (stdio.find(b"\n", 0, LINE_MAX) >= 0 or len(stdio) >= LINE_MAX):
            self._channel._error(PIPELINED)
        return line

    def _answer(self, line: bytes, transport: asyncio.Transport) -> None:
        channel = self._channel
        reply = channel.handle(line)
        if channel.reply_delay > 0:  # realtime: the reply goes when the entry has ended
            self._pending = _Pending(
                reply,
                channel.hangup_after_reply,
                channel.start_lookup_hangup,
                channel.reply_interruptible,
            )
            channel.hangup_after_reply = channel.start_lookup_hangup = False
            self._pending_timer = self._loop.call_later(channel.reply_delay, self._pending_due)
            return
        if not transport.is_closing():  # else the gateway is gone: Asterisk's write fails
            transport.write(reply.encode() + b"\n")
        if channel.hangup_after_reply or channel.start_lookup_hangup:
            hangup, lookup = channel.hangup_after_reply, channel.start_lookup_hangup
            channel.hangup_after_reply = channel.start_lookup_hangup = False
            self._after_reply(hangup, lookup)

    def _after_reply(self, hangup: bool, lookup: bool) -> None:
        if hangup and not self._channel.dead:
            self._send_hangup()
        if lookup:
            self._start_hangup_timer()

    def _pending_due(self) -> None:
        pending = self._pending
        self._pending = self._pending_timer = None
        if pending is None or self._stopped:
            return
        transport = self._transport
        assert transport is not None
        if not transport.is_closing():
            transport.write(pending.reply.encode() + b"\n")
        self._after_reply(pending.hangup, pending.lookup)
        self._run()

    def _interrupt(self, *, by_command: bool) -> None:
        """GET DATA ends when the socket turns readable (ast_waitfordigit_full's cmdfd) and
        handle_getdata answers nothing; what was to follow its reply still happens."""
        pending = self._pending
        timer = self._pending_timer
        assert pending is not None
        assert timer is not None
        timer.cancel()
        self._pending = self._pending_timer = None
        if by_command:
            self._channel._error(INTERRUPTED_GET_DATA)
        self._after_reply(pending.hangup, pending.lookup)
        self._run()

    def _send_hangup(self) -> None:
        # res_agi sends this once, when it notices the hang-up; from then on `dead` holds.
        assert self._transport is not None
        self._channel.mark_dead()
        if not self._transport.is_closing():
            self._transport.write(b"HANGUP\n")

    def _in_poll(self) -> bool:
        """res_agi sits in poll() (so it notices a hang-up at once): not blocked on a write,
        not in a command, not in fgets waiting for the rest of a line."""
        if self._paused or self._pending is not None:
            return False
        stdio = self._stdio
        return not stdio or stdio.find(b"\n", 0, LINE_MAX) >= 0 or len(stdio) >= LINE_MAX

    def _start_hangup_timer(self) -> None:
        if self._hangup_timer is not None:
            self._hangup_timer.cancel()
        delay = self._channel.script.hangup_delay
        self._channel.lookup_hangup_at = self._channel._clock() + delay
        self._hangup_timer = self._loop.call_later(delay, self._lookup_hangup)

    def _lookup_hangup(self) -> None:
        self._hangup_timer = None
        if self._stopped or self._channel.caller_hung_up:  # an entry already ended by it
            return
        if not self._in_poll():  # noticed when res_agi is back in poll()
            self._hangup_due = True
            return
        self._channel.caller_hung_up = True
        self._send_hangup()

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is None or self._transport.is_closing() or self._stopped:
            return
        self._transport.resume_reading()
        self._run()

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
        """Answer nothing more and drop the timers."""
        self._stopped = True
        for timer in (self._hangup_timer, self._pending_timer):
            if timer is not None:
                timer.cancel()
        self._hangup_timer = self._pending_timer = None
        self._pending = None

    async def close(self, *, abort: bool) -> None:
        """Close and wait until closed; `abort` drops unsent replies (no one reads them)."""
        transport = self._transport
        assert transport is not None
        if abort and transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()
        await self._closed


# The command line. What it adds to the simulation: the entries notation on the command line
# ("-" for nothing typed), a calling number of its own for every call of every run, and a
# line per call that says what each attempt typed and what Asterisk read of it.

NOTHING_TYPED = ("", "-")  # an entry, on the command line, for an attempt with no keys

ENTRIES_EPILOG = """\
entries: what the caller keys, one entry per attempt, in order (each GET DATA, or each
attempt of Read, takes the next one; attempts past the last entry get nothing typed):
  12345        keys 1 2 3 4 5, each right after the one before
  12(2.5)345   keys 1 2, a pause of 2.5 s, then keys 3 4 5
  (6)12345     the first key 6 s after the prompt has played
  12#          keys 1 2, then the terminator # (ends the entry at once)
  12  or 12~   keys 1 2 and no more: the timeout after the last key ends the entry
  -   or ""    nothing typed: the first-digit timeout ends the attempt
Two attempts: --entries 123 12345 (or, as before, --entries 123 --entries 12345).

Each attempt is answered as Asterisk 22 would with the gateway's timeouts and digit limit: a
pause longer than the timeout ends the entry there, and keys past the node's digit limit
are not read (Read stops at max digits). Pauses change what is read, not how long the call
takes, unless --realtime. Each call's line shows every attempt as typed, then "->" and what
was read when that differs ("123456->12345", "(6)12345->nothing"), and the entries no attempt
took (unused=[...]).

examples, against `make run` (examples/nodes.yaml; the mock CRM's answers by customer id are
in examples/mock_crm_table.yaml):
  callerid-asterisk-sim --node 1 --entries 12345      a known customer: identified
  callerid-asterisk-sim --node 2 --entries 12 -       too short, then nothing: no_input
"""


def _cli_entry(text: str) -> str | None:
    """An entry as given on the command line: "" and "-" type nothing."""
    return None if text in NOTHING_TYPED else text


class _ReplayChannel(SimulatedChannel):
    """A channel that records what each digit collection took and read (for the summary)."""

    def __init__(self, script: CallScript) -> None:
        super().__init__(script)
        self.attempts: list[tuple[str | None, str]] = []

    def _collect(
        self, first_ms: int, between_ms: int, max_digits: int, enders: str
    ) -> tuple[int, str]:
        index = self.entries_used
        result, digits = super()._collect(first_ms, between_ms, max_digits, enders)
        entries = self.script.entries
        self.attempts.append((entries[index] if index < len(entries) else None, digits))
        return result, digits


def call_attempts(script: CallScript, result: CallResult) -> list[tuple[str | None, str]]:
    """Each digit collection of a finished call: (the entry it took, the digits read).

    Found by answering the call's commands again without I/O, as its channel did: the same
    script gives the same answers. A hang-up in "lookup" mode is taken to come right after
    the command that took the last entry (in the call it came when its timer fired).
    """
    channel = _ReplayChannel(dataclasses.replace(script, realtime=False))
    for line in result.commands:
        channel.handle(line.encode("utf-8", errors="replace"))
        if channel.hangup_after_reply:  # the socket side sends HANGUP: the channel is dead
            channel.hangup_after_reply = False
            channel.mark_dead()
        if channel.start_lookup_hangup:
            channel.start_lookup_hangup = False
            if result.hung_up:
                channel.caller_hung_up = True
                channel.mark_dead()
    return channel.attempts


def describe_attempts(script: CallScript, result: CallResult) -> str:
    """ "attempts=[...]" for the summary line, and "unused=[...]" for entries never taken."""
    shown = []
    for entry, digits in call_attempts(script, result):
        typed = entry or "-"
        shown.append(typed if digits == (entry or "") else f"{typed}->{digits or 'nothing'}")
    text = f"attempts=[{' '.join(shown)}]"
    unused = script.entries[len(shown) :]
    if unused:
        text += f" unused=[{' '.join(entry or '-' for entry in unused)}]"
    return text


def _summary_line(
    index: int, script: CallScript, result: CallResult | BaseException, elapsed_ms: float
) -> str:
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
        f"{describe_attempts(script, result)} "
        f"continue={result.context},{result.extension},{result.priority} "
        f"elapsed_ms={elapsed_ms:.1f}{notes}"
    )


def _caller_numbers(fixed: str | None) -> Callable[[int], str]:
    """The calling number of call `index`: `fixed`, else one of its own per call and per run
    (the gateway limits CRM lookups per calling number; runs must not share numbers)."""
    if fixed is not None:
        return lambda index: fixed
    base = random.SystemRandom().randrange(10**7)
    return lambda index: f"555{(base + index) % 10**7:07d}"


async def _run_many(args: argparse.Namespace) -> int:
    semaphore = asyncio.Semaphore(args.concurrency)
    decided = 0
    outcomes: Counter[str] = Counter()
    elapsed: list[float] = []
    entries = [_cli_entry(entry) for entry in args.entries] if args.entries else ["12345"]
    caller_number = _caller_numbers(args.caller_number)

    async def one(index: int) -> None:
        nonlocal decided
        script = CallScript(
            node=args.node,
            node_in_arg=args.node_in_arg,
            entries=list(entries),
            hangup=args.hangup,
            realtime=args.realtime,
            caller_number=caller_number(index),
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
        print(_summary_line(index, script, result, took), flush=True)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callerid-asterisk-sim",
        description="Place simulated Asterisk FastAGI calls, as "
        "AGI(agi://host:port/identify/<node>) does; one line per call, then a summary. "
        "Exits 0 when every call got a decision (OML_IDENT_OUTCOME).",
        epilog=ENTRIES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4573)
    parser.add_argument("--node", default="1", help="the node id (default: 1)")
    parser.add_argument("--node-in-arg", action="store_true", help="pass the node as agi_arg_1")
    parser.add_argument(
        "--entries",
        nargs="+",
        action="extend",
        metavar="ENTRY",
        help="what the caller keys, one entry per attempt: --entries 123 12345 is two "
        "attempts; '-' or '' types nothing; pauses as '12(2.5)345' (see below; default: 12345)",
    )
    parser.add_argument(
        "--hangup",
        choices=["prompt", "entry", "lookup", "before_env_end"],
        help="the caller hangs up: during the first prompt, while keying the last entry, "
        "just after it, or half-way through the AGI environment",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="delay each entry's reply by the time the caller takes (pauses, timeouts)",
    )
    parser.add_argument(
        "--caller-number",
        help="the calling number of every call (default: one of its own per call and per run; "
        "the gateway limits CRM lookups per calling number)",
    )
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="per call, seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.calls < 1 or args.concurrency < 1:
        parser.error("--calls and --concurrency must be at least 1")
    return asyncio.run(_run_many(args))


if __name__ == "__main__":
    sys.exit(main())
