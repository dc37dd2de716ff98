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


def writer_over(
    transport: Transport, frames: asyncio.Queue[bytes] | None = None
) -> CoalescingWriter:
    """A writer on `transport`, following `frames` as it follows aiormq's write queue."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    protocol.connection_made(transport)
    writer = CoalescingWriter(transport, protocol, reader, loop)
    if frames is not None:
        writer.follow(frames)
    return writer


async def test_frames_the_writer_task_takes_in_one_go_leave_in_one_write() -> None:
    transport, frames = Transport(), asyncio.Queue[bytes]()
    writer = writer_over(transport, frames)
    writer.write(b"publish-1")
    assert transport.writes == [b"publish-1"]  # the queue is empty: nothing to wait for
    for frame in (b"ack-1;", b"ack-2;", b"publish-2;"):
        frames.put_nowait(frame)
    # What aiormq's writer task does: take a frame, write it, take the next without waiting.
    while not frames.empty():
        writer.write(frames.get_nowait())
    assert transport.writes == [b"publish-1", b"ack-1;ack-2;publish-2;"]
    await asyncio.sleep(0)  # the end-of-turn safety net finds nothing left
    assert transport.writes == [b"publish-1", b"ack-1;ack-2;publish-2;"]
    writer.close()


async def test_held_frames_leave_by_the_end_of_the_turn_whatever_the_writer_task_does() -> None:
    transport, frames = Transport(), asyncio.Queue[bytes]()
    writer = writer_over(transport, frames)
    frames.put_nowait(b"never-taken")
    writer.write(b"a;")
    writer.writelines([b"b;", bytearray(b"c;")])
    assert transport.writes == []
    await asyncio.sleep(0)  # the next turn
    assert transport.writes == [b"a;b;c;"]
    writer.close()


async def test_before_the_queue_is_known_every_frame_goes_at_once() -> None:
    """The handshake: aiormq writes it itself, before its writer task and queue are in use."""
    transport = Transport()
    writer = writer_over(transport)
    writer.write(b"start-ok")
    writer.write(b"tune-ok")
    assert transport.writes == [b"start-ok", b"tune-ok"]
    writer.close()


async def test_drain_and_close_send_what_is_held_first() -> None:
    """aiormq writes its Close frame, drains and returns: the frame must not stay behind."""
    transport, frames = Transport(), asyncio.Queue[bytes]()
    writer = writer_over(transport, frames)
    frames.put_nowait(b"more")
    writer.write(b"first")
    writer.write(b"frame")
    assert transport.writes == []
    await writer.drain()
    assert transport.writes == [b"firstframe"]
    writer.write(b"close")
    writer.close()
    assert transport.writes == [b"firstframe", b"close"]
    assert transport.closed
    await asyncio.sleep(0)  # the turn's scheduled flush finds nothing left to send
    assert transport.writes == [b"firstframe", b"close"]
