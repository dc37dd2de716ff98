"""Faults under steady load: every call still gets a decision in budget, and the stack heals.

Each test runs a scaled-out stack (`tools.stack.Stack`: gateway over RabbitMQ, three
resolver processes, Redis, mock CRM), puts a steady simulated load on it, and injects one
fault in the middle: a resolver SIGKILLed, RabbitMQ restarted, Redis stopped, the CRM down.

Invariants, checked call by call:
- every call ends with OML_IDENT_OUTCOME set and the socket closed by the gateway;
- the decision comes at most CRM_TIMEOUT + SLACK after the caller's last digit;
- the decision is the right one for the call's node and customer id, or, only for calls
  alive during the fault, the node's failover (crm_timeout / crm_error to on_error);
- after the fault ends, with no help from the test, calls are identified normally again:
  within `recover_within` s the last `settled` calls are all right, and then every one of the
  next `after` calls is right.

Load: a call started every 1/rate s (at most `concurrency` live), most with fresh ids (so the
CRM is really asked) and some repeated (cache hits). Phases are stamped when a call starts and
ends: before → fault (from the fault's start until recovery is seen) → after.

The short forms run by default; the long ones are marked slow and run with `-m slow` (or
CALLERID_TEST_SLOW=1). Restarting RabbitMQ disturbs everyone using this machine's broker, so
that test runs under CI=true or with CALLERID_TEST_BROKER_RESTART=1, and is skipped (saying so)
otherwise. Numbers are printed, and appended to the file named by `CALLERID_TEST_NOTES`.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tools.asterisk_sim import CallResult, CallScript, run_call
from tools.stack import (
    DEFAULT_FAILOVER,
    Proc,
    Stack,
    expected_decision,
    http_get,
    metric_value,
    port_answers,
    redis_server,
)

pytestmark = pytest.mark.integration

CRM_TIMEOUT = 1.0
SLACK = 0.25
REDIS_DB = 12
# The CRM answers in 100..300 ms, so a few requests are always in flight on every resolver.
CRM_LATENCY_MS, CRM_JITTER_MS = 100, 200
BREAKER_RESET = 1.0  # seconds an open circuit waits before a probe (default 5)
CRM_NODES = ("gold-customers", "crm-router")
FAILOVER_OUTCOMES = ("crm_timeout", "crm_error")


@dataclass(frozen=True)
class Sizes:
    rate: float  # calls started per second
    concurrency: int  # at most this many live
    before: int  # calls completed before the fault
    during: int  # at least this many completed while the fault lasts
    settled: int  # this many right in a row after the fault = recovered
    after: int  # then every one of this many must be right
    recover_within: float  # seconds from the fault's end


SHORT = Sizes(
    rate=50, concurrency=40, before=50, during=60, settled=20, after=60, recover_within=20
)
LONG = Sizes(
    rate=120, concurrency=120, before=600, during=1800, settled=60, after=900, recover_within=30
)
SIZES = [
    pytest.param(SHORT, id="short"),
    pytest.param(LONG, id="long", marks=[pytest.mark.slow, pytest.mark.timeout(240)]),
]


def note(line: str) -> None:
    print(line)
    path = os.environ.get("CALLERID_TEST_NOTES")
    if path:
        with Path(path).open("a", encoding="utf-8") as notes:
            notes.write(line + "\n")


def long_form_wanted(config: pytest.Config, sizes: Sizes) -> None:
    """Skip a long form unless asked for: `-m slow` or CALLERID_TEST_SLOW=1."""
    if sizes is not LONG:
        return
    if "slow" in str(config.getoption("markexpr") or "").replace("not slow", ""):
        return
    if os.environ.get("CALLERID_TEST_SLOW") == "1":
        return
    pytest.skip("long form: run with -m slow or CALLERID_TEST_SLOW=1")


@dataclass
class Call:
    node: str
    customer_id: str
    started: float
    phase_at_start: str
    result: CallResult | BaseException | None = None
    ended: float = 0.0
    phase_at_end: str = ""

    @property
    def decided(self) -> bool:
        return isinstance(self.result, CallResult) and "OML_IDENT_OUTCOME" in self.result.variables

    @property
    def decision(self) -> tuple[str, str, str, str]:
        assert isinstance(self.result, CallResult)
        v = self.result.variables
        return (
            v.get("OML_IDENT_OUTCOME", "-"),
            v.get("OML_DEST_TYPE", "-"),
            v.get("OML_DEST_ID", "-"),
            v.get("OML_IDENT_SOURCE", "-"),
        )

    @property
    def right(self) -> bool:
        if not self.decided:
            return False
        outcome, dest_type, dest_id, source = self.decision
        return (outcome, dest_type, dest_id) == expected_decision(
            self.node, self.customer_id
        ) and source in ("crm", "cache")

    @property
    def failover(self) -> bool:
        if not self.decided:
            return False
        outcome, dest_type, dest_id, source = self.decision
        return (
            outcome in FAILOVER_OUTCOMES
            and (dest_type, dest_id) == DEFAULT_FAILOVER[self.node]
            and source == "failover"
        )

    @property
    def during_fault(self) -> bool:
        return "fault" in (self.phase_at_start, self.phase_at_end)

    @property
    def wait(self) -> float:
        """Caller's last digit to decision, as the simulated Asterisk saw them."""
        assert isinstance(self.result, CallResult)
        assert self.result.decided_at is not None
        assert self.result.last_digit_at is not None
        return self.result.decided_at - self.result.last_digit_at


