"""Drive a real, private Asterisk 22 against the FastAGI gateway: the real-PBX test harness.

What belongs here: everything tests and `bench/` need to run calls through a genuine Asterisk
and read back what happened to each one, and nothing about the gateway itself.

- `find_asterisk` / `require_asterisk` locate (or build, via tools/asterisk/ensure_asterisk.sh)
  the Asterisk binary.
- `PrivateAsterisk` runs one Asterisk of its own: every directory inside its work directory,
  its own control socket, explicit module loads only and no network listener at all (no SIP,
  no AMI, no HTTP). It writes its configuration, the test prompts and the dialplan below.
- A call (`Call`) is a Local channel `Local/<node>@<inbound context>` originated from a call
  file. Its `;2` leg is the inbound call: it runs the inbound context, which calls
  `AGI(agi://${GATEWAY}/identify/<node>)`. Its `;1` leg is the caller: it runs a small script
  of `Wait`, `Keys` (real DTMF across the Local channel) and `Hangup` steps, then stays on the
  line until the inbound leg ends.
- Results: a hangup handler on each leg appends one line to `results.log` in the work
  directory; `wait_for_results` joins the two lines of each call into a `CallResult`, waiting
  a bounded time (a call that never recorded is reported as missing, never waited for forever).

Dialplan the instance always has (`base_dialplan()` writes it; `add_dialplan` adds more):

- `callerid-inbound`: the default inbound context (`inbound_context()` builds others, with
  their own lines after the AGI): the recording hangup handler at priority 1, set-up and
  answer at 2, `AGI(...)` at 3 (`AGI_PRIORITY`), `AGI_RETURNED_AT` at 4,
  `ENDED=<context>,<node>,5` at 5, Hangup at 6.
  Node ids are the extension, matched by two patterns that leave out "h" (a pattern that
  matches "h" would run the AGI again as the h extension when the call ends there).
- `oml-dest-1`, `-2`, `-3`, `-5`, `-9`: jump targets for the gateway's jump template
  (`oml-dest-{type},{id},1`): `_[0-9]!` sets `ENDED=oml-dest-N,<id>,1` at priority 1, then
  `AGI_RETURNED_AT` if unset, then hangs up.
- `callerid-inbound-setup`, `callerid-inbound-record`: the inbound leg's set-up subroutine and
  hangup handler; `callerid-caller`, `callerid-caller-step`, `callerid-caller-record`: the
  caller leg's script interpreter and hangup handler; `callerid-warm-up`: see `start`.

Channel variables set per call (call file `Setvar:`; the Local channel copies all of them,
`__` or not, from the caller leg to the inbound leg): `CALL_ID` (the test's key for a call),
`GATEWAY` (`host:port` of the FastAGI server), `CALLER_SCRIPT` and `CALLER_STEPS` (the encoded
caller script), `CALL_MAX_SECONDS` (after it, Asterisk hangs the caller up), plus the call's
own `variables`. Times recorded (seconds since the epoch, ms, the same clock as time.time()):
`INBOUND_STARTED_AT` (the inbound leg's first priority), `AGI_RETURNED_AT`, `LAST_KEY_AT` and
`KEY_SENDING_AT` (caller leg), and each leg's hang-up. The inbound record also carries
OML_IDENT_OUTCOME, OML_DEST_TYPE, OML_DEST_ID, OML_IDENT_SOURCE, OML_CUSTOMER_ID, OMLCODCLI,
AGISTATUS, ENDED, HANGUPCAUSE, HANGUP_LOCATION, CHANNEL, CALLERID_NUM and `record_variables`.
Records are written by func_env's FILE() in append mode: one write(2) per line, so lines of
parallel calls never interleave; values go through URIENCODE, so any value fits on a line.

The caller script notation, `CALLER_SCRIPT`: steps joined by `/`, each `op[:arg[:arg]]`:
`wait:<seconds>`, `dtmf:<one digit>:<duration ms>`, `hangup`. `Keys` expands into one `dtmf`
step per digit with `wait` steps for the gap, so that the last digit's end is timed exactly:
SendDTMF always starts with 100 ms of quiet and sleeps its gap after every digit, so each
digit gets its own SendDTMF with a 1 ms gap and `LAST_KEY_AT` is taken right after it. The
caller leg starts when the inbound leg answers; after its script it waits until the inbound
leg ends.

Asterisk's CPU time for a load: `cpu_seconds()` before and after. Its AGI transcript:
`set_agi_debug(True)`, then `agi_transcript(log_since(mark), channel)`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import uuid
import wave
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent
ENSURE_SCRIPT = REPO / "tools" / "asterisk" / "ensure_asterisk.sh"
# Building from the tarball takes about 10 minutes on 2 cores; a found binary takes ms.
ENSURE_TIMEOUT = 45 * 60.0

SAMPLE_RATE = 8000  # every prompt the harness writes: 8 kHz mono 16-bit, what format_wav plays
PROMPT = "callerid-test/prompt"  # exactly 1.000 s: a fully played STREAM FILE says endpos=8000
LONG_PROMPT = "callerid-test/long-prompt"  # 4 s: long enough to hang up or key in during it
CONFIRM_PROMPT = "callerid-confirm"  # 1 s: the read-back confirmation prompt
MOH_CLASS = "default"

INBOUND_CONTEXT = "callerid-inbound"
CALLER_CONTEXT = "callerid-caller"
DEST_TYPES = (1, 2, 3, 5, 9)
# Where the AGI() is in every context `inbound_context` builds (1 and 2 are the set-up).
AGI_PRIORITY = 3

NOW = "${STRFTIME(,,%s.%3q)}"  # seconds since the epoch with milliseconds, in the dialplan
# Dialplan lines for contexts a test writes itself (the gateway may jump into them):
MARK_AGI_RETURNED = f'ExecIf($["${{AGI_RETURNED_AT}}" = ""]?Set(AGI_RETURNED_AT={NOW}))'
MARK_ENDED = "Set(ENDED=${CONTEXT},${EXTEN},${PRIORITY})"

# Always recorded from the inbound leg, besides `record_variables`.
OUTCOME_VARIABLES = (
    "OML_IDENT_OUTCOME",
    "OML_DEST_TYPE",
    "OML_DEST_ID",
    "OML_IDENT_SOURCE",
    "OML_CUSTOMER_ID",
    "OMLCODCLI",
)

NODE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
VARIABLE_RE = re.compile(r"_{0,2}[A-Za-z][A-Za-z0-9_]{0,63}")
SOUND_RE = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
CONTEXT_RE = re.compile(r"[A-Za-z0-9_-]{1,79}")
DTMF_DIGITS = frozenset("0123456789*#ABCD")
# Paths go into the dialplan and into FILE()'s comma-separated arguments unquoted.
SAFE_PATH_RE = re.compile(r"[A-Za-z0-9_./+-]+")
# A control socket's path must fit sockaddr_un.sun_path (108 bytes with the NUL).
MAX_SOCKET_PATH = 100
CALL_FILE_LINE_MAX = 1000  # pbx_spool skips lines of 1024 bytes or more

MODULES = (
    "res_timing_timerfd",  # timing for prompts, Wait and DTMF
    "pbx_config",  # extensions.conf
    "pbx_spool",  # call files
    "res_speech",  # res_agi requires it
    "res_agi",
    "app_stack",  # Gosub: hangup handlers and the harness's subroutines
    "app_senddtmf",
    "app_playback",
    "app_read",
    "app_verbose",
    "app_exec",  # ExecIf
    "app_while",
    "res_musiconhold",
    "codec_ulaw",
    "codec_alaw",
    "codec_gsm",
    "format_wav",
    "format_pcm",
    "format_sln",
    "format_gsm",
    "func_channel",  # CHANNEL(hangup_handler_push)
    "func_strings",  # STRFTIME
    "func_logic",
    "func_timeout",  # TIMEOUT(absolute)
    "func_callerid",
    "func_cut",
    "func_env",  # FILE(): how the hangup handlers write results
    "func_uri",  # URIENCODE: any recorded value fits on one line
    "func_global",
    "func_math",
)


class AsteriskUnavailable(RuntimeError):
    """No Asterisk binary here, and none could be built; the message says why."""


class AsteriskError(RuntimeError):
    """The private Asterisk failed to start, answer, or do what it was asked."""


# ---------------------------------------------------------------------------------------------
# Finding the binary


@lru_cache(maxsize=1)
def _ensure() -> tuple[Path | None, str]:
    try:
        done = subprocess.run(
            ["bash", str(ENSURE_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=ENSURE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{ENSURE_SCRIPT.name}: {exc}"
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return None, lines[-1] if lines else f"{ENSURE_SCRIPT.name} exited {done.returncode}"
    path = Path(done.stdout.strip().splitlines()[-1])
    if not os.access(path, os.X_OK):
        return None, f"{ENSURE_SCRIPT.name} printed {path}, which is not an executable"
    return path, ""


def require_asterisk() -> Path:
    """The Asterisk binary (see tools/asterisk/ensure_asterisk.sh for the search order; it
    builds from the tarball when nothing is found), or AsteriskUnavailable saying why.

    The answer is cached for the process: a failed build is not retried per test.
    """
    path, reason = _ensure()
    if path is None:
        raise AsteriskUnavailable(reason)
    return path


def find_asterisk() -> Path | None:
    """The Asterisk binary, or None; `asterisk_unavailable_reason()` then says why."""
    return _ensure()[0]


def asterisk_unavailable_reason() -> str:
    """Why `find_asterisk` returned None ("" when it did not)."""
    return _ensure()[1]


# ---------------------------------------------------------------------------------------------
# The caller's script


@dataclass(frozen=True)
class Wait:
    """The caller waits (silently) this many seconds."""

    seconds: float

    def encode(self) -> list[str]:
        if not (math.isfinite(self.seconds) and 0 <= self.seconds <= 3600):
            raise ValueError(f"Wait({self.seconds!r}): seconds must be within 0..3600")
        return [f"wait:{self.seconds:.3f}"] if self.seconds > 0 else []


@dataclass(frozen=True)
class Keys:
    """The caller keys `digits` as real DTMF (0-9 * # A-D).

    `gap_ms` is from the end of one digit to the start of the next; it is at least 100 ms,
    because SendDTMF always waits 100 ms before its first digit. The step starts with that
    100 ms of quiet too. `duration_ms` is how long each digit lasts (Asterisk's minimum for
    a Local channel is 100 ms).
    """

    digits: str
    gap_ms: int = 100
    duration_ms: int = 100

    def encode(self) -> list[str]:
        if not self.digits or not set(self.digits) <= DTMF_DIGITS:
            raise ValueError(f"Keys({self.digits!r}): digits must be 1+ of 0-9 * # A-D")
        if not 100 <= self.gap_ms <= 60_000:
            raise ValueError(f"Keys(gap_ms={self.gap_ms}): must be within 100..60000")
        if not 100 <= self.duration_ms <= 10_000:
            raise ValueError(f"Keys(duration_ms={self.duration_ms}): must be within 100..10000")
        steps: list[str] = []
        for index, digit in enumerate(self.digits):
            if index and self.gap_ms > 100:
                steps.append(f"wait:{(self.gap_ms - 100) / 1000:.3f}")
            steps.append(f"dtmf:{digit}:{self.duration_ms}")
        return steps


@dataclass(frozen=True)
class Hangup:
    """The caller hangs up (the inbound leg's AGI sees HANGUP)."""

    def encode(self) -> list[str]:
        return ["hangup"]


Step = Wait | Keys | Hangup


def encode_script(steps: Iterable[Step]) -> list[str]:
    """The primitive steps the caller dialplan runs (see the module docstring)."""
    encoded: list[str] = []
    for step in steps:
        encoded.extend(step.encode())
    return encoded


# ---------------------------------------------------------------------------------------------
# Calls and results


def new_call_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class Call:
    """One call to place: node `node` on inbound context `inbound_context`.

    `script` is what the caller does once the inbound leg answers; after it, the caller stays
    on the line until the inbound leg ends (or `max_seconds`, when Asterisk hangs the caller
    up, so a gateway that never lets go cannot keep a call alive). The script starts when the
    inbound leg answers: an inbound context that never answers never hears a key.
    `variables` are set on the caller leg and copied by the Local channel to the inbound leg
    before it runs (plain names; a `__` prefix makes them inherit further). `caller_number`
    becomes the inbound leg's CALLERID(num).
    """

    node: str
    script: Sequence[Step] = ()
    call_id: str = field(default_factory=new_call_id)
    inbound_context: str = INBOUND_CONTEXT
    variables: Mapping[str, str] = field(default_factory=dict)
    caller_number: str | None = None
    max_seconds: int = 60

    def validate(self) -> None:
        if not NODE_RE.fullmatch(self.node) or not self.node.strip("-"):
            raise ValueError(f"node {self.node!r}: 1-64 of A-Z a-z 0-9 _ - (not only dashes)")
        # Asterisk's own "h" extension ("-" is ignored in matching): no inbound pattern takes it.
        if self.node.replace("-", "") == "h":
            raise ValueError("node 'h' cannot be dialled: it is Asterisk's hang-up extension")
        if not CALL_ID_RE.fullmatch(self.call_id):
            raise ValueError(f"call_id {self.call_id!r}: 1-64 of A-Z a-z 0-9 _ . -")
        if not CONTEXT_RE.fullmatch(self.inbound_context):
            raise ValueError(f"inbound_context {self.inbound_context!r}: not a context name")
        if self.caller_number is not None and not re.fullmatch(
            r"\+?[0-9]{1,32}", self.caller_number
        ):
            raise ValueError(f"caller_number {self.caller_number!r}: digits, optional +")
        if not 1 <= self.max_seconds <= 3600:
            raise ValueError(f"max_seconds {self.max_seconds}: must be within 1..3600")
        for name, value in self.variables.items():
            if not VARIABLE_RE.fullmatch(name):
                raise ValueError(f"variable name {name!r}: not a channel variable name")
            # pbx_spool.c reads a call file line by line, cuts a "#" after white space as a
            # comment (no escape), and trims trailing white space; ";" is escaped for it.
            if re.search(r"[\r\n]|[ \t]#|\s$", value):
                raise ValueError(
                    f"variable {name}: a call file cannot carry line breaks, trailing white "
                    "space or a '#' after white space"
                )


@dataclass(frozen=True)
class CallResult:
    """What Asterisk recorded for one call.

    `inbound` holds everything the inbound leg's hangup handler recorded (the outcome
    variables, `record_variables`, AGISTATUS, ENDED, CHANNEL, HANGUPCAUSE, CALLERID_NUM,
    HANGUP_LOCATION...), as strings; an unset variable reads "". `caller` the same for the
    caller leg. `missing` names the legs that never recorded ("inbound", "caller").
    Timestamps are seconds since the epoch (time.time()'s clock) with millisecond precision.
    """

    call_id: str
    inbound: Mapping[str, str]
    caller: Mapping[str, str]
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing

    def var(self, name: str) -> str:
        """A variable recorded on the inbound leg ("" when unset or not recorded)."""
        return self.inbound.get(name, "")

    def _time(self, mapping: Mapping[str, str], name: str) -> float | None:
        value = mapping.get(name, "")
        return float(value) if value else None

    @property
    def node(self) -> str:
        return self.var("NODE")

    @property
    def agi_status(self) -> str:
        return self.var("AGISTATUS")

    @property
    def ended(self) -> str:
        """Where the call ended in the dialplan ("context,exten,priority"), "" if nowhere."""
        return self.var("ENDED")

    @property
    def outcome(self) -> str:
        return self.var("OML_IDENT_OUTCOME")

    @property
    def started_at(self) -> float | None:
        """When the inbound leg started its dialplan."""
        return self._time(self.inbound, "STARTED_AT")

    @property
    def agi_returned_at(self) -> float | None:
        return self._time(self.inbound, "AGI_RETURNED_AT")

    @property
    def hangup_at(self) -> float | None:
        """When the inbound leg's hangup handler ran."""
        return self._time(self.inbound, "HANGUP_AT")

    @property
    def last_key_at(self) -> float | None:
        """When the caller's last DTMF digit ended (within about 2 ms), None if no digit did.

        The caller leg stamps LAST_KEY_AT right after each digit's SendDTMF returns. If the
        far end hung up within that digit's 1 ms trailing sleep (a gateway answering the last
        digit at once), SendDTMF fails and no stamp is taken; the digit had ended, though, at
        KEY_SENDING_AT + SendDTMF's 100 ms of quiet + its duration, which is what this returns
        when that moment is not after the caller's hang-up. A digit cut short by the hang-up
        does not count: then the one before it was the last.
        """
        done = self._time(self.caller, "LAST_KEY_AT")
        sending = self._time(self.caller, "KEY_SENDING_AT")
        # Strictly after: the previous digit's end and the last digit's start are often
        # stamped in the same millisecond, and a digit lasts at least 200 ms.
        if sending is None or (done is not None and done > sending):
            return done
        duration_ms = self.caller.get("KEY_DURATION_MS", "")
        ended = sending + 0.1 + (int(duration_ms) if duration_ms.isdigit() else 100) / 1000
        hangup = self.caller_hangup_at
        if hangup is not None and ended <= hangup:
            return ended
        return done

    @property
    def caller_hangup_at(self) -> float | None:
        return self._time(self.caller, "HANGUP_AT")

    @property
    def caller_failed(self) -> str:
        """The originate failure reason (pbx.c's REASON) when the caller leg never came up."""
        return self.caller.get("FAILED_REASON", "")


def parse_record(line: str) -> tuple[str, str, dict[str, str]] | None:
    """(leg, call id, fields) from one results.log line; None for a line that is not one."""
    fields: dict[str, str] = {}
    for part in line.strip().split("&"):
        name, sep, value = part.partition("=")
        if not sep:
            return None
        # URIENCODE leaves only A-Z a-z 0-9 - _ . ! ~ * ' ( ) unencoded: no "&", "=" or "+".
        fields[name] = unquote(value)
    leg = fields.pop("rec", "")
    call_id = fields.pop("call", "")
    if leg not in ("inbound", "caller") or not call_id:
        return None
    return leg, call_id, fields


class _Results:
    """results.log, read incrementally: records by call id (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._records: dict[str, dict[str, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def poll(self) -> None:
        with self._lock:
            try:
                with self.path.open("rb") as f:
                    f.seek(self._offset)
                    chunk = f.read()
            except FileNotFoundError:
                return
            end = chunk.rfind(b"\n")
            if end < 0:
                return  # nothing complete yet: a line is only read once its newline is there
            self._offset += end + 1
            for raw in chunk[: end + 1].splitlines():
                parsed = parse_record(raw.decode("utf-8", "replace"))
                if parsed is not None:
                    leg, call_id, fields = parsed
                    self._records.setdefault(call_id, {})[leg] = fields

    def get(self, call_id: str) -> CallResult:
        with self._lock:
            legs = self._records.get(call_id, {})
            missing = tuple(leg for leg in ("inbound", "caller") if leg not in legs)
            return CallResult(
                call_id=call_id,
                inbound=dict(legs.get("inbound", {})),
                caller=dict(legs.get("caller", {})),
                missing=missing,
            )


# ---------------------------------------------------------------------------------------------
# Sounds


def write_wav(path: Path, seconds: float, tone_hz: float | None = None) -> None:
    """An 8 kHz mono 16-bit WAV of exactly round(seconds*8000) samples: silence, or a quiet
    sine tone."""
    samples = round(seconds * SAMPLE_RATE)
    if tone_hz is None:
        frames = bytes(2 * samples)
    else:
        frames = b"".join(
            struct.pack("<h", round(2000 * math.sin(2 * math.pi * tone_hz * n / SAMPLE_RATE)))
            for n in range(samples)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(frames)


def system_sounds_dir() -> Path | None:
    """Debian's core prompts (asterisk-core-sounds-en-wav: en_US_f_Allison, linked as `en`
    only when asterisk-core-sounds-en is installed too)."""
    for candidate in (
        Path("/usr/share/asterisk/sounds/en"),
        Path("/usr/share/asterisk/sounds/en_US_f_Allison"),
    ):
        if (candidate / "digits").is_dir():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Dialplan


def inbound_context(
    name: str,
    after_agi: Sequence[str] = (MARK_ENDED, "Hangup()"),
    *,
    answer: str = "raw",
    agi_args: Sequence[str] = (),
) -> str:
    """The text of an inbound (AGI) context for `add_dialplan`: it takes any node id but "h"
    as its extension, runs the harness's set-up (the hangup handler that records the call,
    start time, answer), then `AGI(agi://${GATEWAY}/identify/<node>[,agi_args...])` at priority
    `AGI_PRIORITY`, sets AGI_RETURNED_AT, then runs `after_agi` (dialplan applications, one
    per priority; labels as `(name)App(...)`).

    `answer`: "raw" answers at once (Answer(,i)); "full" is a plain Answer(), which on a
    Local channel waits up to 500 ms for media the caller never sends; "none" leaves the
    channel ringing, and then the caller's script never starts (it starts on answer).
    """
    if not CONTEXT_RE.fullmatch(name):
        raise ValueError(f"context {name!r}: not a context name")
    if answer not in ("raw", "full", "none"):
        raise ValueError(f"answer={answer!r}: one of raw, full, none")
    agi = "AGI(agi://${GATEWAY}/identify/${EXTEN}" + "".join(f",{a}" for a in agi_args) + ")"
    body = [
        # First of all: a channel hung up early runs only its first priority.
        "Set(CHANNEL(hangup_handler_push)=callerid-inbound-record,s,1)",
        f"Gosub(callerid-inbound-setup,s,1({answer},${{EXTEN}}))",
        agi,
        f"Set(AGI_RETURNED_AT={NOW})",
        *after_agi,
    ]
    lines = [f"[{name}]"]
    # Node ids are letters, digits, "_" and "-" ("-" is ignored in matching). One pattern
    # would match "h" too, and then a call that ends in this context would run it (the AGI!)
    # again as its h extension; with a literal h beside it, the pattern's later priorities
    # run again after h,1. So two patterns that together match every id except "h" itself.
    for pattern in ("_[0-9a-gi-zA-Z_]!", "_h[0-9a-zA-Z_]!"):
        for priority, app in enumerate(body, start=1):
            label = ""
            if app.startswith("("):
                label, _, app = app[1:].partition(")")
                label = f"({label})"
            head = f"exten => {pattern},1" if priority == 1 else f" same => n{label}"
            lines.append(f"{head},{app}")
    return "\n".join(lines) + "\n"


def destination_context(name: str) -> str:
    """A jump target like `oml-dest-1`: any numeric extension records where it landed
    (ENDED=<context>,<exten>,1, and AGI_RETURNED_AT unless already set, for an AGI that
    jumped straight here) and hangs up."""
    if not CONTEXT_RE.fullmatch(name):
        raise ValueError(f"context {name!r}: not a context name")
    return (
        f"[{name}]\n"
        f"exten => _[0-9]!,1,{MARK_ENDED}\n"
        f" same => n,{MARK_AGI_RETURNED}\n"
        " same => n,Hangup()\n"
    )


def _record_line(leg: str, items: Sequence[tuple[str, str]]) -> str:
    fields = "".join(f"&{name}=${{URIENCODE({expr})}}" for name, expr in items)
    return (
        "Set(FILE(${CALLERID_RESULTS},,,al,u)="
        f"rec={leg}&call=${{URIENCODE(${{CALL_ID}})}}{fields})"
    )


def base_dialplan(results_path: Path, record_variables: Sequence[str]) -> str:
    """extensions.conf: the harness's contexts (see the module docstring)."""
    # Recorded under the bare name: "__X" is set with its underscores, read without them.
    recorded = list(dict.fromkeys([*OUTCOME_VARIABLES, *(v.lstrip("_") for v in record_variables)]))
    inbound_items = [
        ("NODE", "${INBOUND_NODE}"),
        ("CHANNEL", "${CHANNEL(name)}"),
        ("CALLERID_NUM", "${CALLERID(num)}"),
        ("STARTED_AT", "${INBOUND_STARTED_AT}"),
        ("AGI_RETURNED_AT", "${AGI_RETURNED_AT}"),
        ("HANGUP_AT", NOW),
        ("AGISTATUS", "${AGISTATUS}"),
        ("ENDED", "${ENDED}"),
        ("HANGUPCAUSE", "${HANGUPCAUSE}"),
        # Where the channel was when it hung up: the frame the handler's Gosub pushed.
        (
            "HANGUP_LOCATION",
            "${STACK_PEEK(1,c,1)},${STACK_PEEK(1,e,1)},${STACK_PEEK(1,p,1)}",
        ),
        *((name, f"${{{name}}}") for name in recorded),
    ]
    caller_items = [
        ("STARTED_AT", "${CALLER_STARTED_AT}"),
        ("LAST_KEY_AT", "${LAST_KEY_AT}"),
        ("KEY_SENDING_AT", "${KEY_SENDING_AT}"),
        ("KEY_DURATION_MS", "${KEY_DURATION_MS}"),
        ("STEPS_DONE", "${STEPS_DONE}"),
        ("HUNG_UP_BY_SCRIPT", "${CALLER_HUNGUP}"),
        ("HANGUP_AT", NOW),
    ]
    dests = "\n".join(destination_context(f"oml-dest-{t}") for t in DEST_TYPES)
    return f"""\
; Written by tools/pbx.py for a private test instance. Rewritten on every add_dialplan().
[general]
static = yes
writeprotect = yes
clearglobalvars = yes

[globals]
CALLERID_RESULTS = {results_path}

; The call file start() uses to see that the spool is live.
[callerid-warm-up]
exten => s,1,Answer(,i)
 same => n,Hangup()

; ---- the inbound (;2) leg ------------------------------------------------------------------
{inbound_context(INBOUND_CONTEXT)}
; Gosub(callerid-inbound-setup,s,1(<raw|full|none>,<node>)) from an inbound context's first
; priority: start time, the recording hangup handler, then the answer.
[callerid-inbound-setup]
exten => s,1,Set(INBOUND_STARTED_AT={NOW})
 same => n,Set(INBOUND_NODE=${{ARG2}})
 same => n,GotoIf($["${{ARG1}}" = "none"]?done)
 same => n,GotoIf($["${{ARG1}}" = "full"]?full)
 same => n,Answer(,i)
 same => n,Goto(done)
 same => n(full),Answer()
 same => n(done),Return()

; Hangup handler of the inbound leg: runs on every path, after the dialplan is done.
[callerid-inbound-record]
exten => s,1,{_record_line("inbound", inbound_items)}
 same => n,Return()

; ---- jump targets ----------------------------------------------------------------------------
{dests}
; ---- the caller (;1) leg ---------------------------------------------------------------------
; Starts once the inbound leg answers; runs CALLER_SCRIPT (CALLER_STEPS steps), then stays
; on the line: its Wait ends when the inbound leg hangs up (or at CALL_MAX_SECONDS).
[{CALLER_CONTEXT}]
; The handler first: when the inbound leg answers and hangs up at once, the caller leg is
; hung up before it starts, and Asterisk runs only its first priority.
exten => s,1,Set(CHANNEL(hangup_handler_push)=callerid-caller-record,s,1)
 same => n,Set(CALLER_STARTED_AT={NOW})
 same => n,Set(TIMEOUT(absolute)=${{CALL_MAX_SECONDS}})
 same => n,Set(STEPS_DONE=0)
 same => n(next),GotoIf($[${{STEPS_DONE}} >= ${{CALLER_STEPS}}]?hold)
 same => n,Set(STEP=${{CUT(CALLER_SCRIPT,/,$[${{STEPS_DONE}} + 1])}})
 same => n,Gosub(callerid-caller-step,${{CUT(STEP,:,1)}},1(${{CUT(STEP,:,2)}},${{CUT(STEP,:,3)}}))
 same => n,Set(STEPS_DONE=$[${{STEPS_DONE}} + 1])
 same => n,Goto(next)
 same => n(hold),Wait(${{CALL_MAX_SECONDS}})
 same => n,Hangup()
; pbx.c runs this (on a dummy channel with the call file's variables) when the originate
; fails, e.g. the inbound leg hung up without answering: the caller still records.
exten => failed,1,{_record_line("caller", [("FAILED_REASON", "${REASON}"), ("HANGUP_AT", NOW)])}
 same => n,Hangup()

[callerid-caller-step]
exten => wait,1,Wait(${{ARG1}})
 same => n,Return()
; A 1 ms gap: SendDTMF returns right after the digit ends, so LAST_KEY_AT is that moment.
; But when the far end hangs up at once on that digit, the hang-up cuts the 1 ms sleep and
; the dialplan stops before LAST_KEY_AT: KEY_SENDING_AT lets CallResult work it out then.
exten => dtmf,1,Set(KEY_SENDING_AT={NOW})
 same => n,Set(KEY_DURATION_MS=${{ARG2}})
 same => n,SendDTMF(${{ARG1}},1,${{ARG2}})
 same => n,Set(LAST_KEY_AT={NOW})
 same => n,Return()
exten => hangup,1,Set(CALLER_HUNGUP=1)
 same => n,Hangup()

[callerid-caller-record]
exten => s,1,{_record_line("caller", caller_items)}
 same => n,Return()
"""


