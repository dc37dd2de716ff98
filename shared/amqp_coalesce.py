"""AMQP frames written in one event-loop turn leave in one send().

aiormq's writer task hands every frame (a publish, an ack) to the transport with its own
`write`, which on loopback or a LAN is one system call each and one more wake-up of RabbitMQ.
Under load a gateway publishes several requests, and a resolver acks and replies to several
messages, in the same loop turn. The turn's first frame is written at once (a lone frame, as at
one call at a time, waits for nothing); the ones after it are held and handed over together at
the end of the turn: one `call_soon` a turn, and two sends a turn instead of one per frame.
Order is kept and nothing waits past the current turn; `drain()` and `close()` flush first, so
aiormq's "write the Close frame, drain, return" still sends it.

Callers that want their frames batched publish and ack with `wait=False`: aiormq's default
(`wait=True`) drains after every frame, which flushes the turn's writes at once (and, for a
publish, holds the channel lock until then).

This plugs in through aiormq's `transport_factory` (a public parameter of its Connection),
which aio-pika does not pass on by itself: `CoalescingConnection` adds it. Plain `amqp://`
only; `amqps://` keeps aiormq's own TLS transport.
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
        self._turn_open = False  # something was written in this loop turn
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._turn_open:
            self._held.append(bytes(data))
            return
        # The turn's first frame goes at once: a lone frame (one call at a time) waits for
        # nothing; what follows it in the same turn is held and leaves together.
        self._turn_open = True
        self._turn_loop.call_soon(self._end_turn)
        if not self.transport.is_closing():
            self.transport.write(data)

    def _end_turn(self) -> None:
        self._turn_open = False
        self.flush()

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what this turn wrote to the transport, in one write."""
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
        return reader, CoalescingWriter(transport, protocol, reader, loop)


class CoalescingConnection(aio_pika.RobustConnection):
    """A robust connection whose every (re)connect uses `CoalescingTransportFactory`."""

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        if self.url.scheme == "amqp":
            self.kwargs["transport_factory"] = CoalescingTransportFactory()
