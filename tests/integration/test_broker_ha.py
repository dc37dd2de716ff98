"""Broker HA, for real: three RabbitMQ nodes, a quorum request queue, its leader killed.

A private 3-node cluster (`tools.rabbit_cluster`: its own ports, epmd, cookie and data; never
the shared broker) carries a stack of real processes (`tools.stack.Stack`: a gateway over
RabbitMQ, two resolvers, a mock CRM) configured with the cluster's three URLs and
CALLERID_AMQP_QUEUE_TYPE=quorum. The gateway and resolver A list the nodes from node 1,
resolver B from node 2; the gateway declares the request queue first, so its leader is node 1
(checked with `rabbitmqctl list_queues name leader`). Under a steady, bounded load
(`tests.stack_load.Load`) node 1 is killed with -9: the queue's leader, and the node the gateway
and resolver A are connected to. What the test proves:

- every call gets a decision, within its CRM budget (no call left without one, none hangs);
- a call fails over (`crm_timeout`, the node's `on_error`) only if it was alive between the
  kill and the first call identified through the CRM after it (the queue moving, the services
  reconnecting); every call before and after that window is identified;
- the gateway and resolver A connect to another node by themselves, and logged the loss once.

Then node 1 is started again (it rejoins and catches up by itself) and the node a service is
connected to that does not lead the queue is killed (the same checks, the queue not moving);
when every service is on the new leader, that node is killed (the queue moves again).

The recovery time (kill to the first call identified again) and the counts are printed, and
appended to the file named by CALLERID_TEST_NOTES. Without rabbitmq-server the test fails
under CI=true and is skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.topology import Topology
from tests.stack_load import Call, Load, check_calls, note, until
from tools import rabbit_cluster
from tools.rabbit_cluster import RabbitCluster, RabbitNode
from tools.stack import Proc, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CRM_TIMEOUT = 2.0  # the nodes' budget: a call is decided within it (plus SLACK) whatever dies
SLACK = 0.5
RATE = 20.0  # calls per second, bounded
BEFORE = 40  # calls identified before the kill
AFTER = 3.0  # seconds of calls after the recovery
RECOVERY_WITHIN = 30.0  # generous: proves it recovers by itself, not how fast


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    reason = rabbit_cluster.missing_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    with RabbitCluster(tmp_path_factory.mktemp("rabbit"), size=3) as running:
        yield running


def urls_from(cluster: RabbitCluster, first: int) -> str:
    """The cluster's URLs, starting from node `first` (1-based), as CALLERID_AMQP_URL."""
    nodes = cluster.nodes[first - 1 :] + cluster.nodes[: first - 1]
    return ",".join(node.url for node in nodes)


def first_right_after(load: Load, moment: float) -> Call | None:
    """The first call started after `moment` to end with its right answer (CRM or cache)."""
    answered = [c for c in list(load.finished) if c.started > moment and c.right]
    return min(answered, key=lambda call: call.ended, default=None)


def connected_lines(log: Path) -> list[str]:
    """What a service's link said about its connections: connected, lost, and a channel that
    lost track of the quorum queue (`AmqpLink.publish_nacked`)."""
    return [
        line
        for line in log.read_text(errors="replace").splitlines()
        if "shared.amqp_link" in line
        and any(words in line for words in ("connected to RabbitMQ", "lost the", "lost track"))
    ]


def online_members(cluster: RabbitCluster, queue: str) -> str:
    """`rabbitmqctl list_queues name online` of `queue`, from a live node."""
    asker = next(node for node in cluster.nodes if node.alive)
    out = asker.ctl("list_queues", "name", "online", "--quiet", "--no-table-headers")
    return next((line for line in out.splitlines() if line.startswith(queue)), "")


def node_of(cluster: RabbitCluster, proc: Proc) -> RabbitNode:
    """The node a service is connected to now, from its last `connected to` log line."""
    last = [line for line in connected_lines(proc.log_path) if "connected to" in line][-1]
    port = int(last.rpartition(":")[2].split()[0])
    return next(node for node in cluster.nodes if node.amqp_port == port)


async def kill_and_recover(
    load: Load, cluster: RabbitCluster, node: RabbitNode, phase: str
) -> tuple[Call, float]:
    """Kill `node` under the load (calls from now on are in `phase`), wait for the first call
    identified after it, then run AFTER seconds of calls that must all be right. The call and
    the seconds from the kill to its decision."""
    load.phase = phase
    killed_at = time.monotonic()
    cluster.kill(node)
    await until(
        lambda: first_right_after(load, killed_at) is not None,
        RECOVERY_WITHIN,
        f"a call identified after {node.name} was killed",
    )
    recovered = first_right_after(load, killed_at)
    assert recovered is not None
    # Every call alive until now may have been caught; those after must be right.
    load.phase = f"after-{phase}"
    after_from = time.monotonic()
    await until(
        lambda: sum(1 for c in load.finished if c.started > after_from) >= RATE * AFTER,
        30,
        "calls after the recovery",
    )
    return recovered, recovered.ended - killed_at


