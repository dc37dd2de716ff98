"""A mock CRM speaking OMniLeads' protocol, answering from a small table: demo, tests, benchmarks.

`callerid-mock-crm --listen 127.0.0.1:8081 --table examples/mock_crm_table.yaml` serves any
path: every POST reads the form field `idContact` and answers from the table, so several nodes
can point at different paths of one mock. Tests start one in their own event loop with
`start_mock_crm(table)`.

The table (YAML or JSON; `examples/mock_crm_table.yaml` is the commented demo):

    default: {destination: "false"}          # when nothing else matches
    customers:                               # exact ids first
      "12345": {destination: "true"}
      "33333": {delay_ms: 6000, destination: "true"}
      "44444": {status_code: 500}
      "55555": {raw: "<html>garbage</html>"}
    rules:                                   # then the first regex that matches (re.search)
      - {match: "^1", destination: "true"}

An entry may set `destination` (a string, a boolean or a [type, id] list), `status` ("ok" by
default; null leaves the key out), `key` ("destination" or "response", the name of the
answer's key), `status_code` (200), `raw` (a body sent as is instead of JSON; characters up to
U+00FF are sent as those bytes, so a test can send any bytes), and `delay_ms`.

Control endpoints (tests, the demo, `tools/stack.py`):
- `GET /_stats` → `{"calls": N, "by_id": {id: N}, "by_path": {path: N}}`: identification
  POSTs received since the start or the last reset, whatever was answered;
- `POST /_reset` zeroes the counts;
- `PUT /_table` replaces the table (a JSON body; 400 with the reason if it is not valid);
- `POST /_mode {"mode": "normal" | "down" | "slow" | "garbage", "delay_ms": N}` flips the
  whole CRM: down answers 503, slow adds `delay_ms` (default 5000) to every answer, garbage
  answers 200 with an HTML page.

Latency for load tests: `--latency-ms` plus a uniform random 0..`--latency-jitter-ms` is added
to every identification answer. Each request is logged at INFO with the id masked but for its
last two digits. On shutdown, answers still waiting out a delay are sent at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.settings import parse_listen
from shared.startup_errors import StartupError, listening, report

log = logging.getLogger("callerid.mock_crm")

Mode = Literal["normal", "down", "slow", "garbage"]
GARBAGE = b"<html><body><h1>It works!</h1></body></html>"
_SLOW_DEFAULT_MS = 5000.0
_MAX_DELAY_MS = 600_000.0
_MODES: tuple[Mode, ...] = get_args(Mode)
# aiohttp's default of 128 overflows when a load test's resolvers open thousands of CRM
# connections at once; the dropped SYNs come back after 1, 3, 7 s of retransmission and read
# as a slow CRM.
LISTEN_BACKLOG = 4096
# Delayed answers are woken on shutdown, so this only bounds a client that stops reading.
_SHUTDOWN_SECONDS = 1.0


class Entry(BaseModel):
    """How the mock answers one id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    destination: str | bool | list[int] = "false"
    status: str | None = "ok"
    key: Literal["destination", "response"] = "destination"
    status_code: int = Field(default=200, ge=100, le=599)
    raw: str | None = None
    delay_ms: float = Field(default=0, ge=0, le=_MAX_DELAY_MS)

    def body(self) -> bytes:
        if self.raw is not None:
            try:
                return self.raw.encode("latin-1")
            except UnicodeEncodeError:
                return self.raw.encode("utf-8", "surrogatepass")
        document: dict[str, Any] = {}
        if self.status is not None:
            document["status"] = self.status
        document[self.key] = self.destination
        return json.dumps(document).encode()


class Rule(Entry):
    match: re.Pattern[str]


class Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Entry = Entry()
    customers: dict[str, Entry] = {}
    rules: list[Rule] = []

    @field_validator("customers", mode="before")
    @classmethod
    def _ids_are_strings(cls, value: Any) -> Any:
        # YAML reads an unquoted 12345 as an int.
        if isinstance(value, dict):
            return {str(key): entry for key, entry in value.items()}
        return value

    def answer_for(self, customer_id: str) -> Entry:
        entry = self.customers.get(customer_id)
        if entry is not None:
            return entry
        for rule in self.rules:
            if rule.match.search(customer_id):
                return rule
        return self.default


