"""A simulated Asterisk 22 FastAGI client, for tests and for load from the command line.

It does what Asterisk does when the dialplan runs `AGI(agi://host:port/identify/<node>)`:
connect, send the environment in several writes, answer every command the way res_agi.c
would, and, when the gateway closes the socket, report where the dialplan would continue.

The emulation is split like the gateway's own code: `SimulatedChannel` is the channel and
res_agi's command handling with no I/O (a command line in, reply text out); `run_call` does the
socket, the timers and the script's hang-ups around it.

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

Anything the gateway sends that real Asterisk would reject or misread is recorded in
`CallResult.protocol_errors`, so a test can assert there is none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tools.stats import percentile

HangupMode = Literal[None, "prompt", "lookup", "before_env_end"]

OUTCOME_VARIABLE = "OML_IDENT_OUTCOME"
AGI_BUF_LEN = 2048  # res_agi reads a command into a buffer this size
_READ_CHUNK = 4096
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
    variables: dict[str, str]  # every SET VARIABLE applied (unquoted values), last wins
    commands: list[str]  # every command line received, in order
    context: str  # where the dialplan continues after AGI() returns
    extension: str
    priority: int
    hung_up: bool  # the simulated caller hung up
    closed_by_gateway: bool  # False if we gave up waiting for the gateway to close
    last_digit_at: float | None  # monotonic time the last GET DATA reply with digits was sent
    decided_at: float | None  # monotonic time SET VARIABLE OML_IDENT_OUTCOME arrived
    protocol_errors: list[str]  # what real Asterisk would have rejected or misread


def parse_args(line: str) -> tuple[list[str], bool]:
    """Split a command line as res_agi's parse_args does; also say if a quote or escape is
    left open (Asterisk accepts that silently, which is how injected text goes unnoticed)."""
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
    "EXEC": _usage(" Usage: EXEC <application> <options>"),
    "SET CONTEXT": _usage(" Usage: SET CONTEXT <desired context>"),
    "SET EXTENSION": _usage(" Usage: SET EXTENSION <new extension>"),
    "SET PRIORITY": _usage(" Usage: SET PRIORITY <priority>"),
    "SET MUSIC": _usage(" Usage: SET MUSIC <on|off> <class>"),
    "VERBOSE": _usage(" Usage: VERBOSE <message> <level>"),
}

_KNOWN_APPLICATIONS = {"goto", "noop", "set", "log", "verbose", "playback", "wait", "answer"}


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
        reply = method(argv)
        if reply is None:
            self._error(f"bad arguments: {line[:60]!r}")
            return _USAGE[words]
        return reply

    def _error(self, message: str) -> None:
        self.protocol_errors.append(message)

    def _find(
        self, argv: Sequence[str]
    ) -> tuple[str, Callable[[Sequence[str]], str | None], bool] | None:
        upper = [word.upper() for word in argv]
        for words, (method, dead_safe) in self._table().items():
            parts = words.split(" ")
            if upper[: len(parts)] == parts:
                return words, method, dead_safe
        return None

    def _table(self) -> dict[str, tuple[Callable[[Sequence[str]], str | None], bool]]:
        return {
            "ANSWER": (self._answer, False),
            "CHANNEL STATUS": (self._channel_status, False),
            "GET DATA": (self._get_data, False),
            "STREAM FILE": (self._stream_file, False),
            "SAY DIGITS": (self._say_digits, False),
            "WAIT FOR DIGIT": (self._wait_for_digit, False),
            "SET VARIABLE": (self._set_variable, True),
            "GET VARIABLE": (self._get_variable, True),
            "GET FULL VARIABLE": (self._get_full_variable, True),
            "EXEC": (self._exec, True),
            "SET CONTEXT": (self._set_context, False),
            "SET EXTENSION": (self._set_extension, False),
            "SET PRIORITY": (self._set_priority, False),
            "SET MUSIC": (self._set_music, False),
            "VERBOSE": (self._verbose, True),
            "NOOP": (lambda argv: "200 result=0", True),
            "HANGUP": (self._hangup, False),
        }

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
        self.variables[argv[2]] = argv[3]
        if argv[2] == OUTCOME_VARIABLE:
            self.decided_at = self._clock()
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
            self.variables[name] = value
        return "200 result=0"

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

    def _hangup(self, argv: Sequence[str]) -> str | None:
        # The gateway hangs the channel up itself: Asterisk then notices and sends HANGUP.
        self.hangup_after_reply = True
        return "200 result=1"


def environment_writes(script: CallScript, host: str, port: int) -> list[bytes]:
    """The environment as Asterisk 22 writes it: network lines first, several writes."""
    script_path = "identify" if script.node_in_arg else f"identify/{script.node}"
    network = [
        ("agi_network", "yes"),
        ("agi_network_script", script_path),
        ("agi_request", f"agi://{host}:{port}/{script_path}"),
    ]
    channel = [
        ("agi_channel", f"PJSIP/trunk-{script.uniqueid.replace('.', '')[-8:]}"),
        ("agi_language", "en"),
        ("agi_type", "PJSIP"),
        ("agi_uniqueid", script.uniqueid),
        ("agi_version", "22.1.0"),
        ("agi_callerid", script.caller_number),
        ("agi_calleridname", script.caller_name),
        ("agi_callingpres", "0"),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", "unknown"),
        ("agi_rdnis", "unknown"),
    ]
    dialplan = [
        ("agi_context", script.context),
        ("agi_extension", script.extension),
        ("agi_priority", str(script.priority)),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", ""),
        ("agi_threadid", "140234567890"),
    ]
    arguments = [("agi_arg_1", script.node)] if script.node_in_arg else []
    blocks = [network, channel, dialplan, arguments]

    def encode(lines: list[tuple[str, str]]) -> bytes:
        # Empty values keep the space after the colon, as Asterisk's "%s: %s\n" writes them.
        return "".join(f"{name}: {value}\n" for name, value in lines).encode()

    return [*(encode(block) for block in blocks[:-1]), encode(blocks[-1]) + b"\n"]


async def run_call(
    host: str,
    port: int,
    script: CallScript,
    *,
    # Not asyncio.timeout(): running out of time is a result here (a hung channel), not an error.
    timeout: float = 30.0,
) -> CallResult:
    """Place one simulated call against a FastAGI server and report what it did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    channel = SimulatedChannel(script)
    async with asyncio.timeout_at(deadline):
        reader, writer = await asyncio.open_connection(host, port)
    closed_by_gateway = False
    try:
        writes = environment_writes(script, host, port)
        if script.hangup == "before_env_end":
            writer.write(writes[0])
            await writer.drain()
            channel.caller_hung_up = True
        else:
            for chunk in writes:
                writer.write(chunk)
                await writer.drain()
            closed_by_gateway = await _serve(reader, writer, channel, deadline)
    except ConnectionError:
        closed_by_gateway = True  # the gateway reset the connection: closed, if rudely
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
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


