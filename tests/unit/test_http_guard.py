"""The operational HTTP port under abuse: idle sockets and garbage cannot take the gateway's
descriptors, its probes or its log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from agi_gateway.app import Gateway
from agi_gateway.settings import GatewaySettings
from shared import http_endpoints
from tests.waiting import eventually
from tools.asterisk_sim import CallScript, run_call

NODES_YAML = """
nodes:
  - id: 1
    name: any-entry
    audio: customer-id-prompt
    min_length: 3
    on_identified: "1,5"
    on_not_identified: "1,6"
"""
IDLE = 1000


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(NODES_YAML)
    gw = Gateway(
        GatewaySettings(
            nodes=str(nodes),
            embedded=True,
            agi_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            drain_timeout=1,
        )
    )
    await gw.start()
    yield gw
    await gw.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def get(port: int, path: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)
        ) as response,
    ):
        return response.status


async def test_idle_http_sockets_hold_no_more_than_the_cap_and_calls_go_on(
    gateway: Gateway,
) -> None:
    """1,000 sockets that connect to the HTTP port and send nothing (slowloris): the gateway
    keeps at most MAX_CONNECTIONS of them, probes still answer, and a FastAGI call is decided
    meanwhile."""
    assert gateway.server is not None
    readers, writers = [], []
    for _ in range(IDLE):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        readers.append(reader)
        writers.append(writer)

    def still_open() -> int:
        return sum(1 for r in readers if not r.at_eof() and r.exception() is None)

    try:
        assert await get(gateway.http_port, "/healthz") == 200
        await eventually(lambda: still_open() <= http_endpoints.MAX_CONNECTIONS)
        host, port = gateway.server.address
        result = await run_call(host, port, CallScript(node="1", entries=["4567"]), timeout=10)
        assert result.variables["OML_IDENT_OUTCOME"] == "identified"
    finally:
        for writer in writers:
            writer.close()


async def test_a_socket_that_never_sends_a_request_is_closed(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that sends no complete request head is closed after HEAD_TIMEOUT."""
    monkeypatch.setattr(http_endpoints, "HEAD_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_malformed_requests_are_one_warning_line(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """50 malformed requests give one WARNING line without a traceback, not 50 ERRORs."""
    caplog.set_level(logging.DEBUG, logger="callerid.http")
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert loud[0].levelno == logging.WARNING
    assert loud[0].exc_info is None
    assert "malformed HTTP request" in loud[0].getMessage()
