"""Nodes read live from OMniLeads' Redis hashes, called through a real Asterisk 22.

The hashes are written the way OMniLeads writes them (every value a string, `TRUEDST` left out
of a type-3 node that has no "identified" destination), the gateway reads them from Redis,
and an edit of one hash reaches the next call without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from tests import services
from tests.asterisk.conftest import omnileads_redis
from tools import pbx
from tools.pbx import Call, Keys, Wait
from tools.stack import Stack, metric_value

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(120)]

REDIS_DB = 11  # the tier's own db: the hashes are OMniLeads' fixed key names
PREFIX = "OML:CUSTOMERID:"

CRM_TABLE = {
    "default": {"destination": "false"},
    "customers": {"12345": {"destination": "true"}, "22222": {"destination": "1,7"}},
}


def omnileads_hashes(crm: str) -> dict[str, dict[str, str]]:
    common = {"AUDIO": "callerid-test/prompt", "LENGTH": "5", "TIMEOUT": "3", "RETRIES": "1"}
    return {
        # Type 3 saved without TRUEDST: the CRM names the destination.
        f"{PREFIX}31": {
            **common,
            "NAME": "oml-router",
            "TYPE": "3",
            "EXTERNALURL": f"{crm}/route",
            "FALSEDST": "1,4",
        },
        f"{PREFIX}32": {
            **common,
            "NAME": "oml-true-false",
            "TYPE": "2",
            "EXTERNALURL": f"{crm}/identify",
            "TRUEDST": "1,3",
            "FALSEDST": "1,4",
        },
        # Type 1 (no CRM), LENGTH "" (not set), chaining to node 32 with type 9.
        f"{PREFIX}33": {
            **common,
            "NAME": "oml-any-entry",
            "TYPE": "1",
            "EXTERNALURL": "",
            "LENGTH": "",
            "TRUEDST": "9,32",
            "FALSEDST": "1,6",
        },
    }


@pytest.fixture(scope="module")
def oml_redis() -> Iterator[redis.Redis]:
    with omnileads_redis(REDIS_DB) as client:
        yield client


@pytest.fixture(scope="module")
def stack(oml_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    def write_hashes(running: Stack) -> None:
        for key, fields in omnileads_hashes(running.crm_url).items():
            oml_redis.hset(key, mapping=fields)

    base = services.redis_url().rsplit("/", 1)[0]
    with Stack(
        tmp_path_factory.mktemp("stack-omnileads"),
        crm_table=CRM_TABLE,
        before_services=write_hashes,
        extra_env={
            "CALLERID_NODES": f"{base}/{REDIS_DB}",
            "CALLERID_RELOAD_INTERVAL": "0.5",
            # These callers never confirm: the read-back has a test of its own
            # (test_omnileads_dialplan.py).
            "CALLERID_OMNILEADS_CONFIRM": "false",
        },
    ) as running:
        yield running


def route(result: pbx.CallResult) -> tuple[str, str, str]:
    destination = f"{result.var('OML_DEST_TYPE')},{result.var('OML_DEST_ID')}"
    return result.outcome, destination, result.ended


def call(asterisk: pbx.PrivateAsterisk, stack: Stack, calls: list[Call]) -> list[pbx.CallResult]:
    host, port = stack.agi_address
    ids = asterisk.place_calls(calls, f"{host}:{port}")
    results = asterisk.wait_for_results(ids, timeout=60)
    assert all(r.complete for r in results.values()), results
    return [results[call_id] for call_id in ids]


def after_agi(node: str) -> str:
    return f"{pbx.INBOUND_CONTEXT},{node},{pbx.AGI_PRIORITY + 2}"


def test_nodes_from_omnileads_hashes(private_asterisk: pbx.PrivateAsterisk, stack: Stack) -> None:
    """A type-3 hash without TRUEDST routes where the CRM says, falls to FALSEDST on "false"
    and fails over on "true" (it has no "identified" destination); a type-2 hash routes
    true/false; a type-1 hash with LENGTH "" chains to node 32 with type 9. Without a jump
    template each call continues at the priority after AGI()."""
    keyed = [Wait(0.3), Keys("12345")]
    results = call(
        private_asterisk,
        stack,
        [
            Call("31", [Wait(0.3), Keys("22222")]),
            Call("31", [Wait(0.3), Keys("54321")]),
            Call("31", keyed),
            Call("32", keyed),
            # The entry ends by the default 3 s inter-digit timeout, then node 32 asks again.
            Call("33", [Wait(0.3), Keys("987"), Wait(4.0), Keys("12345")]),
        ],
    )
    assert [route(r) for r in results] == [
        ("crm_destination", "1,7", after_agi("31")),
        ("not_identified", "1,4", after_agi("31")),
        ("crm_bad_response", "1,4", after_agi("31")),
        ("identified", "1,3", after_agi("32")),
        ("identified", "1,3", after_agi("33")),
    ]


def test_a_live_edit_of_a_hash_reaches_the_next_call(
    private_asterisk: pbx.PrivateAsterisk, stack: Stack, oml_redis: redis.Redis
) -> None:
    """OMniLeads changes FALSEDST of node 32: once the gateway has reloaded (it polls every
    0.5 s here), the next call that is not identified goes to the new destination."""
    assert stack.gateway is not None
    reloads = metric_value(stack.gateway.metrics(), "callerid_config_reloads_total", result="ok")
    oml_redis.hset(f"{PREFIX}32", "FALSEDST", "1,44")
    deadline = time.monotonic() + 10
    while (
        metric_value(stack.gateway.metrics(), "callerid_config_reloads_total", result="ok")
        <= reloads
    ):
        assert time.monotonic() < deadline, "the gateway never reloaded the edited hash"
        time.sleep(0.05)
    (result,) = call(private_asterisk, stack, [Call("32", [Wait(0.3), Keys("54321")])])
    assert route(result) == ("not_identified", "1,44", after_agi("32"))
