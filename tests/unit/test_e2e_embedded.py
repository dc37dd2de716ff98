"""End to end over real TCP and HTTP: simulated Asterisk → embedded gateway → mock CRM.

The gateway is the real composition root (`Gateway`) in embedded mode: nodes from a YAML
file, the in-memory bus, the resolver, the aiohttp CRM client and the in-memory cache.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agi_gateway.app import Gateway
from agi_gateway.settings import GatewaySettings
from shared.outcomes import Outcome, Source
from tests.waiting import eventually
from tools.asterisk_sim import CallResult, CallScript, run_call
from tools.mock_crm import MockCrm, start_mock_crm
from tools.node_fixture import nodes_yaml

# The CRM nodes' budget: short, so the slow customer ("33333", 3 s) times out.
CRM_TIMEOUT = 0.5
TABLE = {
    "default": {"destination": "false"},
    "customers": {
        "12345": {"destination": "true"},
        "22222": {"destination": "1,7"},
        "33333": {"delay_ms": 3000, "destination": "true"},
        "44444": {"status_code": 500},
        "55555": {"raw": "<html>garbage</html>"},
        "66666": {"status": "fail", "destination": "false"},
        "77777": {"destination": "99,1"},
        "88888": {"destination": "9,4"},
    },
}


@dataclass
class Stack:
    gateway: Gateway
    crm: MockCrm

    async def call(self, script: CallScript) -> CallResult:
        assert self.gateway.server is not None
        host, port = self.gateway.server.address
        return await run_call(host, port, script, timeout=15)

    async def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.gateway.http_port}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.text()


@pytest.fixture
def gateway_cache() -> bool:
    return True


@pytest.fixture
async def stack(tmp_path: Path, gateway_cache: bool) -> AsyncIterator[Stack]:
    crm = await start_mock_crm(TABLE)
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(nodes_yaml(crm.url.rstrip("/"), crm_timeout=CRM_TIMEOUT))
    gateway = Gateway(
        GatewaySettings(
            nodes=str(nodes),
            embedded=True,
            agi_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            jump_templates={"*": "oml-dest-{type},{id},1"},
            drain_timeout=2,
            gateway_cache=gateway_cache,
        )
    )
    await gateway.start()
    yield Stack(gateway, crm)
    await gateway.stop()
    await crm.close()


@pytest.mark.parametrize("gateway_cache", [True, False])
async def test_the_gateway_reads_the_cache_first_unless_told_not_to(
    stack: Stack, gateway_cache: bool
) -> None:
    """A repeat caller is answered by the gateway's cache read (the resolver never sees it);
    with CALLERID_GATEWAY_CACHE=false the resolver answers it from the same cache."""
    for _ in range(2):
        await stack.call(CallScript(node="1", entries=["12345"]))
    registry = stack.gateway.registry
    labels = {"node": "gold-customers", "result": "hit"}
    by_gateway = registry.get_sample_value("callerid_gateway_cache_lookups_total", labels)
    by_resolver = registry.get_sample_value("callerid_cache_lookups_total", labels)
    assert (by_gateway, by_resolver) == ((1.0, 0.0) if gateway_cache else (0.0, 1.0))


def outcome(result: CallResult) -> tuple[str, str, str, str]:
    v = result.variables
    return (v["OML_IDENT_OUTCOME"], v["OML_DEST_TYPE"], v["OML_DEST_ID"], v["OML_IDENT_SOURCE"])


async def test_true_false_node_asks_the_crm_then_the_cache(stack: Stack) -> None:
    """crm_true_false: true from the CRM, and the same id again is answered by the cache."""
    first = await stack.call(CallScript(node="1", entries=["12345"]))
    second = await stack.call(CallScript(node="1", entries=["12345"]))
    assert outcome(first) == ("identified", "1", "3", "crm")
    assert outcome(second) == ("identified", "1", "3", "cache")
    assert (first.context, first.extension, first.priority) == ("oml-dest-1", "3", 1)
    stats = await stack.crm.stats()
    assert stats["by_id"] == {"12345": 1}


async def test_crm_false(stack: Stack) -> None:
    """crm_true_false: the CRM's false goes to on_not_identified."""
    result = await stack.call(CallScript(node="1", entries=["10101"]))
    assert outcome(result) == ("not_identified", "1", "4", "crm")


