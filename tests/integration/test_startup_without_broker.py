"""Start-up without a broker, for real: the services start, wait, and connect when it comes.

A gateway (scaled out) and a resolver are started with CALLERID_AMQP_URL naming a private
loopback port nothing listens on (a RabbitMQ node of the test's own comes there later:
`tools.rabbit_cluster` with one node, never the shared broker). What the test proves:

- both processes start and stay up: /healthz 200, /readyz 503 (not ready);
- the gateway serves calls meanwhile: a node that needs no CRM decides as usual, a CRM node
  fails over at once (`crm_timeout`, the contract's outcome for "broker down": DESIGN.md §2),
  not after waiting its CRM budget;
- each logs one WARNING about the broker (naming CALLERID_AMQP_URL), no traceback, however
  many attempts it makes while it waits;
- once the node listens, both connect by themselves, are ready, and CRM nodes are identified.

Without rabbitmq-server the test fails under CI=true and is skipped elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.stack_load import note, until
from tools import rabbit_cluster
from tools.asterisk_sim import CallResult, CallScript, run_call
from tools.rabbit_cluster import RabbitCluster
from tools.stack import DEFAULT_FAILOVER, Proc, Stack, free_port, http_get

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CRM_TIMEOUT = 5.0  # long on purpose: a failover "at once" comes well before it
AT_ONCE = CRM_TIMEOUT / 2  # a generous bound that still proves nobody waited the budget


@pytest.fixture
def rabbit_available() -> None:
    reason = rabbit_cluster.missing_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def alive_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Stack.start` waits for /readyz; without a broker nothing is ready: wait for /healthz
    (the process is up and serving) instead."""
    wait_ready = Proc.wait_ready

    def wait_alive(self: Proc, path: str = "/readyz", timeout: float = 30.0) -> None:
        wait_ready(self, "/healthz" if path == "/readyz" else path, timeout)

    monkeypatch.setattr(Proc, "wait_ready", wait_alive)


def status(proc: Proc, path: str) -> int:
    return http_get(f"http://127.0.0.1:{proc.http_port}{path}")[0]


def broker_lines(proc: Proc, level: str) -> list[str]:
    return [
        line
        for line in proc.log_path.read_text(errors="replace").splitlines()
        if f" {level} shared.amqp_link:" in line
    ]


async def call(stack: Stack, node: str, customer_id: str) -> CallResult:
    host, port = stack.agi_address
    return await run_call(host, port, CallScript(node=node, entries=[customer_id]), timeout=20)


def decision(result: CallResult) -> tuple[str, str, str, str]:
    v = result.variables
    return (
        v.get("OML_IDENT_OUTCOME", "-"),
        v.get("OML_DEST_TYPE", "-"),
        v.get("OML_DEST_ID", "-"),
        v.get("OML_IDENT_SOURCE", "-"),
    )


def wait_of(result: CallResult) -> float:
    assert result.decided_at is not None, result.commands
    assert result.last_digit_at is not None, result.commands
    return result.decided_at - result.last_digit_at


@pytest.fixture
def stack(tmp_path: Path, rabbit_available: None, alive_enough: None) -> Iterator[Stack]:
    port = free_port()  # nothing listens here until the test starts its RabbitMQ node
    with Stack(
        tmp_path / "stack",
        amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/",
        resolvers=1,
        crm_timeout=CRM_TIMEOUT,
        extra_env={"CALLERID_LOG_LEVEL": "INFO"},
    ) as running:
        yield running


async def test_services_start_without_a_broker_and_connect_when_it_comes(
    stack: Stack, tmp_path: Path
) -> None:
    """Gateway and resolver up but not ready without a broker; the gateway decides a local
    node's call and fails a CRM node's call over at once; one WARNING each; then a RabbitMQ
    node comes on that port: both ready by themselves, CRM calls identified."""
    gateway, (resolver,) = stack.gateway, stack.resolver_procs
    assert gateway is not None
    for proc in (gateway, resolver):
        assert status(proc, "/healthz") == 200, proc.name
        assert status(proc, "/readyz") == 503, proc.name

    local = await call(stack, "2", "4242")  # any-entry: decided by the gateway alone
    assert decision(local)[:3] == ("identified", "1", "5"), local.variables
    crm = [await call(stack, "3", f"1{n:04d}") for n in range(3)]
    for result in crm:
        assert decision(result) == ("crm_timeout", *DEFAULT_FAILOVER["3"], "failover")
        assert wait_of(result) < AT_ONCE, wait_of(result)
    # Several seconds of attempts by now: still one WARNING each (rate-limited), no traceback.
    await until(lambda: all(broker_lines(p, "WARNING") for p in (gateway, resolver)), 10, "warned")
    for proc in (gateway, resolver):
        warnings = broker_lines(proc, "WARNING")
        assert len(warnings) == 1, (proc.name, warnings)
        assert "CALLERID_AMQP_URL" in warnings[0]
        assert "connection refused" in warnings[0]
        assert "Traceback" not in proc.log_path.read_text(errors="replace")

    port = urlsplit(stack.amqp_url or "").port
    assert port is not None
    broker = RabbitCluster(tmp_path / "rabbit", size=1, amqp_ports=[port])
    came = time.monotonic()
    try:
        broker.start()
        listening = time.monotonic() - came
        ready_in = await until(
            lambda: all(status(p, "/readyz") == 200 for p in (gateway, resolver)),
            30,
            "both services ready once the broker listens",
        )
        result = await call(stack, "3", "10042")
        assert decision(result) == ("identified", "1", "3", "crm"), result.variables
    finally:
        stack.stop()  # deletes its topology while the broker is still up
        stack.amqp_url = None  # nothing left to delete when the fixture stops it again
        broker.stop()
    for proc in (gateway, resolver):
        assert any("connected to RabbitMQ at" in line for line in broker_lines(proc, "INFO"))
        assert broker_lines(proc, "ERROR") == []
    note(
        f"start-up without a broker: gateway and resolver not ready, local node decided, CRM "
        f"calls failed over in {max(wait_of(r) for r in crm) * 1000:.0f} ms (budget "
        f"{CRM_TIMEOUT:g} s); broker listening {listening:.1f} s after its start, both ready "
        f"{ready_in:.1f} s after that"
    )
