"""shared.answering: a request always gets a reply, the one way both transports give it."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from shared.answering import answer_request
from shared.messages import IdentifyReply, IdentifyRequest
from shared.outcomes import ErrorCode, Verdict

REQUEST = IdentifyRequest(request_id="r1", node_id="1", customer_id="7", deadline=time.time() + 60)


async def test_the_handlers_reply_passes_through() -> None:
    reply = IdentifyReply(request_id="r1", verdict=Verdict.TRUE)

    async def handler(request: IdentifyRequest) -> IdentifyReply:
        return reply

    assert await answer_request(handler, REQUEST) is reply


async def test_a_handler_that_raises_gets_the_internal_envelope_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(request: IdentifyRequest) -> IdentifyReply:
        raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR, logger="shared.answering"):
        reply = await answer_request(handler, REQUEST)
    assert reply == IdentifyReply.failure("r1", ErrorCode.INTERNAL)
    (record,) = caplog.records
    assert "r1" in record.getMessage()
    assert record.exc_info is not None


async def test_cancellation_is_not_an_error() -> None:
    """Cancelling (a transport closing) goes through instead of becoming a reply."""
    started = asyncio.Event()

    async def handler(request: IdentifyRequest) -> IdentifyReply:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never reached")

    task = asyncio.create_task(answer_request(handler, REQUEST))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
