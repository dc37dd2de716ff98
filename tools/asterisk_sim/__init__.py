"""A simulated Asterisk 22 FastAGI client, for tests and for load from the command line.

It does what Asterisk does when the dialplan runs `AGI(agi://host:port/identify/<node>)`:
connect, send the environment in several writes, answer every command the way res_agi.c
would, and, when the gateway closes the socket, report where the dialplan would continue.

The emulation is split like the gateway's own code: `SimulatedChannel` is the channel and
res_agi's command handling with no I/O (a command line in, reply text out); `run_call` does the
socket, the timers and the script's hang-ups around it.

The package, by concern: `script` (what the caller does, what a call left behind, res_agi's
limits), `args` (how res_agi and applications split their arguments), `usage` (res_agi's usage
texts), `keys` (an entry's keys and pauses against Asterisk's timeouts), `channel`
(`SimulatedChannel`), `wire` (`run_call`, the environment, res_agi's two buffers) and `cli`
(`callerid-asterisk-sim`).

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

from tools.asterisk_sim.args import app_separate_args, parse_args
from tools.asterisk_sim.channel import SimulatedChannel, channel_name
from tools.asterisk_sim.cli import (
    ENTRIES_EPILOG,
    NOTHING_TYPED,
    build_parser,
    call_attempts,
    describe_attempts,
    main,
)
from tools.asterisk_sim.keys import Keys, parse_entry, read_keys, timeout_ms
from tools.asterisk_sim.script import (
    AGI_BUF_LEN,
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
    INTERRUPTED_GET_DATA,
    LINE_MAX,
    MSET_MAX_PARTS,
    OUTCOME_VARIABLE,
    PIPELINED,
    READ_MAX_DIGITS,
    READ_MAX_PARTS,
    STREAM_ENDPOS,
    UNKNOWN_COMMAND,
    CallResult,
    CallScript,
    HangupMode,
)
from tools.asterisk_sim.wire import environment_writes, run_call

__all__ = [
    "AGI_BUF_LEN",
    "DEAD_CHANNEL",
    "DEFAULT_DIGIT_TIMEOUT_MS",
    "DEFAULT_RESPONSE_TIMEOUT_MS",
    "ENTRIES_EPILOG",
    "FOREVER_MS",
    "GETDATA_COMPLETE",
    "GETDATA_EMPTY_END_TERMINATED",
    "GETDATA_FAILED",
    "GETDATA_TIMEOUT",
    "GET_DATA_BETWEEN_MS",
    "GET_DATA_FIRST_MS",
    "GET_DATA_MAX_DIGITS",
    "INTERRUPTED_GET_DATA",
    "LINE_MAX",
    "MSET_MAX_PARTS",
    "NOTHING_TYPED",
    "OUTCOME_VARIABLE",
    "PIPELINED",
    "READ_MAX_DIGITS",
    "READ_MAX_PARTS",
    "STREAM_ENDPOS",
    "UNKNOWN_COMMAND",
    "CallResult",
    "CallScript",
    "HangupMode",
    "Keys",
    "SimulatedChannel",
    "app_separate_args",
    "build_parser",
    "call_attempts",
    "channel_name",
    "describe_attempts",
    "environment_writes",
    "main",
    "parse_args",
    "parse_entry",
    "read_keys",
    "run_call",
    "timeout_ms",
]