def load_table(path: str | Path) -> Table:
    """A table file (YAML, or JSON, which YAML reads too); ValueError naming the problem."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return Table.model_validate(data or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"mock CRM table {str(path)!r}: {exc}") from exc


@dataclass
class _State:
    table: Table
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    mode: Mode = "normal"
    mode_delay_ms: float = _SLOW_DEFAULT_MS

    def __post_init__(self) -> None:
        self.by_id: Counter[str] = Counter()
        self.by_path: Counter[str] = Counter()
        # Set on shutdown: answers waiting out a delay go at once instead of holding it up.
        self.closing = asyncio.Event()
        # Notified on every identification request, for tests that wait for one to arrive.
        self.arrived = asyncio.Condition()

    @property
    def calls(self) -> int:
        return sum(self.by_id.values())

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "by_id": dict(self.by_id),
            "by_path": dict(self.by_path),
        }

    def reset(self) -> None:
        self.by_id.clear()
        self.by_path.clear()

    def set_mode(self, mode: str, delay_ms: float | None = None) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(_MODES)}")
        if delay_ms is not None and not 0 <= delay_ms <= _MAX_DELAY_MS:
            raise ValueError("delay_ms out of range")
        self.mode = mode
        self.mode_delay_ms = _SLOW_DEFAULT_MS if delay_ms is None else delay_ms

    async def pause(self, delay_ms: float) -> None:
        if delay_ms <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), delay_ms / 1000)


_STATE: web.AppKey[_State] = web.AppKey("state", _State)


def mask(customer_id: str) -> str:
    """The id for a log line: all masked but the last two characters, when they are digits."""
    tail = customer_id[-2:] if len(customer_id) > 2 else ""
    if not (tail.isascii() and tail.isdigit()):
        tail = ""
    return "*" * min(len(customer_id) - len(tail), 30) + tail


async def _identify(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    form = await request.post()
    raw_id = form.get("idContact", "")
    customer_id = raw_id[:64] if isinstance(raw_id, str) else ""
    state.by_id[customer_id] += 1
    state.by_path[request.path[:64]] += 1
    async with state.arrived:
        state.arrived.notify_all()

    delay = state.latency_ms + random.uniform(0, state.jitter_ms)
    if state.mode == "down":
        status, body = 503, b'{"error": "mock CRM is down"}'
    elif state.mode == "garbage":
        status, body = 200, GARBAGE
    else:
        entry = state.table.answer_for(customer_id)
        status, body = entry.status_code, entry.body()
        delay += entry.delay_ms
        if state.mode == "slow":
            delay += state.mode_delay_ms
    log.info(
        "POST %s idContact=%s -> %d after %.0f ms", request.path, mask(customer_id), status, delay
    )
    await state.pause(delay)
    return web.Response(status=status, body=body, content_type="application/json")


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].stats())


async def _reset(request: web.Request) -> web.Response:
    request.app[_STATE].reset()
    return web.json_response({"ok": True})


async def _put_table(request: web.Request) -> web.Response:
    try:
        table = Table.model_validate(await request.json())
    except (ValueError, ValidationError) as exc:
        return web.json_response({"error": str(exc)[:2000]}, status=400)
    request.app[_STATE].table = table
    return web.json_response({"ok": True})


async def _set_mode(request: web.Request) -> web.Response:
    try:
        data = await request.json()
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        delay = data.get("delay_ms")
        request.app[_STATE].set_mode(str(data.get("mode")), None if delay is None else float(delay))
    except (ValueError, TypeError) as exc:
        return web.json_response({"error": str(exc)[:500]}, status=400)
    return web.json_response({"ok": True})


def build_app(table: Table, *, latency_ms: float = 0.0, jitter_ms: float = 0.0) -> web.Application:
    app = web.Application()
    state = _State(table, latency_ms=latency_ms, jitter_ms=jitter_ms)
    app[_STATE] = state

    async def wake_delayed(_: web.Application) -> None:
        state.closing.set()

    app.on_shutdown.append(wake_delayed)
    app.router.add_get("/_stats", _stats)
    app.router.add_post("/_reset", _reset)
    app.router.add_put("/_table", _put_table)
    app.router.add_post("/_mode", _set_mode)
    app.router.add_post("/{path:.*}", _identify)
    return app


class MockCrm:
    """A mock CRM running in the current event loop (see `start_mock_crm`)."""

    def __init__(self, runner: web.AppRunner, state: _State, url: str) -> None:
        self._runner: web.AppRunner | None = runner
        self._state = state
        self.url = url
        """Base URL, no trailing slash: nodes use `{url}/identify`, `{url}/route`..."""

    async def stats(self) -> dict[str, Any]:
        return self._state.stats()

    async def reset(self) -> None:
        self._state.reset()

    async def wait_calls(self, count: int) -> None:
        """Return once `count` identification requests have arrived (bound it with a timeout)."""
        async with self._state.arrived:
            await self._state.arrived.wait_for(lambda: self._state.calls >= count)

    async def set_table(self, table: dict[str, Any]) -> None:
        self._state.table = Table.model_validate(table)

    async def set_mode(self, mode: str, delay_ms: float | None = None) -> None:
        self._state.set_mode(mode, delay_ms)

    async def close(self) -> None:
        """Stop serving; answers still waiting out a delay are sent at once. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def start_mock_crm(
    table: dict[str, Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    latency_ms: float = 0.0,
    jitter_ms: float = 0.0,
) -> MockCrm:
    """Serve a mock CRM on host:port (0: any free port) in this event loop; close() it."""
    app = build_app(Table.model_validate(table), latency_ms=latency_ms, jitter_ms=jitter_ms)
    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_SECONDS
    )
    await runner.setup()
    started = False
    try:
        await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG).start()
        bound = runner.addresses[0]
        started = True
    finally:
        if not started:
            await runner.cleanup()
    url_host = f"[{host}]" if ":" in host else host
    return MockCrm(runner, app[_STATE], f"http://{url_host}:{bound[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callerid-mock-crm", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port to serve on")
    parser.add_argument("--table", help="YAML or JSON answer table (default: everyone false)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    parser.add_argument(
        "--latency-jitter-ms", type=float, default=0.0, help="plus uniform random 0..this"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    if args.latency_ms < 0 or args.latency_jitter_ms < 0:
        parser.error("latencies must not be negative")
    try:
        table = load_table(args.table) if args.table else Table()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    app = build_app(table, latency_ms=args.latency_ms, jitter_ms=args.latency_jitter_ms)
    log.info(
        "mock CRM on http://%s (%d customers, %d rules)",
        args.listen,
        len(table.customers),
        len(table.rules),
    )
    try:
        with listening("--listen", args.listen):
            web.run_app(
                app,
                host=host,
                port=port,
                access_log=None,
                print=None,
                shutdown_timeout=_SHUTDOWN_SECONDS,
                handler_cancellation=True,
                backlog=LISTEN_BACKLOG,
            )
    except StartupError as exc:  # the port is taken, or not this host's: one line, no traceback
        return report(parser.prog, [exc], str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
