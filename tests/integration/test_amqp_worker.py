"""The resolver's RabbitMQ worker against the real broker: what it acks, dead-letters, drops,
and how it stops. Each test uses its own topology (unique prefix), deleted afterwards."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from prometheus_client import CollectorRegistry

import crm_resolver.amqp_worker as amqp_worker_module
from agi_gateway.amqp_identifier import AmqpIdentifier
from agi_gateway.metrics import GatewayMetrics
from crm_resolver.amqp_worker import AmqpWorker
from crm_resolver.metrics import ResolverMetrics
from shared.messages import IdentifyReply, IdentifyRequest
from shared.outcomes import Verdict
from shared.topology import DEAD_REASON_HEADER, Topology
from tests.waiting import eventually

pytestmark = pytest.mark.integration


def request(*, budget: float = 3.0, node_id: str = "7") -> IdentifyRequest:
    return IdentifyRequest(
        request_id=uuid.uuid4().hex,
        node_id=node_id,
        customer_id="12345",
        deadline=time.time() + budget,
    )


class Handler:
    """A fake resolver: records calls, answers `true`, optionally held at a gate."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.calls: list[IdentifyRequest] = []

    async def __call__(self, request: IdentifyRequest) -> IdentifyReply:
        self.calls.append(request)
        if self.gate is not None:
            await self.gate.wait()
        return IdentifyReply(request_id=request.request_id, verdict=Verdict.TRUE)


@pytest.fixture
async def topology(unique_name: str) -> Topology:
    return Topology(prefix=unique_name)


@pytest.fixture
async def admin(amqp_url: str, topology: Topology) -> AsyncIterator[AbstractChannel]:
    """A plain channel for the test's own publishing and inspection; cleans the topology up."""
    connection: AbstractConnection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await topology.declare(channel)
    yield channel
    await topology.delete(channel)
    await connection.close()


@pytest.fixture
async def identifier(
    amqp_url: str, topology: Topology, admin: AbstractChannel
) -> AsyncIterator[AmqpIdentifier]:
    """A gateway-side client; depends on `admin` so the topology is deleted after it closes."""
    identifier = AmqpIdentifier(amqp_url, GatewayMetrics(CollectorRegistry()), topology=topology)
    await identifier.start()
    yield identifier
    await identifier.close()


def worker_for(
    amqp_url: str, topology: Topology, handler: Handler, *, prefetch: int = 64
) -> AmqpWorker:
    metrics = ResolverMetrics(CollectorRegistry())
    return AmqpWorker(amqp_url, handler, metrics, topology=topology, prefetch=prefetch)


async def publish_raw(
    channel: AbstractChannel, topology: Topology, body: bytes, *, reply_to: str | None
) -> None:
    exchange = await channel.get_exchange(topology.request_exchange)
    await exchange.publish(
        aio_pika.Message(body, reply_to=reply_to, correlation_id="c-1"), topology.routing_key
    )


async def ready_messages(channel: AbstractChannel, queue: str) -> int:
    """Messages waiting in a queue (neither delivered nor unacked)."""
    declared = await channel.declare_queue(queue, passive=True)
    count = declared.declaration_result.message_count
    assert count is not None
    return count


async def test_unparseable_messages_are_dead_lettered_with_a_reason_and_acked(
    amqp_url: str, topology: Topology, admin: AbstractChannel
) -> None:
    """Garbage, a body that is JSON but not a request, and a request without reply_to go to
    the dead-letter queue with a reason header and without customer ids; the originals are
    acked (not redelivered after the worker closes) and the handler never sees them."""
    handler = Handler()
    registry = CollectorRegistry()
    worker = AmqpWorker(amqp_url, handler, ResolverMetrics(registry), topology=topology)
    await worker.start()
    await publish_raw(admin, topology, b"\xff not json, id 4567890", reply_to="nowhere")
    await publish_raw(admin, topology, json.dumps({"v": 1}).encode(), reply_to="nowhere")
    await publish_raw(admin, topology, request().model_dump_json().encode(), reply_to=None)

    await eventually(lambda: registry.get_sample_value("callerid_dead_lettered_total") == 3)
    await worker.stop()

    dead = await admin.declare_queue(topology.dead_letter_queue, passive=True)
    reasons, bodies = [], []
    for _ in range(3):
        message = await dead.get(timeout=2)
        await message.ack()
        reasons.append(str(message.headers[DEAD_REASON_HEADER]))
        bodies.append(message.body)
    # Kept on disk for someone to read: no customer id and no caller number in any of them.
    customer = request().customer_id
    assert all(customer.encode() not in body for body in bodies)
    assert b"4567890" not in bodies[0]
    assert json.loads(bodies[2])["customer_id"] == "[redacted]"
    assert reasons[0].startswith("invalid request")
    assert "request_id" in reasons[1]
    assert reasons[2] == "no reply_to"
    assert await ready_messages(admin, topology.request_queue) == 0
    assert handler.calls == []


