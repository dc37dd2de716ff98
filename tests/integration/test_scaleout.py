"""Scaled out for real: one gateway over RabbitMQ, three resolver processes, Redis, a mock CRM.

Every process is the console script an operator runs (`tools.stack.Stack`), on loopback
ports, with the machine's RabbitMQ (a unique name prefix) and Redis (db 12, a unique cache
pepper). What these tests prove, beyond the embedded end-to-end tests:

- the resolver pool gives every call the decision its inputs call for, under concurrency;
- the CRM is asked once per distinct (node, customer id): repeats are answered by the shared
  cache, and identical lookups in flight at once on different processes are merged (the Redis
  flight lock);
- a request whose deadline passed while it waited in the broker never reaches the CRM.

Numbers (calls, CRM calls, latencies) are printed, and appended to the file named by
`CALLERID_TEST_NOTES` when that is set.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import pytest

from tests.stack_load import note, redis_db
from tests.waiting import eventually
from tools.asterisk_sim import CallResult, CallScript, run_call
from tools.stack import DEFAULT_NODES, DEFAULT_TABLE, Stack, expected_decision, metric_value
from tools.stats import percentile

pytestmark = pytest.mark.integration

CRM_TIMEOUT = 1.0
SHORT_TIMEOUT = 0.3
# How far past its CRM budget a decision may come (docs/design.md §1: never past the budget).
SLACK = 0.25
REDIS_DB = 12
SLOW_ID = "17777"  # the CRM takes SLOW_MS to answer it: lookups of it overlap for sure
SLOW_MS = 300

# The default nodes, plus one with a short budget on its own CRM path (the expiry test).
NODES = (
    DEFAULT_NODES
    + """
  - id: 5
    name: short-budget
    interaction: crm_destination
    url: {crm}/short
    audio: customer-id-prompt
    expected_length: 5
    on_identified: {{type: 1, id: 3}}
    on_not_identified: {{type: 1, id: 4}}
    on_error: {{type: 5, id: 1}}
"""
    + f"    crm_timeout: {SHORT_TIMEOUT}\n"
)
TABLE = {
    **DEFAULT_TABLE,
    "customers": {
        **DEFAULT_TABLE["customers"],
        SLOW_ID: {"delay_ms": SLOW_MS, "destination": "true"},
    },
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, amqp_url: str, redis_base_url: str
) -> Iterator[Stack]:
    """One stack for the module: each test uses its own customer ids and resets CRM counts."""
    with Stack(
        tmp_path_factory.mktemp("scaleout"),
        amqp_url=amqp_url,
        redis_url=redis_db(redis_base_url, REDIS_DB),
        resolvers=3,
        crm_timeout=CRM_TIMEOUT,
        crm_table=TABLE,
        crm_latency_ms=10,
        crm_latency_jitter_ms=20,
        nodes_template=NODES,
        # These tests are about merging lookups across resolvers, not about failing open: a
        # 50 ms cache bound that a loaded CI box misses would skip the flight lock now and
        # then (test_redis_stall tests the bound itself).
        extra_env={"CALLERID_CACHE_TIMEOUT": "0.5"},
    ) as running:
        yield running


async def place(stack: Stack, scripts: Sequence[CallScript], concurrency: int) -> list[CallResult]:
    host, port = stack.agi_address
    gate = asyncio.Semaphore(concurrency)

    async def one(script: CallScript) -> CallResult:
        async with gate:
            return await run_call(host, port, script, timeout=10)

    return list(await asyncio.gather(*(one(s) for s in scripts)))


def decision(result: CallResult) -> tuple[str, str, str]:
    v = result.variables
    return v["OML_IDENT_OUTCOME"], v["OML_DEST_TYPE"], v["OML_DEST_ID"]


def wait_of(result: CallResult) -> float:
    """Seconds from the caller's last digit to the decision, as Asterisk sees them."""
    assert result.decided_at is not None, result.variables
    assert result.last_digit_at is not None, result.commands
    return result.decided_at - result.last_digit_at


def per_resolver(stack: Stack, name: str, **labels: str) -> list[float]:
    return [metric_value(p.metrics(), name, **labels) for p in stack.resolver_procs]