async def test_destination_node(stack: Stack) -> None:
    """crm_destination: the CRM's X,Y is where the call goes."""
    result = await stack.call(CallScript(node="3", entries=["22222"]))
    assert outcome(result) == ("crm_destination", "1", "7", "crm")


async def test_type_9_from_the_crm_runs_the_next_node(stack: Stack) -> None:
    """A CRM answer 9,4 hands the call to node 4 in the same session."""
    result = await stack.call(CallScript(node="3", entries=["88888", "1234"]))
    assert outcome(result) == ("identified", "1", "8", "local")


async def test_none_node(stack: Stack) -> None:
    """interaction none: a valid entry is identified locally; the CRM is not called."""
    result = await stack.call(CallScript(node="2", entries=["777"]))
    assert outcome(result) == ("identified", "1", "5", "local")
    assert (await stack.crm.stats())["calls"] == 0


async def test_retries_no_input_and_invalid_length(stack: Stack) -> None:
    """Attempts are counted; silence ends in no_input, a bad length in invalid_input."""
    retried = await stack.call(CallScript(node="1", entries=[None, "12", "12345"]))
    silent = await stack.call(CallScript(node="2", entries=[None, None]))
    invalid = await stack.call(CallScript(node="1", entries=["1", "12", "1234"]))
    assert outcome(retried)[0] == "identified"
    assert outcome(silent) == ("no_input", "3", "1", "local")
    assert outcome(invalid) == ("invalid_input", "1", "4", "local")


@pytest.mark.parametrize(
    ("customer", "expected"),
    [
        ("33333", "crm_timeout"),
        ("44444", "crm_error"),
        ("55555", "crm_bad_response"),
        ("66666", "crm_error"),
        ("77777", "crm_bad_response"),
    ],
)
async def test_crm_slow_failing_or_garbage_fails_over(
    stack: Stack, customer: str, expected: str
) -> None:
    """Slow, 5xx, garbage, status fail and disallowed answers all take on_error in budget."""
    result = await stack.call(CallScript(node="3", entries=[customer]))
    assert outcome(result) == (expected, "5", "1", "failover")
    assert result.decided_at is not None
    assert result.last_digit_at is not None
    assert result.decided_at - result.last_digit_at < 0.5 + 0.25


async def test_crm_down_fails_over(stack: Stack) -> None:
    """A CRM that answers 503 to everything is crm_error, routed to on_error."""
    await stack.crm.set_mode("down")
    result = await stack.call(CallScript(node="1", entries=["12345"]))
    assert outcome(result) == ("crm_error", "1", "9", "failover")


async def test_hangups(stack: Stack) -> None:
    """Hang-up mid-prompt and mid-lookup: outcome hangup, socket closed, nothing routed."""
    mid_prompt = await stack.call(CallScript(node="1", entries=["12345"], hangup="prompt"))
    mid_lookup = await stack.call(
        CallScript(node="1", entries=["33333"], hangup="lookup", hangup_delay=0.05)
    )
    for result in (mid_prompt, mid_lookup):
        assert result.variables["OML_IDENT_OUTCOME"] == "hangup"
        assert result.closed_by_gateway
        assert result.priority == 2  # no jump: the dialplan just goes on


