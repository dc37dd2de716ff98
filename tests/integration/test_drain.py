"""Gateway SIGTERM with 500 live calls: not ready first, nothing new accepted, live calls finish
inside the drain timeout, the rest get their failover decision, and the process exits 0.

The stack is the scaled-out one an operator runs (`tools.stack.Stack`: gateway over RabbitMQ,
two resolver processes with room for every request at once, the machine's Redis db 12 with a
unique pepper, the mock CRM). The CRM is slow on purpose, so that every call is live, waiting
for its answer, when the gateway is told to stop:

- ids starting with 1 are answered (true) FAST_MS after they reach the CRM: those calls can
  finish inside the drain timeout and must get their right decision;
- ids starting with 4 are answered after a minute, far past the drain: those calls must get
  their node's failover (crm_timeout to on_error) when the drain runs out, before the process
  exits — the node's budget (20 s) is longer than the drain, so only the drain can end them.

One test, about 20 s; it is the "gateway SIGTERM" fault of the chaos suite (`test_chaos.py`
cannot hold it: it ends the gateway). Numbers are printed and appended to CALLERID_TEST_NOTES.
"""

from __future__ import annotations

import asyncio
import random
import resource
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agi_gateway.server import ABORT_GRACE
from tests.stack_load import note, redis_db, until
from tools.asterisk_sim import CallResult, CallScript, run_call
from tools.stack import DEFAULT_FAILOVER, DEFAULT_TABLE, Stack, expected_decision, http_get
from tools.stack import metric_value as value

pytestmark = pytest.mark.integration

CALLS = 500
DRAIN_TIMEOUT = 8.0
CRM_TIMEOUT = 20.0  # longer than the drain: the drain, not the budget, ends the slow calls
FAST_MS = 4000  # answered inside the drain, but never before SIGTERM
REDIS_DB = 12
TABLE = {
    **DEFAULT_TABLE,
    "rules": [
        {"match": "^1", "destination": "true", "delay_ms": FAST_MS},
        {"match": "^4", "destination": "false", "delay_ms": 60_000},
    ],
}


@pytest.fixture
def stack(tmp_path: Path, amqp_url: str, redis_base_url: str) -> Iterator[Stack]:
    # One socket per call on each side of the gateway, and CRM connections: make room.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8 * CALLS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    running = Stack(
        tmp_path / "stack",
        amqp_url=amqp_url,
        redis_url=redis_db(redis_base_url, REDIS_DB),
        resolvers=2,
        crm_timeout=CRM_TIMEOUT,
        crm_table=TABLE,
        extra_env={
            "CALLERID_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
            "CALLERID_PREFETCH": str(CALLS),
            "CALLERID_CRM_MAX_CONNECTIONS": str(CALLS),
            "CALLERID_LOG_LEVEL": "INFO",
        },
    )
    try:
        yield running.start()
    finally:
        # The CRM first: it answers its held requests at once on shutdown, so the resolvers
        # have nothing left in flight and stop at once too.
        if running.crm is not None:
            running.crm.stop()
        running.stop()


def gateway_metric(stack: Stack, name: str, **labels: str) -> float:
    assert stack.gateway is not None
    return value(stack.gateway.metrics(), name, **labels)


def readyz(stack: Stack) -> int:
    assert stack.gateway is not None
    try:
        return http_get(f"http://127.0.0.1:{stack.gateway.http_port}/readyz", 1.0)[0]
    except OSError:
        return 0  # not answering at all