async def _serve(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    channel: SimulatedChannel,
    deadline: float,
) -> bool:
    """Answer commands until the gateway closes (True) or the deadline passes (False)."""
    loop = asyncio.get_running_loop()
    buffer = bytearray()
    hangup_at: float | None = None

    async def send(text: str) -> None:
        writer.write(text.encode() + b"\n")
        await writer.drain()

    async def hang_up() -> None:
        # res_agi sends this once, when it notices the hang-up; from then on `dead` holds.
        channel.mark_dead()
        await send("HANGUP")

    while True:
        # Decided before waiting: the loop may wake a hair before the time it was asked for.
        hangup_first = hangup_at is not None and hangup_at < deadline
        try:
            async with asyncio.timeout_at(hangup_at if hangup_at and hangup_first else deadline):
                data = await reader.read(_READ_CHUNK)
        except TimeoutError:
            if hangup_first:
                hangup_at = None
                channel.caller_hung_up = True
                await hang_up()
                continue
            return False
        if not data:
            if buffer:
                channel.protocol_errors.append("unterminated command line at end of stream")
            return True
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            raw = bytes(buffer[:end])
            del buffer[: end + 1]
            await send(channel.handle(raw))
            if channel.hangup_after_reply:
                channel.hangup_after_reply = False
                if not channel.dead:
                    await hang_up()
            if channel.start_lookup_hangup:
                channel.start_lookup_hangup = False
                hangup_at = loop.time() + channel.script.hangup_delay
        if len(buffer) >= AGI_BUF_LEN:
            channel.protocol_errors.append(f"command line longer than {AGI_BUF_LEN} bytes")
            buffer.clear()


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