@dataclass
class Load:
    """A steady stream of simulated calls; `phase` is stamped on each call."""

    stack: Stack
    sizes: Sizes
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    phase: str = "before"
    calls: list[Call] = field(default_factory=list)
    finished: list[Call] = field(default_factory=list)  # in the order they ended
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _counter: int = 0
    _repeats: list[tuple[str, str]] = field(default_factory=list)

    def stop(self) -> None:
        self._stopping.set()

    def ended_in(self, phase: str) -> int:
        return sum(1 for call in self.finished if call.phase_at_start == phase)

    def last_right(self, count: int) -> bool:
        tail = self.finished[-count:]
        return len(tail) == count and all(call.right for call in tail)

    def _next(self) -> tuple[str, str]:
        # 1 in 4 calls repeats a recent lookup (a cache hit, or merged); the rest are new ids.
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
        gate = asyncio.Semaphore(self.sizes.concurrency)
        interval = 1 / self.sizes.rate

        async def one(call: Call, index: int) -> None:
            try:
                call.result = await run_call(
                    host,
                    port,
                    CallScript(node=call.node, entries=[call.customer_id], uniqueid=f"f.{index}"),
                    timeout=10,
                )
            except OSError as exc:  # the gateway refused the connection: a failure to report
                call.result = exc
            finally:
                call.ended = time.monotonic()
                call.phase_at_end = self.phase
                self.finished.append(call)
                gate.release()

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


