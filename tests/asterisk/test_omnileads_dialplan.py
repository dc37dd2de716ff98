"""The OMniLeads switch-over dialplan (examples/omnileads/extensions.conf) in a real Asterisk 22.

The example file is loaded as it would be installed: first, and OMniLeads' own
`[sub-oml-module-custmer-id]` after it (a stand-in that marks the call if it ever runs). Two
more stand-ins play OMniLeads' part: `sub-oml-set-chanvars` sets `__OMLCUSTOMERID<FIELD>` from
the node's hash, as OMniLeads' omni-retrieve-conf AGI does, and `sub-oml-dst-switch` records
the "type,id" it was asked to route to in OML_SWITCHED, then returns. The inbound context sets
`__OMLCODCLI=-1` and enters with `Gosub(sub-oml-module-custmer-id,s,1(<node>))`, as
OMniLeads' inbound route and its type-9 destination do, and records where the call came back.

The gateway reads the same hashes from Redis db 10, so its nodes read the entry back and ask
for 1 (CALLERID_OMNILEADS_CONFIRM, on by default), with OMniLeads' own prompt name. Every
caller keys real DTMF: the entry during the prompt, then 1 once the read-back has played.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests import services
from tests.asterisk.conftest import omnileads_redis
from tools import pbx
from tools.pbx import Call, Hangup, Keys, Wait
from tools.stack import Stack, free_port

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(120)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "omnileads" / "extensions.conf"
REDIS_DB = 10  # this module's own db (test_omnileads_nodes.py uses 11)
PREFIX = "OML:CUSTOMERID:"
CONFIRM_PROMPT = "oml/en/oml-to-confirm-press-one"  # CALLERID_OMNILEADS_CONFIRM_AUDIO's default
INBOUND = "oml-test-dial-in"
# Priority of the inbound context's Set(ENDED=...), right after the Gosub into the module.
BACK_FROM_MODULE = 5

CRM_TABLE = {
    "default": {"destination": "false"},
    "customers": {
        "12345": {"destination": "true"},
        "13579": {"destination": "true"},
        "22222": {"destination": "3,7"},
        "44444": {"status_code": 500},
    },
}


def omnileads_hashes(crm: str) -> dict[str, dict[str, str]]:
    """The nodes by id, as OMniLeads writes them (strings; node 43 has no TRUEDST)."""
    common = {"AUDIO": "callerid-test/prompt", "LENGTH": "5", "TIMEOUT": "4", "RETRIES": "1"}
    identify, route = f"{crm}/identify", f"{crm}/route"
    return {
        "41": dict(
            common, NAME="dp-none", TYPE="1", EXTERNALURL="", TRUEDST="1,3", FALSEDST="1,41"
        ),
        "42": dict(
            common,
            NAME="dp-true-false",
            TYPE="2",
            EXTERNALURL=identify,
            TRUEDST="1,3",
            FALSEDST="1,42",
            RETRIES="2",
        ),
        "43": dict(common, NAME="dp-router", TYPE="3", EXTERNALURL=route, FALSEDST="1,43"),
        "44": dict(
            common,
            NAME="dp-router-true",
            TYPE="3",
            EXTERNALURL=route,
            TRUEDST="2,1",
            FALSEDST="1,44",
        ),
    }


# Node 49 exists for OMniLeads (its hash reaches sub-oml-set-chanvars) but not for the gateway,
# e.g. created a moment ago: the gateway answers config_error with no destination.
ONLY_IN_OMNILEADS = {"49": {"NAME": "dp-new", "TYPE": "1", "TRUEDST": "1,3", "FALSEDST": "3,9"}}


def standins(hashes: dict[str, dict[str, str]]) -> str:
    """OMniLeads' subroutines as this test needs them, and its inbound route."""
    lines = [
        "[sub-oml-set-chanvars]",
        "exten => s,1,Goto(oml-test-conf-${ARG2},${ARG1},1)",
        "[oml-test-conf-CUSTOMERID]",
    ]
    for node, fields in hashes.items():
        sets = [f"Set(__OMLCUSTOMERID{field}={value})" for field, value in fields.items()]
        lines.append(f"exten => {node},1,{sets[0]}")
        lines.extend(f" same => n,{app}" for app in sets[1:])
        lines.append(' same => n,ExecIf($["${OMLUNIQUEID}" = ""]?Set(__OMLUNIQUEID=${UNIQUEID}))')
        lines.append(" same => n,Return()")
    lines += [
        "[sub-oml-dst-switch]",
        "exten => s,1,Set(OML_SWITCHED=${OML_SWITCHED}[${ARG1},${ARG2}])",
        " same => n,Return()",
        # OMniLeads' own module, read after the example file as oml_extensions_modules.conf is.
        "[sub-oml-module-custmer-id]",
        "exten => s,1,Set(OMNILEADS_ORIGINAL=ran)",
        " same => n,Set(OMNILEADS_ORIGINAL=ran)",
        " same => n,Gosub(sub-oml-dst-switch,s,1(${OMLCUSTOMERIDFALSEDST}))",
        " same => n,Return()",
        f"[{INBOUND}]",
        "exten => _[0-9]!,1,Set(CHANNEL(hangup_handler_push)=callerid-inbound-record,s,1)",
        " same => n,Gosub(callerid-inbound-setup,s,1(raw,${EXTEN}))",
        " same => n,Set(__OMLCODCLI=-1)",
        " same => n,Gosub(sub-oml-module-custmer-id,s,1(${EXTEN}))",
        f" same => n,{pbx.MARK_ENDED}",
        " same => n,Hangup()",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def oml_redis() -> Iterator[redis.Redis]:
    with omnileads_redis(REDIS_DB) as client:
        yield client


@pytest.fixture(scope="module")
def stack(oml_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    def write_hashes(running: Stack) -> None:
        for node, fields in omnileads_hashes(running.crm_url).items():
            oml_redis.hset(f"{PREFIX}{node}", mapping=fields)

    base = services.redis_url().rsplit("/", 1)[0]
    with Stack(
        tmp_path_factory.mktemp("stack-omnileads-dialplan"),
        crm_table=CRM_TABLE,
        before_services=write_hashes,
        extra_env={"CALLERID_NODES": f"{base}/{REDIS_DB}"},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def asterisk(private_asterisk: pbx.PrivateAsterisk, stack: Stack) -> Iterator[pbx.PrivateAsterisk]:
    """The session's Asterisk with the example file first, then OMniLeads' stand-ins."""
    private_asterisk.add_sound(CONFIRM_PROMPT, 1.0)
    private_asterisk.add_record_variables("OML_SWITCHED", "OMLCUSTOMERIDFALSEDST")
    private_asterisk.add_record_variables("OMNILEADS_ORIGINAL")
    private_asterisk.add_dialplan("omnileads-switch-over", EXAMPLE.read_text())
    hashes = omnileads_hashes(stack.crm_url) | ONLY_IN_OMNILEADS
    private_asterisk.add_dialplan("omnileads-standins", standins(hashes))
    yield private_asterisk
    private_asterisk.remove_dialplan("omnileads-standins")
    private_asterisk.remove_dialplan("omnileads-switch-over")


@dataclass(frozen=True)
class Expect:
    switched: str  # what sub-oml-dst-switch was asked, e.g. "[1,3]"; "" never
    outcome: str
    source: str
    codcli: str  # OMLCODCLI as the agent's channel inherits it
    agi_status: str = "SUCCESS"
    back: bool = True  # the module returned to the inbound route


def entry(digits: str, confirm: str = "1") -> list[pbx.Step]:
    """Key `digits` into the prompt, then `confirm` in the middle of the window for it: the
    read-back (SAY DIGITS, 3.7-4.1 s for five digits), the 1 s prompt, then TIMEOUT (4 s)."""
    return [Wait(0.3), Keys(digits), Wait(7.0), Keys(confirm)]


def test_the_switch_over_dialplan_routes_every_case(
    asterisk: pbx.PrivateAsterisk, stack: Stack
) -> None:
    """Each node type, the read-back (1 accepts, anything else costs an attempt), the CRM
    failing, the gateway down or without an answer, no entry and a caller who hangs up: each
    call reaches OMniLeads' dst-switch exactly once, with the gateway's decision or else the
    node's FALSEDST, and comes back to the inbound route; only a caller who left reaches none."""
    host, port = stack.agi_address
    up = {"CALLERID_GATEWAY": f"{host}:{port}"}
    down = {"CALLERID_GATEWAY": f"127.0.0.1:{free_port()}"}  # nothing listens there
    cases: dict[str, tuple[Call, Expect]] = {
        "type 1": (Call("41", entry("12345")), Expect("[1,3]", "identified", "local", "12345")),
        "type 2 true": (
            Call("42", entry("12345")),
            Expect("[1,3]", "identified", "crm", "12345"),
        ),
        "type 2 false": (
            Call("42", entry("54321")),
            Expect("[1,42]", "not_identified", "crm", "54321"),
        ),
        "type 3 without TRUEDST": (
            Call("43", entry("22222")),
            Expect("[3,7]", "crm_destination", "crm", "22222"),
        ),
        "type 3 true": (
            Call("44", entry("12345")),
            Expect("[2,1]", "identified", "crm", "12345"),
        ),
        # Read back, 2 instead of 1: OMniLeads asks again (RETRIES 2), so does the gateway.
        "read-back refused then accepted": (
            Call("42", [*entry("97531", confirm="2"), Wait(0.5), *entry("13579")]),
            Expect("[1,3]", "identified", "crm", "13579"),
        ),
        "crm 500": (
            Call("42", entry("44444")),
            Expect("[1,42]", "crm_error", "failover", "44444"),
        ),
        "no entry": (Call("41"), Expect("[1,41]", "no_input", "local", "-1")),
        "gateway down": (
            Call("41", variables=down),
            Expect("[1,41]", "", "", "-1", agi_status="FAILURE"),
        ),
        "node the gateway lacks": (
            Call("49"),
            Expect("[3,9]", "config_error", "failover", "-1"),
        ),
        "caller hangs up": (
            Call("42", [Wait(0.3), Keys("12"), Hangup()]),
            Expect("", "hangup", "local", "-1", agi_status="HANGUP", back=False),
        ),
    }
    calls = [
        Call(c.node, c.script, inbound_context=INBOUND, variables=c.variables or up)
        for c, _ in cases.values()
    ]
    ids = asterisk.place_calls(calls, f"{host}:{port}")
    results = asterisk.wait_for_results(ids, timeout=60)
    assert all(r.complete for r in results.values()), f"see {asterisk.log_path}"
    problems: dict[str, dict[str, tuple[str, str]]] = {}
    for (name, (call, expect)), call_id in zip(cases.items(), ids, strict=True):
        result = results[call_id]
        seen = {
            "switched": result.var("OML_SWITCHED"),
            "outcome": result.outcome,
            "source": result.var("OML_IDENT_SOURCE"),
            "OMLCODCLI": result.var("OMLCODCLI"),
            "AGISTATUS": result.agi_status,
            "ended": result.ended,
            "OMniLeads' own module": result.var("OMNILEADS_ORIGINAL"),
            "FALSEDST loaded": result.var("OMLCUSTOMERIDFALSEDST"),
        }
        falsedst = (omnileads_hashes("") | ONLY_IN_OMNILEADS)[call.node]["FALSEDST"]
        wanted = {
            "switched": expect.switched,
            "outcome": expect.outcome,
            "source": expect.source,
            "OMLCODCLI": expect.codcli,
            "AGISTATUS": expect.agi_status,
            "ended": f"{INBOUND},{call.node},{BACK_FROM_MODULE}" if expect.back else "",
            "OMniLeads' own module": "",
            "FALSEDST loaded": falsedst,
        }
        wrong = {k: (seen[k], wanted[k]) for k in wanted if seen[k] != wanted[k]}
        if wrong:
            problems[name] = wrong
    assert not problems, f"{problems}; see {asterisk.log_path}"
    # An entry the caller did not confirm never reaches the CRM; a confirmed one does, once.
    asked = stack.crm_stats()["by_id"]
    assert "97531" not in asked
    assert asked["13579"] == 1


def test_the_example_file_holds_priority_one(asterisk: pbx.PrivateAsterisk) -> None:
    """The check docs/omnileads.md gives the operator: with OMniLeads' module loaded after the
    example file, priority 1 of s@sub-oml-module-custmer-id is the example's Goto."""
    shown = asterisk.cli("dialplan show s@sub-oml-module-custmer-id")
    first = [line for line in shown.splitlines() if "'s' =>" in line]
    assert first, shown
    assert "1. Goto(callerid-oml-customer-id,s,1)" in first[0], shown
