"""The AMQP writer that hands one loop turn's frames to the transport in one write."""

from __future__ import annotations

import asyncio

from shared.amqp_coalesce import CoalescingWriter


class Transport(asyncio.WriteTransport):
    """Records each write; never pauses."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def writer_over(transport: Transport) -> CoalescingWriter:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    protocol.connection_made(transport)
    return CoalescingWriter(transport, protocol, reader, loop)


async def test_a_turns_first_frame_goes_at_once_and_the_rest_together_in_order() -> None:
    transport = Transport()
    writer = writer_over(transport)
    writer.write(b"publish-1")
    assert transport.writes == [b"publish-1"]  # nothing to wait for
    writer.write(b"ack-1;")
    writer.writelines([b"ack-2;", bytearray(b"publish-2;")])
    assert transport.writes == [b"publish-1"]  # held until the end of this turn
    await asyncio.sleep(0)  # the next turn
    assert transport.writes == [b"publish-1", b"ack-1;ack-2;publish-2;"]
    writer.write(b"next")
    assert transport.writes == [b"publish-1", b"ack-1;ack-2;publish-2;", b"next"]
    writer.close()


async def test_drain_and_close_send_what_is_held_first() -> None:
    """aiormq writes its Close frame, drains and returns: the frame must not stay behind."""
    transport = Transport()
    writer = writer_over(transport)
    writer.write(b"first")
    writer.write(b"frame")
    await writer.drain()
    assert transport.writes == [b"first", b"frame"]
    writer.write(b"close")
    writer.close()
    assert transport.writes == [b"first", b"frame", b"close"]
    assert transport.closed
    await asyncio.sleep(0)  # the turn's scheduled flush finds nothing left to send
    assert transport.writes == [b"first", b"frame", b"close"]
