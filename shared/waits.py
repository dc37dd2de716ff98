"""Waiting for a future with a time limit, cheaply, on the per-call path.

`asyncio.timeout` around an `await` costs a context object, a task lookup, a reschedule and
cancellation bookkeeping on every use, and `asyncio.shield` (to wait without cancelling what is
waited for) adds a future and two callbacks more. The gateway and the resolver wait like that
several times a call, so this module does the same with one loop timer and one future:
`done_within` never cancels the future it watches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any


def waker(waiter: asyncio.Future[None]) -> Callable[..., None]:
    """A callback, for a timer or another future's done callbacks, that wakes `waiter` once."""

    def wake(*_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    return wake


async def done_within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Wait until `future` is done or `seconds` have passed; whether it is done.

    The future is left as it is either way (not cancelled, its result not taken). A
    cancellation of the caller propagates, and also leaves the future alone.
    """
    await first_done((future,), seconds)
    return future.done()


async def first_done(futures: Collection[asyncio.Future[Any]], seconds: float) -> None:
    """Wait until any of `futures` is done or `seconds` have passed (`asyncio.wait` with
    FIRST_COMPLETED, without the sets it builds); none of them is cancelled."""
    if any(future.done() for future in futures):
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    wake = waker(waiter)
    for future in futures:
        future.add_done_callback(wake)
    timer = loop.call_later(seconds, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        for future in futures:
            future.remove_done_callback(wake)
