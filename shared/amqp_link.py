"""One robust RabbitMQ connection and its channel, as both services hold them.

What belongs here: connecting (with a connection name the broker's UI shows), opening the one
channel each adapter uses, telling whether both are up, and closing. What does not: topology
(`shared.topology`) and publishing or consuming (the adapters).
"""

from __future__ import annotations

from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from shared.amqp_coalesce import CoalescingConnection


class AmqpLink:
    def __init__(self, url: str, connection_name: str, *, reconnect_interval: float) -> None:
        self._url = url
        self._connection_name = connection_name
        self._reconnect_interval = reconnect_interval
        self._connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None

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
        return self.channel

    async def publisher(self) -> aiormq.Channel:
        """aiormq's channel under the robust one, to publish and ack without building an
        aio_pika.Message each time. The concrete class, whose basic_publish and basic_ack take
        `wait` (see `shared.amqp_coalesce`). Waits while the robust channel reopens."""
        channel = self.channel
        assert channel is not None, "publisher() before open()"
        return cast(aiormq.Channel, await channel.get_underlay_channel())

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
        if connection is not None:
            await connection.close()
