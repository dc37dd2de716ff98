"""Ours against the Python FastAGI peers, side by side: `python -m bench.peers.run` (~1.5 min).

The servers, each a real process on loopback, all serving the same node (LOADGEN_NODES node 1,
a crm_true_false node with 8-digit ids) against ONE mock CRM (`callerid-mock-crm` with
LOADGEN_CRM_TABLE: DEFAULT_TABLE's rules, ids starting with 1 are customers, 2 gets "1,7"):

- ours: `agi-gateway --embedded`, started by `tools.stack.Stack` as `bench.run` starts it
  (CALLERID_LOG_LEVEL=WARNING, uvloop, its in-process resolver; every id in these runs is
  new, so its answer cache never hits);
- panoramisk: `python -m bench.peers.panoramisk_node` (asyncio on uvloop, aiohttp);
- pystrix: `python -m bench.peers.pystrix_node` (a thread per call, requests).

The client is our load generator, in this process, as `bench.run` drives the product:
`tools.loadgen.drive` with `agi_caller` over `tools.asterisk_sim` (Asterisk 22's
one-command-at-a-time reading: a pipelined command is a protocol error), on uvloop
(`run_fast`). Every call is checked against what the node must decide.

Order of a run:
1. Decisions first: each server takes a fixed set of calls (customers, non-customers, no
   entry, wrong lengths, a wrong entry then a valid one, and "1,7" answers that a
   true/false node must treat as a CRM error → 1,9); a server with any failure (wrong
   decision, protocol error, no decision) gets no timing runs: its numbers would not count.
2. Throughput: `--concurrency` calls at once (closed loop) for `--duration` s after
   `--warmup` s, one server after the other (ours, panoramisk, pystrix, or the order of
   `--servers`), cache-miss ids
   (a fresh block per run), mix crm_true:crm_false = 5:3 (the "miss" mix without the
   destination node, which the peers do not implement).
3. Latency: `--latency-calls` calls one at a time, each server in turn.
4. The early-close probe, after all timing runs and on each server in turn: CPU over 1 s
   idle, then ONE connection that sends the first part of the environment and closes
   (`CallScript.hangup="before_env_end"`), CPU over `--probe-seconds` s, then one normal
   call with a 3 s limit to see whether the server still serves. panoramisk 1.4 spins at
   100 % of a core there and serves nothing more; the processes are stopped right after.

Per scenario: calls/s, the latency from the caller's last digit to OML_IDENT_OUTCOME (as
the load generator computes it), p50/p99; CPU per call of the server process (utime+stime
from /proc/<pid>/stat, warm-up included, divided by all calls), also the mock CRM's and
the load generator's; peak RSS of the server (VmHWM, reset at the scenario's start where
the kernel allows it); other load (cores busy with processes this run does not watch: a
row with more than ~0.2 ran on a busy machine). Results: `bench/results/peers-<UTC>.json`
and `bench/results/peers-latest.md`; one progress line per scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import busy_cpu_seconds, cpu_seconds, load_average, reset_peak_rss, status_kib
from bench.processes import wait_for_line
from tools.asterisk_sim import OUTCOME_VARIABLE, CallResult, CallScript, run_call
from tools.loadgen import (
    LOADGEN_CRM_TABLE,
    LOADGEN_NODES,
    Expectation,
    LoadPlan,
    Mix,
    PlannedCall,
    agi_caller,
    drive,
    raise_fd_limit,
    record,
    run_fast,
)
from tools.stack import Proc, Stack, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "bench" / "results"
NODE = "1"  # LOADGEN_NODES' crm_true_false node: the one every server serves
TIMED_MIX = {"crm_true": 5, "crm_false": 3}
CHECK_MIX = {
    "crm_true": 3,
    "crm_false": 2,
    "no_input": 1,
    "wrong_length": 1,
    "wrong_then_valid": 1,
}
CHECK_CALLS = 24
# An id starting with 2 gets destination "1,7": a true/false node's CRM error (ours calls it
# crm_bad_response, the peers crm_error), routed to the node's on_error, 1,9.
CRM_ERROR = Expectation(frozenset({"crm_bad_response", "crm_error"}), "1,9")
ID_BLOCK = 1_000_000
CALL_TIMEOUT = 30.0
PEERS = {"panoramisk": "panoramisk_node", "pystrix": "pystrix_node"}
SERVERS = ("ours", *PEERS)


@dataclass
class Server:
    name: str
    proc: Proc
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Params:
    concurrency: int
    duration: float
    warmup: float
    latency_calls: int
    probe_seconds: float


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def on_node(mix: Mix) -> Callable[[], PlannedCall]:
    """The mix's calls, all to NODE (its CRM kinds pick node 1 or 3; their decisions on a
    true/false node are the same)."""

    def next_call() -> PlannedCall:
        planned = mix.next()
        planned.script.node = NODE
        return planned

    return next_call


def start_peer(name: str, crm_url: str, workdir: Path) -> Server:
    port = free_port()
    proc = Proc(
        name,
        [
            sys.executable,
            "-m",
            f"bench.peers.{PEERS[name]}",
            "--listen",
            f"127.0.0.1:{port}",
            "--crm-url",
            crm_url,
        ],
        dict(os.environ, PYTHONPATH=str(ROOT)),
        workdir / f"{name}.log",
    )
    proc.start()
    try:
        wait_for_line(proc, "ready")
    except BaseException:
        proc.stop(timeout=5)
        raise
    return Server(name, proc, port)


def _verdict(planned: PlannedCall, result: CallResult | BaseException) -> str | None:
    return record(planned, result, 0.0, 0.0).failure


async def _check_calls(server: Server, calls: list[PlannedCall]) -> dict[str, Any]:
    failures: list[str] = []
    exchange: list[str] | None = None
    for planned in calls:
        result: CallResult | BaseException
        try:
            result = await run_call("127.0.0.1", server.port, planned.script, timeout=10)
        except (OSError, TimeoutError) as exc:
            result = exc
        failure = _verdict(planned, result)
        if failure is not None:
            failures.append(failure)
        elif (
            exchange is None
            and isinstance(result, CallResult)
            and result.variables.get(OUTCOME_VARIABLE) == "identified"
            and len(planned.script.entries) == 1
        ):
            exchange = result.commands
    return {"calls": len(calls), "failures": failures, "exchange_identified": exchange}


def check_decisions(server: Server, id_offset: int) -> dict[str, Any]:
    """The fixed set of calls every server must decide correctly before it is timed."""
    next_call = on_node(Mix(CHECK_MIX, seed=7, id_offset=id_offset))
    calls = [next_call() for _ in range(CHECK_CALLS)]
    for index in range(2):
        script = CallScript(node=NODE, entries=[f"2{(id_offset + index) % 10**7:07d}"])
        calls.append(PlannedCall("crm_error", script, CRM_ERROR))
    result: dict[str, Any] = run_fast(_check_calls(server, calls))
    line = f"check {server.name}: {result['calls']} calls, {len(result['failures'])} failures"
    print(line + (f" e.g. {result['failures'][0]}" if result["failures"] else ""), flush=True)
    return result


def measure(
    name: str,
    server: Server,
    crm_pid: int,
    plan: LoadPlan,
    id_offset: int,
) -> dict[str, Any]:
    """One load run against `server`, with its CPU, peak RSS and the machine's other load."""
    watched = {"server": server.pid, "mock-crm": crm_pid}
    reset_peak_rss(server.pid)
    before = {who: cpu_seconds(pid) for who, pid in watched.items()}
    own_before = self_cpu_seconds()
    busy_before = busy_cpu_seconds()
    started = time.monotonic()
    next_call = on_node(Mix(TIMED_MIX, seed=1, id_offset=id_offset))
    caller = agi_caller("127.0.0.1", server.port, timeout=CALL_TIMEOUT)
    report = run_fast(drive(plan, next_call, caller))
    wall = time.monotonic() - started
    cpu: dict[str, float] = {"loadgen": self_cpu_seconds() - own_before}
    for who, pid in watched.items():
        now, then = cpu_seconds(pid), before[who]
        if now is not None and then is not None:
            cpu[who] = now - then
    result: dict[str, Any] = report.to_json(plan, mix="crm_true=5,crm_false=3 on node 1")
    calls = max(int(result["calls"]), 1)
    result["server"] = server.name
    result["cpu_ms_per_call"] = {k: round(v * 1000 / calls, 4) for k, v in sorted(cpu.items())}
    result["server_cpu_share_of_wall"] = round(cpu.get("server", 0.0) / wall, 3)
    result["other_load_cores"] = round(
        max(0.0, busy_cpu_seconds() - busy_before - sum(cpu.values())) / wall, 2
    )
    hwm = status_kib(server.pid, "VmHWM")
    result["server_peak_rss_mib"] = None if hwm is None else round(hwm / 1024, 1)
    result["load_average"] = load_average()
    result["valid"] = result["failures"]["total"] == 0
    lat = result["latency_ms"]
    print(
        f"{name}: {result['identifications_per_s']}/s p50={lat['p50']} p99={lat['p99']} ms "
        f"server_cpu_ms/call={result['cpu_ms_per_call'].get('server')} "
        f"rss={result['server_peak_rss_mib']} MiB failures={result['failures']['total']} "
        f"other_load={result['other_load_cores']}",
        flush=True,
    )
    return result


