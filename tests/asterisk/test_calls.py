"""Calls through a real Asterisk 22 into the gateway: the real-PBX tier.

Each call is a Local channel with real DTMF (tools/pbx.py); the gateway, the mock CRM and, when
scaled out, RabbitMQ, two resolvers and Redis are real processes (tools/stack.py). A call is
checked where Asterisk itself recorded it: the channel variables the gateway set, AGISTATUS,
and the dialplan position the call really ended at.

Scenarios that do not depend on each other run as one batch of simultaneous calls, so the tier
costs about as long as its slowest call. Timings in the scripts are generous: a caller keys
the next attempt at least 0.5 s after the previous entry has ended, and never near a timeout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import services
from tools import pbx
from tools.pbx import Call, Hangup, Keys, Wait
from tools.stack import Stack

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(120)]

NODES = """
nodes:
  - id: tf
    name: tier-true-false
    interaction: crm_true_false
    url: {crm}/identify
    audio: callerid-test/prompt
    expected_length: 5
    timeout: 3
    inter_digit_timeout: 1.5
    attempts: 2
    on_identified: {{type: 1, id: 3}}
    on_not_identified: {{type: 1, id: 4}}
    on_error: {{type: 1, id: 9}}
    crm_timeout: 1.5
  - id: dest
    name: tier-destination
    interaction: crm_destination
    url: {crm}/route
    audio: callerid-test/prompt
    expected_length: 5
    timeout: 3
    on_not_identified: {{type: 1, id: 4}}
    on_error: {{type: 5, id: 1}}
    crm_timeout: 1.5
  - id: local
    name: tier-local
    audio: callerid-test/prompt
    min_length: 3
    max_length: 8
    pattern: "[1-8]+"
    timeout: 2
    inter_digit_timeout: 1
    attempts: 2
    on_identified: {{type: 9, id: 21}}
    on_not_identified: {{type: 1, id: 6}}
    on_no_input: {{type: 3, id: 1}}
    on_invalid: {{type: 3, id: 2}}
  - id: 21
    name: tier-second-node
    audio: callerid-test/prompt
    expected_length: 4
    timeout: 3
    on_identified: {{type: 1, id: 8}}
    on_not_identified: {{type: 1, id: 6}}
  - id: 22
    name: tier-loop
    audio: callerid-test/prompt
    expected_length: 1
    timeout: 3
    on_identified: {{type: 9, id: 22}}
    on_not_identified: {{type: 1, id: 6}}
  - id: digits
    name: tier-inter-digit
    audio: callerid-test/prompt
    max_length: 10
    timeout: 4
    inter_digit_timeout: 1
    on_identified: {{type: 2, id: 1}}
    on_not_identified: {{type: 1, id: 6}}
  - id: confirm
    name: tier-confirm
    audio: callerid-test/prompt
    expected_length: 3
    confirm: true
    confirm_audio: callerid-confirm
    timeout: 6
    on_identified: {{type: 2, id: 2}}
    on_not_identified: {{type: 1, id: 6}}
  - id: music
    name: tier-music
    interaction: crm_true_false
    url: {crm}/identify
    audio: callerid-test/prompt
    expected_length: 5
    timeout: 3
    on_identified: {{type: 1, id: 3}}
    on_not_identified: {{type: 1, id: 4}}
    crm_timeout: 4
    hold_music_after: 0.3
  - id: long
    name: tier-long-prompt
    audio: callerid-test/long-prompt
    expected_length: 5
    timeout: 3
    on_identified: {{type: 1, id: 3}}
    on_not_identified: {{type: 1, id: 4}}
