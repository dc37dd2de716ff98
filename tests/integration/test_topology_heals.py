"""Topology heals, for real: the request queue or exchange deleted on the live broker.

On the processes an operator runs (`tools.stack.Stack`: a gateway over RabbitMQ, two resolver
processes, a mock CRM; its own name prefix on the shared broker), the queue or exchange is
deleted as `rabbitmqctl delete_queue` / `delete_exchange` would (here on an AMQP channel, so
the moment is known to the millisecond). What these tests prove:

- deleted while calls flow: with no help, calls are answered again within seconds; the calls
  caught in between fail over (`crm_timeout`), none past its budget, and once the stack has
  healed every call is right. Every process that noticed logs the loss once (WARNING) and the
  heal once (INFO), however many calls came meanwhile; the others log nothing;
- while the name cannot be declared again (another queue or exchange, with other arguments,
  holds it), the processes that noticed answer /readyz 503 and calls fail over; they keep
  retrying, logging the refusal once (ERROR); once the name is free they heal by themselves.

The not-ready window of a plain deletion is the time to declare a few things, tens of ms: too
short to catch by polling /readyz, so readiness is asserted where the topology is held broken,
and the window of a plain deletion is read from each process's heal line. Numbers are printed,
and appended to the file named by `CALLERID_TEST_NOTES`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from shared.topology import Topology
from tests.stack_load import SLACK, Call, Load, check_calls, note, ready, until
from tools.asterisk_sim import CallResult, CallScript, run_call
from tools.stack import DEFAULT_FAILOVER, Proc, Stack

pytestmark = pytest.mark.integration

CRM_TIMEOUT = 1.0
RATE, CONCURRENCY = 40, 20  # calls started per second, at most this many live
BEFORE, AFTER = 40, 40  # calls completed before the fault, and right after the heal
HEAL_WITHIN = 15.0  # generous: proves the stack healed by itself, not how fast
LOST = "RabbitMQ topology {prefix!r} lost ("
REFUSED = "could not declare the RabbitMQ topology again"
HEALED = "RabbitMQ topology {prefix!r} declared again after"
HEALED_AFTER = re.compile(r"declared again after ([0-9.]+) s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, amqp_url: str) -> Iterator[Stack]:
    """One stack for the module, logging at INFO (the heal is an INFO line); every test
    leaves its topology whole."""
    with Stack(
        tmp_path_factory.mktemp("heals"),
        amqp_url=amqp_url,
        resolvers=2,
        crm_timeout=CRM_TIMEOUT,
        extra_env={"CALLERID_LOG_LEVEL": "INFO"},
    ) as running:
        yield running


@asynccontextmanager
async def admin(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    """A plain channel of the test's own, to delete and declare with."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield await connection.channel()


class Logs:
    """What each process of the stack logs from now on."""

    def __init__(self, stack: Stack) -> None:
        assert stack.gateway is not None
        self.topology = Topology(prefix=stack.prefix)
        self.procs: list[Proc] = [stack.gateway, *stack.resolver_procs]
        self._from = {proc.name: proc.log_path.stat().st_size for proc in self.procs}

    def lines(self, proc: Proc, level: str | None = None) -> list[str]:
        with proc.log_path.open("rb") as log:
            log.seek(self._from[proc.name])
            lines = log.read().decode(errors="replace").splitlines()
        # "<date> <time> <LEVEL> <logger>: <message>" (shared.settings.LOG_FORMAT)
        return [line for line in lines if level is None or line.split(" ")[2:3] == [level]]

    def warnings(self, proc: Proc) -> list[str]:
        return [
            line for level in ("WARNING", "ERROR", "CRITICAL") for line in self.lines(proc, level)
        ]

    def count(self, proc: Proc, text: str, level: str) -> int:
        text = text.format(prefix=self.topology.prefix)
        return sum(1 for line in self.lines(proc, level) if text in line)

    def losses(self, proc: Proc) -> int:
        return self.count(proc, LOST, "WARNING")

    def refusals(self, proc: Proc) -> int:
        """PRECONDITION_FAILED, the refusal these tests provoke, is an ERROR: it names the fix."""
        return self.count(proc, REFUSED, "ERROR")

    def heals(self, proc: Proc) -> int:
        return self.count(proc, HEALED, "INFO")

    def not_ready_for(self, proc: Proc) -> list[float]:
        """Seconds from each loss to its heal, as the process logged them."""
        return [
            float(match.group(1))
            for line in self.lines(proc, "INFO")
            if (match := HEALED_AFTER.search(line))
        ]


