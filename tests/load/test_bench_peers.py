"""The peer nodes of `bench/peers/` decide calls correctly: what makes their figures count.

Each peer (`python -m bench.peers.panoramisk_node`, `... pystrix_node`) runs as a real
process against a real mock CRM (DEFAULT_TABLE, in this event loop) and takes a few calls
from the simulated Asterisk 22 at once: a customer, a non-customer, a CRM answer a true/false
node cannot use, a CRM slower than the node's 1 s timeout, no entry at all, and a short entry
then a valid one. Every call must end with the decision `tools.stack` expects of
DEFAULT_NODES node 1 (5-digit ids), with no protocol error (the simulator records any
pipelined command), and the CRM must have been asked exactly as OMniLeads asks. No timing is
asserted. Skipped where the `peers` extra is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tools.asterisk_sim import CallScript, run_call
from tools.mock_crm import Table, build_app
from tools.stack import DEFAULT_TABLE, expected_decision, free_port

ROOT = Path(__file__).resolve().parents[2]
PEERS = {"panoramisk": "panoramisk_node", "pystrix": "pystrix_node"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def recording_crm() -> AsyncIterator[tuple[str, list[tuple[str, str, str]]]]:
    """The mock CRM with DEFAULT_TABLE, recording each lookup's User-Agent, type and body."""
    app = build_app(Table.model_validate(DEFAULT_TABLE))
    seen: list[tuple[str, str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and not request.path.startswith("/_"):
            body = await request.text()
            seen.append((request.headers.get("User-Agent", ""), request.content_type, body))
        return await handler(request)

    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def peer(name: str, crm_url: str) -> AsyncIterator[int]:
    """The peer serving DEFAULT_NODES node 1 on a free port, stopped by PID afterwards."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"bench.peers.{PEERS[name]}",
        f"--listen=127.0.0.1:{port}",
        f"--crm-url={crm_url}/identify",
        "--crm-timeout=1.0",
        "--expected-length=5",
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line == b"ready\n", f"{name} did not start: {line!r}"
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


# (entries, (OML_IDENT_OUTCOME accepted, OML_DEST_TYPE, OML_DEST_ID))
CALLS: list[tuple[list[str | None], tuple[set[str], str, str]]] = [
    (["12345"], ({expected_decision("1", "12345")[0]}, "1", "3")),
    (["45678"], ({expected_decision("1", "45678")[0]}, "1", "4")),
    # "1,7" from the CRM: ours says crm_bad_response, the peers crm_error; both go to on_error.
    (["23456"], ({"crm_error"}, "1", "9")),
    # DEFAULT_TABLE answers 33333 after 6 s, past the node's 1 s CRM timeout.
    (["33333"], ({"crm_error"}, "1", "9")),
    ([None, None, None], ({"no_input"}, "1", "4")),
    (["123", "14567"], ({"identified"}, "1", "3")),
]


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PEERS))
async def test_peer_decides_calls_correctly(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[peers]')")
    assert expected_decision("1", "12345")[1:] == ("1", "3")
    async with recording_crm() as (crm_url, seen), peer(name, crm_url) as port:
        results = await asyncio.gather(
            *(
                run_call("127.0.0.1", port, CallScript(node="1", entries=entries), timeout=10)
                for entries, _ in CALLS
            )
        )
    for (entries, (outcomes, dest_type, dest_id)), result in zip(CALLS, results, strict=True):
        variables = result.variables
        assert result.protocol_errors == [], (entries, result.protocol_errors)
        assert result.closed_by_gateway, entries
        assert variables.get("OML_IDENT_OUTCOME") in outcomes, (entries, variables)
        assert (variables.get("OML_DEST_TYPE"), variables.get("OML_DEST_ID")) == (
            dest_type,
            dest_id,
        ), (entries, variables)
        customer = entries[-1]
        if customer is not None and len(customer) == 5:
            assert variables["__OML_CUSTOMER_ID"] == customer
            assert variables["__OMLCODCLI"] == customer
            source = "crm" if dest_id in ("3", "4") else "failover"
            assert variables["OML_IDENT_SOURCE"] == source
        else:
            assert variables["OML_IDENT_SOURCE"] == "local"
    # One POST per valid entry, as OMniLeads sends it; the short entry never reached the CRM.
    assert sorted(seen) == sorted(
        ("OMniLeads", "application/x-www-form-urlencoded", f"idContact={customer}")
        for customer in ("12345", "45678", "23456", "33333", "14567")
    )