async def until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Poll a (possibly blocking: it runs in a thread) condition; seconds it took."""
    started = time.monotonic()
    deadline = started + within
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


@dataclass
class Fault:
    name: str
    begin: Callable[[], Awaitable[None]]
    lasts_until: Callable[[], bool]  # besides `during` calls ended: what the fault must show
    end: Callable[[], Awaitable[None]]


async def run_fault(stack: Stack, sizes: Sizes, fault: Fault) -> Load:
    """Load before, during and after `fault`; check every call; write down the numbers."""
    load = Load(stack, sizes)
    runner = asyncio.create_task(load.run())
    crm_before = stack.crm_stats()["calls"]
    timeline: dict[str, float] = {}
    try:
        await until(lambda: load.ended_in("before") >= sizes.before, 30, "load before the fault")
        load.phase = "fault"
        timeline["fault"] = time.monotonic()
        await fault.begin()
        await until(
            lambda: load.ended_in("fault") >= sizes.during and fault.lasts_until(),
            60,
            f"{fault.name}: calls during the fault",
        )
        await fault.end()
        timeline["ended"] = time.monotonic()
        await until(
            lambda: load.last_right(sizes.settled),
            sizes.recover_within,
            f"{fault.name}: {sizes.settled} right decisions in a row after the fault",
        )
        timeline["recovered"] = time.monotonic()
        load.phase = "after"
        await until(lambda: load.ended_in("after") >= sizes.after, 60, "load after the fault")
    finally:
        load.stop()
        await runner

    calls = load.calls
    problems: list[str] = []
    for n, call in enumerate(calls):
        label = f"call {n} ({call.phase_at_start}->{call.phase_at_end}, node {call.node})"
        if not call.decided:
            problems.append(f"{label}: no decision: {call.result!r}"[:300])
            continue
        assert isinstance(call.result, CallResult)
        if not call.result.closed_by_gateway:
            problems.append(f"{label}: the gateway never closed the socket")
        if call.wait > CRM_TIMEOUT + SLACK:
            problems.append(f"{label}: decided {call.wait * 1000:.0f} ms after the last digit")
        if not (call.right or (call.during_fault and call.failover)):
            problems.append(f"{label}: {call.decision} for {call.customer_id}")

    waits = [call.wait for call in calls if call.decided]
    in_fault = [call for call in calls if call.during_fault]
    fault_waits = [call.wait for call in in_fault if call.decided]
    outcomes = Counter(call.decision[0] for call in in_fault if call.decided)
    note(
        f"fault {fault.name} [{'long' if sizes is LONG else 'short'}]: calls={len(calls)} "
        f"decided={len(waits)} during_fault={len(in_fault)} fault_outcomes={dict(outcomes)} "
        f"failovers={sum(c.failover for c in calls)} wrong={len(problems)} "
        f"crm_calls={stack.crm_stats()['calls'] - crm_before} "
        f"max={max(waits) * 1000:.0f}ms p99={percentile(waits, 0.99) * 1000:.0f}ms "
        f"fault_max={max(fault_waits, default=0) * 1000:.0f}ms "
        f"fault_p99={percentile(fault_waits or [0.0], 0.99) * 1000:.0f}ms "
        f"budget={(CRM_TIMEOUT + SLACK) * 1000:.0f}ms "
        f"fault_lasted={timeline['ended'] - timeline['fault']:.2f}s "
        f"settled_after_end={timeline['recovered'] - timeline['ended']:.2f}s"
    )
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"
    return load


def redis_db(base_url: str, db: int) -> str:
    return urlunsplit(urlsplit(base_url)._replace(path=f"/{db}"))


@pytest.fixture
def make_stack(
    tmp_path: Path, amqp_url: str, redis_base_url: str
) -> Iterator[Callable[..., Stack]]:
    """Start a stack (stopped by PID at the end); redis_url may point at the test's own Redis."""
    started: list[Stack] = []

    def make(redis_url: str | None = None) -> Stack:
        stack = Stack(
            tmp_path / f"stack{len(started)}",
            amqp_url=amqp_url,
            redis_url=redis_url or redis_db(redis_base_url, REDIS_DB),
            resolvers=3,
            crm_timeout=CRM_TIMEOUT,
            crm_latency_ms=CRM_LATENCY_MS,
            crm_latency_jitter_ms=CRM_JITTER_MS,
            extra_env={"CALLERID_BREAKER_RESET": str(BREAKER_RESET)},
        )
        started.append(stack)
        return stack.start()

    yield make
    for stack in started:
        stack.stop()


def in_flight(proc: Proc) -> float:
    return metric_value(proc.metrics(), "callerid_resolver_in_flight")


def circuit_states(stack: Stack) -> list[float]:
    """The circuit gauge of every CRM node on every running resolver."""
    return [
        metric_value(text, "callerid_crm_circuit_state", node=node)
        for text in (p.metrics() for p in stack.resolver_procs if p.alive)
        for node in CRM_NODES
    ]


async def nothing() -> None:
    return None


@pytest.mark.parametrize("sizes", SIZES)
async def test_resolver_killed_mid_load(
    make_stack: Callable[..., Stack], sizes: Sizes, request: pytest.FixtureRequest
) -> None:
    """SIGKILL one of three resolvers under load: the calls it held fail over (crm_timeout)
    within budget or are answered by the others after the broker redelivers them; the two
    left serve every later call right."""
    long_form_wanted(request.config, sizes)
    stack = make_stack()
    victim = stack.resolver_procs[0]

    async def kill() -> None:
        # Mid-load means holding requests: the broker must redeliver or lose those.
        await until(lambda: in_flight(victim) >= 2, 10, "the victim working on requests")
        victim.kill()

    await run_fault(stack, sizes, Fault("resolver-sigkill", kill, lambda: True, nothing))
    assert not victim.alive
    assert victim.popen is not None
    assert victim.popen.returncode == -signal.SIGKILL


