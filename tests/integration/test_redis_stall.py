"""A stalled Redis or a frozen resolver must not cost calls a healthy CRM answered in time.

Real processes (`tools.stack.Stack`: gateway over RabbitMQ, two resolvers, mock CRM answering
in 100–300 ms for a 1 s budget) under a small steady load (`tests.stack_load.Load`), with
one fault in the middle:

- Redis stalled: the stack's own redis-server runs `DEBUG SLEEP 3` (it accepts connections
  but answers nothing for 3 s). Every cache operation ends within `CALLERID_CACHE_TIMEOUT`
  and fails open, so every call is still decided from the CRM (or the cache) — no failover,
  no `crm_error` — during the stall and after it. Besides the stack, this test process runs
  the cache operations itself through the adapter the services build (`build_cache`), timing
  each one: the worst of them is the figure that shows the bound.
- Resolvers frozen: both resolvers SIGSTOPped for a few seconds, then SIGCONTed. Calls alive
  meanwhile fail over at the budget (`crm_timeout`: nobody answers). Once resumed, the
  resolvers drop the requests whose deadline passed without asking the CRM, and a request
  whose time ran out while the process was frozen is not the CRM's fault: no circuit opens,
  no call gets `crm_error`, and calls are right again at once.

Numbers are printed and appended to the file named by CALLERID_TEST_NOTES.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from crm_resolver.app import build_cache
from crm_resolver.ports import Lease
from crm_resolver.redis_cache import RedisCache
from shared.settings import CommonSettings
from tests.fakes import TRUE
from tests.stack_load import (
    CRM_NODES,
    SLACK,
    Call,
    Load,
    check_calls,
    circuit_states,
    note,
    redis_db,
    until,
)
from tools.stack import Proc, Stack, redis_server
from tools.stats import percentile

T = TypeVar("T")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CRM_TIMEOUT = 1.0
CACHE_TIMEOUT = 0.05  # CALLERID_CACHE_TIMEOUT, the default, set explicitly
CRM_LATENCY_MS, CRM_JITTER_MS = 100, 200
REDIS_DB = 12
STALL = 3  # seconds of DEBUG SLEEP
FREEZE = 6.0  # seconds both resolvers stay SIGSTOPped
RATE = 40  # calls started per second, as in the runs
# "Proves the timeout fired" bound for one cache operation: ten times the timeout, far below
# the 3 s stall it would otherwise wait out.
CACHE_OP_BOUND = 10 * CACHE_TIMEOUT
# The breaker's wait, default (5 s): a breaker opened by the fault would still be refusing
# calls in the "after" phase.
BREAKER_RESET = 5.0


def debuggable_redis(workdir: Path) -> Proc:
    """A private redis-server that also accepts DEBUG from loopback (Redis 7 refuses DEBUG
    unless started with --enable-debug-command)."""
    return redis_server(workdir, extra_args=("--enable-debug-command", "local"))


def debug_sleep(port: int, seconds: float) -> None:
    """Stall the Redis on `port` for `seconds` (blocks the calling thread that long)."""
    client = redis.Redis(port=port, socket_timeout=seconds + 10)
    try:
        client.execute_command("DEBUG", "SLEEP", seconds)  # type: ignore[no-untyped-call]
    finally:
        client.close()


@dataclass
class CacheProbe:
    """Cache operations run steadily from this process through `cache` — fetch, put, lead,
    peek and settle in turn, on `workers` concurrent tasks — each timed from its call until it
    returned (a settle: until its future was done). `phase` is stamped on each."""

    cache: RedisCache
    workers: int = 6
    pace: float = 0.05  # seconds between one worker's rounds (pacing, not waiting)
    phase: str = "before"
    times: list[tuple[str, str, float]] = field(default_factory=list)  # (phase, op, seconds)
    # (phase, seconds): how late this process's event loop ran a 5 ms timer, which every
    # operation's time includes (the box's two cores also run the stack and the load).
    lags: list[tuple[str, float]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def stop(self) -> None:
        self._stopping.set()

    def worst(self, phase: str) -> float:
        return max((took for seen, _, took in self.times if seen == phase), default=0.0)

    def count(self, phase: str) -> int:
        return sum(1 for seen, _, _ in self.times if seen == phase)

    def p99(self, phase: str) -> float:
        return percentile([took for seen, _, took in self.times if seen == phase], 0.99)

    def worst_lag(self, phase: str) -> float:
        return max((lag for seen, lag in self.lags if seen == phase), default=0.0)

    async def _lag(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            phase, started = self.phase, loop.time()
            await asyncio.sleep(0.005)  # a timer to see how late it runs, not a wait
            self.lags.append((phase, loop.time() - started - 0.005))

    async def _timed(self, op: str, work: Awaitable[T]) -> T:
        phase, started = self.phase, time.monotonic()
        result = await work
        self.times.append((phase, op, time.monotonic() - started))
        return result

    async def _worker(self) -> None:
        cache = self.cache
        while not self._stopping.is_set():
            customer = str(100_000 + next(self._ids))
            await self._timed("fetch", cache.fetch("probe", customer))
            await self._timed("put", cache.put("probe", customer, TRUE, 30))
            fresh = str(100_000 + next(self._ids))
            lease = await self._timed("lead", cache.lead("probe", fresh, 5))
            await self._timed("peek", cache.peek("probe", fresh))
            if isinstance(lease, Lease):
                await self._timed("settle", cache.settle(lease, TRUE, 30))
            await asyncio.sleep(self.pace)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._lag())
            for _ in range(self.workers):
                group.create_task(self._worker())


@pytest.fixture
def make_stack(
    tmp_path: Path, amqp_url: str, redis_base_url: str
) -> Iterator[Callable[..., Stack]]:
    """Start a stack of two resolvers (stopped by PID at the end); `redis_url` may name the
    test's own Redis."""
    started: list[Stack] = []

    def make(redis_url: str | None = None) -> Stack:
        stack = Stack(
            tmp_path / f"stack{len(started)}",
            amqp_url=amqp_url,
            redis_url=redis_url or redis_db(redis_base_url, REDIS_DB),
            resolvers=2,
            crm_timeout=CRM_TIMEOUT,
            crm_latency_ms=CRM_LATENCY_MS,
            crm_latency_jitter_ms=CRM_JITTER_MS,
            extra_env={
                "CALLERID_CACHE_TIMEOUT": str(CACHE_TIMEOUT),
                "CALLERID_BREAKER_RESET": str(BREAKER_RESET),
            },
        )
        started.append(stack)
        return stack.start()

    yield make
    for stack in started:
        stack.stop()


