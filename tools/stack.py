"""Start and stop a whole callerid stack as real processes on loopback (tests, benchmarks).

A `Stack` runs the mock CRM, any number of `crm-resolver` processes and one `agi-gateway`
(scaled-out over RabbitMQ, or embedded), each on free loopback ports, waits until every one
answers /readyz, and stops them by PID (a paused process is woken so that SIGTERM can act;
a stack that fails to start stops what it had started). Its RabbitMQ names carry a unique
prefix and its cache keys a unique pepper, so several stacks and test runs can share one
broker and one Redis; `stop` deletes its RabbitMQ queues and exchanges (they are durable, and
would pile up in the shared broker run after run). Fault tests pause (SIGSTOP), resume and
kill single processes, and `redis_server` gives them a private Redis they may stop, never the
shared one.

`expected_decision` says what the default nodes make of the default CRM table's answers, so
tests can check every call of a load against its inputs.

Not for production: it exists so that tests and `bench/` exercise the same processes an
operator runs, with the same console scripts and environment variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika

from shared.topology import Topology
from tools.node_fixture import nodes_template

BIN = Path(sys.executable).parent
READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def url_answers(url: str, default_port: int, timeout: float = 1.0) -> bool:
    """Whether the server a service URL names (amqp://, redis://) accepts a connection."""
    parts = urlsplit(url)
    return port_answers(parts.port or default_port, parts.hostname or "127.0.0.1", timeout)


def redis_server(workdir: Path, port: int | None = None, extra_args: Sequence[str] = ()) -> Proc:
    """A private, started redis-server (no persistence) on loopback, for tests that stop it.

    Never the shared Redis: tests that take Redis away must not take it from anyone else.
    `port` lets a test start it again where the services expect it; `extra_args` go to
    redis-server as they are (e.g. `--enable-debug-command local` for a test that stalls it).
    """
    port = port if port is not None else free_port()
    proc = Proc(
        f"redis-{port}",
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(workdir),
            *extra_args,
        ],
        dict(os.environ),
        workdir / f"redis-{port}.log",
    )
    proc.start()
    try:
        proc.wait_listening(port)
    except BaseException:
        proc.stop()
        raise
    proc.tcp_port = port
    return proc


