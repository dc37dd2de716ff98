"""Steady simulated load on a real-process stack, and the call-by-call checks on it.

Shared by the fault, chaos, soak and drain tests (`tests/load/test_faults.py`, `test_chaos.py`,
`test_soak.py`, `test_drain.py`). What belongs here: placing calls at a rate (`Load`), the
compact record of each call (`Call`: the decision, the wait, whether the gateway closed the
socket — not the whole transcript, so a ten-minute soak does not hold 100,000 of them), the
invariant every call must meet (`check_calls`), process samples from /proc, waiting on
another process (`until`), and the `-m slow` gate for long forms. What does not: the faults
themselves, and the stacks (`tools.stack`).

A call is *right* when its decision is what the default nodes make of the default CRM table's
answer for its id (`tools.stack.expected_decision`), from the CRM or the cache. It is a
*failover* when it went to its node's `on_error` destination with source `failover` and one of
the outcomes a fault may cause; a failover is only acceptable for a call alive while a fault
was active (its phase, stamped when it starts and when it ends, begins with "fault").
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from shared.outcomes import Outcome
from tests.waiting import eventually_in_thread
from tools.asterisk_sim import CallResult, CallScript, run_call
from tools.stack import DEFAULT_FAILOVER, Proc, Stack, expected_decision, http_get, metric_value

# How far past its CRM budget a decision may come (docs/design.md §1: never past the budget).
SLACK = 0.25
CRM_NODES = ("gold-customers", "crm-router")
# What the CRM's faults make of a call: a timeout, an error (5xx, refused, circuit open) and,
# for a CRM answering garbage, a bad response. All three route to the node's on_error.
FAILOVER_OUTCOMES = frozenset(outcome.value for outcome in Outcome if outcome.is_failover)


def note(line: str) -> None:
    """Print a result line, and append it to the file named by CALLERID_TEST_NOTES."""
    print(line)
    path = os.environ.get("CALLERID_TEST_NOTES")
    if path:
        with Path(path).open("a", encoding="utf-8") as notes:
            notes.write(line + "\n")


def slow_wanted(config: pytest.Config) -> bool:
    """Long forms run with `-m slow` or CALLERID_TEST_SLOW=1."""
    if "slow" in str(config.getoption("markexpr") or "").replace("not slow", ""):
        return True
    return os.environ.get("CALLERID_TEST_SLOW") == "1"


def skip_unless_slow_wanted(config: pytest.Config) -> None:
    if not slow_wanted(config):
        pytest.skip("long form: run with -m slow or CALLERID_TEST_SLOW=1")


def broker_restart_allowed() -> bool:
    """Restarting RabbitMQ disturbs everyone on this machine's broker: CI, or asked for."""
    return bool(os.environ.get("CI")) or os.environ.get("CALLERID_TEST_BROKER_RESTART") == "1"


def redis_db(base_url: str, db: int) -> str:
    return urlunsplit(urlsplit(base_url)._replace(path=f"/{db}"))


# The load tests' name for waiting on a blocking condition (tests/waiting.py).
until = eventually_in_thread


@dataclass
class Call:
    """One simulated call, reduced to what the checks need once it has ended."""

    node: str
    customer_id: str
    started: float
    phase_at_start: str
    ended: float = 0.0
    phase_at_end: str = ""
    decision: tuple[str, str, str, str] | None = None  # outcome, dest type, dest id, source
    wait: float | None = None  # caller's last digit to decision, as Asterisk saw them
    closed_by_gateway: bool = False
    error: str | None = None  # the call could not be placed (connection refused...)

    def record(self, result: CallResult | BaseException) -> None:
        if isinstance(result, BaseException):
            self.error = repr(result)[:200]
            return
        v = result.variables
        self.closed_by_gateway = result.closed_by_gateway
        if "OML_IDENT_OUTCOME" in v:
            self.decision = (
                v["OML_IDENT_OUTCOME"],
                v.get("OML_DEST_TYPE", "-"),
                v.get("OML_DEST_ID", "-"),
                v.get("OML_IDENT_SOURCE", "-"),
            )
        if result.decided_at is not None and result.last_digit_at is not None:
            self.wait = result.decided_at - result.last_digit_at

    @property
    def decided(self) -> bool:
        return self.decision is not None

    @property
    def right(self) -> bool:
        if self.decision is None:
            return False
        outcome, dest_type, dest_id, source = self.decision
        expected = expected_decision(self.node, self.customer_id)
        return (outcome, dest_type, dest_id) == expected and source in ("crm", "cache")

    def failover(self, outcomes: Iterable[str] = FAILOVER_OUTCOMES) -> bool:
        if self.decision is None:
            return False
        outcome, dest_type, dest_id, source = self.decision
        return (
            outcome in outcomes
            and (dest_type, dest_id) == DEFAULT_FAILOVER[self.node]
            and source == "failover"
        )

    @property
    def during_fault(self) -> bool:
        return self.phase_at_start.startswith("fault") or self.phase_at_end.startswith("fault")


