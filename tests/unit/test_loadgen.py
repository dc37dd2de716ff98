"""The load generator: the call mix, the checks on each call, the drivers and the report."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from tools.asterisk_sim import CallResult
from tools.loadgen import (
    CallRecord,
    LoadPlan,
    Mix,
    PlannedCall,
    Report,
    agi_caller,
    check,
    drive,
    latency_summary,
    load_expectations,
    main,
    parse_mix,
    record,
    run_fast,
)
from tools.stats import percentile


def _result(variables: dict[str, str], **changes: object) -> CallResult:
    fields: dict[str, object] = {
        "variables": variables,
        "commands": [],
        "context": "from-pstn",
        "extension": "s",
        "priority": 2,
        "hung_up": False,
        "closed_by_gateway": True,
        "last_digit_at": 1.0,
        "decided_at": 1.002,
        "protocol_errors": [],
    }
    fields.update(changes)
    return CallResult(**fields)  # type: ignore[arg-type]


def _decided(outcome: str, dest: str) -> dict[str, str]:
    dest_type, _, dest_id = dest.partition(",")
    return {"OML_IDENT_OUTCOME": outcome, "OML_DEST_TYPE": dest_type, "OML_DEST_ID": dest_id}


def test_miss_mix_never_repeats_an_id_and_expects_the_tables_answer() -> None:
    """Cache-miss ids are distinct, of the configured length, and carry the CRM table's answer."""
    mix = Mix(parse_mix("miss"), seed=7, id_offset=1000)
    calls = [mix.next() for _ in range(3000)]
    ids = [call.script.entries[0] for call in calls]
    assert len(set(ids)) == len(ids)
    assert all(entry is not None and len(entry) == 8 for entry in ids)
    for call in calls:
        first = (call.script.entries[0] or "")[0]
        expected = {"1": "identified", "2": "crm_destination"}.get(first, "not_identified")
        assert call.expect.outcomes == {expected}


def test_offsets_keep_runs_apart() -> None:
    """Two runs with disjoint offsets share no cache-miss id."""
    a = Mix(parse_mix("miss"), id_offset=0)
    b = Mix(parse_mix("miss"), id_offset=1_000_000)
    ids_a = {a.next().script.entries[0] for _ in range(2000)}
    ids_b = {b.next().script.entries[0] for _ in range(2000)}
    assert not ids_a & ids_b


def test_realistic_mix_has_every_kind_in_proportion() -> None:
    """The realistic mix places every kind, close to its weight, and hang-ups are scripted."""
    mix = Mix(parse_mix("realistic"), seed=3)
    calls = [mix.next() for _ in range(5000)]
    kinds = Counter(call.kind for call in calls)
    assert set(kinds) == set(parse_mix("realistic"))
    assert 0.25 < kinds["crm_true"] / len(calls) < 0.35
    assert all(c.script.hangup == "prompt" for c in calls if c.kind == "hangup_prompt")
    no_input = next(c for c in calls if c.kind == "no_input")
    assert no_input.script.entries == [None, None, None]
    assert not no_input.expect.identification


def test_hit_mix_stays_within_its_pool() -> None:
    """The hit mix repeats a bounded set of ids, so after one round every lookup is cached."""
    mix = Mix(parse_mix("hit"), hit_pool=50)
    ids = {mix.next().script.entries[0] for _ in range(2000)}
    assert len(ids) == 50


@pytest.mark.parametrize("text", ["nope", "crm_true=x", "crm_true=0", "bogus=1", "crm_true=-1"])
def test_bad_mixes_are_refused(text: str) -> None:
    """An unknown mix name, kind or weight is a usage error, not a silent empty mix."""
    with pytest.raises(ValueError, match=r"mix|could not convert"):
        parse_mix(text)


def test_check_accepts_the_expected_decision_and_names_every_other_failure() -> None:
    """A call fails on a wrong outcome or route, a missing decision, a protocol error."""
    call = Mix(parse_mix("crm_true=1")).next()
    assert check(call, _result(_decided("identified", "1,3")), verify=True) is None
    wrong = check(call, _result(_decided("not_identified", "1,4")), verify=True)
    assert wrong is not None
    assert wrong.startswith("wrong_decision")
    route = check(call, _result(_decided("identified", "1,9")), verify=True)
    assert route is not None
    assert "routed to 1,9" in route
    assert (check(call, _result({}), verify=True) or "").startswith("no_decision")
    broken = _result(_decided("identified", "1,3"), protocol_errors=["CR inside"])
    assert (check(call, broken, verify=True) or "").startswith("protocol")
    open_ = _result(_decided("identified", "1,3"), closed_by_gateway=False)
    assert (check(call, open_, verify=True) or "").startswith("not_closed")
    assert check(call, _result(_decided("not_identified", "1,4")), verify=False) is None


