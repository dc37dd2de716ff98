"""AMQP frames that aiormq's writer takes in one go leave in one send().

aiormq queues every frame (a publish, an ack) on its connection's `write_queue`, and one writer
task takes them off and hands each to the transport with its own `write`: on loopback or a LAN
one system call each, and one more wake-up of RabbitMQ. Under load a gateway publishes several
requests, and a resolver acks and replies to several messages, before that task runs; it then
takes them all in one step, without waiting, until the queue is empty.

`CoalescingWriter` holds each frame while the queue still has more for the writer task to take,
and sends what it holds with the frame that empties the queue: one send per step of the writer
task. A lone frame (one call at a time) empties the queue, so it waits for nothing. `drain()`
and `close()` send what is held first, so aiormq's "write the Close frame, drain, return" still
sends it; and should the writer task ever stop taking frames with some held, they leave at the
end of the loop turn.

Callers that want their frames batched publish and ack with `wait=False`: aiormq's default
(`wait=True`) drains after every frame, which sends at once (and, for a publish, holds the
channel lock until then).

This plugs in through aiormq's `transport_factory` (a public parameter of its Connection),
which aio-pika does not pass on by itself: `CoalescingConnection` adds it, and points each new
writer at its connection's `write_queue` once connected. Until then (the handshake, which
aiormq writes itself) every frame goes at once. Plain `amqp://` only; `amqps://` keeps aiormq's
own TLS transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import aio_pika
from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError
from yarl import URL


class CoalescingWriter(asyncio.StreamWriter):
    def __init__(
        self,
        transport: asyncio.WriteTransport,
        protocol: asyncio.BaseProtocol,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._turn_loop = loop
        self._frames: asyncio.Queue[Any] | None = None  # aiormq's write_queue, once connected
        self._held: list[bytes] = []
        self._flush_scheduled = False

    def follow(self, frames: asyncio.Queue[Any]) -> None:
        """Hold frames while `frames` (the queue the writer task takes them from) is not empty."""
        self._frames = frames

    def write(self, data: bytes | bytearray | memoryview) -> None:
        frames = self._frames
        if frames is not None and not frames.empty():
            # The writer task takes the next frame without waiting: send them together.
            self._held.append(bytes(data))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._turn_loop.call_soon(self._end_turn)
            return
        if self._held:
            self._held.append(bytes(data))
            self.flush()
        elif not self.transport.is_closing():
            self.transport.write(data)

    def _end_turn(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what is held to the transport, in one write."""
        if self._held:
            data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
            self._held.clear()
            if not self.transport.is_closing():
                self.transport.write(data)

    async def drain(self) -> None:
        self.flush()
        await super().drain()

    def close(self) -> None:
        self.flush()
        super().close()


class CoalescingTransportFactory(TransportFactory):
    def __init__(self) -> None:
        self.writer: CoalescingWriter | None = None  # the latest connection's

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kwargs.pop("ssl_context_provider", None)  # plain TCP, as aiormq's own factory does
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol, host=url.host or "localhost", port=url.port or 5672, **kwargs
            )
        except OSError as exc:
            raise AMQPConnectionError(*exc.args) from exc
        self.writer = CoalescingWriter(transport, protocol, reader, loop)
        return reader, self.writer


class CoalescingConnection(aio_pika.RobustConnection):
    """A robust connection whose every (re)connect uses `CoalescingTransportFactory`."""

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self._factory: CoalescingTransportFactory | None = None
        if self.url.scheme == "amqp":
            self._factory = CoalescingTransportFactory()
            self.kwargs["transport_factory"] = self._factory

    async def _on_connected(self) -> None:
        # Called after every (re)connect, once aiormq's connection and its writer task exist.
        factory, transport = self._factory, self.transport
        if factory is not None and factory.writer is not None and transport is not None:
            factory.writer.follow(transport.connection.write_queue)
        await super()._on_connected()
