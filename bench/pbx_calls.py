"""Calls through a real Asterisk 22: last digit to decision, and CPU per call beside Asterisk's.

    python -m bench.pbx_calls                 # about 3 minutes on 2 cores
    python -m bench.pbx_calls --sequential 10 --burst 50 --rounds 1   # a quicker look

Needs Asterisk 22 (`tools/asterisk/ensure_asterisk.sh` finds or builds it), and for the
scaled-out mode the local RabbitMQ and Redis (CALLERID_TEST_AMQP_URL, default
amqp://guest:guest@127.0.0.1:5672/; CALLERID_TEST_REDIS_URL, default redis://127.0.0.1:6379,
of which db 12 is used). Writes `bench/results/pbx-<UTC timestamp>.json` and
`bench/results/pbx-latest.md`, and prints one line per scenario while it runs.

One private Asterisk (`tools.pbx.PrivateAsterisk`, verbosity 0) places Local-channel calls with
real DTMF against the gateway, run as real processes by `tools.stack.Stack`:

- `embedded`: the gateway alone, asking the mock CRM itself;
- `scaled_out`: the gateway over RabbitMQ, two resolvers, the answer cache in Redis db 12.

Each mode runs a few warm-up calls (checked, not counted), then `--sequential` calls one at a
time (each placed once the last has its decision), then `--rounds` rounds of `--burst` calls
placed at once. The node is `crm_true_false` with `expected_length: 5`, so the entry ends at
its last digit (no inter-digit wait). Every call keys a customer id never used before in the
run (a counter; ids starting with 1 are "true" by the CRM table's rule, the others take its
default "false"), so every call is a cache miss that asks the CRM; the CRM's request count is
checked against the calls. Every call's decision is checked where Asterisk recorded it
(outcome, destination, source "crm", the customer id, AGISTATUS and where the dialplan's
routing on OML_DEST_TYPE/OML_DEST_ID landed, as OMniLeads routes: no gateway jump): `wrong`
and `missing` must be 0 for a row's figures to count (`valid`).

Latency: from the end of the caller's last DTMF digit to the dialplan's first priority after
the AGI (`CallResult.agi_returned_at`), both stamped by Asterisk with
millisecond resolution (so -1..+2 ms is "at once"). The last digit's end comes from
`last_key_at` here, not `CallResult.last_key_at`, which reads one digit (200 ms) early when
the far end hangs up on the last digit (see `last_key_at`). CPU: utime+stime deltas from /proc of
Asterisk, the gateway, the resolvers, the mock CRM (and, scaled out, the shared RabbitMQ and
Redis servers, only read) over each scenario's calls, divided by its calls. Asterisk's figure
includes the harness's caller leg (the script that keys the digits, the result records).

Control rows, `asterisk_only`: the same calls into a dialplan that runs Read() itself, no AGI:
the latency floor of Asterisk alone (a digit's end to Read() returning) and Asterisk's CPU for
the same call without the gateway.

`gateway_per_asterisk_cpu` (embedded, the bursts) is the gateway's CPU per call over
Asterisk's: the target is <= 10 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.measure import busy_cpu_seconds, load_average, service_pids
from bench.measure import cpu_seconds as process_cpu
from tools import pbx
from tools.pbx import Call, CallResult, Keys, PrivateAsterisk, Wait
from tools.stack import Stack, url_answers
from tools.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
REDIS_DB = 12
NODE = "tf"
ID_LENGTH = 5
# After AGI() the dialplan routes on the variables, as OMniLeads' own dialplan does (the
# gateway gets no CALLERID_JUMP_TEMPLATES: examples/omnileads/extensions.conf says why) and as
# examples/extensions.conf shows first: into the harness's oml-dest-N contexts, which record
# where the call landed. The gateway's jump instead would be one more AGI round trip, which
# costs the gateway 0.08-0.1 ms of CPU per call against a real Asterisk (measured with and
# without CALLERID_JUMP_TEMPLATES, 2 x 100 calls at once each).
ROUTED_CONTEXT_NAME = "bench-routed"
ROUTE_ON_VARIABLES = "Goto(oml-dest-${OML_DEST_TYPE},${OML_DEST_ID},1)"
NODES = """
nodes:
  - id: tf
    name: bench-true-false
    interaction: crm_true_false
    url: {crm}/identify
    audio: callerid-test/prompt
    expected_length: 5
    timeout: 5
    inter_digit_timeout: 3
    attempts: 1
    on_identified: {{type: 1, id: 3}}
    on_not_identified: {{type: 1, id: 4}}
    on_error: {{type: 1, id: 9}}
    crm_timeout: 5
