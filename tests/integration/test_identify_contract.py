"""The identification RPC contract, run twice: on the in-memory bus and on real RabbitMQ.

One set of tests, one fixture (`rig`) that yields the same harness for both transports: an
`Identifier`, a way to bind a `RequestHandler` on the resolver side, a way to make requests
undeliverable, and the two numbers the contract is about (calls still pending, late replies).
At the end, gateway-side behaviour specific to RabbitMQ: metrics labels and a dropped connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from agi_gateway.amqp_identifier import AmqpIdentifier
from agi_gateway.metrics import GatewayMetrics
from crm_resolver.amqp_worker import AmqpWorker
from crm_resolver.metrics import ResolverMetrics
from shared.destination import Destination
from shared.memory_bus import MemoryBus
from shared.messages import IdentifyReply, IdentifyRequest
from shared.outcomes import ErrorCode, Source, Verdict
from shared.ports import Identifier, IdentifyTimeout, IdentifyUnavailable, RequestHandler
from shared.topology import Topology
from tests.waiting import eventually

ON_TIME = 0.1  # a timeout may come this much after the deadline, never before it


def request(
    customer_id: str = "12345", *, budget: float = 2.0, node_id: str = "7"
) -> IdentifyRequest:
    return IdentifyRequest(
        request_id=uuid.uuid4().hex,
        node_id=node_id,
        customer_id=customer_id,
        caller_number="5551234",
        call_id="1700000000.1",
        deadline=time.time() + budget,
    )


def answer(req: IdentifyRequest) -> IdentifyReply:
    """A reply that names the request's customer, so mixed-up replies are detectable."""
    return IdentifyReply(
        request_id=req.request_id,
        verdict=Verdict.DESTINATION,
        destination=Destination(type=1, id=int(req.customer_id)),
        source=Source.CACHE,
        crm_ms=1.5,
    )


@dataclass
class EchoHandler:
    """Answers every request with `answer(request)`, counting calls; optionally held at a gate."""

    gate: asyncio.Event | None = None
    calls: list[IdentifyRequest] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: IdentifyRequest) -> IdentifyReply:
        self.calls.append(request)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return answer(request)


@dataclass
class Rig:
    identifier: Identifier
    bind: Callable[[RequestHandler], Awaitable[None]]
    make_undeliverable: Callable[[], Awaitable[None]]
    pending: Callable[[], int]
    late_replies: Callable[[], float]


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.integration)])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    if request.param == "memory":
        async for memory in _memory_rig():
            yield memory
    else:
        url = request.getfixturevalue("amqp_url")
        name = request.getfixturevalue("unique_name")
        async for rabbit in _rabbitmq_rig(url, Topology(prefix=name)):
            yield rabbit


async def _memory_rig() -> AsyncIterator[Rig]:
    late = 0

    def on_late_reply() -> None:
        nonlocal late
        late += 1

    bus = MemoryBus(on_late_reply=on_late_reply)

    async def bind(handler: RequestHandler) -> None:
        bus.bind(handler)

    async def unbind() -> None:
        bus.unbind()

    yield Rig(bus, bind, unbind, lambda: bus.pending, lambda: late)
    await bus.close()


async def _rabbitmq_rig(url: str, topology: Topology) -> AsyncIterator[Rig]:
    registry = CollectorRegistry()
    identifier = AmqpIdentifier(url, GatewayMetrics(registry), topology=topology)
    workers: list[AmqpWorker] = []
    admin = await aio_pika.connect(url)
    try:
        await identifier.start()

        async def bind(handler: RequestHandler) -> None:
            worker = AmqpWorker(
                url, handler, ResolverMetrics(CollectorRegistry()), topology=topology
            )
            workers.append(worker)
            await worker.start()

        async def delete_request_queue() -> None:
            async with admin.channel() as channel:
                await channel.queue_delete(topology.request_queue)

        def late_replies() -> float:
            return registry.get_sample_value("callerid_late_replies_total") or 0.0

        yield Rig(identifier, bind, delete_request_queue, lambda: identifier.pending, late_replies)
    finally:
        for worker in workers:
            await worker.stop(drain_timeout=5)
        await identifier.close()
        async with admin.channel() as channel:
            await topology.delete(channel)
        await admin.close()


async def test_reply_round_trip(rig: Rig) -> None:
    """The handler's reply reaches the caller unchanged, and nothing stays pending."""
    handler = EchoHandler()
    await rig.bind(handler)
    req = request("4242")

    reply = await rig.identifier.identify(req)

    assert reply == answer(req)
    assert [call.request_id for call in handler.calls] == [req.request_id]
    assert handler.calls[0] == req
    assert rig.pending() == 0


async def test_error_envelope_passes_through_unchanged(rig: Rig) -> None:
    """An error reply (verdict error + code + CRM time) arrives exactly as the handler sent it."""
    sent: list[IdentifyReply] = []

    async def failing(request: IdentifyRequest) -> IdentifyReply:
        sent.append(
            IdentifyReply.failure(request.request_id, ErrorCode.CRM_CIRCUIT_OPEN, crm_ms=0.25)
        )
        return sent[-1]

    await rig.bind(failing)

    reply = await rig.identifier.identify(request())

    assert reply == sent[0]
    assert reply.verdict is Verdict.ERROR
    assert reply.error is ErrorCode.CRM_CIRCUIT_OPEN
    assert reply.destination is None