def ready(proc: Proc) -> bool:
    assert proc.http_port is not None
    try:
        return proc.alive and http_get(f"http://127.0.0.1:{proc.http_port}/readyz")[0] == 200
    except OSError:
        return False


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("sizes", SIZES)
async def test_rabbitmq_restarted_mid_load(
    make_stack: Callable[..., Stack], sizes: Sizes, request: pytest.FixtureRequest, amqp_url: str
) -> None:
    """RabbitMQ stopped (stop_app) and started again under load: while it is down every call
    fails over at once (crm_timeout) instead of waiting; the gateway and the resolvers
    reconnect by themselves and calls are identified normally again."""
    long_form_wanted(request.config, sizes)
    if not (os.environ.get("CI") or os.environ.get("CALLERID_TEST_BROKER_RESTART") == "1"):
        pytest.skip(
            "restarts the machine's shared RabbitMQ: runs under CI=true "
            "or with CALLERID_TEST_BROKER_RESTART=1"
        )
    amqp_port = urlsplit(amqp_url).port or 5672
    stack = make_stack()
    gateway = stack.gateway
    assert gateway is not None
    stopped = False

    async def stop_broker() -> None:
        nonlocal stopped
        stopped = True
        await asyncio.to_thread(rabbitmqctl, "stop_app")

    async def start_broker() -> None:
        nonlocal stopped
        await asyncio.to_thread(rabbitmqctl, "start_app")
        await until(lambda: port_answers(amqp_port), 60, "RabbitMQ answering again")
        stopped = False

    try:
        await run_fault(
            stack,
            sizes,
            Fault(
                "rabbitmq-restart",
                stop_broker,
                lambda: not port_answers(amqp_port),
                start_broker,
            ),
        )
    finally:
        if stopped:  # the test failed with the broker down: never leave it so
            await asyncio.to_thread(rabbitmqctl, "start_app")
    assert all(ready(proc) for proc in [gateway, *stack.resolver_procs])


@pytest.mark.parametrize("sizes", SIZES)
async def test_redis_stopped_mid_load(
    make_stack: Callable[..., Stack],
    sizes: Sizes,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """The cache's Redis (this test's own redis-server) stopped under load, then started
    again: resolvers go on without the cache (counted as cache errors) and every call is still
    decided right; once Redis is back the cache answers again."""
    long_form_wanted(request.config, sizes)
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    servers: list[Proc] = [redis_server(redis_dir)]
    try:
        port = servers[0].tcp_port
        assert port is not None
        stack = make_stack(f"redis://127.0.0.1:{port}/0")
        errors_before = stack.resolver_metric("callerid_cache_lookups_total", result="error")

        async def stop_redis() -> None:
            await asyncio.to_thread(servers[-1].stop)

        def cache_failing() -> bool:
            errors = stack.resolver_metric("callerid_cache_lookups_total", result="error")
            return errors > errors_before

        async def start_redis() -> None:
            servers.append(await asyncio.to_thread(redis_server, redis_dir, port))

        hits_before_end: list[float] = []

        async def start_redis_noting_hits() -> None:
            hits_before_end.append(
                await asyncio.to_thread(
                    stack.resolver_metric, "callerid_cache_lookups_total", result="hit"
                )
            )
            await start_redis()

        load = await run_fault(
            stack, sizes, Fault("redis-stop", stop_redis, cache_failing, start_redis_noting_hits)
        )
        errors = stack.resolver_metric("callerid_cache_lookups_total", result="error")
        hits = stack.resolver_metric("callerid_cache_lookups_total", result="hit")
        note(
            f"  redis: cache_errors={errors - errors_before:.0f} "
            f"hits_after_restart={hits - hits_before_end[0]:.0f}"
        )
        # Without the cache the CRM answers: going on without Redis costs no call its answer.
        assert not [call for call in load.calls if not call.right]
        assert hits > hits_before_end[0]
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("sizes", SIZES)
async def test_crm_down_then_back_mid_load(
    make_stack: Callable[..., Stack], sizes: Sizes, request: pytest.FixtureRequest
) -> None:
    """The CRM answers 503 for a while, then recovers: calls fail over (crm_error) within
    budget, the circuit breakers open (failing fast), and after the CRM is back they close by
    themselves and calls are identified normally."""
    long_form_wanted(request.config, sizes)
    stack = make_stack()
    opened: list[float] = []

    async def crm_down() -> None:
        await asyncio.to_thread(stack.crm_mode, "down")

    def circuit_open() -> bool:
        states = circuit_states(stack)
        opened.append(max(states))
        return max(states) == 2

    async def crm_normal() -> None:
        await asyncio.to_thread(stack.crm_mode, "normal")

    load = await run_fault(stack, sizes, Fault("crm-down", crm_down, circuit_open, crm_normal))
    assert 2 in opened
    took = await until(
        lambda: set(circuit_states(stack)) == {0}, sizes.recover_within, "circuits closed again"
    )
    open_calls = sum(
        stack.resolver_metric("callerid_crm_requests_total", node=node, result="crm_circuit_open")
        for node in CRM_NODES
    )
    note(
        f"  crm-down: crm_error={sum(c.decision[0] == 'crm_error' for c in load.calls)} "
        f"refused_by_open_circuit={open_calls:.0f} all_circuits_closed_after={took:.2f}s more"
    )
    assert open_calls > 0