async def test_200_concurrent_calls(stack: Stack) -> None:
    """200 calls at once, mixed ids: every one gets the decision its inputs call for."""
    ids = ["12345", "10101", "22222"] * 66 + ["12345", "10101"]
    scripts = [CallScript(node="3", entries=[cid], uniqueid=f"c{i}") for i, cid in enumerate(ids)]
    results = await asyncio.gather(*(stack.call(s) for s in scripts))
    expected = {"12345": "identified", "10101": "not_identified", "22222": "crm_destination"}
    assert [r.variables["OML_IDENT_OUTCOME"] for r in results] == [expected[i] for i in ids]
    assert all(r.closed_by_gateway for r in results)
    # Identical lookups in flight are merged and repeats are cached: 3 distinct ids, 3 CRM calls.
    assert (await stack.crm.stats())["calls"] == 3


async def test_operational_endpoints(stack: Stack) -> None:
    """/healthz and /readyz answer 200 while serving; /metrics counts calls by outcome."""
    await stack.call(CallScript(node="2", entries=["777"]))
    assert (await stack.http("/healthz"))[0] == 200
    assert (await stack.http("/readyz"))[0] == 200
    status, text = await stack.http("/metrics")
    assert status == 200
    assert 'callerid_calls_total{node="any-entry",outcome="identified",source="local"} 1.0' in text
    assert 'callerid_crm_requests_total{node="gold-customers",result="true"} 0.0' in text


async def test_drain_turns_unready_and_fails_over_live_calls(stack: Stack) -> None:
    """On drain /readyz goes 503 first and a call stuck on the CRM takes its failover."""
    server = stack.gateway.server
    assert server is not None
    live = asyncio.ensure_future(stack.call(CallScript(node="1", entries=["33333"])))
    await eventually(lambda: server.live_calls == 1)
    drain = asyncio.ensure_future(server.drain(0.1))
    await eventually(lambda: not stack.gateway.ready())
    assert (await stack.http("/readyz"))[0] == 503
    result = await live
    await drain
    assert outcome(result)[0] in {"crm_timeout", "identified"}
    assert result.closed_by_gateway


# Every line the gateway may write to the AGI socket, with every value in a fixed form.
_OUTCOMES = "|".join(o.value for o in Outcome)
_SOURCES = "|".join(s.value for s in Source)
_ALLOWED = re.compile(
    r"CHANNEL STATUS"
    r'|GET DATA "[a-z\-]+" \d+ 1'
    r'|STREAM FILE "[a-z\-]+" ""'
    r'|SAY DIGITS "\d{1,30}" ""'
    r'|SET MUSIC (on "default"|off)'
    r'|EXEC MSet "TIMEOUT\(response\)=\d+\.\d{3},TIMEOUT\(digit\)=\d+\.\d{3}"'
    r'|EXEC Read "CALLERID_ENTRY,[a-z\-]+,\d{1,2}"'
    r'|GET FULL VARIABLE "\$\{CALLERID_ENTRY\},\$\{READSTATUS\}"'
    # The decision: one MSet, the customer id (digits only) first when there is one, the
    # outcome last.
    r'|EXEC MSet "(__OML_CUSTOMER_ID=(?P<id>\d{1,30}),__OMLCODCLI=(?P=id),)?'
    rf"OML_DEST_TYPE=\d*,OML_DEST_ID=\d*,OML_IDENT_SOURCE=({_SOURCES}),"
    rf'OML_IDENT_OUTCOME=({_OUTCOMES})"'
    r'|EXEC Goto "oml-dest-\d+,\d+,1"'
)