async def test_handler_that_raises_yields_an_internal_error_envelope(rig: Rig) -> None:
    """A crashing handler is a bug, but the caller still gets an answer: error `internal`."""

    async def crashing(request: IdentifyRequest) -> IdentifyReply:
        raise RuntimeError("bug in the resolver")

    await rig.bind(crashing)
    req = request()

    reply = await rig.identifier.identify(req)

    assert reply == IdentifyReply.failure(req.request_id, ErrorCode.INTERNAL)


async def test_slow_handler_times_out_on_time_and_its_late_reply_is_counted(rig: Rig) -> None:
    """A handler slower than the deadline: IdentifyTimeout at the deadline (not before, at
    most 100 ms after); the reply that comes later is dropped and counted as late."""
    gate = asyncio.Event()
    handler = EchoHandler(gate=gate)
    await rig.bind(handler)
    req = request(budget=0.3)

    with pytest.raises(IdentifyTimeout):
        await rig.identifier.identify(req)
    gave_up = time.time()

    assert req.deadline <= gave_up <= req.deadline + ON_TIME
    assert handler.entered.is_set()
    assert rig.late_replies() == 0
    gate.set()
    await eventually(lambda: rig.late_replies() == 1)
    await eventually(lambda: rig.pending() == 0)


async def test_no_consumer_is_unavailable_at_once(rig: Rig) -> None:
    """With nothing to deliver to (no handler / no queue bound to the exchange), the caller
    learns at once with IdentifyUnavailable, long before its deadline."""
    await rig.make_undeliverable()
    req = request(budget=3.0)
    started = time.monotonic()

    with pytest.raises(IdentifyUnavailable):
        await rig.identifier.identify(req)

    assert time.monotonic() - started < 0.5
    assert rig.pending() == 0


async def test_already_expired_request_times_out_at_once(rig: Rig) -> None:
    """A request past its deadline is never sent: IdentifyTimeout at once, handler not called."""
    handler = EchoHandler()
    await rig.bind(handler)
    req = request(budget=-0.01)
    started = time.monotonic()

    with pytest.raises(IdentifyTimeout):
        await rig.identifier.identify(req)

    assert time.monotonic() - started < 0.05
    assert handler.calls == []
    assert rig.pending() == 0


async def test_concurrent_requests_each_get_their_own_reply(rig: Rig) -> None:
    """200 requests in flight at once: every caller gets the reply to its own request."""
    await rig.bind(EchoHandler())
    requests = [request(str(100_000 + n), budget=5.0) for n in range(200)]

    replies = await asyncio.gather(*(rig.identifier.identify(req) for req in requests))

    assert replies == [answer(req) for req in requests]
    assert rig.pending() == 0


# --- RabbitMQ gateway specifics: metrics and a dropped connection -----------------------


@pytest.fixture
async def topology(amqp_url: str, unique_name: str) -> AsyncIterator[Topology]:
    topology = Topology(prefix=unique_name)
    yield topology
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        await topology.delete(channel)


@pytest.mark.integration
async def test_dropped_connection_fails_waiting_calls_and_replies_work_after_reconnect(
    amqp_url: str, topology: Topology
) -> None:
    """When the broker connection drops, calls waiting for a reply fail at once (their replies
    can never arrive), and once the robust connection is back the reply consumer works again."""
    gate = asyncio.Event()
    held = EchoHandler(gate=gate)
    identifier = AmqpIdentifier(
        amqp_url, GatewayMetrics(CollectorRegistry()), topology=topology, reconnect_interval=0.1
    )
    worker = AmqpWorker(amqp_url, held, ResolverMetrics(CollectorRegistry()), topology=topology)
    await identifier.start()
    await worker.start()
    try:
        waiting = asyncio.create_task(identifier.identify(request(budget=5.0)))
        await held.entered.wait()
        started = time.monotonic()
        # Fault injection: close the socket-level connection under the robust wrapper, as a
        # network drop would; aio-pika then reconnects by itself.
        connection = identifier._link._connection
        assert connection is not None
        assert connection.transport is not None
        await connection.transport.connection.close()

        with pytest.raises(IdentifyUnavailable):
            await waiting
        assert time.monotonic() - started < 1.0
        assert identifier.pending == 0

        await eventually(lambda: identifier.ready)
        gate.set()
        req = request()
        assert await identifier.identify(req) == answer(req)
    finally:
        gate.set()
        await worker.stop()
        await identifier.close()


@pytest.mark.integration
async def test_identifier_is_not_ready_before_start_or_after_close(
    amqp_url: str, topology: Topology
) -> None:
    """ready reflects the connection; requests outside start..close are unavailable at once."""
    identifier = AmqpIdentifier(amqp_url, GatewayMetrics(CollectorRegistry()), topology=topology)
    assert not identifier.ready
    with pytest.raises(IdentifyUnavailable):
        await identifier.identify(request())
    await identifier.start()
    assert identifier.ready
    await identifier.close()
    assert not identifier.ready
    with pytest.raises(IdentifyUnavailable):
        await identifier.identify(request())