"""

CRM_TABLE = {
    "default": {"destination": "false"},
    "customers": {
        "12345": {"destination": "true"},
        "22222": {"destination": "1,7"},
        "33333": {"delay_ms": 6000, "destination": "true"},
        "44444": {"status_code": 500},
        "55555": {"raw": "<html>garbage</html>"},
        "77777": {"delay_ms": 1500, "destination": "true"},
    },
}

# Types 1..3 jump into the harness's oml-dest-N contexts; type 5 has no template, so those
# calls continue at the priority after AGI() (the inbound context records it as priority 5).
JUMPS = {"1": "oml-dest-1,{id},1", "2": "oml-dest-2,{id},1", "3": "oml-dest-3,{id},1"}
AFTER_AGI = f"{pbx.INBOUND_CONTEXT},{{node}},{pbx.AGI_PRIORITY + 2}"


def keys(digits: str, after: float = 0.3) -> list[pbx.Step]:
    """Key `digits` `after` seconds into the prompt (DTMF interrupts it)."""
    return [Wait(after), Keys(digits)]


@dataclass(frozen=True)
class Expect:
    outcome: str
    dest: str  # "type,id", "" for none
    source: str
    customer_id: str = ""
    ended: str = ""  # "" : derived from the destination (the jump, or after AGI())


def expected_end(node: str, expect: Expect) -> str:
    if expect.ended:
        return expect.ended
    if not expect.dest:
        return ""
    dest_type, dest_id = expect.dest.split(",")
    if dest_type in JUMPS:
        return f"oml-dest-{dest_type},{dest_id},1"
    return AFTER_AGI.format(node=node)


# (name, node, caller script, expectation): every outcome of the outcome table and the rules.
SCENARIOS: list[tuple[str, str, list[pbx.Step], Expect]] = [
    ("crm true", "tf", keys("12345"), Expect("identified", "1,3", "crm", "12345")),
    ("crm false", "tf", keys("54321"), Expect("not_identified", "1,4", "crm", "54321")),
    ("crm destination", "dest", keys("22222"), Expect("crm_destination", "1,7", "crm", "22222")),
    # A type-3 node without on_identified (OMniLeads leaves TRUEDST out) given "true".
    (
        "true on type 3",
        "dest",
        keys("12345"),
        Expect("crm_bad_response", "5,1", "failover", "12345"),
    ),
    ("crm slow", "tf", keys("33333"), Expect("crm_timeout", "1,9", "failover", "33333")),
    ("crm 500", "tf", keys("44444"), Expect("crm_error", "1,9", "failover", "44444")),
    ("crm garbage", "tf", keys("55555"), Expect("crm_bad_response", "1,9", "failover", "55555")),
    ("no input", "local", [], Expect("no_input", "3,1", "local")),
    # "9" breaks the pattern; both attempts invalid.
    (
        "invalid",
        "local",
        [*keys("129"), Wait(1.5), Keys("129")],
        Expect("invalid_input", "3,2", "local"),
    ),
    # Too short, ended by the inter-digit timeout (1.5 s), then a valid entry on the retry.
    (
        "retry",
        "tf",
        [*keys("12"), Wait(2.5), Keys("12345")],
        Expect("identified", "1,3", "crm", "12345"),
    ),
    # Type 9: a valid entry on "local" runs node 21 in the same session.
    (
        "type 9",
        "local",
        [*keys("4567"), Wait(1.8), Keys("8888")],
        Expect("identified", "1,8", "local", "8888"),
    ),
    ("unknown node", "nosuchnode", [], Expect("config_error", "1,99", "failover")),
    ("hang-up in prompt", "long", [Wait(1.0), Hangup()], Expect("hangup", "", "local")),
    ("hang-up in entry", "tf", [*keys("12"), Hangup()], Expect("hangup", "", "local")),
    (
        "hang-up in lookup",
        "tf",
        [*keys("33333"), Wait(0.5), Hangup()],
        Expect("hangup", "", "local"),
    ),
]


@pytest.fixture(scope="module", params=["embedded", "scaled_out"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The gateway under test, embedded or with RabbitMQ, two resolvers and Redis."""
    scaled_out = request.param == "scaled_out"
    with Stack(
        tmp_path_factory.mktemp(f"stack-{request.param}"),
        amqp_url=services.amqp_url() if scaled_out else None,
        redis_url=f"{services.redis_url().rsplit('/', 1)[0]}/12" if scaled_out else None,
        resolvers=2,
        crm_table=CRM_TABLE,
        nodes_template=NODES,
        extra_env={
            "CALLERID_JUMP_TEMPLATES": json.dumps(JUMPS),
            "CALLERID_FALLBACK_DESTINATION": "1,99",
            "CALLERID_MAX_HOPS": "2",
        },
    ) as running:
        yield running


def gateway_of(stack: Stack) -> str:
    host, port = stack.agi_address
    return f"{host}:{port}"


def run_calls(
    asterisk: pbx.PrivateAsterisk, stack: Stack, calls: list[Call], timeout: float = 60.0
) -> dict[str, pbx.CallResult]:
    ids = asterisk.place_calls(calls, gateway_of(stack))
    results = asterisk.wait_for_results(ids, timeout=timeout)
    missing = {call_id: r.missing for call_id, r in results.items() if not r.complete}
    assert not missing, f"calls never recorded: {missing}; see {asterisk.log_path}"
    return results


def check(result: pbx.CallResult, node: str, expect: Expect) -> list[str]:
    """The differences between what Asterisk recorded and `expect` (empty when it matches)."""
    got_dest = ",".join(filter(None, (result.var("OML_DEST_TYPE"), result.var("OML_DEST_ID"))))
    source = result.var("OML_IDENT_SOURCE")
    seen = {
        "outcome": result.outcome,
        "dest": got_dest,
        # Calls share customers, so a CRM answer may come from the cache: the same answer.
        "source": "crm" if source == "cache" else source,
        "customer_id": result.var("OML_CUSTOMER_ID"),
        "OMLCODCLI": result.var("OMLCODCLI"),
        "ended": result.ended,
    }
    wanted = {
        "outcome": expect.outcome,
        "dest": expect.dest,
        "source": expect.source,
        "customer_id": expect.customer_id,
        "OMLCODCLI": expect.customer_id,
        "ended": expected_end(node, expect),
    }
    return [
        f"{key}: {seen[key]!r} != {wanted[key]!r}" for key in wanted if seen[key] != wanted[key]
    ]


