"""`promtool check metrics` on the live /metrics of each running service (issue 4).

A gateway over RabbitMQ and a resolver run as real processes after some calls, so every
labelled series that traffic creates is in the exposition, not only the zero-initialised ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from crm_resolver.redis_cache import RedisCache
from tests.deploy_helpers import promtool_check_metrics
from tests.waiting import eventually
from tools.asterisk_sim import CallScript, run_call
from tools.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path: Path, amqp_url: str, redis_base_url: str) -> Iterator[Stack]:
    with Stack(tmp_path, amqp_url=amqp_url, redis_url=redis_base_url, resolvers=1) as running:
        yield running


async def test_live_metrics_pass_promtool(stack: Stack, redis_base_url: str) -> None:
    """Both services' /metrics, after real calls of several outcomes, pass promtool's lint."""
    host, port = stack.agi_address
    first = await run_call(host, port, CallScript(node="1", entries=["12345"]), timeout=10)
    assert first.variables["OML_IDENT_SOURCE"] == "crm"
    # The resolver stores the answer just after its reply (with its next Redis call, or
    # within a few ms): the repeat below comes once it is there, as a real repeat would.
    # (The cache object only names the key; its client never connects.)
    stored = RedisCache(redis.asyncio.Redis(), pepper=stack.prefix).key("1", "12345")
    with redis.Redis.from_url(redis_base_url) as raw:
        await eventually(lambda: raw.exists(stored) == 1)
    scripts = [
        CallScript(node="1", entries=["12345"]),  # the same id again: the cache
        CallScript(node="3", entries=["22222"]),  # a destination
        CallScript(node="2", entries=[None, None]),  # no input
        CallScript(node="nope"),  # unknown node
    ]
    results = await asyncio.gather(*(run_call(host, port, s, timeout=10) for s in scripts))
    assert all("OML_IDENT_OUTCOME" in r.variables for r in results)
    assert stack.gateway is not None
    gateway_text = stack.gateway.metrics()
    resolver_text = stack.resolver_procs[0].metrics()
    assert 'outcome="identified",source="cache"} 1.0' in gateway_text
    # The repeat is answered by the gateway from the shared cache: it never reaches a resolver.
    hit = 'cache_lookups_total{node="gold-customers",result="hit"}'
    assert f"callerid_gateway_{hit} 1.0" in gateway_text
    assert f"callerid_{hit} 0.0" in resolver_text
    for text in (gateway_text, resolver_text):
        promtool_check_metrics(text.encode())
