"""Process plumbing both services share: the event loop, signals and config start-up."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsError

from shared.settings import CommonSettings, configure_logging, env_name, flag_overrides

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CommonSettings)


def start_service(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    settings_type: type[S],
    serve: Callable[[S], Coroutine[Any, Any, int]],
) -> int:
    """A console script's whole start: flags over env into settings, logging, the loop.

    Invalid settings exit with code 2 and one line per bad setting, naming it and where its
    value came from (the flag, else the environment variable); never a traceback.
    """
    args = parser.parse_args(argv)
    overrides = flag_overrides(args)

    def origin(field: str) -> str:
        if field in overrides:
            flags = [a.option_strings[-1] for a in parser._actions if a.dest == field]
            return flags[0] if flags else field
        return env_name(settings_type, field)

    try:
        settings = settings_type(**overrides)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            message = error["msg"].removeprefix("Value error, ")
            where = origin(str(error["loc"][0])) if error["loc"] else "settings"
            print(f"{parser.prog}: invalid setting {field}: {message} ({where})", file=sys.stderr)
        return 2
    except SettingsError as exc:
        # A structured setting (JSON in the environment) that does not parse.
        named = re.search(r'field "(\w+)"', str(exc))
        cause = exc.__cause__
        message = "not valid JSON" if isinstance(cause, json.JSONDecodeError) else str(cause)
        if named is None:
            print(f"{parser.prog}: invalid settings: {exc}", file=sys.stderr)
        else:
            field = named.group(1)
            print(
                f"{parser.prog}: invalid setting {field}: {message} ({origin(field)})",
                file=sys.stderr,
            )
        return 2
    configure_logging(settings.log_level)
    return run(lambda: serve(settings))


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