async def test_sigterm_with_500_live_calls(stack: Stack) -> None:
    """500 calls live on a slow CRM, then SIGTERM: /readyz turns 503 before any call is cut,
    a new connection is refused, the calls the CRM answers inside the drain get their right
    decision, the others get their failover when the drain runs out, every one of the 500 has
    OML_IDENT_OUTCOME before the process exits, and it exits 0."""
    gateway = stack.gateway
    assert gateway is not None
    assert gateway.popen is not None
    host, port = stack.agi_address
    rng = random.Random(11)
    plan = [
        (rng.choice("13"), f"{kind}{n:04d}")
        for n, kind in enumerate(rng.choice("14") for _ in range(CALLS))
    ]
    stack.crm_reset()

    async def one(n: int, node: str, customer_id: str) -> CallResult:
        script = CallScript(node=node, entries=[customer_id], uniqueid=f"drain.{n}")
        return await run_call(host, port, script, timeout=60)

    calls = [asyncio.create_task(one(n, *call)) for n, call in enumerate(plan)]
    try:
        # Every request has reached the CRM: every call is live, waiting for its answer
        # (unless the ramp took longer than FAST_MS and some fast calls already ended).
        ramp = await until(
            lambda: stack.crm_stats()["calls"] >= CALLS, 30, f"{CALLS} calls asking the CRM"
        )
        live_at_sigterm = gateway_metric(stack, "callerid_agi_sessions_live")
        sigterm_at = time.monotonic()
        gateway.signal(signal.SIGTERM)
        await until(lambda: readyz(stack) == 503, 2, "/readyz 503 after SIGTERM")
        unready_at = time.monotonic()
        live_when_unready = gateway_metric(stack, "callerid_agi_sessions_live")
        # A new call now: refused at the socket, or answered with config_error (draining).
        refused = False
        try:
            late = await run_call(host, port, CallScript(node="1", entries=["12345"]), timeout=5)
        except OSError:
            refused = True
        else:
            assert late.variables.get("OML_IDENT_OUTCOME") == "config_error", late.variables
            assert gateway_metric(stack, "callerid_agi_sessions_rejected_total", reason="draining")
        exit_code = await asyncio.to_thread(gateway.popen.wait, DRAIN_TIMEOUT + ABORT_GRACE + 10)
        exited_at = time.monotonic()
        results = await asyncio.gather(*calls)
    finally:
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    problems: list[str] = []
    fast_waits: list[float] = []
    failover_at: list[float] = []
    for (node, customer_id), result in zip(plan, results, strict=True):
        v = result.variables
        label = f"{customer_id} on node {node}"
        if "OML_IDENT_OUTCOME" not in v or result.decided_at is None:
            problems.append(f"{label}: no decision ({v})")
            continue
        if not result.closed_by_gateway:
            problems.append(f"{label}: the gateway never closed the socket")
        decision = (v["OML_IDENT_OUTCOME"], v["OML_DEST_TYPE"], v["OML_DEST_ID"])
        if result.decided_at > exited_at:
            problems.append(f"{label}: decided after the gateway exited")
        if customer_id.startswith("1"):
            if decision != expected_decision(node, customer_id):
                problems.append(f"{label}: {decision}, the CRM answered inside the drain")
            if result.decided_at > sigterm_at:
                fast_waits.append(result.decided_at - sigterm_at)
        else:
            if decision != ("crm_timeout", *DEFAULT_FAILOVER[node]):
                problems.append(f"{label}: {decision}, not its failover")
            if v.get("OML_IDENT_SOURCE") != "failover":
                problems.append(f"{label}: source {v.get('OML_IDENT_SOURCE')}")
            failover_at.append(result.decided_at - sigterm_at)
    outcomes = Counter(r.variables.get("OML_IDENT_OUTCOME", "-") for r in results)
    note(
        f"drain: calls={CALLS} live_at_sigterm={live_at_sigterm:.0f} (ramp {ramp:.2f}s) "
        f"readyz_503_after={(unready_at - sigterm_at) * 1000:.0f}ms "
        f"live_when_unready={live_when_unready:.0f} new_connection_refused={refused} "
        f"outcomes={dict(outcomes)} "
        f"answered_in_drain={len(fast_waits)} at {min(fast_waits, default=0):.2f}"
        f"..{max(fast_waits, default=0):.2f}s after SIGTERM "
        f"failed_over={len(failover_at)} at {min(failover_at, default=0):.2f}"
        f"..{max(failover_at, default=0):.2f}s "
        f"exit={exit_code} after {exited_at - sigterm_at:.2f}s "
        f"(drain timeout {DRAIN_TIMEOUT:g}s + abort grace {ABORT_GRACE:g}s) wrong={len(problems)}"
    )
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"
    assert exit_code == 0
    assert live_at_sigterm >= CALLS / 2, "the slow calls were not all live at SIGTERM"
    assert fast_waits, f"no call was answered inside the drain (ramp {ramp:.2f} s)"
    assert failover_at, "no call was left for the drain to fail over"
    # Readiness went false before any call was cut off, with (nearly) every call still live.
    assert unready_at < sigterm_at + min(failover_at)
    assert live_when_unready > CALLS / 2
    assert max(fast_waits) < DRAIN_TIMEOUT
    assert min(failover_at) >= DRAIN_TIMEOUT
    assert exited_at - sigterm_at < DRAIN_TIMEOUT + ABORT_GRACE + 2