def test_percentiles_are_nearest_rank() -> None:
    """p50/p90/p99 are values that were measured, in milliseconds."""
    values = [i / 1000 for i in range(1, 101)]
    assert percentile(values, 0.5) == 0.05
    assert percentile(reversed(values), 0.99) == 0.099  # any order
    assert math.isnan(percentile([], 0.5))  # no values: not a made-up 0
    assert latency_summary(values) == {
        "count": 100,
        "p50": 50.0,
        "p90": 90.0,
        "p99": 99.0,
        "max": 100.0,
    }
    assert latency_summary([])["p50"] is None


async def test_closed_loop_keeps_n_calls_live_and_stops_at_the_count() -> None:
    """Closed loop: never more than `concurrency` calls at once, exactly `calls` placed."""
    live = peak = 0

    async def call(planned: PlannedCall) -> CallRecord:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(0.001)
        live -= 1
        return CallRecord(planned.kind, 0.0, 0.0, "identified", "crm", 0.001, None, True)

    mix = Mix(parse_mix("miss"))
    report = await drive(LoadPlan(duration=0, concurrency=5, calls=40), mix.next, call)
    assert len(report.records) == 40
    assert peak == report.max_in_flight == 5


async def test_open_loop_keeps_its_rate_and_counts_overload() -> None:
    """Open loop: arrivals follow the rate whatever the calls do; beyond the cap they fail."""

    async def slow(planned: PlannedCall) -> CallRecord:
        await asyncio.sleep(0.2)
        return CallRecord(planned.kind, 0.0, 0.0, "identified", "crm", None, None, True)

    mix = Mix(parse_mix("miss"))
    loop = asyncio.get_running_loop()
    began = loop.time()
    plan = LoadPlan(duration=0.25, concurrency=None, rate=200, max_in_flight=20)
    report = await drive(plan, mix.next, slow)
    assert loop.time() - began < 1.0
    assert report.max_in_flight == 20
    assert report.overload >= 20
    summary = report.to_json(plan)
    assert summary["failures"]["overload"] == report.overload
    assert summary["failures"]["total"] == report.overload


def test_report_leaves_warmup_out_of_the_figures() -> None:
    """Calls started before the window are not counted, but their failures still are."""
    report = Report(
        records=[
            CallRecord("crm_true", 0.5, 0.6, "identified", "crm", 0.001, None, True),
            CallRecord("crm_true", 1.5, 2.0, "identified", "crm", 0.002, None, True),
            CallRecord("crm_true", 0.2, 0.3, None, None, None, "no_decision: x", False),
        ],
        window=(1.0, 2.0),
    )
    out = report.to_json()
    assert out["counted_calls"] == 1
    assert out["identifications_per_s"] == 1.0
    assert out["latency_ms"]["p50"] == 2.0
    assert out["failures"] == {"total": 1, "no_decision": 1}
    assert out["identifications_all"] == 2


async def _tiny_gateway(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, route: str = "1,3"
) -> None:
    """Just enough of a FastAGI server: prompt once, then write a decision for any entry."""
    while (await reader.readline()).strip():
        pass
    writer.write(b"GET DATA customer-id-prompt 5000 8\n")
    reply = (await reader.readline()).decode()
    entered = reply.partition("result=")[2].split(" ")[0].strip()
    outcome = "identified" if entered.startswith("1") else "no_input"
    dest_type, _, dest_id = route.partition(",")
    # The decision as the gateway writes it: one MSet, the outcome last.
    pairs = f"OML_DEST_TYPE={dest_type},OML_DEST_ID={dest_id},OML_IDENT_OUTCOME={outcome}"
    writer.write(f'EXEC MSet "{pairs}"\n'.encode())
    await reader.readline()
    writer.close()