def gateway_hits(stack: Stack) -> float:
    assert stack.gateway is not None
    return metric_value(
        stack.gateway.metrics(), "callerid_gateway_cache_lookups_total", result="hit"
    )


def customer_ids(rng: random.Random, first_digit: str, count: int) -> list[str]:
    ids: set[str] = set()
    while len(ids) < count:
        candidate = first_digit + f"{rng.randrange(10_000):04d}"
        if candidate not in (SLOW_ID, "33333"):
            ids.add(candidate)
    return sorted(ids)


async def test_500_calls_three_resolvers_right_decisions_one_crm_call_per_lookup(
    stack: Stack,
) -> None:
    """500 calls, 50 at a time, ids repeated within and across nodes, over three resolvers:
    every call gets the decision its inputs call for within its budget, the CRM is asked
    exactly once per distinct (node, id), the rest come from the shared cache, and every
    resolver takes a share."""
    rng = random.Random(3)
    true_ids = customer_ids(rng, "1", 20)
    route_ids = customer_ids(rng, "2", 20)
    false_ids = customer_ids(rng, str(rng.choice("456789")), 20)
    # A true/false node given a destination answers crm_bad_response, which is never cached:
    # node 1 gets no "2" ids, so every distinct lookup is cacheable.
    choices = [("1", i) for i in true_ids + false_ids] + [
        ("3", i) for i in true_ids + route_ids + false_ids
    ]
    calls = [rng.choice(choices) for _ in range(500)]
    scripts = [
        CallScript(node=node, entries=[cid], uniqueid=f"scale.{n}", caller_number=f"555{n:04d}")
        for n, (node, cid) in enumerate(calls)
    ]
    stack.crm_reset()
    hits_before = stack.cache_lookups("hit")
    errors_before = stack.cache_lookups("error")
    gateway_hits_before = gateway_hits(stack)
    handled_before = per_resolver(stack, "callerid_resolver_requests_total")

    started = time.monotonic()
    results = await place(stack, scripts, concurrency=50)
    elapsed = time.monotonic() - started

    waits = []
    for (node, cid), result in zip(calls, results, strict=True):
        assert result.closed_by_gateway, (node, cid)
        assert result.protocol_errors == [], (node, cid)
        assert decision(result) == expected_decision(node, cid), (node, cid)
        assert result.variables["OML_IDENT_SOURCE"] in ("crm", "cache"), (node, cid)
        assert result.variables["__OMLCODCLI"] == cid
        waits.append(wait_of(result))
    assert max(waits) <= CRM_TIMEOUT + SLACK

    distinct = set(calls)
    stats = stack.crm_stats()
    # One CRM call per distinct lookup, except where the cache failed (a Redis operation over
    # CALLERID_CACHE_TIMEOUT on a loaded box): the cache fails open, and a lookup that could
    # not join another then asks the CRM itself. Every extra call has a counted cache error.
    cache_errors = stack.cache_lookups("error") - errors_before
    assert len(distinct) <= stats["calls"] <= len(distinct) + cache_errors
    assert set(stats["by_id"]) == {cid for _, cid in distinct}
    if not cache_errors:
        assert stats["calls"] == len(distinct)
        assert stats["by_id"] == dict(Counter(cid for _, cid in distinct))
        assert stats["by_path"] == {
            "/identify": sum(1 for node, _ in distinct if node == "1"),
            "/route": sum(1 for node, _ in distinct if node == "3"),
        }
    hits = stack.cache_lookups("hit") - hits_before
    # Repeat callers are answered by the gateway from the cache, so they reach no resolver.
    answered_by_gateway = gateway_hits(stack) - gateway_hits_before
    assert hits > 0
    assert answered_by_gateway > 0
    handled = [
        after - before
        for after, before in zip(
            per_resolver(stack, "callerid_resolver_requests_total"), handled_before, strict=True
        )
    ]
    assert all(share > 0 for share in handled), handled
    assert sum(handled) == len(calls) - answered_by_gateway - sum(
        1 for r in results if r.variables["OML_IDENT_SOURCE"] == "local"
    )
    sources = Counter(r.variables["OML_IDENT_SOURCE"] for r in results)
    note(
        f"scaleout: calls={len(results)} decided={len(waits)} distinct_pairs={len(distinct)} "
        f"crm_calls={stats['calls']} cache_hits={hits:.0f} cache_errors={cache_errors:.0f} "
        f"sources={dict(sources)} "
        f"per_resolver={[int(h) for h in handled]} wall={elapsed:.2f}s "
        f"p50={percentile(waits, 0.5) * 1000:.1f}ms p99={percentile(waits, 0.99) * 1000:.1f}ms "
        f"max={max(waits) * 1000:.1f}ms budget={(CRM_TIMEOUT + SLACK) * 1000:.0f}ms"
    )