"""
CRM_TABLE: dict[str, Any] = {
    "default": {"destination": "false"},
    "rules": [{"match": "^1", "destination": "true"}],
}
# The control: Asterisk reads the entry itself (the gateway does it with the same Read()).
FLOOR_CONTEXT_NAME = "bench-asterisk-only"
FLOOR_NODE = "77"
FLOOR_CONTEXT = f"""\
[{FLOOR_CONTEXT_NAME}]
exten => _X!,1,Set(CHANNEL(hangup_handler_push)=callerid-inbound-record,s,1)
 same => n,Gosub(callerid-inbound-setup,s,1(raw,${{EXTEN}}))
 same => n,Read(BENCH_ENTRY,{pbx.PROMPT},{ID_LENGTH},,1,5)
 same => n,Set(AGI_RETURNED_AT={pbx.NOW})
 same => n,Set(OML_CUSTOMER_ID=${{BENCH_ENTRY}})
 same => n,{pbx.MARK_ENDED}
 same => n,Hangup()
"""
SCRIPT_WAIT = 0.3  # into the prompt before the first digit, as the real-PBX tests key
SCRIPT_STEPS = len(pbx.encode_script([Wait(SCRIPT_WAIT), Keys("1" * ID_LENGTH)]))
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Params:
    warmup: int = 3
    sequential: int = 30
    burst: int = 100
    rounds: int = 2
    floor_sequential: int = 10
    floor_burst: int = 100
    sequential_timeout: float = 20.0  # per call
    burst_timeout: float = 60.0  # per round
    modes: tuple[str, ...] = ("embedded", "scaled_out")


# --- calls and checks --------------------------------------------------------------------


@dataclass
class Ids:
    """Customer ids never used before in this run: odd counters are "true", even "false"."""

    next_number: int = 1

    def take(self) -> str:
        number = self.next_number
        self.next_number += 1
        if number >= 10 ** (ID_LENGTH - 1):
            raise RuntimeError("out of customer ids: make the run smaller")
        return f"{1 if number % 2 else 5}{number:0{ID_LENGTH - 1}d}"


def expected(customer_id: str) -> dict[str, str]:
    """What Asterisk must hold after a call that keyed `customer_id` (see CRM_TABLE, NODES)."""
    outcome, dest_id = (
        ("identified", "3") if customer_id.startswith("1") else ("not_identified", "4")
    )
    return {
        "OML_IDENT_OUTCOME": outcome,
        "OML_DEST_TYPE": "1",
        "OML_DEST_ID": dest_id,
        "OML_IDENT_SOURCE": "crm",
        "OML_CUSTOMER_ID": customer_id,
        "OMLCODCLI": customer_id,
        "AGISTATUS": "SUCCESS",
        "ENDED": f"oml-dest-1,{dest_id},1",
    }


def floor_expected(customer_id: str) -> dict[str, str]:
    return {"OML_CUSTOMER_ID": customer_id, "ENDED": f"{FLOOR_CONTEXT_NAME},{FLOOR_NODE},6"}


def last_key_at(result: CallResult) -> tuple[float | None, bool]:
    """When the caller's last digit ended, and whether that was inferred rather than stamped.

    Not `CallResult.last_key_at`: the caller stamps LAST_KEY_AT after each digit and
    KEY_SENDING_AT before the next in the same millisecond, and when the far end hangs up on
    the last digit (within SendDTMF's 1 ms trailing sleep, so its stamp is never taken),
    that property's `done >= sending` takes the previous digit's stamp for the last one: a
    latency 200 ms (one digit) too long. Here the script's step count decides instead: all
    steps done, LAST_KEY_AT is the last digit's; one short with the last digit started
    (KEY_SENDING_AT not before LAST_KEY_AT), it ended 100 ms of SendDTMF's quiet plus its
    duration after KEY_SENDING_AT, provided the caller was still there then. The entry check
    (all 5 digits in OML_CUSTOMER_ID) shows that the last digit did reach the inbound leg.
    """

    def stamp(name: str) -> float | None:
        value = result.caller.get(name, "")
        return float(value) if value else None

    done, sending, hangup = stamp("LAST_KEY_AT"), stamp("KEY_SENDING_AT"), stamp("HANGUP_AT")
    steps_done = result.caller.get("STEPS_DONE", "")
    if steps_done == str(SCRIPT_STEPS):
        return done, False
    duration_ms = result.caller.get("KEY_DURATION_MS", "")
    if (
        steps_done == str(SCRIPT_STEPS - 1)
        and sending is not None
        and (done is None or sending >= done)
        and duration_ms.isdigit()
    ):
        ended = sending + 0.1 + int(duration_ms) / 1000
        if hangup is not None and ended <= hangup + 0.002:  # stamps are whole ms
            return ended, True
    return None, False


def problems(result: CallResult, wanted: Mapping[str, str]) -> list[str]:
    found = [
        f"{name}={result.var(name)!r} (want {value!r})"
        for name, value in wanted.items()
        if result.var(name) != value
    ]
    if last_key_at(result)[0] is None or result.agi_returned_at is None:
        found.append("no last-key or decision time")
    return found


def latency_ms(result: CallResult) -> float | None:
    key_end = last_key_at(result)[0]
    if key_end is None or result.agi_returned_at is None:
        return None
    return round((result.agi_returned_at - key_end) * 1000, 1)


def spread(values: list[float]) -> dict[str, float | None]:
    def pick(fraction: float) -> float | None:
        return round(percentile(values, fraction), 1) if values else None

    return {
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": round(max(values), 1) if values else None,
        "min": round(min(values), 1) if values else None,
    }


# --- CPU ---------------------------------------------------------------------------------


@dataclass
class Watched:
    """The processes a scenario's CPU is read from: name → pid (Asterisk by its own call)."""

    asterisk: PrivateAsterisk
    pids: dict[str, int] = field(default_factory=dict)

    def cpu(self) -> dict[str, float | None]:
        found: dict[str, float | None] = {"asterisk": self.asterisk.cpu_seconds()}
        found.update({name: process_cpu(pid) for name, pid in self.pids.items()})
        # This process (placing calls, reading results): not a cost of the call, but kept out
        # of "other load".
        found["bench-self"] = process_cpu(os.getpid())
        return found


def stack_pids(stack: Stack, scaled_out: bool) -> dict[str, int]:
    assert stack.gateway is not None
    assert stack.crm is not None
    pids = {"gateway": stack.gateway.pid, "mock-crm": stack.crm.pid}
    pids.update({proc.name: proc.pid for proc in stack.resolver_procs if proc.alive})
    if scaled_out:
        pids.update(service_pids())  # the shared RabbitMQ and Redis: only read
    return pids


@dataclass
class CpuMeter:
    """CPU deltas of the watched processes over the measured windows, summed."""

    watched: Watched
    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    busy: float = 0.0
    _before: dict[str, float | None] = field(default_factory=dict)
    _started: float = 0.0
    _busy_before: float = 0.0

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        self._before = self.watched.cpu()
        self._busy_before = busy_cpu_seconds()
        self._started = time.monotonic()
        yield
        self.wall += time.monotonic() - self._started
        self.busy += busy_cpu_seconds() - self._busy_before
        for name, value in self.watched.cpu().items():
            start = self._before.get(name)
            if value is not None and start is not None:
                self.seconds[name] = self.seconds.get(name, 0.0) + value - start

    def per_call_ms(self, calls: int) -> dict[str, float]:
        return {k: round(v * 1000 / max(calls, 1), 3) for k, v in sorted(self.seconds.items())}

    def other_load_cores(self) -> float | None:
        """Cores busy with processes not watched here (others' tests), over the windows."""
        if self.wall <= 0:
            return None
        return round(max(0.0, self.busy - sum(self.seconds.values())) / self.wall, 2)


# --- scenarios ---------------------------------------------------------------------------


@dataclass
class Bench:
    asterisk: PrivateAsterisk
    params: Params
    ids: Ids = field(default_factory=Ids)
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)

    def wait(self, call_ids: list[str], offset: int, timeout: float) -> dict[str, CallResult]:
        """Results of `call_ids`, placed when results.log was `offset` bytes long.

        Counts the lines Asterisk appends (two per call) instead of asking the harness for
        every call every 20 ms, which would take a core from Asterisk during a burst.
        """
        want = 2 * len(call_ids)
        deadline = time.monotonic() + timeout
        lines = 0
        path = self.asterisk.results_path
        while lines < want and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            with contextlib.suppress(FileNotFoundError), path.open("rb") as log:
                log.seek(offset)
                chunk = log.read()
                offset += len(chunk)
                lines += chunk.count(b"\n")
        return self.asterisk.wait_for_results(call_ids, timeout=0)

    def log_offset(self) -> int:
        try:
            return self.asterisk.results_path.stat().st_size
        except FileNotFoundError:
            return 0

    def call(self, customer_id: str, floor: bool) -> Call:
        return Call(
            FLOOR_NODE if floor else NODE,
            [Wait(SCRIPT_WAIT), Keys(customer_id)],
            inbound_context=FLOOR_CONTEXT_NAME if floor else ROUTED_CONTEXT_NAME,
            max_seconds=30,
        )

    def sequential(
        self, name: str, gateway: str, watched: Watched, count: int, *, floor: bool = False
    ) -> dict[str, Any]:
        """`count` calls, each placed once the previous one has recorded its decision."""
        meter = CpuMeter(watched)
        outcomes: list[tuple[str, CallResult]] = []
        with meter.window():
            for _ in range(count):
                customer_id = self.ids.take()
                offset = self.log_offset()
                call_id = self.asterisk.place_call(self.call(customer_id, floor), gateway)
                done = self.wait([call_id], offset, self.params.sequential_timeout)
                outcomes.append((customer_id, done[call_id]))
        return self.record(name, 1, outcomes, meter, floor=floor, rounds=[])

    def burst(
        self, name: str, gateway: str, watched: Watched, count: int, rounds: int, *, floor: bool
    ) -> dict[str, Any]:
        """`rounds` rounds of `count` calls placed at once, one round after the other."""
        meter = CpuMeter(watched)
        outcomes: list[tuple[str, CallResult]] = []
        round_info: list[dict[str, Any]] = []
        for _ in range(rounds):
            batch = {c: self.call(c, floor) for c in (self.ids.take() for _ in range(count))}
            with meter.window():
                offset = self.log_offset()
                placed_at = time.time()
                ids = self.asterisk.place_calls(batch.values(), gateway)
                done = self.wait(ids, offset, self.params.burst_timeout)
                finished_at = time.time()
            results = [(c, done[call.call_id]) for c, call in batch.items()]
            outcomes.extend(results)
            starts = [r.started_at for _, r in results if r.started_at is not None]
            round_info.append(
                {
                    "wall_s": round(finished_at - placed_at, 3),
                    # How long Asterisk took to originate the whole batch (pbx_spool).
                    "first_inbound_start_after_place_s": (
                        round(min(starts) - placed_at, 3) if starts else None
                    ),
                    "last_inbound_start_after_place_s": (
                        round(max(starts) - placed_at, 3) if starts else None
                    ),
                }
            )
            time.sleep(0.5)  # let the last channels go before the next round
        return self.record(name, count, outcomes, meter, floor=floor, rounds=round_info)

    def record(
        self,
        name: str,
        concurrency: int,
        outcomes: list[tuple[str, CallResult]],
        meter: CpuMeter,
        *,
        floor: bool,
        rounds: list[dict[str, Any]],
    ) -> dict[str, Any]:
        wrong: dict[str, list[str]] = {}
        missing: dict[str, list[str]] = {}
        latencies: list[float] = []
        inbound_to_last_key: list[float] = []
        inferred = 0
        for customer_id, result in outcomes:
            if not result.complete:
                missing[result.call_id] = [f"never recorded: {', '.join(result.missing)}"]
                continue
            found = problems(
                result, floor_expected(customer_id) if floor else expected(customer_id)
            )
            if found:
                wrong[result.call_id] = found
                continue
            value = latency_ms(result)
            if value is not None:
                latencies.append(value)
            key_end, guessed = last_key_at(result)
            inferred += guessed
            if result.started_at is not None and key_end is not None:
                inbound_to_last_key.append((key_end - result.started_at) * 1000)
        calls = len(outcomes)
        cpu = meter.per_call_ms(calls)
        ours = {
            k: v for k, v in cpu.items() if k not in ("asterisk", "rabbitmq", "redis", "bench-self")
        }
        entry: dict[str, Any] = {
            "name": name,
            "concurrency": concurrency,
            "calls": calls,
            "wrong": len(wrong),
            "missing": len(missing),
            "valid": not wrong and not missing and calls > 0,
            "latency_ms": spread(latencies),
            "latency_samples_ms": sorted(latencies),
            # Calls whose last digit's end was inferred (see last_key_at), not stamped.
            "last_key_inferred": inferred,
            "inbound_start_to_last_key_ms": spread(inbound_to_last_key),
            "cpu_ms_per_call": cpu,
            "cpu_ms_per_call_ours": round(sum(ours.values()), 3),
            "resolvers_cpu_ms_per_call": round(
                sum(v for k, v in cpu.items() if k.startswith("resolver")), 3
            ),
            "wall_s": round(meter.wall, 2),
            "other_load_cores": meter.other_load_cores(),
            "load_average": load_average(),
            "examples_wrong": dict(list(wrong.items())[:5]),
            "examples_missing": dict(list(missing.items())[:5]),
        }
        if rounds:
            entry["rounds"] = rounds
        self.scenarios[name] = entry
        return entry

    def mode(self, mode: str, workdir: Path, amqp_url: str, redis_url: str) -> None:
        scaled_out = mode == "scaled_out"
        p = self.params
        with Stack(
            workdir / mode,
            amqp_url=amqp_url if scaled_out else None,
            redis_url=redis_url if scaled_out else None,
            resolvers=2,
            crm_table=CRM_TABLE,
            nodes_template=NODES,
            crm_args=["--log-level", "WARNING"],
        ) as stack:
            self.asterisk.add_dialplan(
                ROUTED_CONTEXT_NAME,
                pbx.inbound_context(ROUTED_CONTEXT_NAME, after_agi=[ROUTE_ON_VARIABLES]),
            )
            host, port = stack.agi_address
            gateway = f"{host}:{port}"
            watched = Watched(self.asterisk, stack_pids(stack, scaled_out))

            def asked_crm(entry: dict[str, Any], before: int) -> None:
                # Every call a miss: exactly one CRM request per call, no answer from a cache.
                asked = int(stack.crm_stats()["calls"]) - before
                entry["crm_requests"] = asked
                entry["crm_asked_every_call"] = asked == entry["calls"]
                entry["valid"] = entry["valid"] and entry["crm_asked_every_call"]
                print(one_line(entry), flush=True)

            before = int(stack.crm_stats()["calls"])
            asked_crm(self.sequential(f"{mode}_warmup", gateway, watched, p.warmup), before)
            before = int(stack.crm_stats()["calls"])
            entry = self.sequential(f"{mode}_1_at_a_time", gateway, watched, p.sequential)
            asked_crm(entry, before)
            before = int(stack.crm_stats()["calls"])
            name = f"{mode}_{p.burst}_at_once"
            entry = self.burst(name, gateway, watched, p.burst, p.rounds, floor=False)
            asked_crm(entry, before)
            by_id: dict[str, int] = stack.crm_stats()["by_id"]
            entry["crm_ids_asked_more_than_once_in_mode"] = sum(v != 1 for v in by_id.values())

    def floor(self) -> None:
        p = self.params
        self.asterisk.add_dialplan("bench-floor", FLOOR_CONTEXT)
        watched = Watched(self.asterisk)
        unused = "127.0.0.1:9"  # the control context never dials the gateway
        if p.floor_sequential:
            name = "asterisk_only_1_at_a_time"
            entry = self.sequential(name, unused, watched, p.floor_sequential, floor=True)
            print(one_line(entry), flush=True)
        if p.floor_burst:
            name = f"asterisk_only_{p.floor_burst}_at_once"
            entry = self.burst(name, unused, watched, p.floor_burst, 1, floor=True)
            print(one_line(entry), flush=True)