def delete_topology(amqp_url: str, prefix: str, timeout: float = 5.0) -> bool:
    """Delete the queues and exchanges a stack with `prefix` declared; False (and a line on
    stderr) if the broker could not be asked, e.g. a fault test left it stopped."""
    failure: list[BaseException] = []

    async def delete() -> None:
        connection = await aio_pika.connect(amqp_url, timeout=timeout)
        async with connection:
            await Topology(prefix=prefix).delete(await connection.channel())

    def run() -> None:
        try:
            asyncio.run(asyncio.wait_for(delete(), timeout))
        except Exception as exc:  # reported below: a stop never raises for this
            failure.append(exc)

    # A thread with its own loop: stop() is also called from async tests and fixtures.
    thread = threading.Thread(target=run, name=f"delete-{prefix}", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    if failure or thread.is_alive():
        reason = repr(failure[0]) if failure else "timed out"
        print(f"stack {prefix}: RabbitMQ topology not deleted: {reason}", file=sys.stderr)
        return False
    return True


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post_json(url: str, body: object, method: str = "POST") -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status), bytes(response.read())


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    http_port: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    tcp_port: int | None = None  # the service port of a server without HTTP (redis_server)

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(signum)

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets but does nothing (a hung process)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap: a crash, with no chance to clean up."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: never leaves the process behind."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            # A paused (SIGSTOPped) process would keep SIGTERM pending until the timeout.
            self.popen.send_signal(signal.SIGCONT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def wait_listening(self, port: int, timeout: float = READY_TIMEOUT) -> None:
        """Until something accepts TCP connections on 127.0.0.1:port (servers without HTTP)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited early:\n{self.tail()}")
            if port_answers(port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not listening within {timeout:g} s:\n{self.tail()}")

    def wait_ready(self, path: str = "/readyz", timeout: float = READY_TIMEOUT) -> None:
        assert self.http_port is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited early:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{self.http_port}{path}", 0.5)[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout:g} s:\n{self.tail()}")

    def metrics(self) -> str:
        assert self.http_port is not None
        return http_get(f"http://127.0.0.1:{self.http_port}/metrics")[1].decode()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        if all(f'{key}="{val}"' in label_text for key, val in labels.items()):
            total += float(value)
    return total


# The shared node fixture (tools/fixtures/nodes.yaml) with 5-digit ids: a `nodes_template`.
DEFAULT_NODES = nodes_template()

# What DEFAULT_NODES make of DEFAULT_TABLE's answers: (outcome, destination type, id) by node
# and CRM answer, and each node's failover destination (on_error). Tests check calls by these.
DEFAULT_DECISIONS: dict[str, dict[str, tuple[str, str, str]]] = {
    "1": {
        "true": ("identified", "1", "3"),
        "false": ("not_identified", "1", "4"),
        "1,7": ("crm_bad_response", "1", "9"),  # a true/false node given a destination
    },
    "3": {
        "true": ("identified", "1", "3"),
        "false": ("not_identified", "1", "4"),
        "1,7": ("crm_destination", "1", "7"),
    },
}
DEFAULT_FAILOVER: dict[str, tuple[str, str]] = {"1": ("1", "9"), "3": ("5", "1")}


def default_answer(customer_id: str) -> str:
    """The destination DEFAULT_TABLE's rules give `customer_id` (not its delayed "33333")."""
    if customer_id.startswith("1"):
        return "true"
    return "1,7" if customer_id.startswith("2") else "false"


def expected_decision(node: str, customer_id: str) -> tuple[str, str, str]:
    """(OML_IDENT_OUTCOME, OML_DEST_TYPE, OML_DEST_ID) for a call to a default CRM node."""
    return DEFAULT_DECISIONS[node][default_answer(customer_id)]


DEFAULT_TABLE: dict[str, Any] = {
    "default": {"destination": "false"},
    "rules": [
        {"match": "^1", "destination": "true"},
        {"match": "^2", "destination": "1,7"},
    ],
    "customers": {"33333": {"delay_ms": 6000, "destination": "true"}},
}


@dataclass
class Stack:
    workdir: Path
    amqp_url: str | None = None  # None: the gateway runs embedded
    redis_url: str | None = None
    resolvers: int = 3
    crm_timeout: float = 1.0
    crm_table: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TABLE))
    crm_latency_ms: float = 0.0
    crm_latency_jitter_ms: float = 0.0
    nodes_template: str = DEFAULT_NODES
    extra_env: dict[str, str] = field(default_factory=dict)
    crm_args: list[str] = field(default_factory=list)  # more mock CRM flags (--log-level ...)
    # Run once the mock CRM answers, before any service starts: e.g. to write OMniLeads
    # hashes that name the CRM's URL, for a stack whose CALLERID_NODES is a redis:// URL.
    before_services: Callable[[Stack], None] | None = None
    prefix: str = field(default_factory=lambda: f"stack-{uuid.uuid4().hex[:10]}")
    crm: Proc | None = None
    gateway: Proc | None = None
    resolver_procs: list[Proc] = field(default_factory=list)

    @property
    def crm_url(self) -> str:
        assert self.crm is not None
        assert self.crm.http_port is not None
        return f"http://127.0.0.1:{self.crm.http_port}"

    @property
    def agi_address(self) -> tuple[str, int]:
        assert self.gateway is not None
        return "127.0.0.1", int(self.gateway.env["CALLERID_AGI_LISTEN"].rpartition(":")[2])

    def _env(self, http_port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLERID_")}
        env.update(
            CALLERID_NODES=str(self.workdir / "nodes.yaml"),
            CALLERID_HTTP_LISTEN=f"127.0.0.1:{http_port}",
            CALLERID_AMQP_PREFIX=self.prefix,
            CALLERID_CACHE_KEY_PEPPER=self.prefix,
            CALLERID_LOG_LEVEL="WARNING",
        )
        if self.amqp_url:
            env["CALLERID_AMQP_URL"] = self.amqp_url
        if self.redis_url:
            env["CALLERID_REDIS_URL"] = self.redis_url
        env.update(self.extra_env)
        return env

    def start(self) -> Stack:
        """Start everything and wait until it is ready; on failure, stop what was started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        table = self.workdir / "crm_table.json"
        table.write_text(json.dumps(self.crm_table))
        self.crm = Proc(
            "mock-crm",
            [
                str(BIN / "callerid-mock-crm"),
                "--listen",
                f"127.0.0.1:{port}",
                "--table",
                str(table),
                "--latency-ms",
                str(self.crm_latency_ms),
                "--latency-jitter-ms",
                str(self.crm_latency_jitter_ms),
                *self.crm_args,
            ],
            self._env(free_port()),
            self.workdir / "mock-crm.log",
            http_port=port,
        )
        self.crm.start()
        self.crm.wait_ready("/_stats")
        (self.workdir / "nodes.yaml").write_text(
            self.nodes_template.format(crm=self.crm_url, crm_timeout=self.crm_timeout)
        )
        if self.before_services is not None:
            self.before_services(self)
        if self.amqp_url:
            for _ in range(self.resolvers):
                self.add_resolver()
        port = free_port()
        env = self._env(port)
        env["CALLERID_AGI_LISTEN"] = f"127.0.0.1:{free_port()}"
        argv = [str(BIN / "agi-gateway")] + ([] if self.amqp_url else ["--embedded"])
        self.gateway = Proc("gateway", argv, env, self.workdir / "gateway.log", http_port=port)
        self.gateway.start()
        self.gateway.wait_ready()
        return self

    def add_resolver(self) -> Proc:
        port = free_port()
        index = len(self.resolver_procs)
        proc = Proc(
            f"resolver-{index}",
            [str(BIN / "crm-resolver")],
            self._env(port),
            self.workdir / f"resolver-{index}.log",
            http_port=port,
        )
        proc.start()
        proc.wait_ready()
        self.resolver_procs.append(proc)
        return proc

    def crm_stats(self) -> dict[str, Any]:
        return dict(json.loads(http_get(f"{self.crm_url}/_stats")[1]))

    def crm_mode(self, mode: str, **extra: Any) -> None:
        http_post_json(f"{self.crm_url}/_mode", {"mode": mode, **extra})

    def crm_reset(self) -> None:
        http_post_json(f"{self.crm_url}/_reset", {})

    def resolver_metric(self, name: str, **labels: str) -> float:
        """Summed over the resolvers still running (do not ask while one is paused)."""
        return sum(
            metric_value(p.metrics(), name, **labels) for p in self.resolver_procs if p.alive
        )

    def cache_lookups(self, result: str) -> float:
        """Answer-cache lookups with this result (hit, miss, error) by the gateway, which reads
        the cache first, and by the running resolvers, which read it for the gateway's misses."""
        gateway = 0.0
        if self.gateway is not None and self.gateway.alive:
            gateway = metric_value(
                self.gateway.metrics(), "callerid_gateway_cache_lookups_total", result=result
            )
        return gateway + self.resolver_metric("callerid_cache_lookups_total", result=result)

    def stop(self) -> None:
        """Gateway first (it drains), then resolvers, then the CRM, all by PID; then the
        stack's RabbitMQ topology."""
        for proc in [self.gateway, *self.resolver_procs, self.crm]:
            if proc is not None:
                proc.stop()
        if self.amqp_url:
            delete_topology(self.amqp_url, self.prefix)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