def _cpu_share(pid: int, seconds: float) -> float | None:
    start, began = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    end = cpu_seconds(pid)
    if start is None or end is None:
        return None
    return round((end - start) / (time.monotonic() - began), 3)


def early_close_probe(server: Server, seconds: float, customer: str) -> dict[str, Any]:
    """One connection closed before the end of the environment block; what it costs after."""
    idle = _cpu_share(server.pid, 1.0)
    closing = CallScript(node=NODE, hangup="before_env_end")
    run_fast(run_call("127.0.0.1", server.port, closing, timeout=2))
    after = _cpu_share(server.pid, seconds)
    identified = Expectation(frozenset({"identified"}), "1,3")
    planned = PlannedCall("crm_true", CallScript(node=NODE, entries=[customer]), identified)
    result: CallResult | BaseException
    try:
        result = run_fast(run_call("127.0.0.1", server.port, planned.script, timeout=3))
    except (OSError, TimeoutError) as exc:
        result = exc
    failure = _verdict(planned, result)
    out = {
        "idle_cpu_share": idle,
        "cpu_share_after_early_close": after,
        "seconds": seconds,
        "next_call_decided": failure is None,
        "next_call_failure": failure,
    }
    print(
        f"early_close_{server.name}: CPU {after} of a core over {seconds:g} s after one early "
        f"close (idle {idle}); next call decided: {failure is None}",
        flush=True,
    )
    return out


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in ("panoramisk", "pystrix", "aiohttp", "requests", "uvloop", "callerid"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=5)