async def test_killing_the_node_that_leads_the_request_queue_loses_no_call(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    """Node 1 (the request queue's leader, and the node the gateway and resolver A use) is
    killed with -9 under steady load: every call is decided within its budget, failovers only
    while the queue moves, every call identified again after that, the services on node 1
    reconnected to another node, each logging the loss once."""
    started = time.monotonic()
    stack = Stack(
        tmp_path / "stack",
        amqp_url=urls_from(cluster, 1),
        resolvers=0,
        crm_timeout=CRM_TIMEOUT,
        crm_latency_ms=5,
        extra_env={"CALLERID_AMQP_QUEUE_TYPE": "quorum", "CALLERID_LOG_LEVEL": "INFO"},
    )
    try:
        stack.start()  # the gateway first: it declares the queue on node 1
        stack.add_resolver()  # A: node 1 first
        stack.extra_env["CALLERID_AMQP_URL"] = urls_from(cluster, 2)
        stack.add_resolver()  # B: node 2 first
        gateway, (resolver_a, resolver_b) = stack.gateway, stack.resolver_procs
        assert gateway is not None
        queue = Topology(prefix=stack.prefix).request_queue
        leader = cluster.leader(queue)
        assert leader is cluster.nodes[0], leader.name
        assert f"127.0.0.1:{leader.amqp_port}" in connected_lines(gateway.log_path)[0]

        load = Load(stack, rate=RATE, concurrency=40, call_timeout=CRM_TIMEOUT + 10)
        runner = asyncio.create_task(load.run())
        try:
            await until(lambda: load.ended_in("before") >= BEFORE, 30, "calls before the kill")
            first = await kill_and_recover(load, cluster, leader, "fault")
            new_leader = cluster.leader(queue)
            # Node 1 back (it rejoins by itself), then the node a service is on, not the leader.
            cluster.restart(leader)
            await until(lambda: leader.name in online_members(cluster, queue), 60, "node 1 back")
            on = {proc.name: node_of(cluster, proc) for proc in (gateway, resolver_a, resolver_b)}
            # All on the new leader (it happens): then that node, the leader once more.
            target = next((node for node in on.values() if node is not new_leader), None)
            target = target or new_leader
            second = await kill_and_recover(load, cluster, target, "fault2")
        finally:
            load.stop()
            await runner
    finally:
        stack.amqp_url = ",".join(node.url for node in cluster.nodes if node.alive)
        stack.stop()
        elapsed = time.monotonic() - started

    problems = check_calls(load.calls, CRM_TIMEOUT + SLACK, failover_outcomes={"crm_timeout"})
    assert problems == [], problems[:20]
    assert all(call.decided for call in load.calls)
    outcomes = Counter(
        (call.phase_at_start, call.decision[0] if call.decision else "none") for call in load.calls
    )

    def failovers(phase: str) -> int:
        return sum(
            1 for c in load.calls if c.phase_at_start == phase and c.failover({"crm_timeout"})
        )

    stale = sum("lost track" in line for line in connected_lines(gateway.log_path))
    # Who was on a killed node reconnected elsewhere, and said so once per loss.
    for proc in (gateway, resolver_a):
        assert on[proc.name] is not leader, (proc.name, connected_lines(proc.log_path))
    for proc, lost_first in ((gateway, 1), (resolver_a, 1), (resolver_b, 0)):
        losses = lost_first + (1 if on[proc.name] is target else 0)
        lines = connected_lines(proc.log_path)
        assert sum("lost the connection" in line for line in lines) == losses, (proc.name, lines)
    moved = [name for name, node in on.items() if node is target]
    second_text = (
        f"then node 1 restarted and {target.name} ("
        f"{'not the leader' if target is not new_leader else 'the new leader'}; "
        f"{', '.join(moved)} on it) killed: identified again {second[1]:.2f} s after, "
        f"{failovers('fault2')} failed over"
    )
    for proc in (gateway, resolver_a, resolver_b):
        if proc.name in moved:
            last = connected_lines(proc.log_path)[-1]
            assert f":{target.amqp_port}" not in last, (proc.name, last)
    note(
        f"broker HA: 3 RabbitMQ nodes, quorum request queue, {RATE:g} calls/s: its leader "
        f"({leader.name}, the gateway's and resolver A's node) killed -9: identified again "
        f"{first[1]:.2f} s after, {failovers('fault')} failed over (crm_timeout), new leader "
        f"{new_leader.name}, gateway channel stale after the move {stale} time(s); "
        f"{second_text}; {len(load.calls)} calls, all decided; outcomes {dict(outcomes)}; "
        f"test {elapsed:.0f} s with the stack (cluster start not included)"
    )