async def test_agi_calls_are_measured_from_last_digit_to_decision() -> None:
    """Over a real socket: good decisions count as identifications with a latency sample."""
    server = await asyncio.start_server(_tiny_gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        mix = Mix(parse_mix("crm_true=1"))
        call = agi_caller("127.0.0.1", port, timeout=5)
        report = await drive(LoadPlan(duration=0, concurrency=4, calls=20), mix.next, call)
    out = report.to_json()
    assert out["failures"] == {"total": 0}
    assert out["identifications"] == 20
    assert out["latency_ms"]["count"] == 20
    assert 0 < out["latency_ms"]["p50"] < 100


def test_agi_calls_run_on_uvloop_as_the_command_line_runs_them() -> None:
    """`main` runs on uvloop (run_fast), whose transports differ from asyncio's: the same
    calls succeed there."""

    async def run() -> dict[str, object]:
        server = await asyncio.start_server(_tiny_gateway, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            call = agi_caller("127.0.0.1", port, timeout=5)
            plan = LoadPlan(duration=0, concurrency=4, calls=20)
            report = await drive(plan, Mix(parse_mix("crm_true=1")).next, call)
        return report.to_json()

    out = run_fast(run())
    assert out["failures"] == {"total": 0}
    assert out["identifications"] == 20


async def test_agi_calls_with_a_wrong_route_are_failures() -> None:
    """A gateway that routes customers to the wrong place is caught, not counted."""

    async def wrong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _tiny_gateway(reader, writer, route="1,4")

    server = await asyncio.start_server(wrong, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        mix = Mix(parse_mix("crm_true=1"))
        call = agi_caller("127.0.0.1", port, timeout=5)
        report = await drive(LoadPlan(duration=0, concurrency=2, calls=6), mix.next, call)
    out = report.to_json()
    assert out["failures"] == {"total": 6, "wrong_decision": 6}
    assert out["identifications"] == 0


async def test_refused_connections_are_failures_not_crashes() -> None:
    """Nothing listening: every call is a connection failure and the run still ends."""
    server = await asyncio.start_server(_tiny_gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    call = agi_caller("127.0.0.1", port, timeout=2)
    report = await drive(
        LoadPlan(duration=0, concurrency=2, calls=4), Mix({"crm_true": 1}).next, call
    )
    assert report.to_json()["failures"] == {"total": 4, "connection": 4}


def test_default_checks_hold_for_any_nodes_and_crm() -> None:
    """Without expectations a call passes with any real decision, whatever its route, and
    fails with an outcome that does not exist or a destination that is not two integers."""
    call = Mix(parse_mix("crm_true=1")).next()
    for outcome, dest in [("not_identified", "1,4"), ("crm_error", "5,1"), ("no_input", "3,1")]:
        assert check(call, _result(_decided(outcome, dest)), verify=False) is None
    for outcome in ("hangup", "config_error"):  # the two that may leave without a route
        assert check(call, _result(_decided(outcome, ",")), verify=False) is None
    for outcome, dest in [("identified", ","), ("bogus", "1,3"), ("identified", "1,x")]:
        failure = check(call, _result(_decided(outcome, dest)), verify=False)
        assert (failure or "").startswith("bad_decision"), (outcome, dest)
    assert (check(call, _result({}), verify=False) or "").startswith("no_decision")


def _table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "expect.yaml"
    path.write_text(text)
    return path


def test_expect_table_gives_the_first_matching_rule_for_calls_that_type_an_id(
    tmp_path: Path,
) -> None:
    """--expect FILE: by node, the first regex that finds the typed id says the outcome and
    route; calls that type no id, and ids no rule finds, get only the default checks."""
    table = load_expectations(
        _table(
            tmp_path,
            """
"1": {"^12": "crm_timeout 1,9", "^1": "identified 1,3", "^3": not_identified}
"3": {"": "identified 1,3"}
""",
        )
    )
    # Ids are 1 and a counter from the offset: those past 2,000,000 start with 12.
    weights = parse_mix("crm_true=1,no_input=1,hangup_prompt=1,hangup_lookup=1")
    mix = Mix(weights, seed=5, id_offset=1_999_900)
    calls = [mix.next() for _ in range(400)]
    assert {(c.customer or "")[:2] for c in calls if c.customer} == {"11", "12"}
    for call in calls:
        expect = table.expectation(call)
        if call.kind in ("no_input", "hangup_prompt"):
            assert call.customer is None
            assert expect is None
            continue
        assert call.customer is not None
        assert call.customer == call.script.entries[-1]
        assert expect is not None
        if call.script.node == "3":
            assert "identified" in expect.outcomes
        elif call.customer.startswith("12"):
            assert "crm_timeout" in expect.outcomes
        else:
            assert "identified" in expect.outcomes
        if call.kind == "hangup_lookup":  # the caller's hang-up may come first
            assert "hangup" in expect.outcomes
            assert len(expect.outcomes) == 2
            assert expect.destination is None
    crm = next(c for c in calls if c.kind == "crm_true" and c.script.node == "1")
    assert crm.customer is not None
    assert table.expectation(dataclasses.replace(crm, customer="99999999")) is None  # no rule
    routed = "1,9" if crm.customer.startswith("12") else "1,3"
    outcome = "crm_timeout" if routed == "1,9" else "identified"
    good = record(crm, _result(_decided(outcome, routed)), 0.0, 1.0, verify=table)
    assert good.failure is None
    assert good.expected
    bad = record(crm, _result(_decided(outcome, "1,4")), 0.0, 1.0, verify=table)
    assert (bad.failure or "").startswith("wrong_decision")
    unsure = next(c for c in calls if c.kind == "no_input")
    unchecked = record(unsure, _result(_decided("not_identified", "1,4")), 0.0, 1.0, verify=table)
    assert unchecked.failure is None
    assert not unchecked.expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("- just a list\n", "expected node id"),
        ('"1": {"^1": "identified_maybe 1,3"}\n', "not one of"),
        ('"1": {"^1": "identified 1"}\n', "not type,id"),
        ('"1": {"(": "identified"}\n', "bad regex"),
        ('"1": []\n', "node 1"),
        ("{1: [\n", "expect.yaml"),
    ],
)
def test_bad_expect_files_are_refused_with_the_reason(
    tmp_path: Path, text: str, error: str
) -> None:
    """A table that cannot be what the author meant is a usage error, not a silent check."""
    with pytest.raises(ValueError, match=error):
        load_expectations(_table(tmp_path, text))


def test_every_run_gives_its_calls_calling_numbers_of_their_own() -> None:
    """Calls of a run never share a calling number, and runs from other bases do not meet."""
    a = Mix(parse_mix("miss"), caller_base=0)
    b = Mix(parse_mix("miss"), caller_base=5_000)
    numbers_a = [a.next().script.caller_number for _ in range(1000)]
    numbers_b = {b.next().script.caller_number for _ in range(1000)}
    assert numbers_a[0] == "5500000001"  # as before: the default base is 0
    assert len(set(numbers_a)) == 1000
    assert not set(numbers_a) & numbers_b


async def _command_line(tmp_path: Path, port: int, *args: str) -> tuple[int, dict[str, object]]:
    """`callerid-loadgen` (its own event loop, in a thread) against `port`; status and JSON."""
    out = tmp_path / "out.json"
    argv = ["--port", str(port), "--concurrency", "2", "--duration", "0", "--calls", "6"]
    status = await asyncio.to_thread(
        main, [*argv, "--mix", "crm_true=1", "--output", str(out), *args]
    )
    result: dict[str, object] = json.loads(out.read_text())
    return status, result


async def test_command_line_checks_valid_decisions_by_default_and_expectations_on_request(
    tmp_path: Path,
) -> None:
    """Against a gateway whose nodes are not bench/'s (it routes customers to 1,4): the
    defaults pass every call (exit 0), `--expect bench` finds every route wrong (exit 1), and
    a table that says 1,4 passes with every call checked against it."""

    async def other_nodes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _tiny_gateway(reader, writer, route="1,4")

    server = await asyncio.start_server(other_nodes, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    table = _table(tmp_path, '"1": {"^1": "identified 1,4"}\n"3": {"^1": "identified 1,4"}\n')
    async with server:
        default = await _command_line(tmp_path, port)
        bench = await _command_line(tmp_path, port, "--expect", "bench")
        expected = await _command_line(tmp_path, port, "--expect", str(table))
    assert default[0] == 0
    assert default[1]["failures"] == {"total": 0}
    assert default[1]["outcomes"] == {"identified": 6}
    assert default[1]["checked_against_expected"] == 0
    assert default[1]["checks"] == "valid decision"
    assert bench[0] == 1
    assert bench[1]["failures"] == {"total": 6, "wrong_decision": 6}
    assert expected[0] == 0
    assert expected[1]["failures"] == {"total": 0}
    assert expected[1]["checked_against_expected"] == 6


def test_command_line_refuses_a_bad_expect_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --expect file stops the run before any call, with the reason."""
    bad = _table(tmp_path, '"1": {"^1": "maybe"}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["--calls", "1", "--duration", "0", "--expect", str(bad)])
    assert exit_.value.code == 2
    assert "'maybe' is not one of" in capsys.readouterr().err