def one_line(entry: Mapping[str, Any]) -> str:
    lat = entry["latency_ms"]
    cpu = entry["cpu_ms_per_call"]
    rounds = entry.get("rounds", [])
    originate = (
        " originate(last start after place)="
        + ",".join(f"{r['last_inbound_start_after_place_s']}s" for r in rounds)
        if rounds
        else ""
    )
    return (
        f"{entry['name']}: calls={entry['calls']} wrong={entry['wrong']} "
        f"missing={entry['missing']} crm_asked_every_call={entry.get('crm_asked_every_call', '-')} "
        f"p50={lat['p50']} p99={lat['p99']} max={lat['max']} ms "
        f"cpu ms/call asterisk={cpu.get('asterisk')} gateway={cpu.get('gateway', '-')} "
        f"resolvers={entry['resolvers_cpu_ms_per_call']} crm={cpu.get('mock-crm', '-')} "
        f"other_load={entry['other_load_cores']} wall={entry['wall_s']}s{originate}"
    )


# --- report ------------------------------------------------------------------------------


def evaluate(scenarios: Mapping[str, Mapping[str, Any]], params: Params) -> dict[str, Any]:
    burst = scenarios.get(f"embedded_{params.burst}_at_once")
    if burst is None:
        return {"gateway_per_asterisk_cpu": None, "met": None}
    cpu = burst["cpu_ms_per_call"]
    gateway, asterisk = cpu.get("gateway"), cpu.get("asterisk")
    ratio = round(gateway / asterisk, 4) if gateway is not None and asterisk else None
    floor = scenarios.get(f"asterisk_only_{params.floor_burst}_at_once")
    extra: float | None = None
    if floor is not None and asterisk is not None:
        extra = round(asterisk - floor["cpu_ms_per_call"].get("asterisk", 0.0), 3)
    return {
        "gateway_per_asterisk_cpu": ratio,
        "target": "<= 0.10 (embedded, calls at once)",
        "met": None if ratio is None or not burst["valid"] else ratio <= 0.10,
        "asterisk_cpu_ms_per_call_for_the_agi": extra,
    }