async def test_expired_request_never_reaches_the_handler_and_is_counted_by_node_name(
    amqp_url: str, topology: Topology, admin: AbstractChannel
) -> None:
    """A request delivered after its deadline is acked and dropped without calling the
    handler; `expired` is counted under the node's configured name, not its id."""
    handler = Handler()
    registry = CollectorRegistry()
    worker = AmqpWorker(
        amqp_url,
        handler,
        ResolverMetrics(registry),
        topology=topology,
        node_label=lambda node_id: {"7": "gold-customers"}.get(node_id, "unknown"),
    )
    await worker.start()
    stale = request(budget=-1.0)
    fresh = request()
    await publish_raw(admin, topology, stale.model_dump_json().encode(), reply_to="nowhere")
    await publish_raw(admin, topology, fresh.model_dump_json().encode(), reply_to="nowhere")

    await eventually(lambda: len(handler.calls) == 1 and worker.in_flight == 0)
    await worker.stop()

    assert [call.request_id for call in handler.calls] == [fresh.request_id]
    expired = registry.get_sample_value(
        "callerid_expired_requests_total", {"node": "gold-customers"}
    )
    assert expired == 1
    assert await ready_messages(admin, topology.request_queue) == 0


async def test_request_is_acked_only_after_its_reply_is_published(
    amqp_url: str, topology: Topology, admin: AbstractChannel
) -> None:
    """When the broker refuses the reply (its queue rejects every publish), the request is
    not acked: it comes back and is answered again while its deadline leaves time; once the
    deadline has passed it is acked and dropped, so nothing is left behind."""
    refusing = await admin.declare_queue(
        f"{topology.prefix}.refusing",
        auto_delete=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    handler = Handler()
    worker = worker_for(amqp_url, topology, handler)
    await worker.start()
    req = request(budget=0.4)
    await publish_raw(admin, topology, req.model_dump_json().encode(), reply_to=refusing.name)

    await eventually(lambda: len(handler.calls) >= 2)
    await eventually(lambda: time.time() > req.deadline and worker.in_flight == 0)
    await worker.stop()

    assert {call.request_id for call in handler.calls} == {req.request_id}
    assert await ready_messages(admin, topology.request_queue) == 0
    await refusing.delete(if_unused=False, if_empty=False)


async def test_stop_waits_for_in_flight_handlers_and_their_replies(
    amqp_url: str, topology: Topology, identifier: AmqpIdentifier
) -> None:
    """stop() stops consuming at once but returns only after the request being handled has
    been answered: the caller gets its reply."""
    gate = asyncio.Event()
    handler = Handler(gate)
    worker = worker_for(amqp_url, topology, handler)
    await worker.start()
    call = asyncio.create_task(identifier.identify(request(budget=5.0)))
    await eventually(lambda: len(handler.calls) == 1)

    stopping = asyncio.create_task(worker.stop())
    await eventually(lambda: not worker.ready)
    done, _ = await asyncio.wait({stopping}, timeout=0.2)
    assert not done, "stop() returned while a handler was still running"
    assert worker.in_flight == 1

    gate.set()
    await stopping
    reply = await call
    assert reply.verdict is Verdict.TRUE
    assert worker.in_flight == 0


async def test_handlers_run_concurrently_up_to_prefetch(
    amqp_url: str, topology: Topology, admin: AbstractChannel, identifier: AmqpIdentifier
) -> None:
    """With prefetch 3, three handlers run at once and the other requests wait in the queue."""
    gate = asyncio.Event()
    handler = Handler(gate)
    worker = worker_for(amqp_url, topology, handler, prefetch=3)
    await worker.start()
    calls = [asyncio.create_task(identifier.identify(request())) for _ in range(5)]

    await eventually(lambda: len(handler.calls) == 3)
    assert worker.in_flight == 3
    assert await ready_messages(admin, topology.request_queue) == 2

    gate.set()
    replies = await asyncio.gather(*calls)
    assert len({reply.request_id for reply in replies}) == 5
    await worker.stop()


async def test_several_workers_share_the_request_queue(
    amqp_url: str, topology: Topology, identifier: AmqpIdentifier
) -> None:
    """Two workers (prefetch 1) consume the same queue: two requests are handled at the same
    time, one by each, and both callers get replies."""
    gate = asyncio.Event()
    first, second = Handler(gate), Handler(gate)
    workers = [
        worker_for(amqp_url, topology, first, prefetch=1),
        worker_for(amqp_url, topology, second, prefetch=1),
    ]
    for worker in workers:
        await worker.start()
    calls = [asyncio.create_task(identifier.identify(request())) for _ in range(2)]

    await eventually(lambda: len(first.calls) == 1 and len(second.calls) == 1)
    assert all(worker.ready for worker in workers)

    gate.set()
    replies = await asyncio.gather(*calls)
    assert all(reply.verdict is Verdict.TRUE for reply in replies)
    for worker in workers:
        await worker.stop()
    assert not any(worker.ready for worker in workers)


async def test_an_ack_waits_for_the_next_reply_and_goes_out_with_it(
    amqp_url: str,
    topology: Topology,
    admin: AbstractChannel,
    identifier: AmqpIdentifier,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answered request's ack is queued, not sent: the next reply takes it along. The
    broker shows it: when the worker's connection drops without stop() (which would send
    the queued acks), only the request answered last, whose ack was still queued, is
    redelivered."""
    monkeypatch.setattr(amqp_worker_module, "ACK_DELAY", 3600.0)
    worker = worker_for(amqp_url, topology, Handler())
    await worker.start()
    for _ in range(2):
        reply = await identifier.identify(request(budget=5.0))
        assert reply.verdict is Verdict.TRUE

    await worker._link.close()  # the connection drops: no stop(), no flush
    async with asyncio.timeout(5):  # the broker requeues what the dropped channel left unacked
        while await ready_messages(admin, topology.request_queue) == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert await ready_messages(admin, topology.request_queue) == 1


async def test_a_deleted_request_queue_is_declared_again_and_requests_flow_again(
    amqp_url: str, topology: Topology, admin: AbstractChannel, identifier: AmqpIdentifier
) -> None:
    """A request being handled when its queue is deleted is still answered, and its ack is
    accepted (the channel stays open). The broker cancels the worker's consumer: the worker
    counts one loss, declares the queue again by itself and consumes it, and is ready again;
    later requests, routed to the new queue, are answered."""
    gate = asyncio.Event()
    handler = Handler(gate)
    worker = worker_for(amqp_url, topology, handler)
    await worker.start()
    held = asyncio.create_task(identifier.identify(request(budget=5.0)))
    await eventually(lambda: len(handler.calls) == 1)

    await admin.queue_delete(topology.request_queue)
    await eventually(lambda: worker._link.topology_losses == 1 and worker.ready)
    channel = await worker._link.publisher()

    gate.set()
    assert (await held).verdict is Verdict.TRUE
    reply = await identifier.identify(request(budget=5.0))
    assert reply.verdict is Verdict.TRUE
    assert len(handler.calls) == 2
    assert await worker._link.publisher() is channel  # no channel error on the way
    assert worker._link.topology_losses == 1
    await worker.stop()
    assert not worker.ready
