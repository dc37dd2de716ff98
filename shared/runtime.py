"""Process plumbing both services share: the event loop, signals and config start-up."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from shared import startup_errors
from shared.nodes import ConfigError
from shared.settings import CommonSettings, configure_logging, flag_overrides

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CommonSettings)
# Allocations between two collections of the youngest generation (CPython's default is 700).
# Counted on the gateway under load (gc.get_stats over 5,325 embedded calls, default settings):
# 741 young, 67 middle and 6 full collections, which found 2,076 objects of cyclic garbage in
# all: nearly everything a call makes is freed by reference counting, and the collections,
# the full ones walking the whole heap above all, were pure cost (bench/ab.py: this and
# `heap_settled` took the gateway's CPU per call down by about a tenth).
GC_YOUNG_THRESHOLD = 20_000


def start_service(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    settings_type: type[S],
    serve: Callable[[S], Coroutine[Any, Any, int]],
) -> int:
    """A console script's whole start: flags over env into settings, logging, the loop.

    Nothing that stops a start reaches the operator as a traceback: each reason is one ERROR
    line naming the setting (its flag when the value came from one, else its environment
    variable) and the fix, and the exit status says whether the configuration is wrong (2) or
    this host is not ready (1): `shared.startup_errors`.
    """
    args = parser.parse_args(argv)
    overrides = flag_overrides(args)
    settings = startup_errors.load_settings(parser, settings_type, overrides)
    if isinstance(settings, int):
        return settings
    configure_logging(settings.log_level)
    where = startup_errors.origins(parser, settings_type, set(overrides))
    try:
        return run(lambda: serve(settings))
    except KeyboardInterrupt:
        return startup_errors.INTERRUPTED
    except startup_errors.StartupError as exc:
        return startup_errors.report(parser.prog, [exc], where)
    except ConfigError as exc:
        error = startup_errors.from_config_error(exc, settings.nodes)
        return startup_errors.report(parser.prog, [error], where)
    except Exception as exc:
        return startup_errors.report_unexpected(parser.prog, exc)


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main` on uvloop when it is installed (measurably faster), else on asyncio's loop."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def heap_settled() -> None:
    """Call once a service has started: what start-up made (modules, settings, the nodes) lives
    for good, so it is moved out of every later collection's way (`gc.freeze`). Without this
    the first full collections under load walk all of it."""
    gc.collect()
    gc.freeze()


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
