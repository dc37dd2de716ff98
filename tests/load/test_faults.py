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
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.stack_load import (
    CRM_NODES,
    SLACK,
    Load,
    broker_restart_allowed,
    check_calls,
    circuit_states,
    in_flight,
    note,
    rabbitmqctl,
    ready,
    redis_db,
    skip_unless_slow_wanted,
    until,
)
from tools.stack import Proc, Stack, port_answers, redis_server
from tools.stats import percentile

pytestmark = pytest.mark.integration

CRM_TIMEOUT = 1.0
REDIS_DB = 12
# The CRM answers in 100..300 ms, so a few requests are always in flight on every resolver.
CRM_LATENCY_MS, CRM_JITTER_MS = 100, 200
BREAKER_RESET = 1.0  # seconds an open circuit waits before a probe (default 5)
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


def long_form_wanted(config: pytest.Config, sizes: Sizes) -> None:
    """Skip a long form unless asked for: `-m slow` or CALLERID_TEST_SLOW=1."""
    if sizes is LONG:
        skip_unless_slow_wanted(config)


@dataclass
class Fault:
    name: str
    begin: Callable[[], Awaitable[None]]
    lasts_until: Callable[[], bool]  # besides `during` calls ended: what the fault must show
    end: Callable[[], Awaitable[None]]


async def run_fault(stack: Stack, sizes: Sizes, fault: Fault) -> Load:
    """Load before, during and after `fault`; check every call; write down the numbers."""
    load = Load(stack, sizes.rate, sizes.concurrency)
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
    problems = check_calls(calls, CRM_TIMEOUT + SLACK, FAILOVER_OUTCOMES)
    waits = [call.wait for call in calls if call.wait is not None]
    in_fault = [call for call in calls if call.during_fault]
    fault_waits = [call.wait for call in in_fault if call.wait is not None]
    outcomes = Counter(call.decision[0] for call in in_fault if call.decision is not None)
    note(
        f"fault {fault.name} [{'long' if sizes is LONG else 'short'}]: calls={len(calls)} "
        f"decided={len(waits)} during_fault={len(in_fault)} fault_outcomes={dict(outcomes)} "
        f"failovers={sum(c.failover(FAILOVER_OUTCOMES) for c in calls)} wrong={len(problems)} "
        f"crm_calls={stack.crm_stats()['calls'] - crm_before} "
        f"max={max(waits) * 1000:.0f}ms p99={percentile(waits, 0.99) * 1000:.0f}ms "
        f"fault_max={max(fault_waits, default=0) * 1000:.0f}ms "
        f"fault_p99={percentile(fault_waits, 0.99) * 1000:.0f}ms "
        f"budget={(CRM_TIMEOUT + SLACK) * 1000:.0f}ms "
        f"fault_lasted={timeline['ended'] - timeline['fault']:.2f}s "
        f"settled_after_end={timeline['recovered'] - timeline['ended']:.2f}s"
    )
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"
    return load


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


@pytest.mark.parametrize("sizes", SIZES)
async def test_rabbitmq_restarted_mid_load(
    make_stack: Callable[..., Stack], sizes: Sizes, request: pytest.FixtureRequest, amqp_url: str
) -> None:
    """RabbitMQ stopped (stop_app) and started again under load: while it is down every call
    fails over at once (crm_timeout) instead of waiting; the gateway and the resolvers
    reconnect by themselves and calls are identified normally again."""
    long_form_wanted(request.config, sizes)
    if not broker_restart_allowed():
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
        errors_before = stack.cache_lookups("error")

        async def stop_redis() -> None:
            await asyncio.to_thread(servers[-1].stop)

        def cache_failing() -> bool:
            errors = stack.cache_lookups("error")
            return errors > errors_before

        async def start_redis() -> None:
            servers.append(await asyncio.to_thread(redis_server, redis_dir, port))

        hits_before_end: list[float] = []

        async def start_redis_noting_hits() -> None:
            hits_before_end.append(await asyncio.to_thread(stack.cache_lookups, "hit"))
            await start_redis()

        load = await run_fault(
            stack, sizes, Fault("redis-stop", stop_redis, cache_failing, start_redis_noting_hits)
        )
        errors = stack.cache_lookups("error")
        hits = stack.cache_lookups("hit")
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
    crm_errors = sum(c.decision is not None and c.decision[0] == "crm_error" for c in load.calls)
    note(
        f"  crm-down: crm_error={crm_errors} "
        f"refused_by_open_circuit={open_calls:.0f} all_circuits_closed_after={took:.2f}s more"
    )
    assert open_calls > 0
