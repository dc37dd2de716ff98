"""One robust RabbitMQ connection, its channel and its consumers, as both services hold them.

What belongs here: connecting (with a connection name the broker's UI shows), opening the one
channel each adapter uses, consuming, telling whether all of it is up, and closing. What does
not: topology (`shared.topology`) and publishing or handling messages (the adapters).

Consumers are aiormq's, on the channel under aio-pika's robust one: aio-pika's own consumer
wraps every delivery in an `aio_pika.IncomingMessage` and runs the callback in a second task,
which is about a tenth of a resolver's AMQP work per request and buys these services nothing.
The robust channel does not know about them, so the link starts them again once the channel
has reopened after a reconnect; `consuming` is false from the channel's loss until then.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from shared.amqp_coalesce import CoalescingConnection

OnDelivery = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]


@dataclass
class _Consumer:
    queue: str
    on_delivery: OnDelivery
    no_ack: bool
    tag: str | None = None  # on the current channel; None until (re)started


class AmqpLink:
    def __init__(self, url: str, connection_name: str, *, reconnect_interval: float) -> None:
        self._url = url
        self._connection_name = connection_name
        self._reconnect_interval = reconnect_interval
        self._connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self._consumers: list[_Consumer] = []

    async def open(self, *, on_return_raises: bool = False) -> AbstractRobustChannel:
        """Connect and open a channel with publisher confirms; reconnects by itself after."""
        self._connection = await aio_pika.connect_robust(
            self._url,
            client_properties={"connection_name": self._connection_name},
            reconnect_interval=self._reconnect_interval,
            connection_class=CoalescingConnection,
        )
        channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=on_return_raises
        )
        self.channel = cast(AbstractRobustChannel, channel)
        self.channel.close_callbacks.add(self._on_channel_closed)
        # Run after the robust channel has restored its QoS, exchanges and queues.
        self.channel.reopen_callbacks.add(self._restart_consumers)
        return self.channel

    async def publisher(self) -> aiormq.Channel:
        """aiormq's channel under the robust one, to publish and ack without building an
        aio_pika.Message each time. The concrete class, whose basic_publish and basic_ack take
        `wait` (see `shared.amqp_coalesce`). Waits while the robust channel reopens."""
        channel = self.channel
        assert channel is not None, "publisher() before open()"
        return cast(aiormq.Channel, await channel.get_underlay_channel())

    async def consume(self, queue: str, on_delivery: OnDelivery, *, no_ack: bool = False) -> None:
        """Deliver `queue`'s messages to `on_delivery` (one task each, started by aiormq), on
        this channel and on every channel that replaces it after a reconnect."""
        consumer = _Consumer(queue, on_delivery, no_ack)
        await self._start(consumer)
        self._consumers.append(consumer)

    async def cancel_consumers(self) -> None:
        """No new deliveries; those already delivered go on. Raises what aiormq raises.
        Nothing to do when nothing consumes (never started, or cancelled already)."""
        consumers, self._consumers = self._consumers, []
        if not consumers:
            return
        channel = await self.publisher()
        for consumer in consumers:
            if consumer.tag is not None:
                await channel.basic_cancel(consumer.tag)

    @property
    def consuming(self) -> bool:
        """Every consumer is started on the current channel."""
        return bool(self._consumers) and all(c.tag is not None for c in self._consumers)

    async def _start(self, consumer: _Consumer) -> None:
        channel = await self.publisher()
        ok = await channel.basic_consume(
            consumer.queue, consumer.on_delivery, no_ack=consumer.no_ack
        )
        consumer.tag = ok.consumer_tag

    async def _restart_consumers(self, _sender: Any) -> None:
        for consumer in self._consumers:
            await self._start(consumer)

    def _on_channel_closed(self, _sender: Any, _exc: BaseException | None) -> None:
        for consumer in self._consumers:
            consumer.tag = None  # consumers die with their channel

    @property
    def up(self) -> bool:
        """Connected and the channel open (a robust channel is reopened after a reconnect)."""
        connection, channel = self._connection, self.channel
        return (
            connection is not None
            and connection.connected.is_set()
            and channel is not None
            and not channel.is_closed
        )

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        for consumer in self._consumers:
            consumer.tag = None
        if connection is not None:
            await connection.close()
