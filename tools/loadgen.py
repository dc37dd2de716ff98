"""Load generator: simulated Asterisk calls against a FastAGI gateway, with a realistic mix.

It drives either N concurrent calls (closed loop: each finished call starts the next) or a
fixed call rate (open loop: arrivals on a schedule, whatever the gateway's pace), for a fixed
time or a fixed number of calls, and reports identifications/s, the latency from the caller's
last digit to the routing decision (`decided_at - last_digit_at`, both taken where Asterisk
would see them), outcomes and failures, as JSON.

The Asterisk side is `tools.asterisk_sim` (environment in several writes, res_agi's replies,
scripted DTMF, hang-ups); nothing here speaks AGI itself. What belongs here: which calls to
place (`Mix`), when to place them (`drive`), and what the results say (`Report`).

Checking decisions (`check`): every call must end with the gateway closing the session, no
protocol error, and a decision that could be real: OML_IDENT_OUTCOME one of the outcomes, and
OML_DEST_TYPE / OML_DEST_ID two integers (both empty only for hangup and config_error). That
holds for any nodes and any CRM, and is all the command line checks by default. What each
call should end with depends on them, and comes from one of:

- the mix itself (`verify=True`, `--expect bench`): it assumes the gateway serves
  `LOADGEN_NODES` and the CRM answers by `LOADGEN_CRM_TABLE` (the mock CRM's rule table: ids
  starting with 1 are customers, with 2 get destination 1,7, anything else is not a
  customer). `bench/` starts exactly that;
- a table (`--expect FILE`, `load_expectations`): by node, the first regex that finds the
  customer id a call types gives its outcome and destination. Calls that type no id (nothing,
  a short entry, a hang-up at the prompt) and ids no regex finds get the checks above only.

Customer ids are `--id-length` digits: a kind digit, then a counter that starts at
`--id-offset`, so a run's cache-miss ids are distinct (give concurrent or successive runs
against the same cache disjoint offsets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import math
import random
import re
import resource
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.outcomes import Outcome
from tools.asterisk_sim import OUTCOME_VARIABLE, CallResult, CallScript, run_call
from tools.node_fixture import nodes_template
from tools.stats import percentile

ID_LENGTH = 8
TRUE_PREFIX, DESTINATION_PREFIX = "1", "2"
FALSE_PREFIXES = "3456789"
HIT_POOL = 200  # distinct ids repeated by the "hit" mix

# Node ids the mix uses, as LOADGEN_NODES configures them (ATTEMPTS: node 1's attempts).
NODE_TRUE_FALSE, NODE_LOCAL, NODE_DESTINATION = "1", "2", "3"
ATTEMPTS = 3

LOADGEN_NODES = nodes_template(id_length=ID_LENGTH)
"""The nodes the mix assumes (a `tools.stack.Stack` nodes_template): the shared node fixture,
tools/fixtures/nodes.yaml, with 8-digit ids."""

LOADGEN_CRM_TABLE: dict[str, Any] = {
    "default": {"destination": "false"},
    "rules": [
        {"match": "^1", "destination": "true"},
        {"match": "^2", "destination": "1,7"},
    ],
}
"""The mock CRM's rule table the mix assumes."""


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a call may end with: any of `outcomes`, and `destination` ("type,id") if given."""

    outcomes: frozenset[str]
    destination: str | None = None
    identification: bool = True  # a valid id reached a decision: counted as an identification
    timed: bool = True  # has a last digit followed by a decision: a latency sample


@dataclass(frozen=True, slots=True)
class PlannedCall:
    kind: str
    script: CallScript
    expect: Expectation  # what it ends with against LOADGEN_NODES and LOADGEN_CRM_TABLE
    customer: str | None = None  # the customer id it types (last), if it types a valid one


@functools.cache
def _expect(outcome: str, destination: str | None, **flags: bool) -> Expectation:
    # Expectations are frozen: one object per distinct one, not one per call.
    return Expectation(frozenset({outcome}), destination, **flags)


KINDS = (
    "crm_true",
    "crm_false",
    "crm_destination",
    "repeat",
    "local",
    "no_input",
    "wrong_length",
    "wrong_then_valid",
    "hangup_prompt",
    "hangup_lookup",
)

MIXES: dict[str, dict[str, float]] = {
    # What a contact center's inbound queue looks like: mostly customers, some repeat callers
    # inside the cache TTL, a few who type nothing or the wrong number, a few who hang up.
    "realistic": {
        "crm_true": 30,
        "crm_false": 18,
        "crm_destination": 15,
        "repeat": 15,
        "local": 5,
        "no_input": 5,
        "wrong_length": 4,
        "wrong_then_valid": 4,
        "hangup_prompt": 2,
        "hangup_lookup": 2,
    },
    # Every call a distinct valid id: every identification goes to the CRM.
    "miss": {"crm_true": 50, "crm_false": 30, "crm_destination": 20},
    # Every call one of HIT_POOL ids: after the first round, every identification is a cache hit.
    "hit": {"repeat": 100},
}


def parse_mix(text: str) -> dict[str, float]:
    """A mix by name (`realistic`, `miss`, `hit`) or as weights: `crm_true=3,no_input=1`."""
    if text in MIXES:
        return dict(MIXES[text])
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in KINDS:
            raise ValueError(f"mix {text!r}: expected a name in {sorted(MIXES)} or kind=weight")
        weights[name] = float(value)
        if weights[name] < 0:
            raise ValueError(f"mix {text!r}: weights must not be negative")
    if not any(weights.values()):
        raise ValueError(f"mix {text!r}: no positive weight")
    return weights


class Mix:
    """Chooses each call of a run and what it must end with (deterministic for a seed)."""

    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        seed: int = 1,
        id_offset: int = 0,
        id_length: int = ID_LENGTH,
        hit_pool: int = HIT_POOL,
        hangup_delay: float = 0.0005,
        caller_base: int = 0,
    ) -> None:
        if not 4 <= id_length <= 30:
            raise ValueError("id_length must be 4..30")
        self._kinds = [k for k, w in weights.items() if w > 0]
        # Cumulative once, not per call: random.choices draws the same kinds either way.
        self._cum_weights = list(itertools.accumulate(weights[k] for k in self._kinds))
        self._random = random.Random(seed)
        self._counter = id_offset
        self._id_length = id_length
        self._hit_pool = hit_pool
        self._hangup_delay = hangup_delay
        self._recent: deque[tuple[str, str, Expectation]] = deque(maxlen=1000)
        self._serial = 0
        # Calling numbers are 55 + 8 digits from here: one per call (the gateway limits CRM
        # lookups per calling number); runs against one gateway should start apart.
        self._caller_base = caller_base

    def _new_id(self, prefix: str) -> str:
        self._counter += 1
        width = self._id_length - 1
        return prefix + f"{self._counter % 10**width:0{width}d}"

    def _crm_call(self, kind: str) -> tuple[str, str, Expectation]:
        if kind == "crm_destination":
            return (
                NODE_DESTINATION,
                self._new_id(DESTINATION_PREFIX),
                _expect("crm_destination", "1,7"),
            )
        if kind == "crm_true":
            node = self._random.choice((NODE_TRUE_FALSE, NODE_DESTINATION))
            return node, self._new_id(TRUE_PREFIX), _expect("identified", "1,3")
        prefix = self._random.choice(FALSE_PREFIXES)
        node = self._random.choice((NODE_TRUE_FALSE, NODE_DESTINATION))
        return node, self._new_id(prefix), _expect("not_identified", "1,4")

    def _pooled(self) -> tuple[str, str, Expectation]:
        """One of `hit_pool` fixed ids (the same ones for every Mix of this length)."""
        index = self._random.randrange(self._hit_pool)
        width = self._id_length - 1
        if index % 2:
            return NODE_TRUE_FALSE, "1" + f"{index:0{width}d}", _expect("identified", "1,3")
        return NODE_DESTINATION, "2" + f"{index:0{width}d}", _expect("crm_destination", "1,7")

    def next(self) -> PlannedCall:
        kind = self._random.choices(self._kinds, cum_weights=self._cum_weights)[0]
        self._serial += 1
        uniqueid = f"{int(time.time())}.{self._serial}"
        number = (self._caller_base + self._serial) % 10**8
        script = CallScript(uniqueid=uniqueid, caller_number=f"55{number:08d}")
        short = "1" * (self._id_length - 2)
        customer: str | None = None
        if kind in ("crm_true", "crm_false", "crm_destination"):
            script.node, customer, expect = self._crm_call(kind)
            script.entries = [customer]
            self._recent.append((script.node, customer, expect))
        elif kind == "repeat":
            if self._hit_pool and (not self._recent or self._random.random() < 0.5):
                script.node, customer, expect = self._pooled()
            else:
                script.node, customer, expect = self._random.choice(self._recent)
            script.entries = [customer]
        elif kind == "local":
            script.node = NODE_LOCAL
            customer = "4" * self._random.randint(3, 10)
            script.entries = [customer]
            expect = _expect("identified", "1,5")
        elif kind == "no_input":
            script.node = NODE_TRUE_FALSE
            script.entries = [None] * ATTEMPTS
            expect = _expect("no_input", "1,4", identification=False, timed=False)
        elif kind == "wrong_length":
            script.node = NODE_TRUE_FALSE
            # All shorter than the node's expected length (longer ones GET DATA would cut).
            script.entries = [short, short + "1", short]
            expect = _expect("invalid_input", "1,4", identification=False, timed=False)
        elif kind == "wrong_then_valid":
            script.node, customer, expect = self._crm_call("crm_true")
            script.entries = [short, customer]
        elif kind == "hangup_prompt":
            script.hangup = "prompt"
            expect = _expect("hangup", None, identification=False, timed=False)
        elif kind == "hangup_lookup":
            # The caller hangs up right after the last digit: either the hang-up or the
            # decision wins the race, and both are correct.
            script.node, customer, normal = self._crm_call("crm_true")
            script.entries = [customer]
            script.hangup = "lookup"
            script.hangup_delay = self._hangup_delay
            expect = Expectation(
                normal.outcomes | {"hangup"}, None, identification=False, timed=False
            )
        else:  # pragma: no cover - KINDS and this chain are kept together
            raise AssertionError(kind)
        if kind not in ("local", "no_input", "wrong_length", "hangup_prompt"):
            customer = script.entries[-1]
        return PlannedCall(kind, script, expect, customer)


@dataclass(slots=True)
class CallRecord:
    """One finished call as the report needs it (the full CallResult is not kept)."""

    kind: str
    started: float
    finished: float
    outcome: str | None
    source: str | None
    latency: float | None  # seconds from the last digit to the decision, when timed
    failure: str | None  # None when the call ended as expected
    identification: bool
    expected: bool = False  # its decision was checked against an expected one


# OML_IDENT_OUTCOME's values: the vocabulary's (shared.outcomes), not a copy of it.
OUTCOMES = frozenset(outcome.value for outcome in Outcome)
UNROUTED_OUTCOMES = frozenset({"hangup", "config_error"})  # may leave without a destination
_DESTINATION = re.compile(r"\d{1,3},\d{1,10}")  # Destination: type 0..999, id an int32


@dataclass(frozen=True, slots=True)
class ExpectTable:
    """`--expect FILE`: by node id, (regex, expectation) pairs; the first whose regex finds
    (re.search) the customer id a call types says what that call must end with."""

    nodes: Mapping[str, tuple[tuple[re.Pattern[str], Expectation], ...]]

    def expectation(self, call: PlannedCall) -> Expectation | None:
        """What `call` must end with, or None when the table does not say."""
        if call.customer is None:
            return None
        for pattern, expect in self.nodes.get(call.script.node, ()):
            if pattern.search(call.customer):
                if call.script.hangup == "lookup":  # the hang-up may beat the decision
                    return Expectation(expect.outcomes | {"hangup"}, None)
                return expect
        return None


# What a call's decision is checked against: True, the mix's own expectations (`bench/`'s
# nodes and CRM); False, nothing (only a decision that could be real); or a table.
Verify = bool | ExpectTable


def load_expectations(path: str | Path) -> ExpectTable:
    """Read an --expect file (YAML or JSON); ValueError saying what is wrong with it.

    The form: node id -> {customer id regex: "outcome" or "outcome type,id"}, in order:

        "1": {"^1": "identified 1,3", "": "not_identified 1,4"}
    """
    where = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected node id -> {{customer id regex: outcome}}")
    nodes: dict[str, tuple[tuple[re.Pattern[str], Expectation], ...]] = {}
    for node, rules in data.items():
        if not isinstance(rules, dict) or not rules:
            raise ValueError(f"{where}: node {node}: expected {{customer id regex: outcome}}")
        parsed = []
        for regex, text in rules.items():
            where_rule = f"{where}: node {node}, {str(regex)!r}"
            try:
                pattern = re.compile("" if regex is None else str(regex))
            except re.error as exc:
                raise ValueError(f"{where_rule}: bad regex: {exc}") from None
            outcome, _, destination = str(text).strip().partition(" ")
            destination = destination.strip().replace(" ", "")
            if outcome not in OUTCOMES:
                raise ValueError(f"{where_rule}: {outcome!r} is not one of {sorted(OUTCOMES)}")
            if destination and not _DESTINATION.fullmatch(destination):
                raise ValueError(f"{where_rule}: destination {destination!r} is not type,id")
            parsed.append((pattern, _expect(outcome, destination or None)))
        nodes[str(node)] = tuple(parsed)
    return ExpectTable(nodes)


def _expected(call: PlannedCall, verify: Verify) -> Expectation | None:
    if verify is True:
        return call.expect
    if verify is False:
        return None
    return verify.expectation(call)


def check(call: PlannedCall, result: CallResult | BaseException, *, verify: Verify) -> str | None:
    """Why this call failed, or None: the gateway must close with a decision that could be
    real, and (per `verify`) the one expected."""
    return _check(call, result, _expected(call, verify))


def _check(
    call: PlannedCall, result: CallResult | BaseException, expect: Expectation | None
) -> str | None:
    if isinstance(result, BaseException):
        return f"connection: {type(result).__name__}: {result}"[:200]
    if result.protocol_errors:
        return f"protocol: {result.protocol_errors[0]}"[:200]
    if not result.closed_by_gateway:
        return "not_closed: the gateway never ended the session"
    variables = result.variables
    outcome = variables.get(OUTCOME_VARIABLE)
    if outcome is None:
        return "no_decision: OML_IDENT_OUTCOME never set"
    dest = f"{variables.get('OML_DEST_TYPE', '')},{variables.get('OML_DEST_ID', '')}"
    if outcome not in OUTCOMES:
        return f"bad_decision: {call.kind} ended {outcome[:40]!r}, not an outcome"[:200]
    if not (_DESTINATION.fullmatch(dest) or (dest == "," and outcome in UNROUTED_OUTCOMES)):
        return f"bad_decision: {call.kind} ended {outcome} routed to {dest[:40]!r}"[:200]
    if expect is None:
        return None
    if outcome not in expect.outcomes:
        return f"wrong_decision: {call.kind} ended {outcome}, expected {sorted(expect.outcomes)}"
    if expect.destination is not None and outcome != "hangup" and dest != expect.destination:
        return f"wrong_decision: {call.kind} routed to {dest}, expected {expect.destination}"
    return None


def record(
    call: PlannedCall,
    result: CallResult | BaseException,
    started: float,
    finished: float,
    *,
    verify: Verify = True,
) -> CallRecord:
    expect = _expected(call, verify)
    failure = _check(call, result, expect)
    outcome = source = None
    latency = None
    if isinstance(result, CallResult):
        outcome = result.variables.get(OUTCOME_VARIABLE)
        source = result.variables.get("OML_IDENT_SOURCE")
        if (
            failure is None
            and call.expect.timed
            and result.last_digit_at is not None
            and result.decided_at is not None
        ):
            latency = result.decided_at - result.last_digit_at
    identification = failure is None and call.expect.identification and outcome != "hangup"
    return CallRecord(
        call.kind,
        started,
        finished,
        outcome,
        source,
        latency,
        failure,
        identification,
        expect is not None,
    )


CallFn = Callable[[PlannedCall], Awaitable[CallRecord]]


def agi_caller(host: str, port: int, *, timeout: float, verify: Verify = True) -> CallFn:
    """Place each planned call as a simulated Asterisk channel."""

    async def call(planned: PlannedCall) -> CallRecord:
        started = time.monotonic()
        result: CallResult | BaseException
        try:
            result = await run_call(host, port, planned.script, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            result = exc
        return record(planned, result, started, time.monotonic(), verify=verify)

    return call


@dataclass
class LoadPlan:
    """When to place calls: closed loop (`concurrency`) or open loop (`rate`)."""

    duration: float = 10.0  # seconds during which new calls start (after warm-up)
    concurrency: int | None = 50
    rate: float | None = None  # calls per second
    calls: int | None = None  # stop starting calls after this many (both modes)
    warmup: float = 0.0  # seconds of calls left out of the figures
    max_in_flight: int = 10_000  # open loop: arrivals beyond this are counted as overload

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency and rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.duration <= 0 and self.calls is None:
            raise ValueError("give a positive duration or a number of calls")


@dataclass
class Report:
    records: list[CallRecord] = field(default_factory=list)
    overload: int = 0  # open loop: arrivals dropped because max_in_flight calls were live
    max_in_flight: int = 0
    window: tuple[float, float] = (0.0, 0.0)  # monotonic start and end of the measured window

    def to_json(self, plan: LoadPlan | None = None, **extra: Any) -> dict[str, Any]:
        counted = [r for r in self.records if r.started >= self.window[0]]
        start = self.window[0]
        end = max((r.finished for r in counted), default=self.window[1])
        elapsed = max(end - start, 1e-9)
        latencies = sorted(r.latency for r in counted if r.latency is not None)
        failures = [r for r in self.records if r.failure is not None]
        kinds = Counter(r.failure.split(":", 1)[0] for r in failures if r.failure)
        if self.overload:
            kinds["overload"] += self.overload
        identifications = sum(r.identification for r in counted)
        everything = sum(r.identification for r in self.records)
        out: dict[str, Any] = {
            "calls": len(self.records),
            "counted_calls": len(counted),
            "identifications": identifications,
            "identifications_all": everything,  # warm-up included: what CPU is divided by
            "elapsed_s": round(elapsed, 3),
            "identifications_per_s": round(identifications / elapsed, 1),
            "calls_per_s": round(len(counted) / elapsed, 1),
            "latency_ms": latency_summary(latencies),
            "outcomes": dict(sorted(Counter(r.outcome or "-" for r in counted).items())),
            "sources": dict(sorted(Counter(r.source or "-" for r in counted).items())),
            "kinds": dict(sorted(Counter(r.kind for r in counted).items())),
            "failures": {"total": len(failures) + self.overload, **dict(sorted(kinds.items()))},
            "failure_examples": sorted({r.failure for r in failures if r.failure})[:5],
            "checked_against_expected": sum(r.expected for r in self.records),
            "max_in_flight": self.max_in_flight,
        }
        if plan is not None:
            out["plan"] = {
                "duration_s": plan.duration,
                "concurrency": plan.concurrency,
                "rate": plan.rate,
                "calls": plan.calls,
                "warmup_s": plan.warmup,
            }
        out.update(extra)
        return out


def latency_summary(ordered: Sequence[float]) -> dict[str, Any]:
    """p50/p90/p99/max in milliseconds of sorted latencies in seconds."""
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "count": len(ordered),
        "p50": round(percentile(ordered, 0.5) * 1000, 3),
        "p90": round(percentile(ordered, 0.9) * 1000, 3),
        "p99": round(percentile(ordered, 0.99) * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
    }


async def drive(plan: LoadPlan, next_call: Callable[[], PlannedCall], call: CallFn) -> Report:
    """Place calls per `plan`; returns when every started call has finished."""
    report = Report()
    loop = asyncio.get_running_loop()
    began = loop.time()
    window_start = time.monotonic() + plan.warmup
    stop_at = began + plan.warmup + plan.duration if plan.duration > 0 else math.inf
    started = 0
    in_flight = 0

    def may_start() -> bool:
        return (plan.calls is None or started < plan.calls) and loop.time() < stop_at

    async def one(planned: PlannedCall) -> None:
        nonlocal in_flight
        in_flight += 1
        report.max_in_flight = max(report.max_in_flight, in_flight)
        try:
            report.records.append(await call(planned))
        finally:
            in_flight -= 1

    async with asyncio.TaskGroup() as group:
        if plan.concurrency is not None:

            async def worker() -> None:
                nonlocal started
                while may_start():
                    started += 1
                    await one(next_call())

            for _ in range(plan.concurrency):
                group.create_task(worker())
        else:
            assert plan.rate is not None
            interval = 1.0 / plan.rate
            while may_start():
                due = began + started * interval
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if not may_start():
                        break
                started += 1
                if in_flight >= plan.max_in_flight:
                    report.overload += 1
                    continue
                group.create_task(one(next_call()))
    report.window = (window_start, time.monotonic())
    return report


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards `wanted` (one socket per live call); returns the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


CHECKS_EPILOG = """\
checks: every call must end with the gateway closing the session, no AGI protocol error (as
real Asterisk would see it), OML_IDENT_OUTCOME set to one of the outcomes, and OML_DEST_TYPE /
OML_DEST_ID two integers (empty only for hangup and config_error). That is all that holds for
any nodes and CRM, and all that is checked by default: the JSON's "outcomes" shows the mix of
decisions, "failures" what failed the checks. The exit status is 1 if any call failed.

