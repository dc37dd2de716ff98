"""Chaos under load: faults injected one after another, at random, while calls keep coming.

A scaled-out stack (`tools.stack.Stack`: gateway over RabbitMQ, three resolver processes, a
private redis-server, mock CRM answering in 100..300 ms) takes a steady simulated load
(`tests.stack_load.Load`) while a seeded random schedule injects faults, each held for a
random time, with a random quiet gap after it:

- crm-down: the CRM answers 503 (circuit breakers open);
- crm-slow: the CRM answers 1.6 s late, past the 1 s budget;
- crm-garbage: the CRM answers 200 with an HTML page;
- resolver-sigkill: a resolver holding requests is SIGKILLed, and replaced by a new process
  when the fault ends;
- redis-stop: the cache's Redis (this test's own) stopped, then started again;
- rabbitmq-restart: RabbitMQ stop_app / start_app (only under CI=true or with
  CALLERID_TEST_BROKER_RESTART=1: it disturbs everyone on this machine's broker).

The gateway receiving SIGTERM with live calls is its own test
(`tests/integration/test_drain.py`): it ends the gateway, so it cannot sit in the middle of a
schedule.

Invariants, call by call (`tests.stack_load.check_calls`): every call gets a decision and
OML_IDENT_OUTCOME within its budget (crm_timeout + 250 ms after its last digit) and the
gateway closes its socket; every decision is the right one for its inputs, or — only for a call
alive while a fault was active — its node's failover (on_error, source failover, outcome
crm_timeout / crm_error / crm_bad_response). After each fault ends the stack heals by itself:
`settled` right calls in a row (and, after a CRM fault, every circuit closed) within
`recover_within` s, with no help from the test; after the last fault every call is right.

A fault's window, in which failovers are allowed, runs from its start until the stack is seen
recovered and no call started during it is still live. The seed (CALLERID_CHAOS_SEED, else a
fixed one) and the schedule are printed, and appended to the file named by CALLERID_TEST_NOTES
with the numbers. The short form runs by default (~30 s, 3 faults); the long form (`-m slow` or
CALLERID_TEST_SLOW=1) runs a few minutes and every kind of fault more than once.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.stack_load import (
    SLACK,
    Call,
    Load,
    broker_restart_allowed,
    check_calls,
    circuit_states,
    in_flight,
    note,
    problem_kinds,
    rabbitmqctl,
    ready,
    skip_unless_slow_wanted,
    until,
)
from tools.stack import Proc, Stack, port_answers, redis_server
from tools.stats import percentile

pytestmark = pytest.mark.integration

CRM_TIMEOUT = 1.0
BUDGET = CRM_TIMEOUT + SLACK
CRM_LATENCY_MS, CRM_JITTER_MS = 100, 200
CRM_SLOW_MS = 1600  # past the budget: every CRM call of the window times out
BREAKER_RESET = 1.0  # seconds an open circuit waits before a probe (default 5)
DEFAULT_SEED = 20240607


@dataclass(frozen=True)
class ChaosSizes:
    name: str
    rate: float  # calls started per second
    concurrency: int  # at most this many live
    faults: int  # how many faults the schedule injects
    hold: tuple[float, float]  # each fault lasts this many seconds (uniform)
    gap: tuple[float, float]  # quiet seconds after a fault has been seen recovered (uniform)
    settled: int  # this many right in a row after a fault ends = recovered
    recover_within: float  # seconds from a fault's end
    after: int  # calls after the last fault, all of which must be right


SHORT = ChaosSizes(
    "short",
    rate=40,
    concurrency=40,
    faults=3,
    hold=(2.0, 4.0),
    gap=(1.0, 2.0),
    settled=20,
    recover_within=20,
    after=60,
)
LONG = ChaosSizes(
    "long",
    rate=100,
    concurrency=120,
    faults=18,
    hold=(4.0, 12.0),
    gap=(2.0, 6.0),
    settled=60,
    recover_within=30,
    after=600,
)


@dataclass
class Fault:
    name: str
    begin: Callable[[], Awaitable[None]]
    seen: Callable[[], bool]  # the fault shows (in metrics or on the wire): it is really on
    end: Callable[[], Awaitable[None]]
    healed: Callable[[], bool] = lambda: True  # besides right calls: what recovery means


@dataclass
class Window:
    name: str
    started: float
    seen_after: float = 0.0
    ended: float = 0.0
    recovered_after: float = 0.0  # from the fault's end


class Chaos:
    """The faults this stack can suffer, each with a way to see it and to end it."""

    def __init__(self, stack: Stack, redis_dir: Path, redis: Proc, rng: random.Random) -> None:
        self.stack = stack
        self.rng = rng
        self.redis_dir = redis_dir
        self.redis_servers = [redis]
        self.broker_down = False
        self.victims: list[Proc] = []
        self._cache_errors = 0.0
        self._crm_failures = 0.0

    def crm_failures(self) -> float:
        """CRM requests that gave no usable answer, on the running resolvers."""
        requests = self.stack.resolver_metric
        answered = sum(
            requests("callerid_crm_requests_total", result=r)
            for r in ("true", "false", "destination")
        )
        return requests("callerid_crm_requests_total") - answered

    def note_baseline(self) -> None:
        self._crm_failures = self.crm_failures()
        self._cache_errors = self.stack.cache_lookups("error")

    def faults(self, amqp_port: int) -> dict[str, Fault]:
        stack = self.stack

        def crm(mode: str, **extra: object) -> Callable[[], Awaitable[None]]:
            async def flip() -> None:
                await asyncio.to_thread(stack.crm_mode, mode, **extra)

            return flip

        def crm_failing() -> bool:
            # Some resolver asked the CRM and did not get an answer it could use.
            return self.crm_failures() > self._crm_failures

        def circuits_closed() -> bool:
            return set(circuit_states(stack)) == {0}

        faults = {
            "crm-down": Fault("crm-down", crm("down"), crm_failing, crm("normal"), circuits_closed),
            "crm-slow": Fault(
                "crm-slow",
                crm("slow", delay_ms=CRM_SLOW_MS),
                crm_failing,
                crm("normal"),
                circuits_closed,
            ),
            "crm-garbage": Fault(
                "crm-garbage", crm("garbage"), crm_failing, crm("normal"), circuits_closed
            ),
            "resolver-sigkill": Fault(
                "resolver-sigkill", self._kill_resolver, lambda: True, self._replace_resolver
            ),
            "redis-stop": Fault(
                "redis-stop", self._stop_redis, self._cache_failing, self._start_redis
            ),
        }
        if broker_restart_allowed():

            async def stop_broker() -> None:
                self.broker_down = True
                await asyncio.to_thread(rabbitmqctl, "stop_app")

            async def start_broker() -> None:
                await asyncio.to_thread(rabbitmqctl, "start_app")
                await until(lambda: port_answers(amqp_port), 60, "RabbitMQ answering again")
                self.broker_down = False

            def everyone_ready() -> bool:
                gateway = stack.gateway
                assert gateway is not None
                procs = [gateway, *(p for p in stack.resolver_procs if p.alive)]
                return all(ready(p) for p in procs)

            faults["rabbitmq-restart"] = Fault(
                "rabbitmq-restart",
                stop_broker,
                lambda: not port_answers(amqp_port),
                start_broker,
                everyone_ready,
            )
        return faults

    async def _kill_resolver(self) -> None:
        alive = [p for p in self.stack.resolver_procs if p.alive]
        victim = self.rng.choice(alive)
        # Mid-load means holding requests: the broker must redeliver or lose those.
        await until(lambda: in_flight(victim) >= 1, 10, "the victim working on requests")
        victim.kill()
        self.victims.append(victim)

    async def _replace_resolver(self) -> None:
        await asyncio.to_thread(self.stack.add_resolver)

    def _cache_failing(self) -> bool:
        errors = self.stack.cache_lookups("error")
        return errors > self._cache_errors

    async def _stop_redis(self) -> None:
        await asyncio.to_thread(self.redis_servers[-1].stop)

    async def _start_redis(self) -> None:
        port = self.redis_servers[0].tcp_port
        self.redis_servers.append(await asyncio.to_thread(redis_server, self.redis_dir, port))


# Faults by kind: a short schedule takes one of each kind before any kind repeats.
KINDS = {
    "crm": ("crm-down", "crm-slow", "crm-garbage"),
    "process": ("resolver-sigkill",),
    "infrastructure": ("redis-stop", "rabbitmq-restart"),
}

# RabbitMQ is shared by everyone on this machine: restart it rarely, even in a long run.
MAX_TIMES = {"rabbitmq-restart": 2}


def schedule(rng: random.Random, available: set[str], count: int) -> list[str]:
    """`count` faults: in each round one fault of every kind, kinds in random order, within a
    kind the least used first, never the same fault twice in a row (nor one past MAX_TIMES)."""
    plan: list[str] = []
    used: Counter[str] = Counter()
    while len(plan) < count:
        kinds = [k for k, names in KINDS.items() if any(n in available for n in names)]
        rng.shuffle(kinds)
        for kind in kinds:
            names = [
                n
                for n in KINDS[kind]
                if n in available
                and (not plan or n != plan[-1])
                and used[n] < MAX_TIMES.get(n, count)
            ]
            if not names:
                continue
            least = min(used[n] for n in names)
            pick = rng.choice([n for n in names if used[n] == least])
            used[pick] += 1
            plan.append(pick)
    return plan[:count]


async def run_chaos(
    stack: Stack, chaos: Chaos, sizes: ChaosSizes, seed: int, amqp_port: int
) -> None:
    rng = random.Random(seed)
    faults = chaos.faults(amqp_port)
    plan = schedule(rng, set(faults), sizes.faults)
    note(
        f"chaos [{sizes.name}] seed={seed} rate={sizes.rate}/s schedule={plan}"
        + ("" if "rabbitmq-restart" in faults else " (rabbitmq-restart not allowed here)")
    )
    load = Load(stack, sizes.rate, sizes.concurrency, rng=random.Random(seed + 1))
    runner = asyncio.create_task(load.run())
    windows: list[Window] = []
    begun = time.monotonic()
    try:
        await until(lambda: len(load.finished) >= sizes.settled, 30, "load before the faults")
        for index, name in enumerate(plan):
            fault = faults[name]
            await asyncio.to_thread(chaos.note_baseline)
            phase = f"fault:{index}:{name}"
            window = Window(name, time.monotonic())
            windows.append(window)
            load.phase = phase
            hold = rng.uniform(*sizes.hold)
            await fault.begin()
            window.seen_after = await until(fault.seen, 30, f"{name}: the fault showing")
            # Holding the fault for its scheduled time is the schedule, not a synchronisation.
            await asyncio.sleep(max(0.0, window.started + hold - time.monotonic()))
            await fault.end()
            window.ended = time.monotonic()

            def recovered(fault: Fault = fault) -> bool:
                return load.last_right(sizes.settled) and fault.healed()

            await until(
                recovered,
                sizes.recover_within,
                f"{name}: {sizes.settled} right decisions in a row after the fault",
            )
            window.recovered_after = time.monotonic() - window.ended
            # Recovered: calls from now on must be right. Those of the window end on their own.
            load.phase = "quiet"

            def still_live(phase: str = phase) -> list[Call]:
                return [c for c in load.calls if c.ended == 0.0 and c.phase_at_start == phase]

            try:
                await until(
                    lambda: not still_live(), load.call_timeout + 5, f"{name}: window ending"
                )
            except AssertionError as exc:
                now = time.monotonic()
                stuck = [(c.node, c.customer_id, round(now - c.started, 1)) for c in still_live()]
                raise AssertionError(f"{exc}: still live {stuck[:10]}") from None
            await asyncio.sleep(rng.uniform(*sizes.gap))  # the schedule's quiet time
        load.phase = "after"
        await until(lambda: load.ended_in("after") >= sizes.after, 120, "load after the faults")
    finally:
        load.stop()
        await runner

    calls = load.calls
    problems = check_calls(calls, BUDGET)
    waits = [c.wait for c in calls if c.wait is not None]
    for n, window in enumerate(windows):
        phase = f"fault:{n}:{window.name}"
        in_window = [c for c in calls if phase in (c.phase_at_start, c.phase_at_end)]
        outcomes = Counter(c.decision[0] for c in in_window if c.decision is not None)
        note(
            f"  fault {n} {window.name}: at={window.started - begun:.1f}s "
            f"lasted={window.ended - window.started:.2f}s seen_after={window.seen_after:.2f}s "
            f"calls={len(in_window)} outcomes={dict(outcomes)} "
            f"max={max((c.wait or 0 for c in in_window), default=0) * 1000:.0f}ms "
            f"recovered_after={window.recovered_after:.2f}s"
        )
    failovers = sum(c.failover() for c in calls)
    note(
        f"chaos [{sizes.name}] totals: faults={len(windows)} calls={len(calls)} "
        f"decided={sum(c.decided for c in calls)} failovers={failovers} wrong={len(problems)} "
        f"{problem_kinds(problems)} "
        f"max={max(waits) * 1000:.0f}ms p99={percentile(waits, 0.99) * 1000:.0f}ms "
        f"budget={BUDGET * 1000:.0f}ms "
        f"max_recovery={max(w.recovered_after for w in windows):.2f}s "
        f"after_last_fault={load.ended_in('after')} calls all right="
        f"{all(c.right for c in calls if c.phase_at_start == 'after')} "
        f"wall={time.monotonic() - begun:.1f}s"
    )
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"


@pytest.fixture
def chaos_stack(
    tmp_path: Path, amqp_url: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Stack, Chaos, int]]:
    """A scaled-out stack on its own redis-server; everything stopped by PID at the end."""
    if request.node.get_closest_marker("slow") is not None:
        skip_unless_slow_wanted(request.config)
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = redis_server(redis_dir)
    seed = int(os.environ.get("CALLERID_CHAOS_SEED", DEFAULT_SEED))
    stack = Stack(
        tmp_path / "stack",
        amqp_url=amqp_url,
        redis_url=f"redis://127.0.0.1:{redis.tcp_port}/0",
        resolvers=3,
        crm_timeout=CRM_TIMEOUT,
        crm_latency_ms=CRM_LATENCY_MS,
        crm_latency_jitter_ms=CRM_JITTER_MS,
        extra_env={"CALLERID_BREAKER_RESET": str(BREAKER_RESET)},
    )
    chaos = Chaos(stack, redis_dir, redis, random.Random(seed + 2))
    try:
        stack.start()
        yield stack, chaos, seed
    finally:
        if chaos.broker_down:  # the test failed with the broker down: never leave it so
            rabbitmqctl("start_app")
        stack.stop()
        for server in chaos.redis_servers:
            server.stop()


async def test_chaos_short(chaos_stack: tuple[Stack, Chaos, int], amqp_url: str) -> None:
    """Three random faults (seeded) under 40 calls/s: no call without a decision, none past
    its budget, none wrong for its inputs; the stack heals by itself after each fault."""
    stack, chaos, seed = chaos_stack
    await run_chaos(stack, chaos, SHORT, seed, urlsplit(amqp_url).port or 5672)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_long(chaos_stack: tuple[Stack, Chaos, int], amqp_url: str) -> None:
    """Eighteen random faults (every kind at least twice) under 100 calls/s for minutes: the
    same invariants, call by call, and every fault healed by itself."""
    stack, chaos, seed = chaos_stack
    await run_chaos(stack, chaos, LONG, seed, urlsplit(amqp_url).port or 5672)
