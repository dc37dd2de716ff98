"""The mock CRM: table answers, control endpoints, fault modes, and its command line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from crm_resolver.crm_http import HttpCrmClient
from crm_resolver.ports import (
    CallContext,
    CrmAnswer,
    CrmBadResponse,
    CrmError,
    CrmHttpStatus,
    CrmStatusFail,
    CrmTimeout,
)
from shared.destination import Destination
from shared.nodes import NodeConfig
from shared.outcomes import Verdict
from tools.mock_crm import MockCrm, load_table, mask, start_mock_crm

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_TABLE = ROOT / "examples" / "mock_crm_table.yaml"
TRUE = CrmAnswer(Verdict.TRUE)
FALSE = CrmAnswer(Verdict.FALSE)
CONTEXT = CallContext()

TABLE: dict[str, Any] = {
    "default": {"destination": "false"},
    "customers": {
        "12345": {"destination": "true"},
        "22222": {"destination": "1,7"},
        "44444": {"status_code": 500},
        "55555": {"raw": "<html>garbage</html>"},
        "66666": {"status": "fail", "destination": "false"},
        "70000": {"key": "response", "destination": "3,2"},
        "70001": {"status": None, "destination": True},
        "70002": {"destination": [5, 1]},
    },
    "rules": [{"match": "^9", "destination": "true"}, {"match": "^8", "destination": "2,2"}],
}


def dest(type_: int, id_: int) -> CrmAnswer:
    return CrmAnswer(Verdict.DESTINATION, Destination(type=type_, id=id_))


def node(url: str) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "id": "1",
            "name": "n",
            "interaction": "crm_destination",
            "url": url,
            "audio": "prompt",
            "on_identified": "1,3",
            "on_not_identified": "1,4",
        }
    )


@pytest.fixture
async def crm() -> AsyncIterator[MockCrm]:
    mock = await start_mock_crm(TABLE)
    yield mock
    await mock.close()


@pytest.fixture
async def client() -> AsyncIterator[HttpCrmClient]:
    http = HttpCrmClient()
    await http.start()
    yield http
    await http.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def ask(
    client: HttpCrmClient,
    crm: MockCrm,
    customer: str,
    *,
    path: str = "/identify",
    budget: float = 2,
) -> CrmAnswer | CrmError:
    try:
        return await client.lookup(node(crm.url + path), customer, budget=budget, context=CONTEXT)
    except CrmError as exc:
        return exc


@pytest.mark.parametrize(
    ("customer", "expected"),
    [
        ("12345", TRUE),
        ("22222", dest(1, 7)),
        ("70000", dest(3, 2)),
        ("70001", TRUE),
        ("70002", dest(5, 1)),
        ("91", TRUE),
        ("8123", dest(2, 2)),
        ("10101", FALSE),
    ],
)
async def test_table_answers_through_the_real_client(
    crm: MockCrm, client: HttpCrmClient, customer: str, expected: CrmAnswer
) -> None:
    """Exact ids first, then the first matching rule, then the default, in OMniLeads' format."""
    assert await ask(client, crm, customer) == expected


@pytest.mark.parametrize(
    ("customer", "error"),
    [("44444", CrmHttpStatus), ("55555", CrmBadResponse), ("66666", CrmStatusFail)],
)
async def test_table_faults(
    crm: MockCrm, client: HttpCrmClient, customer: str, error: type[CrmError]
) -> None:
    """status_code, raw and status entries produce the CRM faults they describe."""
    assert type(await ask(client, crm, customer)) is error


async def test_any_path_answers_and_stats_count_by_id_and_path(
    crm: MockCrm, client: HttpCrmClient
) -> None:
    """Every POST path answers from the table; /_stats counts calls per id and per path."""
    assert await ask(client, crm, "12345", path="/gold") == TRUE
    assert await ask(client, crm, "12345", path="/dest") == TRUE
    assert await ask(client, crm, "22222", path="/dest") == dest(1, 7)
    stats = await crm.stats()
    assert stats["calls"] == 3
    assert stats["by_id"] == {"12345": 2, "22222": 1}
    assert stats["by_path"] == {"/gold": 1, "/dest": 2}
    await crm.reset()
    assert (await crm.stats())["calls"] == 0


async def test_control_endpoints_over_http(
    crm: MockCrm, client: HttpCrmClient, session: aiohttp.ClientSession
) -> None:
    """GET /_stats, PUT /_table, POST /_mode and POST /_reset work over HTTP as documented."""
    await ask(client, crm, "12345")
    async with session.get(crm.url + "/_stats") as response:
        stats = await response.json()
    assert stats == {"calls": 1, "by_id": {"12345": 1}, "by_path": {"/identify": 1}}

    new_table = {"default": {"destination": "true"}, "customers": {"12345": {"destination": "9,1"}}}
    async with session.put(crm.url + "/_table", json=new_table) as response:
        assert response.status == 200
    assert await ask(client, crm, "12345") == dest(9, 1)
    assert await ask(client, crm, "10101") == TRUE

    async with session.post(crm.url + "/_mode", json={"mode": "down"}) as response:
        assert response.status == 200
    failed = await ask(client, crm, "12345")
    assert isinstance(failed, CrmHttpStatus)
    assert failed.status == 503

    async with session.post(crm.url + "/_reset") as response:
        assert response.status == 200
    async with session.get(crm.url + "/_stats") as response:
        assert (await response.json())["calls"] == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/_table", {"customers": {"1": {"destination": "true", "bogus": 1}}}),
        ("/_table", {"rules": [{"match": "(", "destination": "true"}]}),
        ("/_table", {"default": {"status_code": 99}}),
        ("/_mode", {"mode": "sideways"}),
        ("/_mode", {"mode": "slow", "delay_ms": -1}),
        ("/_mode", ["down"]),
    ],
)
async def test_bad_control_requests_are_400_and_change_nothing(
    crm: MockCrm, client: HttpCrmClient, session: aiohttp.ClientSession, path: str, body: Any
) -> None:
    """An invalid table or mode is refused with 400 and the mock keeps answering as before."""
    method = session.put if path == "/_table" else session.post
    async with method(crm.url + path, json=body) as response:
        assert response.status == 400
        assert "error" in await response.json()
    assert await ask(client, crm, "12345") == TRUE