# ---------------------------------------------------------------------------------------------
# The instance


def _modules_dir(binary: Path) -> Path | None:
    prefix = binary.resolve().parent.parent
    candidates = [
        prefix / "lib" / "asterisk" / "modules",
        prefix / "lib64" / "asterisk" / "modules",
        *sorted(prefix.glob("lib/*/asterisk/modules")),
    ]
    for candidate in candidates:
        if (candidate / "res_agi.so").is_file():
            return candidate
    return None


def _documentation_dir(binary: Path) -> Path | None:
    # AGI's 520 usage text comes from the XML documentation.
    prefix = binary.resolve().parent.parent
    for candidate in (
        prefix / "var" / "lib" / "asterisk" / "documentation",
        prefix / "share" / "asterisk" / "documentation",
        Path("/usr/share/asterisk/documentation"),
        Path("/var/lib/asterisk/documentation"),
    ):
        if candidate.is_dir():
            return candidate
    return None


_PR_SET_PDEATHSIG = 1


@lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    # Looked up in the parent: a dlopen() between fork and exec could deadlock.
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent() -> None:
    # In the child before exec: if the test process dies (even SIGKILL), so does Asterisk.
    # The signal follows the *thread* that started it: start from a long-lived thread.
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class PrivateAsterisk:
    """One private Asterisk under `workdir` (created if needed); see the module docstring.

    Use as a context manager, or `start()` / `stop()`. `verbose` is Asterisk's verbosity in
    the full log (`log_path`); 0 keeps CPU for calls (bench). `record_variables` are recorded
    from the inbound leg besides the OML outcome variables.
    """

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        *,
        verbose: int = 0,
        record_variables: Sequence[str] = (),
        extra_modules: Sequence[str] = (),
        modules_dir: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.binary = Path(binary)
        self.workdir = Path(workdir).resolve()
        if not SAFE_PATH_RE.fullmatch(str(self.workdir)):
            raise ValueError(f"workdir {self.workdir}: only A-Z a-z 0-9 _ . / + - please")
        for name in record_variables:
            if not VARIABLE_RE.fullmatch(name):
                raise ValueError(f"record_variables: {name!r} is not a variable name")
        self.verbose = verbose
        self.record_variables = tuple(record_variables)
        self.extra_modules = tuple(extra_modules)
        self.die_with_parent = die_with_parent
        found = modules_dir or _modules_dir(self.binary)
        if found is None:
            raise AsteriskError(f"no modules directory (with res_agi.so) for {self.binary}")
        self.modules_dir = found
        self.etc_dir = self.workdir / "etc"
        self.data_dir = self.workdir / "data"
        self.sounds_dir = self.data_dir / "sounds" / "en"
        self.agi_dir = self.data_dir / "agi-bin"
        self.spool_dir = self.workdir / "spool"
        self.log_dir = self.workdir / "log"
        self.log_path = self.log_dir / "full"
        self.results_path = self.workdir / "results.log"
        self.config_path = self.etc_dir / "asterisk.conf"
        self.moh_dir = self.workdir / "moh"
        self._staging = self.workdir / "callfiles"
        self._run_dir = self.workdir / "run"
        self._own_run_dir = False
        self._dialplan: dict[str, str] = {}
        self._generation = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout_file: Path = self.workdir / "asterisk.out"
        self._results = _Results(self.results_path)
        self.system_sounds = system_sounds_dir()
        self.start_seconds: float | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> PrivateAsterisk:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start Asterisk, return once it is fully booted."""
        if self._proc is not None:
            raise AsteriskError("already started")
        started = time.monotonic()
        self._prepare()
        if self.die_with_parent:
            _prctl()
        out = self._stdout_file.open("ab")
        try:
            self._proc = subprocess.Popen(
                [str(self.binary), "-f", "-n", "-C", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C at the terminal is the harness's to handle
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            out.close()
        atexit.register(self._kill)
        try:
            self._wait_booted(started + timeout)
            self._wait_spool(started + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _wait_booted(self, deadline: float) -> None:
        socket_path = self._run_dir / "asterisk.ctl"
        while not socket_path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise AsteriskError(f"no control socket after start-up; see {self._stdout_file}")
            time.sleep(0.02)
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AsteriskError(f"not fully booted in time; see {self.log_path}")
            try:
                done = self._remote("core waitfullybooted", timeout=remaining)
            except subprocess.TimeoutExpired:
                continue
            if done.returncode == 0 and "fully booted" in done.stdout:
                return
            time.sleep(0.05)

    def _wait_spool(self, deadline: float) -> None:
        # pbx_spool looks at the spool only once it sees Asterisk fully booted, polling for
        # that once a second: without this, the first call could start a second late. A
        # warm-up call file is consumed once the spool is live.
        source = self._staging / "warm-up.call"
        source.write_text("Channel: Local/s@callerid-warm-up\nApplication: NoOp\nMaxRetries: 0\n")
        target = self.spool_dir / "outgoing" / source.name
        source.rename(target)
        while target.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise AsteriskError("the call-file spool did not start in time")
            time.sleep(0.02)

    def _check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = self._stdout_file.read_text(errors="replace")[-2000:]
            raise AsteriskError(f"Asterisk exited during start-up:\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Asterisk (`core stop now`, then SIGTERM, then SIGKILL, by PID); idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self._remote("core stop now", timeout=timeout)
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                try:
                    proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._proc = None
        atexit.unregister(self._kill)
        if self._own_run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def _kill(self) -> None:
        # atexit: the test process is going away without stop().
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)

    # -- configuration ----------------------------------------------------------------------

    def _prepare(self) -> None:
        for directory in (
            self.etc_dir,
            self.data_dir,
            self.agi_dir,
            self.spool_dir / "outgoing",
            self.log_dir,
            self.moh_dir,
            self._staging,
            self.workdir / "lib" / "keys",
            self.workdir / "cache",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        self._run_dir = self.workdir / "run"
        self._own_run_dir = len(str(self._run_dir / "asterisk.ctl")) > MAX_SOCKET_PATH
        if self._own_run_dir:
            self._run_dir = Path(tempfile.mkdtemp(prefix="ast-"))  # removed by stop()
        else:
            self._run_dir.mkdir(exist_ok=True)
        documentation = _documentation_dir(self.binary)
        link = self.data_dir / "documentation"
        if documentation is not None and not link.exists():
            link.symlink_to(documentation)
        self._prepare_sounds()
        self._write_configs()

    def _prepare_sounds(self) -> None:
        self.sounds_dir.mkdir(parents=True, exist_ok=True)
        # A real directory of links, not one link: the test prompts live beside the system's.
        if self.system_sounds is not None:
            for entry in self.system_sounds.iterdir():
                link = self.sounds_dir / entry.name
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(entry)
        write_wav(self.sounds_dir / f"{PROMPT}.wav", 1.0)
        write_wav(self.sounds_dir / f"{LONG_PROMPT}.wav", 4.0)
        write_wav(self.sounds_dir / f"{CONFIRM_PROMPT}.wav", 1.0)
        write_wav(self.moh_dir / "hold.wav", 3.0, tone_hz=425.0)

    def add_sound(self, name: str, seconds: float = 1.0, tone_hz: float | None = None) -> str:
        """Make prompt `name` (e.g. "customer-id-prompt"): `seconds` of silence or a tone.
        Returns the name to give Asterisk. Works before and after start()."""
        if not SOUND_RE.fullmatch(name):
            raise ValueError(f"sound name {name!r}: letters, digits, _ - and / only")
        write_wav(self.sounds_dir / f"{name}.wav", seconds, tone_hz)
        return name

    def _write_configs(self) -> None:
        run = self._run_dir
        w = self.workdir
        self.config_path.write_text(
            f"""\
