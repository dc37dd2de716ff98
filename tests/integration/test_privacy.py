"""Customer ids never appear in clear in logs, metrics or Redis (README "Privacy").

A distinctive id is planted and run through the embedded gateway with the real Redis cache
and the mock CRM, on every path that handles it: a CRM answer, a cache hit, a destination,
a CRM error, a CRM that echoes the id back in garbage, a slow CRM, a hang-up mid-lookup, an
invalid entry containing it, and a second node with crm_send_context. Then the test scans
every log record captured at DEBUG from every logger (message, arguments, exception text),
the gateway's /metrics, and every Redis key of the database plus the values of the keys the
stack wrote, and fails if the id (or its unpeppered hash) is found in any of them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from agi_gateway.app import Gateway
from agi_gateway.settings import GatewaySettings
from tools.asterisk_sim import CallScript, run_call
from tools.mock_crm import start_mock_crm

PLANTED = "9137264508"  # ten digits, unlikely anywhere by chance
ECHO = "9137264577"
SLOW = "9137264566"
UNKNOWN = "9137264599"
PEPPER = "test-pepper-" + uuid.uuid4().hex

NODES_YAML = """
nodes:
  - id: {node}
    name: privacy-gold
    interaction: crm_destination
    url: {crm}/identify
    audio: customer-id-prompt
    expected_length: 10
    attempts: 2
    on_identified: "1,3"
    on_not_identified: "1,4"
    on_error: "5,1"
    crm_timeout: 0.3
  - id: {node}c
    name: privacy-context
    interaction: crm_true_false
    url: {crm}/ctx
    audio: customer-id-prompt
    expected_length: 10
    on_identified: "1,3"
    on_not_identified: "1,4"
    crm_send_context: true
"""


def scan(text: str, where: str, found: list[str]) -> None:
    unpeppered = hashlib.sha256(PLANTED.encode()).hexdigest()
    for needle in (PLANTED, ECHO, SLOW, UNKNOWN, unpeppered):
        if needle in text:
            found.append(f"{where}: {text[:200]!r}")


@pytest.mark.integration
async def test_planted_customer_id_is_nowhere_in_clear(
    tmp_path: Path, redis_base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Logs (all loggers at DEBUG, the mock CRM's included), /metrics, Redis keys and the
    values the stack wrote hold no planted id in clear; the calls themselves behave."""
    caplog.set_level(logging.DEBUG)
    node = f"priv{uuid.uuid4().hex[:10]}"
    crm = await start_mock_crm(
        {
            "default": {"destination": "false"},
            "customers": {
                PLANTED: {"destination": "1,7"},
                ECHO: {"raw": f'{{"status": "error {ECHO}", "destination": "{ECHO}"}}'},
                SLOW: {"delay_ms": 1000, "destination": "true"},
            },
        }
    )
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(NODES_YAML.format(node=node, crm=crm.url.rstrip("/")))
    gateway = Gateway(
        GatewaySettings(
            nodes=str(nodes),
            embedded=True,
            redis_url=redis_base_url,
            cache_key_pepper=PEPPER,
            agi_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            log_level="DEBUG",
        )
    )
    client = aioredis.Redis.from_url(redis_base_url)
    outcomes: list[str] = []
    try:
        await gateway.start()
        assert gateway.server is not None
        host, port = gateway.server.address
        scripts = [
            CallScript(node=node, entries=[PLANTED]),  # CRM: destination
            CallScript(node=node, entries=[PLANTED]),  # cache hit
            CallScript(node=node, entries=[ECHO]),  # CRM echoes the id in garbage
            CallScript(node=node, entries=[SLOW]),  # crm_timeout
            CallScript(node=node, entries=[SLOW], hangup="lookup", hangup_delay=0.05),
            CallScript(node=node, entries=[PLANTED[:9], PLANTED[:9]]),  # too short: invalid
            CallScript(node=f"{node}c", entries=[UNKNOWN], caller_number=PLANTED),
        ]
        for script in scripts:
            result = await run_call(host, port, script, timeout=10)
            outcomes.append(result.variables["OML_IDENT_OUTCOME"])
            # The id is meant to reach the agent: the channel variables carry it.
            if outcomes[-1] in {"crm_destination", "not_identified"}:
                assert result.variables["__OML_CUSTOMER_ID"] == script.entries[0]
        await crm.set_mode("down")
        result = await run_call(host, port, CallScript(node=f"{node}c", entries=[ECHO]))
        outcomes.append(result.variables["OML_IDENT_OUTCOME"])

        url = f"http://127.0.0.1:{gateway.http_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            metrics = await response.text()

        keys = [key async for key in client.scan_iter(count=1000)]
        ours = [key for key in keys if node.encode() in key]
        values = [await client.get(key) for key in ours if await client.type(key) == b"string"]
    finally:
        await gateway.stop()
        await crm.close()
        stale = [key async for key in client.scan_iter(match=f"*{node}*", count=1000)]
        if stale:
            await client.delete(*stale)
        await client.aclose()

    assert outcomes == [
        "crm_destination",
        "crm_destination",
        "crm_bad_response",
        "crm_timeout",
        "hangup",
        "invalid_input",
        "not_identified",
        "crm_error",
    ]
    assert ours, "the stack wrote no Redis key for the node: the cache was not exercised"

    found: list[str] = []
    for record in caplog.records:
        scan(record.getMessage(), f"log {record.name}", found)
        scan(repr(record.args), f"log args {record.name}", found)
        if record.exc_info:
            scan(logging.Formatter().formatException(record.exc_info), "traceback", found)
    scan(caplog.text, "log text", found)
    scan(metrics, "/metrics", found)
    for key in keys:
        scan(key.decode(errors="replace"), "redis key", found)
    for value in values:
        scan((value or b"").decode(errors="replace"), "redis value", found)
    assert found == []
    # The masked form is what the call line shows.
    assert any("********08" in r.getMessage() for r in caplog.records)
    assert any(r.name == "callerid.mock_crm" for r in caplog.records)