def outcomes(calls: list[Call]) -> dict[str, int]:
    return dict(Counter(call.decision[0] for call in calls if call.decision is not None))


def crm_results(stack: Stack, result: str) -> float:
    return sum(
        stack.resolver_metric("callerid_crm_requests_total", node=node, result=result)
        for node in CRM_NODES
    )


async def test_redis_stall_under_load_costs_no_call(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """`DEBUG SLEEP 3` on the stack's Redis under RATE (40) calls/s: each cache operation
    ends within the cache timeout (the worst one timed here is bounded far below the stall),
    the services go on without the cache (cache errors counted), and every call — during the
    stall and after it — is decided right, from the CRM or the cache: no failover, no
    `crm_error`, no circuit refusing a call."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    server = debuggable_redis(redis_dir)
    try:
        assert server.tcp_port is not None
        url = f"redis://127.0.0.1:{server.tcp_port}/0"
        stack = make_stack(url)
        async with contextlib.AsyncExitStack() as exits:
            settings = CommonSettings(
                redis_url=url, cache_timeout=CACHE_TIMEOUT, cache_key_pepper="test-cache-secret-01"
            )
            cache = build_cache(exits, settings)
            assert isinstance(cache, RedisCache)
            probe = CacheProbe(cache)
            load = Load(stack, rate=RATE, concurrency=40)
            runner = asyncio.create_task(load.run())
            prober = asyncio.create_task(probe.run())
            try:
                await until(lambda: load.ended_in("before") >= 40, 30, "load before the stall")
                errors_before = await asyncio.to_thread(stack.cache_lookups, "error")
                probe_errors_before = cache.errors
                load.phase = probe.phase = "fault"
                await asyncio.to_thread(debug_sleep, server.tcp_port, STALL)
                load.phase = probe.phase = "after"
                errors_stall = await asyncio.to_thread(stack.cache_lookups, "error")
                probe_errors_stall = cache.errors
                await until(lambda: load.ended_in("after") >= 120, 30, "load after the stall")
            finally:
                load.stop()
                probe.stop()
                await runner
                await prober

        calls = load.calls
        during = [call for call in calls if call.during_fault]
        after = [call for call in calls if call.phase_at_start == "after"]
        waits = [call.wait for call in during if call.wait is not None]
        failovers = sum(call.failover() for call in calls)
        crm_errors = sum(
            call.decision is not None and call.decision[0] == "crm_error" for call in calls
        )
        refused = await asyncio.to_thread(crm_results, stack, "crm_circuit_open")
        note(
            f"redis DEBUG SLEEP {STALL} s at {RATE} calls/s: calls={len(calls)} "
            f"during_stall={len(during)} {outcomes(during)} after={len(after)} {outcomes(after)} "
            f"failovers={failovers} crm_error={crm_errors} circuit_open_refusals={refused:.0f} "
            f"stack_cache_errors={errors_stall - errors_before:.0f} "
            f"stall_wait_max={max(waits, default=0) * 1000:.0f}ms "
            f"p99={percentile(waits, 0.99) * 1000:.0f}ms | "
            f"probe: ops_in_stall={probe.count('fault')} "
            f"errors={probe_errors_stall - probe_errors_before} "
            f"worst_op_stall={probe.worst('fault') * 1000:.0f}ms "
            f"p99_op_stall={probe.p99('fault') * 1000:.0f}ms "
            f"worst_op_after={probe.worst('after') * 1000:.0f}ms "
            f"(timeout {CACHE_TIMEOUT * 1000:.0f}ms; this process's loop lag: "
            f"stall {probe.worst_lag('fault') * 1000:.0f}ms, "
            f"after {probe.worst_lag('after') * 1000:.0f}ms)"
        )
        # The stall really hit the services and the probe: their cache calls failed.
        assert errors_stall > errors_before
        assert probe_errors_stall > probe_errors_before
        # Each cache operation ended because its timeout fired, not because Redis woke up.
        assert probe.worst("fault") < CACHE_OP_BOUND
        # The CRM answered every lookup in time: every call is right, none failed over.
        problems = check_calls(calls, CRM_TIMEOUT + SLACK, ())
        assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"
        assert refused == 0
        assert set(await asyncio.to_thread(circuit_states, stack)) == {0}
    finally:
        server.stop()


async def test_resolvers_frozen_and_resumed_blame_no_crm(make_stack: Callable[..., Stack]) -> None:
    """Both resolvers SIGSTOPped for FREEZE (6) s under RATE (40) calls/s, then SIGCONTed: calls
    alive meanwhile fail over at the budget (`crm_timeout`), requests whose deadline passed
    in the frozen processes are dropped (counted as expired), and the healthy CRM is never
    blamed for time the resolvers lost: no circuit opens, no call gets `crm_error`, and the
    calls placed after the resume are all decided right."""
    stack = make_stack()
    resolvers = stack.resolver_procs
    load = Load(stack, rate=RATE, concurrency=60)
    runner = asyncio.create_task(load.run())
    frozen = False
    try:
        await until(lambda: load.ended_in("before") >= 30, 30, "load before the freeze")
        expired_before = await asyncio.to_thread(
            stack.resolver_metric, "callerid_expired_requests_total"
        )
        load.phase = "fault"
        for proc in resolvers:
            proc.pause()
        frozen = True
        # The fault lasts FREEZE seconds of the load's own time: a wall-clock length is what
        # is wanted here, not a wait for something to happen.
        await asyncio.sleep(FREEZE)
        for proc in resolvers:
            proc.resume()
        frozen = False
        await until(lambda: load.last_right(20), 20, "20 right decisions in a row after resume")
        load.phase = "after"
        await until(lambda: load.ended_in("after") >= 100, 30, "load after the resume")
    finally:
        if frozen:
            for proc in resolvers:
                proc.resume()
        load.stop()
        await runner

    calls = load.calls
    during = [call for call in calls if call.during_fault]
    after = [call for call in calls if call.phase_at_start == "after"]
    crm_errors = sum(
        call.decision is not None and call.decision[0] == "crm_error" for call in calls
    )
    expired = (
        await asyncio.to_thread(stack.resolver_metric, "callerid_expired_requests_total")
        - expired_before
    )
    refused = await asyncio.to_thread(crm_results, stack, "crm_circuit_open")
    timeouts = await asyncio.to_thread(crm_results, stack, "crm_timeout")
    note(
        f"resolvers frozen {FREEZE:g} s at {RATE} calls/s: calls={len(calls)} "
        f"during_freeze={len(during)} {outcomes(during)} after={len(after)} {outcomes(after)} "
        f"crm_error={crm_errors} circuit_open_refusals={refused:.0f} "
        f"crm_attempts_timed_out={timeouts:.0f} expired_dropped={expired:.0f}"
    )
    problems = check_calls(calls, CRM_TIMEOUT + SLACK, ("crm_timeout",))
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"
    assert crm_errors == 0
    assert refused == 0
    assert set(await asyncio.to_thread(circuit_states, stack)) == {0}
    assert expired > 0
