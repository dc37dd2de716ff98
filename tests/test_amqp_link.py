"""AmqpLink's consumers against the real broker: they survive their channel being replaced."""

from __future__ import annotations

import asyncio

import aiormq
import pytest
from aiormq.abc import DeliveredMessage

from shared.amqp_link import AmqpLink
from tests.waiting import eventually


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