[directories]
astcachedir => {w}/cache
astetcdir => {self.etc_dir}
astmoddir => {self.modules_dir}
astvarlibdir => {w}/lib
astdbdir => {w}/lib
astkeydir => {w}/lib/keys
astdatadir => {self.data_dir}
astagidir => {self.agi_dir}
astspooldir => {self.spool_dir}
astrundir => {run}
astlogdir => {self.log_dir}
astsbindir => {self.binary.resolve().parent}

[options]
verbose = {self.verbose}
debug = 0
documentation_language = en_US
defaultlanguage = en
hideconnect = yes
lockconfdir = no
transmit_silence = no
"""
        )
        modules = list(dict.fromkeys([*MODULES, *self.extra_modules]))
        loads = "".join(
            f"load => {m}.so\n" for m in modules if (self.modules_dir / f"{m}.so").is_file()
        )
        configs = {
            "modules.conf": f"[modules]\nautoload = no\n{loads}",
            "logger.conf": (
                "[general]\ndateformat = %F %T.%3q\n\n"
                "[logfiles]\nfull => notice,warning,error,verbose,debug,dtmf\n"
            ),
            "musiconhold.conf": f"[{MOH_CLASS}]\nmode = files\ndirectory = {self.moh_dir}\n",
            # No listeners and no bookkeeping nobody reads (these are in the core).
            "manager.conf": "[general]\nenabled = no\n",
            "http.conf": "[general]\nenabled = no\n",
            "cdr.conf": "[general]\nenable = no\n",
            "cel.conf": "[general]\nenable = no\n",
            "indications.conf": (
                "[general]\ncountry = us\n\n[us]\ndescription = United States\n"
                "ringcadence = 2000,4000\ndial = 350+440\nbusy = 480+620/500,0/500\n"
                "ring = 440+480/2000,0/4000\ncongestion = 480+620/250,0/250\n"
            ),
            # Present, so that start-up does not log an error for each; defaults suit us.
            "ccss.conf": "[general]\n",
            "features.conf": "[general]\n",
            "acl.conf": "",
            "udptl.conf": "[general]\n",
        }
        for name, text in configs.items():
            (self.etc_dir / name).write_text(text)
        self._write_dialplan()

    def _write_dialplan(self) -> None:
        text = base_dialplan(self.results_path, self.record_variables)
        extra = "".join(f"\n; ---- added: {key}\n{body}" for key, body in self._dialplan.items())
        # What _reload_dialplan checks for; first, so a later syntax error cannot hide it.
        text = text.replace(
            "\n[globals]",
            f"\n[callerid-generation-{self._generation}]\nexten => s,1,NoOp()\n\n[globals]",
            1,
        )
        tmp = self.etc_dir / "extensions.conf.tmp"
        tmp.write_text(text + extra)
        tmp.replace(self.etc_dir / "extensions.conf")

    def add_dialplan(self, key: str, text: str) -> None:
        """Add (or replace, by `key`) contexts, e.g. `inbound_context("my-inbound", ...)`,
        and reload the dialplan if running. If Asterisk does not take it (a syntax error,
        a context it names missing), the text is dropped again and AsteriskError raised.
        Calls in progress carry on."""
        previous = self._dialplan.get(key)
        self._dialplan[key] = text
        try:
            self._reload_dialplan(re.findall(r"^\[([^\]]+)\]", text, flags=re.MULTILINE))
        except AsteriskError:
            if previous is None:
                del self._dialplan[key]
            else:
                self._dialplan[key] = previous
            self._reload_dialplan([])
            raise

    def remove_dialplan(self, key: str) -> None:
        if self._dialplan.pop(key, None) is not None:
            self._reload_dialplan([])

    def add_record_variables(self, *names: str) -> None:
        """Record these variables from the inbound leg too (from the next call on)."""
        for name in names:
            if not VARIABLE_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a variable name")
        self.record_variables = tuple(dict.fromkeys([*self.record_variables, *names]))
        self._reload_dialplan([])

    def _reload_dialplan(self, contexts: Sequence[str]) -> None:
        self._generation += 1
        self._write_dialplan()
        if not self.running:
            return
        # Synchronous: calls placed after this see the new dialplan. A file Asterisk cannot
        # parse leaves the old dialplan in place with only a log line, so each version of
        # the file carries a context of its own to look for.
        self.cli("dialplan reload")
        for context in (f"callerid-generation-{self._generation}", *contexts):
            if "There is no existence" in self.cli(f"dialplan show {context}"):
                raise AsteriskError(f"context {context} did not load; see {self.log_path}")

    # -- talking to it ----------------------------------------------------------------------

    def _remote(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), "-C", str(self.config_path), "-rx", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli(self, command: str, timeout: float = 10.0) -> str:
        """Run one CLI command on the instance (`asterisk -rx`) and return its output."""
        if not self.running:
            raise AsteriskError("not running")
        done = self._remote(command, timeout)
        if done.returncode != 0:
            raise AsteriskError(f"{command!r}: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def set_agi_debug(self, on: bool = True) -> None:
        """`agi set debug on|off`: every AGI line both ways goes to the full log (`log_path`)
        as `<channel>AGI Tx >> ...` / `AGI Rx << ...`."""
        self.cli(f"agi set debug {'on' if on else 'off'}")

    def set_verbose(self, level: int) -> None:
        self.cli(f"core set verbose {level}")

    def log_size(self) -> int:
        """A mark in the full log, for `log_since`."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def active_channels(self) -> int:
        """How many channels exist right now (`core show channels count`)."""
        out = self.cli("core show channels count")
        match = re.search(r"(\d+) active channels?", out)
        if match is None:
            raise AsteriskError(f"core show channels count: {out.strip()!r}")
        return int(match.group(1))

    def cpu_seconds(self) -> float:
        """CPU time Asterisk has used so far (user + system, all threads; children excluded),
        from /proc/<pid>/stat. Take it before and after a load for CPU per call."""
        if self._proc is None:
            raise AsteriskError("not running")
        return process_cpu_seconds(self._proc.pid)

    def listening_inet_sockets(self) -> list[str]:
        """TCP sockets Asterisk listens on and UDP sockets it has bound (should be none)."""
        if self._proc is None:
            raise AsteriskError("not running")
        return inet_sockets(self._proc.pid)

    # -- calls ------------------------------------------------------------------------------

    def place_calls(self, calls: Iterable[Call], gateway: str) -> list[str]:
        """Originate `calls` at once against the FastAGI server at `gateway` ("host:port");
        returns their call ids. All call files are written first, then renamed into the
        spool together, so Asterisk originates them in parallel."""
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}", gateway):
            raise ValueError(f"gateway {gateway!r}: host:port")
        if not self.running:
            raise AsteriskError("not running")
        texts: dict[str, str] = {}
        for call in calls:  # everything checked before anything is written
            call.validate()
            if call.call_id in texts:
                raise ValueError(f"call_id {call.call_id!r} used twice")
            texts[call.call_id] = self._call_file(call, gateway)
        staged: list[tuple[Path, Path]] = []
        for call_id, text in texts.items():
            source = self._staging / f"{call_id}.call"
            source.write_text(text)
            staged.append((source, self.spool_dir / "outgoing" / source.name))
        for source, target in staged:
            source.rename(target)  # atomic: pbx_spool never sees a half-written file
        return list(texts)

    def place_call(self, call: Call, gateway: str) -> str:
        return self.place_calls([call], gateway)[0]

    def _call_file(self, call: Call, gateway: str) -> str:
        steps = encode_script(call.script)
        variables = {
            "CALL_ID": call.call_id,
            "GATEWAY": gateway,
            "CALLER_SCRIPT": "/".join(steps),
            "CALLER_STEPS": str(len(steps)),
            "CALL_MAX_SECONDS": str(call.max_seconds),
            **call.variables,
        }
        lines = [
            f"Channel: Local/{call.node}@{call.inbound_context}",
            f"Context: {CALLER_CONTEXT}",
            "Extension: s",
            "Priority: 1",
            "MaxRetries: 0",
            f"WaitTime: {call.max_seconds}",
            "Archive: no",
        ]
        if call.caller_number is not None:
            lines.append(f"CallerID: <{call.caller_number}>")
        # pbx_spool.c cuts a line at an unescaped ";" (a comment).
        lines.extend(
            f"Setvar: {name}={value.replace(';', chr(92) + ';')}"
            for name, value in variables.items()
        )
        for line in lines:
            if len(line) >= CALL_FILE_LINE_MAX:
                raise ValueError(f"call {call.call_id}: call-file line too long: {line[:60]}...")
        return "\n".join(lines) + "\n"

    def result(self, call_id: str) -> CallResult:
        """What has been recorded for `call_id` so far (missing legs listed)."""
        self._results.poll()
        return self._results.get(call_id)

    def wait_for_results(
        self, call_ids: Iterable[str], timeout: float = 30.0
    ) -> dict[str, CallResult]:
        """Wait until every call recorded both legs, at most `timeout` seconds; calls still
        incomplete then come back with `missing` set (never an exception, never a hang)."""
        ids = list(call_ids)
        deadline = time.monotonic() + timeout
        while True:
            results = {call_id: self.result(call_id) for call_id in ids}
            if all(r.complete for r in results.values()) or time.monotonic() >= deadline:
                return results
            time.sleep(0.02)

    async def wait_for_results_async(
        self, call_ids: Iterable[str], timeout: float = 30.0
    ) -> dict[str, CallResult]:
        """`wait_for_results` for an event loop that must keep running meanwhile (e.g. the
        FastAGI server the calls talk to)."""
        ids = list(call_ids)
        deadline = time.monotonic() + timeout
        while True:
            results = {call_id: self.result(call_id) for call_id in ids}
            if all(r.complete for r in results.values()) or time.monotonic() >= deadline:
                return results
            await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# The AGI transcript in the full log