def run_all(params: Params, names: list[str], workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"checks": {}, "throughput": {}, "latency": {}, "early_close": {}}
    offset = 0

    def ids() -> int:
        nonlocal offset
        offset += ID_BLOCK
        return offset

    stack = Stack(
        workdir / "stack",
        amqp_url=None,
        redis_url=None,
        nodes_template=LOADGEN_NODES,
        crm_table=dict(LOADGEN_CRM_TABLE),
        crm_args=["--log-level", "WARNING"],
    )
    try:
        stack.start()
        assert stack.crm is not None
        assert stack.gateway is not None
        crm_url = stack.crm_url + "/identify"
        servers: dict[str, Server] = {}
        procs: list[Proc] = []
        with stopping(procs):
            for name in names:  # the order given: every scenario runs the servers in it
                if name == "ours":
                    servers[name] = Server(name, stack.gateway, stack.agi_address[1])
                else:
                    servers[name] = start_peer(name, crm_url, workdir)
                    procs.append(servers[name].proc)
            timed = []
            for name, server in servers.items():
                check = check_decisions(server, ids())
                out["checks"][name] = check
                if not check["failures"]:
                    timed.append(server)
            closed = LoadPlan(
                duration=params.duration, concurrency=params.concurrency, warmup=params.warmup
            )
            for server in timed:
                out["throughput"][server.name] = measure(
                    f"throughput_{server.name}", server, stack.crm.pid, closed, ids()
                )
            one_by_one = LoadPlan(duration=0, concurrency=1, calls=params.latency_calls)
            for server in timed:
                out["latency"][server.name] = measure(
                    f"latency_{server.name}", server, stack.crm.pid, one_by_one, ids()
                )
            # Last, apart from the timing runs: it may leave a server spinning (panoramisk).
            for name, server in servers.items():
                customer = f"1{ids() % 10**7:07d}"
                out["early_close"][name] = early_close_probe(server, params.probe_seconds, customer)
                if name in PEERS:
                    server.proc.stop(timeout=5)
    finally:
        stack.stop()
    return out


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _ratio(ours: float | None, other: float | None) -> str:
    if not ours or not other:
        return "-"
    return f"{ours / other:.2f}"


