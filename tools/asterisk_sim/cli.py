"""`callerid-asterisk-sim`: calls from the command line.

Part of the simulated Asterisk; the package docstring (tools/asterisk_sim/__init__.py) says
what it reproduces and where each behaviour was checked in Asterisk's source.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from tools.asterisk_sim.channel import (
    SimulatedChannel,
)
from tools.asterisk_sim.script import (
    OUTCOME_VARIABLE,
    CallResult,
    CallScript,
)
from tools.asterisk_sim.wire import (
    run_call,
)
from tools.stats import percentile

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