@pytest.mark.integration
async def test_an_unroutable_request_makes_the_gateway_declare_the_request_queue_again(
    amqp_url: str, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """With the request queue deleted (and no resolver to notice), the next request comes
    back unroutable: that caller fails at once, the gateway is not ready until it has
    declared the topology again, which it does by itself, logging the loss once (WARNING) and
    the heal once (INFO); the queue is there again and the next request is answered."""
    caplog.set_level(logging.INFO, logger="shared.amqp_link")
    identifier = AmqpIdentifier(amqp_url, GatewayMetrics(CollectorRegistry()), topology=topology)
    await identifier.start()
    worker: AmqpWorker | None = None
    try:
        async with await aio_pika.connect(amqp_url) as admin:
            channel = await admin.channel()
            await channel.queue_delete(topology.request_queue)

            with pytest.raises(IdentifyUnavailable):
                await identifier.identify(request())
            await eventually(lambda: identifier._link.topology_losses == 1 and identifier.ready)
            await channel.declare_queue(topology.request_queue, passive=True)

        worker = AmqpWorker(
            amqp_url, EchoHandler(), ResolverMetrics(CollectorRegistry()), topology=topology
        )
        await worker.start()
        req = request()
        assert await identifier.identify(req) == answer(req)
        assert identifier._link.topology_losses == 1
        lines = [
            (r.levelno, r.getMessage()) for r in caplog.records if r.name == "shared.amqp_link"
        ]
        assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
        assert "a request came back unroutable" in lines[0][1]
    finally:
        if worker is not None:
            await worker.stop()
        await identifier.close()


@pytest.mark.integration
async def test_a_deleted_request_exchange_is_declared_again_by_the_gateway(
    amqp_url: str, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """A request to a deleted exchange makes the broker close the gateway's channel (404
    NOT_FOUND): that caller fails at once; the gateway declares the exchange and its binding
    again by itself (one WARNING, one INFO; no other warning), and the next request reaches
    the resolver, which never noticed."""
    caplog.set_level(logging.INFO)
    identifier = AmqpIdentifier(
        amqp_url, GatewayMetrics(CollectorRegistry()), topology=topology, reconnect_interval=0.1
    )
    worker = AmqpWorker(
        amqp_url, EchoHandler(), ResolverMetrics(CollectorRegistry()), topology=topology
    )
    await identifier.start()
    await worker.start()
    try:
        async with await aio_pika.connect(amqp_url) as admin:
            await (await admin.channel()).exchange_delete(topology.request_exchange)

        with pytest.raises(IdentifyUnavailable):
            await identifier.identify(request())
        await eventually(lambda: identifier._link.topology_losses == 1 and identifier.ready)
        req = request()
        assert await identifier.identify(req) == answer(req)
        assert worker._link.topology_losses == 0
        ours = [r for r in caplog.records if r.name.startswith(("shared", "agi_gateway"))]
        warnings = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "NOT_FOUND" in warnings[0]
        assert [r.levelno for r in ours if r.name == "shared.amqp_link"] == [
            logging.WARNING,
            logging.INFO,
        ]
    finally:
        await worker.stop()
        await identifier.close()


# --- In-memory bus specifics: concurrency bound and close ----------------------------------


async def test_memory_bus_runs_at_most_concurrency_handlers_and_skips_abandoned_ones() -> None:
    """With concurrency 1, a second request waits for the slot; if its caller gives up
    meanwhile, the handler never sees it (and no late reply is counted for it)."""
    late: list[None] = []
    bus = MemoryBus(concurrency=1, on_late_reply=lambda: late.append(None))
    gate = asyncio.Event()
    handler = EchoHandler(gate=gate)
    bus.bind(handler)
    first = asyncio.create_task(bus.identify(request(budget=5.0)))
    await handler.entered.wait()

    with pytest.raises(IdentifyTimeout):
        await bus.identify(request(budget=0.05))
    gate.set()
    await first

    assert len(handler.calls) == 1
    assert late == []
    await bus.close()
    assert bus.running == 0


async def test_memory_bus_close_cancels_handlers_and_fails_their_callers_at_once() -> None:
    """close() cancels running handlers and awaits them; their callers get IdentifyUnavailable
    at once rather than waiting for their deadline, and later requests are refused."""
    bus = MemoryBus()
    handler = EchoHandler(gate=asyncio.Event())  # never released
    bus.bind(handler)
    waiting = asyncio.create_task(bus.identify(request(budget=5.0)))
    await handler.entered.wait()
    started = time.monotonic()

    await bus.close()

    with pytest.raises(IdentifyUnavailable):
        await waiting
    assert time.monotonic() - started < 0.5
    assert bus.running == 0
    assert bus.pending == 0
    with pytest.raises(IdentifyUnavailable):
        await bus.identify(request())