async def test_50_identical_lookups_at_once_make_one_crm_call(stack: Stack) -> None:
    """50 calls with the same id at once, spread over three resolver processes, while the CRM
    takes 300 ms to answer: one CRM call; the others join it in-process or through the Redis
    flight lock, and all 50 are identified."""
    stack.crm_reset()
    handled_before = per_resolver(stack, "callerid_resolver_requests_total")
    merged_before = stack.resolver_metric("callerid_crm_lookups_merged_total")
    scripts = [CallScript(node="3", entries=[SLOW_ID], uniqueid=f"same.{n}") for n in range(50)]

    results = await place(stack, scripts, concurrency=50)

    assert [decision(r) for r in results] == [("identified", "1", "3")] * 50
    waits = [wait_of(r) for r in results]
    assert max(waits) <= CRM_TIMEOUT + SLACK
    handled = [
        after - before
        for after, before in zip(
            per_resolver(stack, "callerid_resolver_requests_total"), handled_before, strict=True
        )
    ]
    # The merge crossed processes: more than one resolver got a share of the 50.
    assert sum(1 for share in handled if share > 0) >= 2, handled
    stats = stack.crm_stats()
    merged = stack.resolver_metric("callerid_crm_lookups_merged_total") - merged_before
    note(
        f"identical: calls=50 crm_calls={stats['calls']} per_resolver={[int(h) for h in handled]}"
        f" merged={merged:.0f} max={max(waits) * 1000:.1f}ms"
    )
    assert stats["by_id"] == {SLOW_ID: 1}


async def test_requests_whose_deadline_passed_never_reach_the_crm(stack: Stack) -> None:
    """With every resolver stopped (SIGSTOP), calls on a 0.3 s node fail over with crm_timeout
    within budget; once the resolvers run again they drop those requests as expired without
    calling the CRM, and the next call is identified normally."""
    ids = customer_ids(random.Random(5), "1", 30)
    stack.crm_reset()
    expired_before = stack.resolver_metric("callerid_expired_requests_total")
    scripts = [CallScript(node="5", entries=[cid], uniqueid=f"late.{cid}") for cid in ids]
    for proc in stack.resolver_procs:
        proc.pause()
    try:
        results = await place(stack, scripts, concurrency=len(scripts))
    finally:
        for proc in stack.resolver_procs:
            proc.resume()

    assert [decision(r) for r in results] == [("crm_timeout", "5", "1")] * len(ids)
    waits = [wait_of(r) for r in results]
    assert max(waits) <= SHORT_TIMEOUT + SLACK
    # 30 requests fit the three resolvers' prefetch (64 each), so the broker delivered all of
    # them to the stopped processes before their TTL: each resolver reads its share on waking
    # and must drop it as expired. (Requests still queued would be dropped by their TTL.)
    await eventually(
        lambda: (
            stack.resolver_metric("callerid_expired_requests_total") - expired_before >= len(ids)
        ),
        within=10,
    )
    fresh = await place(stack, [CallScript(node="5", entries=["18888"])], concurrency=1)
    assert decision(fresh[0]) == ("identified", "1", "3")
    stats = stack.crm_stats()
    expired = stack.resolver_metric("callerid_expired_requests_total") - expired_before
    note(
        f"expired: calls={len(ids)} failovers={len(results)} expired_counted={expired:.0f} "
        f"crm_calls_for_them={sum(stats['by_id'].get(cid, 0) for cid in ids)} "
        f"max={max(waits) * 1000:.1f}ms budget={(SHORT_TIMEOUT + SLACK) * 1000:.0f}ms"
    )
    assert not set(stats["by_id"]) & set(ids), stats
    assert expired == len(ids)
    assert stats["by_id"] == {"18888": 1}