_AGI_LINE = re.compile(
    r"\[(?P<callid>C-[0-9a-f]+)\] res_agi\.c: (?:<(?P<channel>[^>]*)>)?"
    r"AGI (?P<dir>Tx >>|Rx <<) (?P<text>.*)$"
)


def agi_transcript(log_text: str, channel: str) -> list[tuple[str, str]]:
    """The AGI conversation of `channel` (a CallResult's inbound CHANNEL) from full-log text
    written with `set_agi_debug(True)`: ("Tx", line) for what Asterisk sent, ("Rx", line)
    for what it received, in order.

    res_agi logs the first environment lines (agi_network, agi_network_script) without the
    channel name, so lines are matched by the log's call id ([C-...]) of the channel's lines.
    """
    matches = [m for m in map(_AGI_LINE.search, log_text.splitlines()) if m is not None]
    callids = {m["callid"] for m in matches if m["channel"] == channel}
    return [
        ("Tx" if m["dir"].startswith("Tx") else "Rx", m["text"])
        for m in matches
        if m["callid"] in callids
    ]


# ---------------------------------------------------------------------------------------------
# /proc helpers


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` in seconds (/proc/<pid>/stat fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def inet_sockets(pid: int) -> list[str]:
    """Listening TCP and bound UDP sockets (IPv4 and IPv6) held by process `pid`, as
    "tcp 0.0.0.0:5060"-like strings."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: list[str] = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            table = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in table:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            listening = state == "0A" if proto.startswith("tcp") else True
            if inode in inodes and listening:
                found.append(f"{proto} {local}")
    return found