def first_answered_after(load: Load, moment: float) -> Call | None:
    """The first call started after `moment` to get its right answer (from the CRM)."""
    answered = [call for call in list(load.finished) if call.started > moment and call.right]
    return min(answered, key=lambda call: call.ended, default=None)


async def run_through(load: Load, stack: Stack, fault: str, logs: Logs) -> float:
    """Calls before, `fault` (deleting something), calls until one started after the deletion
    is answered, then calls after every call alive at that point has ended. Seconds from the
    deletion to that first answer."""
    runner = asyncio.create_task(load.run())
    try:
        await until(lambda: load.ended_in("before") >= BEFORE, 30, "calls before the deletion")
        load.phase = "fault"
        async with admin(stack.amqp_url or "") as channel:
            if fault == "queue":
                await channel.queue_delete(logs.topology.request_queue)
            else:
                await channel.exchange_delete(logs.topology.request_exchange)
            # Confirmed deleted: a call started from now on publishes after the deletion.
            deleted = time.monotonic()
        await until(
            lambda: first_answered_after(load, deleted) is not None,
            HEAL_WITHIN,
            f"a call answered after the request {fault} was deleted",
        )
        healed = time.monotonic()
        # Calls caught by the deletion end by their budget; only those may fail over.
        await until(
            lambda: all(call.ended for call in list(load.calls) if call.started <= healed),
            CRM_TIMEOUT + 10,
            "the calls alive at the heal to end",
        )
        load.phase = "after"
        await until(lambda: load.ended_in("after") >= AFTER, 30, "calls after the heal")
    finally:
        load.stop()
        await runner
    first = first_answered_after(load, deleted)
    assert first is not None
    return first.ended - deleted


def check_the_load(load: Load) -> tuple[int, float]:
    """Every call decided within budget and right, or (only around the fault) failed over;
    every call after the heal right. The failovers, and the longest wait of a call."""
    assert check_calls(load.calls, CRM_TIMEOUT + SLACK, ("crm_timeout",)) == []
    after = [call for call in load.calls if call.phase_at_start == "after"]
    assert len(after) >= AFTER
    assert all(call.right for call in after)
    failovers = sum(1 for call in load.calls if call.failover(("crm_timeout",)))
    return failovers, max(call.wait for call in load.calls if call.wait is not None)


async def place(stack: Stack, customer_ids: Sequence[str]) -> list[CallResult]:
    """One call per id on the crm-router node (3), five at a time."""
    host, port = stack.agi_address
    gate = asyncio.Semaphore(5)

    async def one(customer_id: str) -> CallResult:
        async with gate:
            script = CallScript(node="3", entries=[customer_id], uniqueid=f"h.{customer_id}")
            return await run_call(host, port, script, timeout=10)

    return list(await asyncio.gather(*(one(cid) for cid in customer_ids)))


def decisions(results: Sequence[CallResult]) -> set[tuple[str, str, str, str]]:
    return {
        (
            r.variables.get("OML_IDENT_OUTCOME", "-"),
            r.variables.get("OML_DEST_TYPE", "-"),
            r.variables.get("OML_DEST_ID", "-"),
            r.variables.get("OML_IDENT_SOURCE", "-"),
        )
        for r in results
    }


FAILED_OVER = {("crm_timeout", *DEFAULT_FAILOVER["3"], "failover")}
IDENTIFIED = {("identified", "1", "3", "crm")}


def ids(first: int, count: int) -> list[str]:
    """Customer ids the default CRM table answers `true` for (they start with 1)."""
    return [str(first + n) for n in range(count)]