def check_calls(
    calls: Iterable[Call], budget: float, failover_outcomes: Iterable[str] = FAILOVER_OUTCOMES
) -> list[str]:
    """Every call decided, socket closed by the gateway, within `budget` of the last digit,
    and right — or, only if it was alive during a fault, the node's failover."""
    allowed = frozenset(failover_outcomes)
    problems: list[str] = []
    for n, call in enumerate(calls):
        label = f"call {n} ({call.phase_at_start}->{call.phase_at_end}, node {call.node})"
        if call.decision is None:
            problems.append(f"{label}: no decision: {call.error or 'no OML_IDENT_OUTCOME'}")
            continue
        if not call.closed_by_gateway:
            problems.append(f"{label}: the gateway never closed the socket")
        if call.wait is None:
            problems.append(f"{label}: decided without a last digit: {call.decision}")
        elif call.wait > budget:
            problems.append(f"{label}: decided {call.wait * 1000:.0f} ms after the last digit")
        if not (call.right or (call.during_fault and call.failover(allowed))):
            problems.append(f"{label}: {call.decision} for {call.customer_id}")
    return problems


def problem_kinds(problems: Iterable[str]) -> dict[str, int]:
    """How many problems of each kind `check_calls` found (for the notes)."""
    kinds: Counter[str] = Counter()
    for problem in problems:
        if "no decision" in problem:
            kinds["undecided"] += 1
        elif "never closed" in problem:
            kinds["not_closed"] += 1
        elif "ms after the last digit" in problem:
            kinds["over_budget"] += 1
        else:
            kinds["wrong_decision"] += 1
    return dict(kinds)


@dataclass
class Load:
    """A steady stream of simulated calls (a call every 1/rate s, at most `concurrency` live);
    `phase` is stamped on each call when it starts and when it ends.

    Most ids are new (the CRM is really asked); 1 in 4 repeats a recent lookup (a cache hit, or
    merged with one in flight). Ids cycle through 10,000 per kind, so a long run hits the cache
    more as it goes, as a real center does.
    """

    stack: Stack
    rate: float
    concurrency: int
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    phase: str = "before"
    call_timeout: float = 10.0
    calls: list[Call] = field(default_factory=list)
    finished: list[Call] = field(default_factory=list)  # in the order they ended
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _counter: int = 0
    _repeats: list[tuple[str, str]] = field(default_factory=list)

    def stop(self) -> None:
        self._stopping.set()

    @property
    def live(self) -> int:
        return len(self.calls) - len(self.finished)

    def ended_in(self, phase: str) -> int:
        return sum(1 for call in self.finished if call.phase_at_start == phase)

    def last_right(self, count: int) -> bool:
        tail = self.finished[-count:]
        return len(tail) == count and all(call.right for call in tail)

    def _next(self) -> tuple[str, str]:
        if self._repeats and self.rng.random() < 0.25:
            return self.rng.choice(self._repeats)
        self._counter += 1
        node = self.rng.choice(("1", "3"))
        kinds = "14" if node == "1" else "124"  # node 1 never gets a destination ("2") id
        customer_id = self.rng.choice(kinds) + f"{self._counter % 10_000:04d}"
        self._repeats = [*self._repeats[-29:], (node, customer_id)]
        return node, customer_id

    async def run(self) -> None:
        host, port = self.stack.agi_address
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(self.concurrency)
        interval = 1 / self.rate

        async def one(call: Call, index: int) -> None:
            result: CallResult | BaseException
            try:
                result = await run_call(
                    host,
                    port,
                    CallScript(node=call.node, entries=[call.customer_id], uniqueid=f"l.{index}"),
                    timeout=self.call_timeout,
                )
            except OSError as exc:  # the gateway refused the connection: a failure to report
                result = exc
            finally:
                call.ended = time.monotonic()
                call.phase_at_end = self.phase
                gate.release()
            call.record(result)
            self.finished.append(call)

        async with asyncio.TaskGroup() as group:
            next_at = loop.time()
            while not self._stopping.is_set():
                # Pacing the load, not waiting for anything: a call every `interval` s.
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                await gate.acquire()
                node, customer_id = self._next()
                call = Call(node, customer_id, time.monotonic(), self.phase)
                self.calls.append(call)
                group.create_task(one(call, len(self.calls)))
                next_at = max(next_at + interval, loop.time() - interval)


def ready(proc: Proc) -> bool:
    assert proc.http_port is not None
    try:
        return proc.alive and http_get(f"http://127.0.0.1:{proc.http_port}/readyz")[0] == 200
    except OSError:
        return False


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def in_flight(proc: Proc) -> float:
    return metric_value(proc.metrics(), "callerid_resolver_in_flight")


def circuit_states(stack: Stack) -> list[float]:
    """The circuit gauge of every CRM node on every running resolver."""
    return [
        metric_value(text, "callerid_crm_circuit_state", node=node)
        for text in (p.metrics() for p in stack.resolver_procs if p.alive)
        for node in CRM_NODES
    ]


def rss_kib(pid: int) -> int:
    """Resident set size from /proc/<pid>/status (kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