@pytest.mark.parametrize(
    ("line", "allowed"),
    [
        (
            'EXEC MSet "OML_DEST_TYPE=1,OML_DEST_ID=3,OML_IDENT_SOURCE=crm,'
            'OML_IDENT_OUTCOME=identified"',
            True,
        ),
        (
            'EXEC MSet "OML_DEST_TYPE=,OML_DEST_ID=,OML_IDENT_SOURCE=local,'
            'OML_IDENT_OUTCOME=hangup"',
            True,
        ),
        (
            'EXEC MSet "__OML_CUSTOMER_ID=12345,__OMLCODCLI=12345,OML_DEST_TYPE=1,OML_DEST_ID=3,'
            'OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=identified"',
            True,
        ),
        (
            'EXEC MSet "__OML_CUSTOMER_ID=12a45,__OMLCODCLI=12a45,OML_DEST_TYPE=1,OML_DEST_ID=3,'
            'OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=identified"',
            False,
        ),
        (
            'EXEC MSet "__OML_CUSTOMER_ID=12345,__OMLCODCLI=54321,OML_DEST_TYPE=1,OML_DEST_ID=3,'
            'OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=identified"',
            False,
        ),
        ('EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"', True),
        ('EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000,X=1"', False),
        ('EXEC Read "CALLERID_ENTRY,prompt,5"', True),
        ('EXEC Read "CALLERID_ENTRY,prompt&x,5"', False),
        ('GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"', True),
        ('SET VARIABLE __OMLCODCLI "12345"', False),
        (
            'EXEC MSet "OML_IDENT_OUTCOME=identified,OML_DEST_TYPE=1,OML_DEST_ID=3,'
            'OML_IDENT_SOURCE=crm"',
            False,
        ),
        (
            'EXEC MSet "OML_DEST_TYPE=1,OML_DEST_ID=3,OML_IDENT_SOURCE=crm,'
            'OML_IDENT_OUTCOME=identified,X=1"',
            False,
        ),
        (
            'EXEC MSet "OML_DEST_TYPE=1\\,2,OML_DEST_ID=3,OML_IDENT_SOURCE=crm,'
            'OML_IDENT_OUTCOME=identified"',
            False,
        ),
        (
            'EXEC MSet "OML_DEST_TYPE=1,OML_DEST_ID=3,OML_IDENT_SOURCE=crm,'
            'OML_IDENT_OUTCOME=maybe"',
            False,
        ),
        ('SET VARIABLE OML_IDENT_OUTCOME "identified"', False),
        ('EXEC Goto "oml-dest-1,3,1"\r', False),
    ],
)
def test_socket_grammar_takes_the_decision_line_and_nothing_near_it(
    line: str, allowed: bool
) -> None:
    """`_ALLOWED` accepts the lines the gateway writes and refuses lines close to them: a
    customer id not all digits or two different ids, an extra pair, a second prompt for
    Read, the outcome not last, an escaped comma, an unknown outcome, the old per-variable
    form, a CR."""
    assert bool(_ALLOWED.fullmatch(line)) is allowed


# What a caller can type, and more: Asterisk only sends DTMF, but the gateway must not trust it.
# No spaces: a space would not make the entry odd but the simulated reply line itself
# ("200 result=1 2"), which is the AGI parser's case (tests/unit/test_agi_protocol.py): an
# unparseable reply breaks the session, with no outcome to write. No lone surrogates: they
# have no bytes, so no Asterisk can send them (the simulator could not even encode them).
_entries = st.one_of(
    st.none(),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00 "),
        max_size=40,
    ),
    st.from_regex(r"[0-9*#]{0,12}", fullmatch=True),
)
_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda d: '{"status": "ok", "destination": ' + d + "}",
        st.one_of(
            st.text(max_size=30).map(lambda t: '"' + t.replace('"', "") + '"'),
            st.sampled_from(['"1,3\\r\\nHANGUP"', '"1,3 \\"x"', "[1, 3]", "true", '"9,4"']),
        ),
    ),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries=st.lists(_entries, min_size=1, max_size=3), body=_bodies)
async def test_nothing_unvalidated_reaches_the_agi_socket(
    stack: Stack, entries: list[str | None], body: bytes | str
) -> None:
    """No DTMF input and no CRM body can put CR/LF or an unvalidated value on the socket."""
    raw = body if isinstance(body, str) else body.decode("latin-1")
    await stack.crm.set_table({"default": {"raw": raw}, "customers": {}})
    result = await stack.call(CallScript(node="3", entries=entries))
    assert result.protocol_errors == []
    for line in result.commands:
        assert _ALLOWED.fullmatch(line), line
    assert result.variables["OML_IDENT_OUTCOME"] in {o.value for o in Outcome}