async def test_a_deleted_request_queue_heals_while_calls_flow(stack: Stack) -> None:
    """The request queue is deleted under 40 calls/s. The broker cancels both resolvers'
    consumers; each declares the topology again and consumes the new queue, with no help.
    Calls are answered again within seconds; those caught in between fail over within their
    budget; after the heal every call is right. Each resolver logs the loss once (WARNING)
    and the heal once (INFO) and nothing else at WARNING; the gateway, if a request of its
    came back unroutable meanwhile, logs the same pair once."""
    logs = Logs(stack)
    load = Load(stack, RATE, CONCURRENCY)

    heal_seconds = await run_through(load, stack, "queue", logs)

    failovers, longest = check_the_load(load)
    await until(
        lambda: all(logs.heals(proc) == 1 for proc in stack.resolver_procs),
        10,
        "each resolver to log its heal",
    )
    windows = {}
    for proc in stack.resolver_procs:
        assert logs.losses(proc) == 1
        assert logs.heals(proc) == 1
        assert len(logs.warnings(proc)) == 1, logs.warnings(proc)
        windows[proc.name] = logs.not_ready_for(proc)
    gateway = stack.gateway
    assert gateway is not None
    assert logs.losses(gateway) == logs.heals(gateway) <= 1
    assert len(logs.warnings(gateway)) == logs.losses(gateway), logs.warnings(gateway)
    windows[gateway.name] = logs.not_ready_for(gateway)
    note(
        f"heal, deleted request queue: first call answered {heal_seconds:.3f} s after the "
        f"deletion; not ready (s, from the logs) {windows}; calls={len(load.calls)} "
        f"failovers={failovers} longest_wait={longest * 1000:.0f} ms"
    )


async def test_a_deleted_request_exchange_heals_while_calls_flow(stack: Stack) -> None:
    """The request exchange is deleted under 40 calls/s. The gateway's next publish makes the
    broker close its channel (404 NOT_FOUND): the gateway declares the exchange and the
    queue's binding again, with no help. Calls are answered again within seconds; those caught
    in between fail over within their budget; after the heal every call is right. The gateway
    logs the loss once (WARNING) and the heal once (INFO) and nothing else at WARNING; the
    resolvers, whose queue and consumers were never touched, log nothing about it."""
    logs = Logs(stack)
    load = Load(stack, RATE, CONCURRENCY)

    heal_seconds = await run_through(load, stack, "exchange", logs)

    failovers, longest = check_the_load(load)
    gateway = stack.gateway
    assert gateway is not None
    await until(lambda: logs.heals(gateway) == 1, 10, "the gateway to log its heal")
    assert logs.losses(gateway) == 1
    assert len(logs.warnings(gateway)) == 1, logs.warnings(gateway)
    for proc in stack.resolver_procs:
        assert logs.losses(proc) == 0
        assert logs.warnings(proc) == []
    note(
        f"heal, deleted request exchange: first call answered {heal_seconds:.3f} s after the "
        f"deletion; gateway not ready {logs.not_ready_for(gateway)} s (from its log); "
        f"calls={len(load.calls)} failovers={failovers} longest_wait={longest * 1000:.0f} ms"
    )


