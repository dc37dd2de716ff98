"""Single-flight: identical calls in flight at once share one execution.

What belongs here: the generic mechanism only (a key → task map). Which calls are identical
(the resolver uses (node id, customer id)) and what is shared are the caller's business.

Invariants:
- The shared call runs in its own task, and every caller — the first one too — awaits it
  through `asyncio.shield`. Cancelling one caller (its request timed out, its call hung up)
  never cancels the call the others are waiting for. A call whose callers have all gone
  still runs to the end; in the resolver that is what fills the cache for the next caller.
- An entry lives exactly as long as its task: a done-callback removes it, so the map never
  grows beyond the calls actually running. The callback also retrieves the task's exception,
  so a failure nobody waited for is not reported as "never retrieved".
- `close()` cancels calls still running and waits for them: nothing outlives the owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        """How many shared calls are running (0 when idle: nothing leaks)."""
        return len(self._calls)

    async def run(self, key: K, factory: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The result of the call for `key`, and whether this caller joined one in flight.

        The factory's exception, if any, is raised to every caller.
        """
        task, joined = self.start(key, factory)
        return await asyncio.shield(task), joined

    def start(self, key: K, factory: Callable[[], Awaitable[V]]) -> tuple[asyncio.Task[V], bool]:
        """The shared call for `key` (started with `factory` unless one is in flight), and
        whether it was in flight; for callers that wait on it their own way (never cancel it:
        others share it)."""
        task = self._calls.get(key)
        if task is not None:
            return task, True
        task = asyncio.create_task(_await(factory))
        self._calls[key] = task
        task.add_done_callback(lambda done: self._forget(key, done))
        return task, False

    async def close(self) -> None:
        """Cancel the calls still running and wait until they have ended."""
        tasks = list(self._calls.values())
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() does not raise the tasks' own cancellation or errors (the latter were
            # retrieved by _forget); a cancellation of close() itself still propagates.
            await asyncio.wait(tasks)

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()


async def _await(factory: Callable[[], Awaitable[V]]) -> V:
    return await factory()
