"""Waiting for something another party makes true, with a deadline (never a bare sleep).

The one place tests poll: `eventually` for a condition cheap to check on the event loop,
`eventually_in_thread` for one that blocks (a CLI round trip, an HTTP scrape), `stderr_until`
for what a process we started says.
"""

from __future__ import annotations

import asyncio
import selectors
import subprocess
import time
from collections.abc import Callable


async def eventually(
    condition: Callable[[], bool], within: float = 3.0, *, interval: float = 0.005
) -> None:
    """Poll `condition` every `interval` s until it holds; TimeoutError after `within` s."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the condition is another task's or process's doing
            await asyncio.sleep(interval)


async def eventually_in_thread(
    condition: Callable[[], bool], within: float, what: str, *, interval: float = 0.02
) -> float:
    """Poll a blocking `condition` in a thread until it holds; the seconds it took.

    AssertionError naming `what` after `within` seconds.
    """
    started = time.monotonic()
    deadline = started + within
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started


def stderr_until(process: subprocess.Popen[str], wanted: list[str], timeout: float) -> str:
    """The process's stderr, read until every `wanted` text appeared (or the time is up)."""
    assert process.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while not all(text in seen for text in wanted) and time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                line = process.stderr.readline()
                if not line:
                    break
                seen += line
    return seen
