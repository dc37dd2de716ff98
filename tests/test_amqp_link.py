"""AmqpLink against the real broker: its consumers survive their channel being replaced, and
its topology heals when a queue is deleted under it."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from shared import amqp_link
from shared.amqp_link import AmqpLink
from shared.topology import Topology
from tests.waiting import eventually

pytestmark = pytest.mark.integration

LOST = "lost ("
REFUSED = "could not declare the RabbitMQ topology again"
HEALED = "declared again after"
FAILED_AGAIN = "declaring the topology again failed"


@pytest.fixture
async def admin(amqp_url: str, unique_name: str) -> AsyncIterator[AbstractChannel]:
    """A plain channel to delete what the link declared; deletes the topology afterwards."""
    connection = await aio_pika.connect(amqp_url)
    yield await connection.channel()
    async with connection.channel() as channel:
        await Topology(prefix=unique_name).delete(channel)
    await connection.close()


def link_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == amqp_link.__name__ and r.levelno == level
    ]


async def test_a_consumer_is_started_again_when_its_channel_is_replaced(
    amqp_url: str, unique_name: str
) -> None:
    link = AmqpLink(amqp_url, unique_name, reconnect_interval=0.1)
    channel = await link.open()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_delivery(message: DeliveredMessage) -> None:
        received.put_nowait(message.body)

    try:
        queue = await channel.declare_queue(unique_name, auto_delete=True)
        await link.consume(queue.name, on_delivery, no_ack=True)
        assert link.consuming
        underlay = await link.publisher()
        await underlay.basic_publish(b"before", routing_key=queue.name)
        assert await asyncio.wait_for(received.get(), 3.0) == b"before"

        # A channel error (publishing to an exchange that does not exist) makes the broker
        # close the channel; the robust channel opens a new one, without our consumer.
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await underlay.basic_publish(b"x", exchange=f"{unique_name}-missing", routing_key="x")
        await eventually(lambda: link.consuming and link.up)

        replaced = await link.publisher()
        assert replaced is not underlay
        await replaced.basic_publish(b"after", routing_key=queue.name)
        assert await asyncio.wait_for(received.get(), 3.0) == b"after"

        await link.cancel_consumers()
        assert not link.consuming
    finally:
        await link.close()


async def test_a_consumer_the_broker_cancels_is_started_again_on_the_queue_declared_again(
    amqp_url: str, unique_name: str, admin: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting the queue a link consumes makes the broker cancel the consumer: the link
    counts one loss (not whole until healed), declares its topology again by itself and
    consumes the new queue. The loss is logged once at WARNING, the heal once at INFO."""
    caplog.set_level(logging.INFO, logger=amqp_link.__name__)
    topology = Topology(prefix=unique_name)
    link = AmqpLink(amqp_url, unique_name, reconnect_interval=0.1, topology=topology)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_delivery(message: DeliveredMessage) -> None:
        received.put_nowait(message.body)

    try:
        await link.open()
        await link.consume(topology.request_queue, on_delivery, no_ack=True)
        assert link.consuming
        assert link.topology_whole

        await admin.queue_delete(topology.request_queue)
        await eventually(lambda: link.topology_losses == 1 and link.topology_whole)
        await eventually(lambda: link.consuming)

        underlay = await link.publisher()
        await underlay.basic_publish(
            b"after", exchange=topology.request_exchange, routing_key=topology.routing_key
        )
        assert await asyncio.wait_for(received.get(), 3.0) == b"after"
        warnings = link_lines(caplog, logging.WARNING)
        assert len(warnings) == 1
        assert LOST in warnings[0]
        assert f"the broker cancelled the consumer of {topology.request_queue}" in warnings[0]
        infos = link_lines(caplog, logging.INFO)
        assert len(infos) == 1
        assert HEALED in infos[0]
    finally:
        await link.close()


async def test_a_refused_declaration_is_retried_with_growing_waits_until_it_succeeds(
    amqp_url: str, unique_name: str, admin: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """While another queue holds the request queue's name (other arguments), declaring the
    topology again is refused (PRECONDITION_FAILED): the link stays not whole and retries,
    each wait at least as long as the one before, doubling from 0.1 s up to `retry_max` (never
    a busy loop). Logged: the loss and the first refusal at WARNING, later refusals at DEBUG
    only. Once the name is free the link declares the topology and says so once at INFO."""
    caplog.set_level(logging.DEBUG, logger=amqp_link.__name__)
    topology = Topology(prefix=unique_name)
    link = AmqpLink(amqp_url, unique_name, reconnect_interval=0.1, topology=topology, retry_max=0.4)
    try:
        await link.open()
        await admin.queue_delete(topology.request_queue)
        await admin.declare_queue(
            topology.request_queue, durable=True, arguments={"x-max-length": 1}
        )
        # As the gateway does when a request comes back unroutable.
        link.topology_missing("a request came back unroutable", link.generation)
        assert not link.topology_whole

        def refusals() -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if r.name == amqp_link.__name__
                and (REFUSED in r.getMessage() or FAILED_AGAIN in r.getMessage())
            ]

        await eventually(lambda: len(refusals()) >= 5, within=10)
        assert not link.topology_whole
        times = [r.created for r in refusals()]
        waits = [later - earlier for earlier, later in itertools.pairwise(times)]
        floors = [min(amqp_link.RETRY_FIRST * 2**n, 0.4) for n in range(len(waits))]
        # Lower bounds only: a busy machine makes the waits longer, never shorter.
        assert all(wait >= floor * 0.9 for wait, floor in zip(waits, floors, strict=False)), waits

        await admin.queue_delete(topology.request_queue)
        await eventually(lambda: link.topology_whole, within=5)
        declared = await admin.declare_queue(
            topology.request_queue, durable=True, arguments=topology.request_queue_arguments()
        )
        assert declared.name == topology.request_queue  # ours again: same arguments accepted
        warnings = link_lines(caplog, logging.WARNING)
        assert len(warnings) == 2, warnings
        assert LOST in warnings[0]
        assert REFUSED in warnings[1]
        assert "PRECONDITION_FAILED" in warnings[1]
        infos = link_lines(caplog, logging.INFO)
        assert len(infos) == 1
        assert HEALED in infos[0]
    finally:
        await link.close()


async def test_a_report_from_before_the_last_declaration_is_ignored(
    amqp_url: str, unique_name: str, admin: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests published before the topology was declared again that come back unroutable
    afterwards are old news: they do not start a second loss (one deletion, one WARNING)."""
    caplog.set_level(logging.INFO, logger=amqp_link.__name__)
    topology = Topology(prefix=unique_name)
    link = AmqpLink(amqp_url, unique_name, reconnect_interval=0.1, topology=topology)
    try:
        await link.open()
        before = link.generation
        await admin.queue_delete(topology.request_queue)
        link.topology_missing("a request came back unroutable", before)
        link.topology_missing("a request came back unroutable", before)  # the same burst
        await eventually(lambda: link.topology_whole)
        link.topology_missing("a request came back unroutable", before)  # returned late

        assert link.topology_whole
        assert link.topology_losses == 1
        assert len(link_lines(caplog, logging.WARNING)) == 1
        assert len(link_lines(caplog, logging.INFO)) == 1
    finally:
        await link.close()