def cell(value: Any) -> str:
    return "-" if value is None else str(value)


def markdown(run: Mapping[str, Any]) -> str:
    lines = [
        f"# Real-Asterisk benchmark {run['started']}",
        "",
        f"Command: `{run['command']}`  ",
        f"Asterisk {run['asterisk_version']}; {run['cpus']} CPUs, load average before "
        f"{run['load_before']}, after {run['load_after']}; complete: {run['complete']}.",
        "",
        "| scenario | at once | calls | wrong | missing | valid | p50 ms | p99 ms | max ms | "
        "CPU ms/call Asterisk | gateway | resolvers | CRM | RabbitMQ | Redis | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in run["scenarios"].items():
        lat, cpu = entry["latency_ms"], entry["cpu_ms_per_call"]
        resolvers = entry["resolvers_cpu_ms_per_call"] if name.startswith("scaled") else None
        lines.append(
            f"| {name} | {entry['concurrency']} | {entry['calls']} | {entry['wrong']} | "
            f"{entry['missing']} | {'yes' if entry['valid'] else 'NO'} | {cell(lat['p50'])} | "
            f"{cell(lat['p99'])} | {cell(lat['max'])} | {cell(cpu.get('asterisk'))} | "
            f"{cell(cpu.get('gateway'))} | {cell(resolvers)} | {cell(cpu.get('mock-crm'))} | "
            f"{cell(cpu.get('rabbitmq'))} | {cell(cpu.get('redis'))} | "
            f"{cell(entry['other_load_cores'])} |"
        )
    originates = [
        f"- {name} round {index}: {entry['concurrency']} originates, first inbound leg up "
        f"{info['first_inbound_start_after_place_s']} s and last "
        f"{info['last_inbound_start_after_place_s']} s after the call files were placed; "
        f"all recorded after {info['wall_s']} s."
        for name, entry in run["scenarios"].items()
        for index, info in enumerate(entry.get("rounds", []), start=1)
    ]
    if originates:
        lines += ["", *originates]
    ev = run["evaluation"]
    mark = {True: "met", False: "MISSED", None: "-"}[ev.get("met")]
    lines += [
        "",
        f"Gateway CPU / Asterisk CPU per call (embedded, at once): "
        f"{cell(ev.get('gateway_per_asterisk_cpu'))} ({mark}: {ev.get('target', '')}); "
        "Asterisk CPU per call spent on the AGI (embedded at once minus asterisk_only): "
        f"{cell(ev.get('asterisk_cpu_ms_per_call_for_the_agi'))} ms.",
        "",
        "Latency: end of the caller's last DTMF digit to the dialplan's first priority after the"
        " AGI (Asterisk's own ms stamps); p99 is nearest-rank (the max for 30 calls). Every call"
        " keys a new customer id (a CRM request each: cache misses). CPU ms/call: /proc"
        " utime+stime over the scenario's calls; Asterisk's includes the harness's caller leg."
        " asterisk_only: Read() in the dialplan, no AGI (Asterisk's own floor). Other load:"
        " cores busy with processes not watched here; rows with more than ~0.2 are disturbed."
        " Warm-up rows are checked but not part of the figures.",
    ]
    return "\n".join(lines) + "\n"


def redis_db_url(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def asterisk_version(asterisk: PrivateAsterisk) -> str:
    with contextlib.suppress(Exception):
        return asterisk.cli("core show version").strip().split(" built ")[0]
    return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pbx_calls",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default = Params()
    parser.add_argument("--sequential", type=int, default=default.sequential)
    parser.add_argument("--burst", type=int, default=default.burst, help="calls at once")
    parser.add_argument("--rounds", type=int, default=default.rounds, help="bursts per mode")
    parser.add_argument("--warmup", type=int, default=default.warmup)
    parser.add_argument("--floor-sequential", type=int, default=default.floor_sequential)
    parser.add_argument("--floor-burst", type=int, default=default.floor_burst)
    parser.add_argument(
        "--modes", default=",".join(default.modes), help="embedded,scaled_out (either or both)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs after success")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not set(modes) <= {"embedded", "scaled_out"} or not modes:
        parser.error("--modes: embedded, scaled_out or both")
    params = Params(
        warmup=args.warmup,
        sequential=args.sequential,
        burst=args.burst,
        rounds=args.rounds,
        floor_sequential=args.floor_sequential,
        floor_burst=args.floor_burst,
        modes=modes,
    )
    amqp_url = os.environ.get("CALLERID_TEST_AMQP_URL") or DEFAULT_AMQP
    redis_url = redis_db_url(os.environ.get("CALLERID_TEST_REDIS_URL") or DEFAULT_REDIS, REDIS_DB)
    if "scaled_out" in modes:
        for url, port, what in ((amqp_url, 5672, "RabbitMQ"), (redis_url, 6379, "Redis")):
            if not url_answers(url, port):
                print(f"bench: {what} is not reachable at {url}", file=sys.stderr)
                return 2
    binary = pbx.find_asterisk()
    if binary is None:
        print(f"bench: no Asterisk: {pbx.asterisk_unavailable_reason()}", file=sys.stderr)
        return 2
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    load_before = load_average()
    print(f"bench: load average {load_before} on {os.cpu_count()} CPUs; {binary}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="callerid-pbx-bench-"))
    # SIGTERM must still stop every process by PID: make it raise through the with-blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed = False
    interrupted = False
    version = "?"
    bench: Bench | None = None
    began = time.monotonic()
    try:
        with PrivateAsterisk(binary, workdir / "asterisk", verbose=0) as asterisk:
            version = asterisk_version(asterisk)
            bench = Bench(asterisk, params)
            bench.floor()
            for mode in modes:
                bench.mode(mode, workdir, amqp_url, redis_url)
    except KeyboardInterrupt:
        failed = interrupted = True
        print(f"bench: interrupted; logs in {workdir}", file=sys.stderr)
    except Exception:
        failed = True
        traceback.print_exc()
        print(f"bench: failed; logs in {workdir}", file=sys.stderr)
    scenarios = bench.scenarios if bench is not None else {}
    run: dict[str, Any] = {
        "started": started,
        "command": " ".join(
            ["python -m bench.pbx_calls", *(argv if argv is not None else sys.argv[1:])]
        ),
        "asterisk_version": version,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_average(),
        "duration_s": round(time.monotonic() - began, 1),
        "params": {**asdict(params), "modes": list(params.modes)},
        "scenarios": scenarios,
        "evaluation": evaluate(scenarios, params),
        "complete": not failed,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"pbx-{started}.json").write_text(json.dumps(run, indent=2) + "\n")
    table = markdown(run)
    (args.results_dir / "pbx-latest.md").write_text(table)
    print(table)
    if not failed and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
