"""Process plumbing both services share: the event loop, signals and config start-up."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main` on uvloop when it is installed (measurably faster), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (a second signal exits at once)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def _on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            sys.exit(1)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum)
    return stop


async def wait_first(stop: asyncio.Event, *watched: Awaitable[object]) -> None:
    """Wait for `stop`, or for any background task to end (which is a failure to report)."""
    tasks = [asyncio.ensure_future(item) for item in watched]
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task in done and not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())
    for task in (stopper, *tasks):
        task.cancel()
    await asyncio.wait([stopper, *tasks])