--expect FILE also checks each call that types a customer id against a table (YAML or JSON):
by node id, customer id regexes (re.search; the first that finds the id wins) and the outcome
each must get, optionally with its destination "type,id". The mix's calls use nodes 1 (CRM
true/false), 2 (no CRM) and 3 (CRM destination), and ids of --id-length digits (default 8;
a node reads no more than its own length): a first digit 1 for known customers, 2 for a
CRM destination, 3-9 for unknown ids, and 4s only on node 2. For `make run` (examples/
nodes.yaml, examples/mock_crm_table.yaml) with --id-length 5, this file fits the mix's ids:
  "1": {"^1": "identified 1,3", "": "not_identified 1,4"}
  "2": {"": "identified 1,5"}
  "3": {"^1": "identified 1,3", "^2": "crm_destination 1,5", "": "not_identified 1,4"}
(list a CRM table's exact ids first, e.g. "^22222$": "crm_destination 1,7"; runs of fewer
than 2,000 calls from --id-offset 0 do not type 22222-88888). Calls that type no id (nothing,
a short entry, a hang-up at the prompt) and ids no regex finds get the checks above only;
the JSON's "checked_against_expected" counts the calls that were checked against the file.

--expect bench checks every call against what the mix expects of bench/'s nodes and CRM
(tools.loadgen's LOADGEN_NODES and LOADGEN_CRM_TABLE), as `make bench` starts them.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callerid-loadgen",
        description="Drive simulated Asterisk calls against a FastAGI gateway; JSON results.",
        epilog=CHECKS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="gateway FastAGI host")
    parser.add_argument("--port", type=int, default=4573)
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: calls live at once")
    load.add_argument("--rate", type=float, help="open loop: calls started per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (0: use --calls)")
    parser.add_argument("--calls", type=int, help="stop after starting this many calls")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds not counted")
    parser.add_argument("--max-in-flight", type=int, default=10_000)
    parser.add_argument(
        "--mix", default="realistic", help=f"{', '.join(MIXES)} or weights: crm_true=3,local=1"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--id-offset", type=int, default=0, help="first id counter value")
    parser.add_argument("--id-length", type=int, default=ID_LENGTH)
    parser.add_argument("--timeout", type=float, default=30.0, help="per call, seconds")
    checks = parser.add_mutually_exclusive_group()
    checks.add_argument(
        "--expect",
        metavar="FILE|bench",
        help="also check decisions: against a table (FILE), or bench/'s nodes and CRM (see below)",
    )
    checks.add_argument(
        "--no-verify", action="store_true", help="the default: no --expect (kept for old scripts)"
    )
    parser.add_argument("--output", help="write the JSON here (default: stdout)")
    return parser


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    plan = LoadPlan(
        duration=args.duration,
        concurrency=args.concurrency if args.rate is None else None,
        rate=args.rate,
        calls=args.calls,
        warmup=args.warmup,
        max_in_flight=args.max_in_flight,
    )
    mix = Mix(
        parse_mix(args.mix),
        seed=args.seed,
        id_offset=args.id_offset,
        id_length=args.id_length,
        caller_base=random.SystemRandom().randrange(10**8),  # not the last run's numbers
    )
    verify: Verify = args.expectations
    caller = agi_caller(args.host, args.port, timeout=args.timeout, verify=verify)
    report = await drive(plan, mix.next, caller)
    checks = "valid decision" + ("" if verify is False else f", as --expect {args.expect}")
    return report.to_json(plan, mix=args.mix, target=f"{args.host}:{args.port}", checks=checks)


def run_fast(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when installed: the load generator shares the CPU with what it measures."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the services
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def expectations(expect: str | None) -> Verify:
    """What --expect asks for: False (none), True ("bench": the mix's own), or a table."""
    if expect is None:
        return False
    if expect == "bench":
        return True
    return load_expectations(expect)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concurrency is None and args.rate is None:
        args.concurrency = 50
    try:
        parse_mix(args.mix)
        if args.duration <= 0 and args.calls is None:
            raise ValueError("give a positive --duration or --calls")
        args.expectations = expectations(args.expect)
    except ValueError as exc:
        parser.error(str(exc))
    live = args.concurrency or args.max_in_flight
    raise_fd_limit(live + 256)
    result: dict[str, Any] = run_fast(_main(args))
    text = json.dumps(result, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    else:
        print(text)
    return 0 if result["failures"]["total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