async def test_while_the_request_queue_cannot_be_declared_again_no_service_is_ready(
    stack: Stack,
) -> None:
    """The request queue is deleted and a queue with other arguments takes its name (the
    resolvers paused meanwhile, so they cannot declare it first). The broker cancels the
    resolvers' consumers and refuses their declaration (PRECONDITION_FAILED): both answer
    /readyz 503. The gateway, whose next request comes back unroutable, is refused too and
    answers 503. Calls fail over meanwhile. Each process logs the loss (WARNING) and the
    first refusal (ERROR, naming the fix) once, however many calls come, and keeps retrying;
    once the other queue is deleted, every one declares the topology again by itself, is
    ready, and calls are identified."""
    logs = Logs(stack)
    topology = logs.topology
    resolvers = stack.resolver_procs
    gateway = stack.gateway
    assert gateway is not None
    async with admin(stack.amqp_url or "") as channel:
        for proc in resolvers:
            proc.pause()
        try:
            await channel.queue_delete(topology.request_queue)
            await channel.declare_queue(
                topology.request_queue, durable=True, arguments={"x-max-length": 1}
            )
        finally:
            for proc in resolvers:
                proc.resume()
        try:
            await until(
                lambda: not any(ready(proc) for proc in resolvers), 10, "resolvers not ready"
            )
            assert decisions(await place(stack, ids(14000, 10))) == FAILED_OVER
            await until(lambda: not ready(gateway), 10, "the gateway not ready")
            await until(
                lambda: all(logs.refusals(proc) == 1 for proc in logs.procs),
                10,
                "every process to log the refused declaration",
            )
            assert decisions(await place(stack, ids(14100, 20))) == FAILED_OVER
            assert not any(ready(proc) for proc in logs.procs)
        finally:
            await channel.queue_delete(topology.request_queue)
    healed_in = await until(
        lambda: all(ready(proc) for proc in logs.procs), HEAL_WITHIN, "every process ready"
    )

    assert decisions(await place(stack, ids(14200, 10))) == IDENTIFIED
    await until(lambda: all(logs.heals(p) == 1 for p in logs.procs), 10, "every heal logged")
    for proc in logs.procs:
        assert logs.losses(proc) == 1, proc.name
        assert logs.refusals(proc) == 1, proc.name
        assert "PRECONDITION_FAILED" in "".join(logs.lines(proc, "ERROR"))
        assert len(logs.warnings(proc)) == 2, logs.warnings(proc)
    note(
        f"heal, request queue held by another: every process ready {healed_in:.2f} s after "
        f"the name was freed (retries back off to 2 s at most); "
        f"not ready (s, from the logs) { {p.name: logs.not_ready_for(p) for p in logs.procs} }"
    )


async def test_while_the_request_exchange_cannot_be_declared_again_the_gateway_is_not_ready(
    stack: Stack,
) -> None:
    """The request exchange is deleted and a fanout exchange takes its name before any call.
    The gateway's next request comes back unroutable and its declaration is refused
    (PRECONDITION_FAILED): it answers /readyz 503 and calls fail over, while the resolvers,
    whose queue is intact, stay ready and log nothing. The gateway logs the loss and the
    refusal once, however many calls come; once the fanout exchange is deleted it declares
    the exchange and the binding again by itself, is ready, and calls are identified."""
    logs = Logs(stack)
    topology = logs.topology
    gateway = stack.gateway
    assert gateway is not None
    async with admin(stack.amqp_url or "") as channel:
        await channel.exchange_delete(topology.request_exchange)
        await channel.declare_exchange(
            topology.request_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        try:
            assert decisions(await place(stack, ids(15000, 10))) == FAILED_OVER
            await until(lambda: not ready(gateway), 10, "the gateway not ready")
            await until(lambda: logs.refusals(gateway) == 1, 10, "the refusal logged")
            assert decisions(await place(stack, ids(15100, 20))) == FAILED_OVER
            assert not ready(gateway)
            assert all(ready(proc) for proc in stack.resolver_procs)
        finally:
            await channel.exchange_delete(topology.request_exchange)
    healed_in = await until(lambda: ready(gateway), HEAL_WITHIN, "the gateway ready")

    assert decisions(await place(stack, ids(15200, 10))) == IDENTIFIED
    await until(lambda: logs.heals(gateway) == 1, 10, "the heal logged")
    assert logs.losses(gateway) == 1
    assert logs.refusals(gateway) == 1
    assert len(logs.warnings(gateway)) == 2, logs.warnings(gateway)
    for proc in stack.resolver_procs:
        assert logs.warnings(proc) == []
    note(
        f"heal, request exchange held by another: gateway ready {healed_in:.2f} s after the "
        f"name was freed (retries back off to 2 s at most); gateway not ready "
        f"{logs.not_ready_for(gateway)} s (from its log)"
    )
