"""Items that wait to go out together: with the next call that takes them, or after a delay.

The resolver uses it twice: Redis settles ride with the next flight-lock lead (`redis_cache`)
and AMQP acks with the next reply (`amqp_worker`). Whoever sends next calls `take()` and
carries the items along; when nobody does within `delay`, `send` gets them in a task of its
own. `flush()` sends what is queued at once and waits for every such task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Batch(Generic[T]):
    def __init__(self, delay: float, send: Callable[[list[T]], Coroutine[Any, Any, None]]) -> None:
        self.delay = delay
        self._send = send
        self._items: list[T] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def add(self, items: list[T], *, first: bool = False) -> None:
        """Queue `items` (before the ones queued already if `first`: e.g. put back)."""
        if first:
            self._items[:0] = items
        else:
            self._items += items
        if self._timer is None and self._items:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._due)

    def take(self) -> list[T]:
        """Everything queued, for the caller to send; the timer is off until the next add."""
        items, self._items = self._items, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return items

    async def flush(self) -> None:
        self._due()
        if self._sending:
            await asyncio.wait(set(self._sending))

    def _due(self) -> None:
        items = self.take()
        if items:
            task = asyncio.get_running_loop().create_task(self._send(items))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
