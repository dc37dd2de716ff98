"""examples/extensions.conf on a real Asterisk 22: a call goes somewhere useful whatever the
gateway does — routed by the gateway's variables when it answers, to the safe destination
when the gateway is down, and hung up only when the caller has already gone."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import pbx
from tools.pbx import Call, Hangup, Keys, Wait
from tools.stack import Stack, free_port

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(120)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "extensions.conf"
CONTEXT = "example-from-pstn"

NODES = """
nodes:
  - id: 1
    name: example-gold
    interaction: crm_true_false
    url: {crm}/identify
    audio: callerid-test/prompt
    expected_length: 5
    timeout: 3
    on_identified: {{type: 1, id: 3}}
    on_not_identified: {{type: 1, id: 4}}
"""


def example_context(gateway: str) -> str:
    """The example's [from-pstn] context as an inbound context of the harness: the
    harness's two set-up priorities (the hangup handler that records the call), then the
    example's own lines, with the gateway's address put in."""
    text = EXAMPLE.read_text()
    body = text.split("[from-pstn]", 1)[1].split("\n[", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith(("exten =>", " same =>"))]
    first_exten = next(i for i, line in enumerate(lines) if line.startswith("exten =>"))
    second = next(
        (i for i, line in enumerate(lines) if i > first_exten and line.startswith("exten =>")),
        len(lines),
    )
    pattern = lines[first_exten].split(",", 1)[0].removeprefix("exten =>").strip()
    steps = [
        re.sub(r"^(exten => [^,]+,1|\s*same => n)", "", line) for line in lines[first_exten:second]
    ]
    steps = [step.lstrip(",") for step in steps]
    body_lines = [
        f"exten => {pattern},1,Set(CHANNEL(hangup_handler_push)=callerid-inbound-record,s,1)",
        " same => n,Gosub(callerid-inbound-setup,s,1(raw,${EXTEN}))",
        *(f" same => n{step}" if step.startswith("(") else f" same => n,{step}" for step in steps),
    ]
    return f"[{CONTEXT}]\n" + "\n".join(body_lines).replace("callerid-gateway:4573", gateway) + "\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(
        tmp_path_factory.mktemp("stack-example"),
        crm_table={
            "default": {"destination": "false"},
            "customers": {"12345": {"destination": "true"}},
        },
        nodes_template=NODES,
    ) as running:
        yield running


def place(asterisk: pbx.PrivateAsterisk, gateway: str, calls: list[Call]) -> list[pbx.CallResult]:
    asterisk.add_dialplan("example", example_context(gateway))
    asterisk.cli("dialplan set global CALLERID_SAFE_DEST oml-dest-1,4,1")
    ids = asterisk.place_calls(calls, gateway)  # GATEWAY is unused by this context
    results = asterisk.wait_for_results(ids, timeout=60)
    assert all(r.complete for r in results.values()), results
    return [results[call_id] for call_id in ids]


def test_example_routes_by_the_gateway_and_never_hangs_up_on_a_failure(
    private_asterisk: pbx.PrivateAsterisk, stack: Stack
) -> None:
    """Gateway up: the call goes where the gateway decided. A caller who hangs up: nothing is
    routed. Gateway down (a closed port): AGISTATUS is FAILURE, no variables, and the call goes
    to the safe destination (campaign 4), not to Hangup()."""
    host, port = stack.agi_address
    up = place(
        private_asterisk,
        f"{host}:{port}",
        [
            Call("5551001", [Wait(0.3), Keys("12345")], inbound_context=CONTEXT),
            Call("5551002", [Wait(0.3), Keys("12"), Hangup()], inbound_context=CONTEXT),
        ],
    )
    assert [(r.agi_status, r.outcome, r.ended) for r in up] == [
        ("SUCCESS", "identified", "oml-dest-1,3,1"),
        ("HANGUP", "hangup", ""),
    ]
    (down,) = place(
        private_asterisk,
        f"127.0.0.1:{free_port()}",
        [Call("5551003", [Wait(0.3), Keys("12345")], inbound_context=CONTEXT)],
    )
    assert (down.agi_status, down.outcome, down.ended) == ("FAILURE", "", "oml-dest-1,4,1")
