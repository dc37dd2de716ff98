"""What the simulated caller does and what a call left behind, and res_agi's limits.

Part of the simulated Asterisk; the package docstring (tools/asterisk_sim/__init__.py) says
what it reproduces and where each behaviour was checked in Asterisk's source.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

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