def markdown(run: dict[str, Any]) -> str:
    res = run["results"]
    lines = [
        f"# Ours vs the Python FastAGI peers, {run['started']}",
        "",
        f"Command: `{run['command']}`  ",
        f"Machine: {run['cpus']} CPUs, load average before {run['load_before']}, after "
        f"{run['load_after']}. Versions: {json.dumps(run['versions'])}.",
        "",
        "Every server: the same node (LOADGEN_NODES node 1, crm_true_false, 8-digit ids), the "
        "same mock CRM, the same simulated Asterisk 22 (one command at a time) and load "
        "generator; only calls with the right decision and no protocol error count. Latency: "
        "the caller's last digit to OML_IDENT_OUTCOME. CPU: the server process only "
        "(utime+stime per call, warm-up included). RSS: the server's VmHWM.",
        "",
        f"Throughput: {run['params']['concurrency']} calls at once, "
        f"{run['params']['duration']:g} s after {run['params']['warmup']:g} s warm-up.",
        "",
        "| server | calls/s | ours ÷ server | p50 ms | p99 ms | server CPU ms/call | "
        "server ÷ ours CPU | peak RSS MiB | failures | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours_t = res["throughput"].get("ours", {})
    for name, r in res["throughput"].items():
        lat = r["latency_ms"]
        cpu = r["cpu_ms_per_call"].get("server")
        lines.append(
            f"| {name} | {r['identifications_per_s']} | "
            f"{_ratio(ours_t.get('identifications_per_s'), r['identifications_per_s'])} | "
            f"{_cell(lat['p50'])} | {_cell(lat['p99'])} | {_cell(cpu)} | "
            f"{_ratio(cpu, ours_t.get('cpu_ms_per_call', {}).get('server'))} | "
            f"{_cell(r['server_peak_rss_mib'])} | {r['failures']['total']} | "
            f"{r['other_load_cores']} |"
        )
    lines += [
        "",
        f"One call at a time: {run['params']['latency_calls']} calls.",
        "",
        "| server | p50 ms | server ÷ ours p50 | p99 ms | max ms | server CPU ms/call | "
        "peak RSS MiB | failures | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours_l = res["latency"].get("ours", {}).get("latency_ms", {})
    for name, r in res["latency"].items():
        lat = r["latency_ms"]
        lines.append(
            f"| {name} | {_cell(lat['p50'])} | {_ratio(lat['p50'], ours_l.get('p50'))} | "
            f"{_cell(lat['p99'])} | {_cell(lat['max'])} | "
            f"{_cell(r['cpu_ms_per_call'].get('server'))} | "
            f"{_cell(r['server_peak_rss_mib'])} | {r['failures']['total']} | "
            f"{r['other_load_cores']} |"
        )
    lines += [
        "",
        "A peer that closes before the end of the environment block (one such connection), "
        f"then {run['params']['probe_seconds']:g} s of the server's CPU, then one normal call "
        "with a 3 s limit:",
        "",
        "| server | CPU share of a core, idle | after the early close | next call decided |",
        "|---|---|---|---|",
    ]
    for name, p in res["early_close"].items():
        lines.append(
            f"| {name} | {_cell(p['idle_cpu_share'])} | "
            f"{_cell(p['cpu_share_after_early_close'])} | "
            f"{'yes' if p['next_call_decided'] else 'NO: ' + str(p['next_call_failure'])} |"
        )
    lines += ["", "Decision checks before timing (a server with failures is not timed):", ""]
    for name, c in res["checks"].items():
        lines.append(f"- {name}: {c['calls']} calls, {len(c['failures'])} failures")
    lines += ["", "Per-call exchange of an identified call, as the simulated Asterisk read it:"]
    for name, c in res["checks"].items():
        lines += ["", f"{name}:", "", "```"]
        lines += c["exchange_identified"] or ["(none recorded)"]
        lines += ["```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15.0, help="throughput seconds")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--latency-calls", type=int, default=300)
    parser.add_argument("--probe-seconds", type=float, default=3.0)
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"a subset of {','.join(SERVERS)}, in the order each scenario runs them",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(n.strip() for n in args.servers.split(",") if n.strip()))
    unknown = sorted(set(names) - set(SERVERS))
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {','.join(SERVERS)}")
    params = Params(
        args.concurrency, args.duration, args.warmup, args.latency_calls, args.probe_seconds
    )
    raise_fd_limit(params.concurrency + 256)
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    load_before = load_average()
    print(f"bench.peers: load average {load_before} on {os.cpu_count()} CPUs", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="callerid-peers-"))
    # SIGTERM must still stop every process started here, by PID: make it raise.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed = False
    results: dict[str, Any] = {}
    try:
        results = run_all(params, names, workdir)
    except Exception:
        failed = True
        traceback.print_exc()
        print(f"bench.peers: failed; logs in {workdir}", file=sys.stderr)
    run = {
        "started": started,
        "command": " ".join(["python -m bench.peers.run", *(argv or sys.argv[1:])]),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_average(),
        "params": params.__dict__,
        "versions": versions(),
        "results": results,
        "complete": not failed,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"peers-{started}.json").write_text(json.dumps(run, indent=2) + "\n")
    if failed:
        return 1
    table = markdown(run)
    (args.results_dir / "peers-latest.md").write_text(table)
    print(table)
    shutil.rmtree(workdir, ignore_errors=True)
    invalid = [
        f"{kind} {name}"
        for kind in ("throughput", "latency")
        for name, r in results[kind].items()
        if not r["valid"]
    ]
    unchecked = [name for name, c in results["checks"].items() if c["failures"]]
    if invalid or unchecked:
        print(f"bench.peers: failed calls in {invalid}; failed checks {unchecked}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