async def test_modes(crm: MockCrm, client: HttpCrmClient) -> None:
    """down answers 503, garbage an HTML page, slow adds its delay, normal restores the table."""
    await crm.set_mode("down")
    down = await ask(client, crm, "12345")
    assert isinstance(down, CrmHttpStatus)
    assert down.status == 503

    await crm.set_mode("garbage")
    assert isinstance(await ask(client, crm, "12345"), CrmBadResponse)

    await crm.set_mode("slow", delay_ms=300)
    assert isinstance(await ask(client, crm, "12345", budget=0.1), CrmTimeout)
    started = time.monotonic()
    assert await ask(client, crm, "12345", budget=2) == TRUE
    assert time.monotonic() - started >= 0.29

    await crm.set_mode("normal")
    started = time.monotonic()
    assert await ask(client, crm, "12345") == TRUE
    assert time.monotonic() - started < 0.25


async def test_delay_ms_entry_and_quick_close(client: HttpCrmClient) -> None:
    """A delayed entry outlasts a short budget; close() does not wait out its delay."""
    mock = await start_mock_crm({"customers": {"33333": {"delay_ms": 6000, "destination": "true"}}})
    try:
        assert isinstance(await ask(client, mock, "33333", budget=0.2), CrmTimeout)
        pending = asyncio.ensure_future(ask(client, mock, "33333", budget=10))
        try:
            async with asyncio.timeout(5):
                await mock.wait_calls(2)
        finally:
            started = time.monotonic()
            await mock.close()
            closed_after = time.monotonic() - started
            result = await pending
    finally:
        await mock.close()
    assert closed_after < 1.5
    # Woken by the shutdown, the answer that was waiting out its delay went out at once.
    assert result == TRUE


async def test_latency_applies_to_every_answer(client: HttpCrmClient) -> None:
    """latency_ms delays every identification answer, jitter adds at most its own amount."""
    mock = await start_mock_crm({}, latency_ms=150, jitter_ms=50)
    try:
        started = time.monotonic()
        assert await ask(client, mock, "1") == FALSE
        took = time.monotonic() - started
    finally:
        await mock.close()
    assert 0.14 <= took < 0.2 + 0.2


async def test_requests_are_logged_with_the_id_masked(
    crm: MockCrm, client: HttpCrmClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request is logged at INFO, the customer id masked but for its last two digits."""
    with caplog.at_level(logging.INFO, logger="callerid.mock_crm"):
        await ask(client, crm, "1234567")
    [record] = [r for r in caplog.records if r.name == "callerid.mock_crm"]
    assert record.levelno == logging.INFO
    assert "*****67" in record.getMessage()
    assert "12345" not in record.getMessage()


@pytest.mark.parametrize(
    ("raw", "masked"),
    [("12345", "***45"), ("1", "*"), ("12", "**"), ("", ""), ("12\r\nX", "*****"),
     ("9" * 100, "*" * 30 + "99")],
)  # fmt: skip
def test_mask(raw: str, masked: str) -> None:
    """mask() shows at most the last two characters, only when they are digits, and is bounded."""
    assert mask(raw) == masked


def test_example_table_loads_and_says_what_its_comments_say() -> None:
    """examples/mock_crm_table.yaml is valid and holds the demo customers."""
    table = load_table(EXAMPLE_TABLE)
    assert table.answer_for("12345").destination == "true"
    assert table.answer_for("22222").destination == "1,7"
    assert table.answer_for("33333").delay_ms >= 5000
    assert table.answer_for("44444").status_code == 500
    assert table.answer_for("55555").raw is not None
    assert table.answer_for("66666").status == "fail"
    assert table.answer_for("77777").destination == "99,1"
    assert table.answer_for("99999").destination == "false"


def test_bad_table_file_names_the_file(tmp_path: Path) -> None:
    """A table file that does not validate is a ValueError naming the file."""
    bad = tmp_path / "table.yaml"
    bad.write_text(yaml.safe_dump({"customers": {"1": {"status_code": "many"}}}))
    with pytest.raises(ValueError, match=r"table\.yaml"):
        load_table(bad)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_command_line_serves_the_example_table_and_stops_on_sigterm(
    client: HttpCrmClient,
) -> None:
    """`python -m tools.mock_crm --listen --table` serves the table; SIGTERM ends it cleanly."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tools.mock_crm", "--listen", f"127.0.0.1:{port}"),
        *("--table", str(EXAMPLE_TABLE), "--log-level", "WARNING"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'services'}"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert proc.returncode is None, "mock CRM exited at start"
                assert time.monotonic() < deadline, "mock CRM did not start listening"
                await asyncio.sleep(0.05)
        target = node(url + "/identify")
        assert await client.lookup(target, "12345", budget=2, context=CONTEXT) == TRUE
        assert await client.lookup(target, "22222", budget=2, context=CONTEXT) == dest(1, 7)
        assert await client.lookup(target, "29999", budget=2, context=CONTEXT) == dest(1, 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(5):
                _, stderr = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, stderr.decode(errors="replace")