def test_every_outcome_and_rule_on_a_real_asterisk(
    private_asterisk: pbx.PrivateAsterisk, stack: Stack
) -> None:
    """Each interaction type and every outcome of the table, retries, length and pattern
    rules, type-9 chaining, the unknown node and hang-ups in the prompt, the entry and the
    lookup: the variables Asterisk holds and where each call really ended (jump templates for
    types 1-3, the next priority after AGI() for type 5, nowhere after a hang-up)."""
    calls = {name: Call(node, script) for name, node, script, _ in SCENARIOS}
    results = run_calls(private_asterisk, stack, list(calls.values()))
    problems = {}
    for name, node, _, expect in SCENARIOS:
        result = results[calls[name].call_id]
        wrong = check(result, node, expect)
        if wrong:
            problems[name] = wrong
        expected_status = "HANGUP" if expect.outcome == "hangup" else "SUCCESS"
        if result.agi_status != expected_status:
            problems.setdefault(name, []).append(f"AGISTATUS {result.agi_status}")
    assert not problems, problems


def test_hop_limit_on_a_real_asterisk(private_asterisk: pbx.PrivateAsterisk, stack: Stack) -> None:
    """A node that routes to itself (type 9) is run at most 1 + CALLERID_MAX_HOPS (2) times,
    then the call takes the gateway fallback as config_error."""
    call = Call("22", [Wait(0.3), Keys("1"), Wait(0.6), Keys("1"), Wait(0.6), Keys("1")])
    result = run_calls(private_asterisk, stack, [call])[call.call_id]
    assert check(result, "22", Expect("config_error", "1,99", "failover")) == []


def test_inter_digit_timeout_is_asterisks_own(
    private_asterisk: pbx.PrivateAsterisk, stack: Stack
) -> None:
    """The caller keys 12, pauses 2.5 s, keys 345: with a 1 s inter-digit timeout (and 4 s for
    the first digit) the entry is 12, ended about 1 s after the last key it holds, not 4 s
    (GET DATA's single timeout would have waited 4 s and taken 12345)."""
    call = Call("digits", [*keys("12"), Wait(2.5), Keys("345")])
    result = run_calls(private_asterisk, stack, [call])[call.call_id]
    assert check(result, "digits", Expect("identified", "2,1", "local", "12")) == []
    assert result.last_key_at is not None
    assert result.agi_returned_at is not None
    waited = result.agi_returned_at - result.last_key_at
    assert 0.9 <= waited < 2.5, waited  # the 1 s timeout fired; 4 s would be over 2.5


def test_confirmation_reads_back_with_real_digit_sounds(
    private_asterisk: pbx.PrivateAsterisk, stack: Stack
) -> None:
    """With `confirm` the entry is read back with Debian's digit sounds (SAY DIGITS), then
    key 1 accepts it: the full log shows the three digit files being played on this call."""
    mark = private_asterisk.log_size()
    call = Call("confirm", [*keys("123"), Wait(4.0), Keys("1")])
    result = run_calls(private_asterisk, stack, [call])[call.call_id]
    assert check(result, "confirm", Expect("identified", "2,2", "local", "123")) == []
    log = private_asterisk.log_since(mark)
    channel = result.var("CHANNEL")
    played = [line for line in log.splitlines() if channel in line and "digits/" in line]
    assert len(played) >= 3, played


def test_hold_music_while_the_crm_is_slow(
    private_asterisk: pbx.PrivateAsterisk, stack: Stack
) -> None:
    """A CRM slower than hold_music_after (0.3 s; it answers after 1.5 s) starts music on hold
    on the caller's channel, stops it, and the answer still routes the call."""
    mark = private_asterisk.log_size()
    call = Call("music", keys("77777"))
    result = run_calls(private_asterisk, stack, [call])[call.call_id]
    assert check(result, "music", Expect("identified", "1,3", "crm", "77777")) == []
    channel = result.var("CHANNEL")
    lines = [line for line in private_asterisk.log_since(mark).splitlines() if channel in line]
    assert any("Started music on hold" in line for line in lines), lines[-20:]
    assert any("Stopped music on hold" in line for line in lines), lines[-20:]


def test_100_calls_at_once(private_asterisk: pbx.PrivateAsterisk, stack: Stack) -> None:
    """100 simultaneous calls, known and unknown customers: every one decided correctly."""
    calls = []
    expected = {}
    for index in range(100):
        customer = "12345" if index % 2 else f"5{index:04d}"
        call = Call("tf", keys(customer))
        calls.append(call)
        expected[call.call_id] = (
            Expect("identified", "1,3", "crm", customer)
            if customer == "12345"
            else Expect("not_identified", "1,4", "crm", customer)
        )
    results = run_calls(private_asterisk, stack, calls, timeout=90)
    wrong = {
        call_id: problems
        for call_id, result in results.items()
        if (problems := check(result, "tf", expected[call_id]))
    }
    assert not wrong, f"{len(wrong)} of 100 wrong: {list(wrong.items())[:5]}"
