"""The benchmark's scenarios: their parameters (full and smoke) and the runner that drives them.

Part of `python -m bench.run` (bench/run.py says what the benchmark does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import pbx_calls, ppc
from bench.measure import (
    busy_cpu_seconds,
    load_average,
    service_pids,
    top_frames,
)
from bench.peers import run as peers
from bench.processes import ROOT, Fleet, Floor, _exited, stack_fleet
from tools import pbx
from tools.loadgen import LOADGEN_CRM_TABLE, LOADGEN_NODES
from tools.stack import Stack, metric_value

ID_BLOCK = 1_000_000  # each scenario's cache-miss ids come from its own block
LIVE_SESSIONS = "callerid_agi_sessions_live"
Arg = str | float | int


@dataclass(frozen=True)
class Params:
    """Sizes of one run: `FULL` for the numbers, `SMOKE` to keep the command working in CI."""

    concurrency: int = 64
    floor_duration: float = 30.0
    miss_duration: float = 60.0
    warmup: float = 2.0
    latency_calls: int = 500
    steady_rate: float = 200.0
    steady_duration: float = 30.0
    hit_duration: float = 20.0
    prewarm_calls: int = 1000  # covers all HIT_POOL ids but ~1 (random picks)
    scaling_duration: float = 15.0
    max_resolvers: int = 3
    # Resolver processes (and floor workers) of the main scenarios: one, on this 2-core box
    # that the gateway, RabbitMQ, Redis, the CRM and the load generator share. The
    # resolvers_1..3 rows show what more processes cost here.
    resolvers: int = 1
    embedded_duration: float = 20.0
    held_calls: int = 5000
    # This box cannot start 5,000 calls within 3 s (~2.5 ms of CPU each, load generator
    # included), so the CRM answers 3 s after the LAST call arrives: latency = ramp + 3 s.
    # Within what one 2-core box identifies per second scaled out (~300 misses/s since one AGI
    # command per round trip), so the 5,000 build up while the CRM holds every answer, rather
    # than queueing in RabbitMQ behind an arrival rate no resolver pool here could follow.
    held_rate: float = 250.0
    held_crm_after_last_ms: float = 3000.0
    ppc_calls: int = 40
    profile_seconds: float = 20.0
    # Ours (embedded) beside the Python FastAGI peers, same node, CRM and load (bench.peers).
    peer_duration: float = 15.0
    peer_latency_calls: int = 300
    peer_probe_seconds: float = 3.0
    # Calls through a real Asterisk, embedded (bench.pbx_calls): the gateway's CPU per call
    # beside Asterisk's. Skipped with a note where no Asterisk can be found.
    pbx_burst: int = 100
    pbx_rounds: int = 2


FULL = Params()
SMOKE = Params(
    concurrency=16,
    floor_duration=1.5,
    miss_duration=2.0,
    warmup=0.3,
    latency_calls=20,
    steady_duration=1.5,
    hit_duration=1.5,
    prewarm_calls=250,
    scaling_duration=1.0,
    max_resolvers=2,
    resolvers=1,
    embedded_duration=1.5,
    held_calls=100,
    held_rate=200.0,
    held_crm_after_last_ms=300.0,
    ppc_calls=3,
    profile_seconds=0.0,
    peer_duration=1.0,
    peer_latency_calls=10,
    peer_probe_seconds=0.5,
    pbx_burst=5,
    pbx_rounds=1,
)


@dataclass
class Runner:
    params: Params
    workdir: Path
    amqp_url: str
    redis_url: str
    profile: bool
    scenarios: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, Any] = field(default_factory=dict)
    pbx: dict[str, Any] = field(default_factory=dict)
    offset: int = 0

    def ids(self) -> int:
        self.offset += ID_BLOCK
        return self.offset

    def load(
        self,
        name: str,
        fleet: Fleet,
        argv: list[str],
        *,
        during: Callable[[Callable[[], bool]], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Run one load process against `fleet`; record its JSON, CPU and peak RSS."""
        out = self.workdir / f"{name}.json"
        fleet.reset_peaks()
        services_before = service_pids()
        log_sizes = fleet.log_sizes()
        before = fleet.cpu()
        busy_before = busy_cpu_seconds()
        started = time.monotonic()
        proc = subprocess.Popen(
            [*argv, "--output", str(out)],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / f"{name}.stderr").open("wb"),
        )
        extra: dict[str, Any] = {}
        try:
            if during is not None:
                extra = during(lambda: _exited(proc.pid))
        except BaseException:
            proc.kill()  # the run is failing or being stopped: do not let the load go on
            raise
        finally:
            # wait4, not wait: the rusage of exactly this child (CPU, peak RSS).
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        after = fleet.cpu()
        result: dict[str, Any] = json.loads(out.read_text())
        count = max(int(result.get("identifications_all", 0)), 1)
        cpu: dict[str, float] = {}
        for proc_name, value in after.items():
            start = before.get(proc_name)
            if value is not None and start is not None:
                cpu[proc_name] = value - start
        cpu["loadgen"] = usage.ru_utime + usage.ru_stime
        result["cpu_ms_per_identification"] = {
            k: round(v * 1000 / count, 4) for k, v in sorted(cpu.items())
        }
        result["cpu_ms_per_identification_total"] = round(
            sum(v for k, v in cpu.items() if k != "loadgen") * 1000 / count, 4
        )
        result["cpu_share_of_wall"] = {k: round(v / wall, 3) for k, v in sorted(cpu.items())}
        # Cores busy with processes this scenario does not watch (other engineers' tests): the
        # figures of a scenario with a high value here are not comparable.
        result["other_load_cores"] = round(
            max(0.0, busy_cpu_seconds() - busy_before - sum(cpu.values())) / wall, 2
        )
        peaks = fleet.peaks_mib()
        peaks["loadgen"] = round(usage.ru_maxrss / 1024, 1)
        result["peak_rss_mib"] = {k: v for k, v in sorted(peaks.items()) if v is not None}
        result["load_average"] = load_average()
        result["pids"] = dict(fleet.pids)
        # Someone else's test restarting the shared broker or Redis spoils the figures.
        restarted = sorted(k for k, v in service_pids().items() if services_before.get(k) != v)
        outages = fleet.outages_since(log_sizes)
        if restarted or outages:
            result["disturbed"] = (
                f"shared services restarted: {restarted}; broker outage lines logged: {outages}"
            )
        result.update(extra)
        self.scenarios[name] = result
        print(_one_line(name, result), flush=True)
        return result

    def loadgen(self, stack: Stack, *args: str | float | int) -> list[str]:
        host, port = stack.agi_address
        return [
            sys.executable,
            "-m",
            "tools.loadgen",
            "--host",
            host,
            "--port",
            str(port),
            # Every call checked against what the bench's nodes make of its CRM table.
            "--expect",
            "bench",
            *(str(a) for a in args),
        ]

    def floor_client(self, floor: Floor, *args: str | float | int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.floor",
            "client",
            "--port",
            str(floor.port),
            *(str(a) for a in args),
        ]

    def stack(self, name: str, **kwargs: Any) -> Stack:
        kwargs.setdefault("amqp_url", self.amqp_url)
        kwargs.setdefault("redis_url", self.redis_url)
        return Stack(
            workdir=self.workdir / name,
            nodes_template=LOADGEN_NODES,
            crm_table=dict(LOADGEN_CRM_TABLE),
            crm_args=["--log-level", "WARNING"],
            **kwargs,
        )

    def closed_loop(
        self,
        name: str,
        fleet: Fleet,
        stack: Stack,
        mix: str,
        duration: float,
        *,
        during: Callable[[Callable[[], bool]], dict[str, Any]] | None = None,
    ) -> None:
        """`concurrency` calls at a time for `duration` s (misses get ids never used before)."""
        p = self.params
        fresh: tuple[Arg, ...] = () if mix == "hit" else ("--id-offset", self.ids())
        argv = self.loadgen(
            stack,
            *("--concurrency", p.concurrency, "--warmup", p.warmup, "--duration", duration),
            *("--mix", mix, *fresh),
        )
        self.load(name, fleet, argv, during=during)

    def one_at_a_time(self, name: str, fleet: Fleet, stack: Stack) -> None:
        """`latency_calls` cache misses, each placed when the last one has its decision."""
        argv = self.loadgen(
            stack,
            *("--concurrency", 1, "--duration", 0, "--calls", self.params.latency_calls),
            *("--mix", "miss", "--id-offset", self.ids()),
        )
        self.load(name, fleet, argv)

    def prewarm(self, name: str, fleet: Fleet, stack: Stack) -> None:
        """Fill the cache with the hit pool, so that the hit run after it only hits."""
        argv = self.loadgen(
            stack,
            *("--concurrency", 8, "--duration", 0, "--calls", self.params.prewarm_calls),
            *("--mix", "hit"),
        )
        self.load(name, fleet, argv)

    def run_all(self) -> None:
        p = self.params
        with running(self.stack("rabbitmq", resolvers=p.resolvers)) as stack:
            assert stack.crm is not None
            fleet = stack_fleet(stack)
            with running(
                Floor(
                    self.workdir / "floor",
                    self.amqp_url,
                    self.redis_url,
                    stack.crm_url + "/identify",
                    workers=p.resolvers,
                )
            ) as floor:
                # Each product figure right after its floor counterpart: this VM's speed
                # drifts within a run, and a ratio of two runs seconds apart drifts least.
                ffleet = floor.fleet(stack.crm.pid)
                closed: tuple[Arg, ...] = ("--concurrency", p.concurrency, "--warmup", p.warmup)
                self.load(
                    "floor_throughput",
                    ffleet,
                    self.floor_client(
                        floor, *closed, "--duration", p.floor_duration, "--id-offset", self.ids()
                    ),
                )
                self.closed_loop("miss_throughput", fleet, stack, "miss", p.miss_duration)
                self.load(
                    "floor_latency",
                    ffleet,
                    self.floor_client(
                        floor,
                        *("--concurrency", 1, "--duration", 0, "--calls", p.latency_calls),
                        *("--id-offset", self.ids()),
                    ),
                )
                # After the miss run, as in service: the gateway has learnt that this node's
                # callers are not in the cache and no longer reads it first.
                self.one_at_a_time("latency_one_at_a_time", fleet, stack)
                self.load(
                    "floor_steady_200",
                    ffleet,
                    self.floor_client(
                        floor,
                        *("--rate", p.steady_rate, "--duration", p.steady_duration),
                        *("--id-offset", self.ids()),
                    ),
                )
                self.steady("steady_200", fleet, stack)
            profiler = self.profiler(stack, p.profile_seconds)
            if profiler is not None:
                # Apart from the measured run: py-spy takes CPU from the 2 cores it samples.
                seconds = p.profile_seconds + p.warmup + 3
                self.closed_loop("miss_profiled", fleet, stack, "miss", seconds, during=profiler)
            self.prewarm("hit_prewarm", fleet, stack)
            self.closed_loop("hit_throughput", fleet, stack, "hit", p.hit_duration)
            self.scaling(stack)
            self.ppc(stack)
        self.without_gateway_cache()
        with running(self.stack("embedded", amqp_url=None, redis_url=None)) as stack:
            fleet = stack_fleet(stack)
            self.closed_loop("embedded_throughput", fleet, stack, "miss", p.embedded_duration)
            # Repeat callers, embedded: the gateway answers them from its in-process cache.
            self.prewarm("embedded_hit_prewarm", fleet, stack)
            self.closed_loop("embedded_hit_throughput", fleet, stack, "hit", p.embedded_duration)
        self.held()
        self.run_peers()
        self.run_pbx()

    def steady(self, name: str, fleet: Fleet, stack: Stack) -> None:
        """An open loop of `steady_rate` calls/s of the realistic mix (the floor's beside it)."""
        p = self.params
        argv = self.loadgen(
            stack,
            *("--rate", p.steady_rate, "--duration", p.steady_duration),
            *("--mix", "realistic", "--id-offset", self.ids()),
        )
        self.load(name, fleet, argv)

    def run_peers(self) -> None:
        """Ours (embedded) and the FastAGI peers in turn, each checked before it is timed."""
        p = self.params
        params = peers.Params(
            concurrency=p.concurrency,
            duration=p.peer_duration,
            warmup=p.warmup,
            latency_calls=p.peer_latency_calls,
            probe_seconds=p.peer_probe_seconds,
        )
        # Each timing run prints its own progress line (bench.peers.run.measure).
        self.peers = peers.run_all(params, list(peers.SERVERS), self.workdir / "peers")

    def run_pbx(self) -> None:
        """Embedded calls through a real Asterisk: the gateway's CPU per call beside its."""
        p = self.params
        binary = pbx.find_asterisk()
        if binary is None:
            self.pbx = {"skipped": pbx.asterisk_unavailable_reason()}
            print(f"pbx: skipped: {self.pbx['skipped']}", flush=True)
            return
        params = pbx_calls.Params(
            warmup=2,
            sequential=3,
            burst=p.pbx_burst,
            rounds=p.pbx_rounds,
            floor_sequential=0,
            floor_burst=p.pbx_burst,
            modes=("embedded",),
        )
        workdir = self.workdir / "pbx"
        with pbx.PrivateAsterisk(binary, workdir / "asterisk", verbose=0) as asterisk:
            bench = pbx_calls.Bench(asterisk, params)
            bench.floor()
            bench.mode("embedded", workdir, self.amqp_url, self.redis_url)
        self.pbx = {
            "scenarios": bench.scenarios,
            "evaluation": pbx_calls.evaluate(bench.scenarios, params),
        }
        print(f"pbx: {self.pbx['evaluation']}", flush=True)

    def without_gateway_cache(self) -> None:
        """A/B of the gateway's cache read (CALLERID_GATEWAY_CACHE=false): what it costs a
        miss, and what it saves a hit, against the default runs above."""
        p = self.params
        off = {"CALLERID_GATEWAY_CACHE": "false"}
        with running(
            self.stack("rabbitmq-no-gateway-cache", resolvers=p.resolvers, extra_env=off)
        ) as stack:
            fleet = stack_fleet(stack)
            self.closed_loop("miss_no_gateway_cache", fleet, stack, "miss", p.hit_duration)
            self.one_at_a_time("latency_one_at_a_time_no_gateway_cache", fleet, stack)
            self.prewarm("hit_no_gateway_cache_prewarm", fleet, stack)
            self.closed_loop("hit_no_gateway_cache", fleet, stack, "hit", p.hit_duration)

    def scaling(self, stack: Stack) -> None:
        """Cache-miss throughput with 1..max_resolvers resolver processes."""
        p = self.params
        for proc in stack.resolver_procs[1:]:
            proc.stop()
        for count in range(1, p.max_resolvers + 1):
            while sum(proc.alive for proc in stack.resolver_procs) < count:
                stack.add_resolver()
            self.closed_loop(
                f"resolvers_{count}", stack_fleet(stack), stack, "miss", p.scaling_duration
            )

    def held(self) -> None:
        """Many calls waiting on a slow CRM at once: all must be decided, gateway RSS bounded."""
        p = self.params
        calls = p.held_calls
        resolvers = 2
        env = {
            "CALLERID_MAX_CALLS": str(calls + 1000),
            "CALLERID_PREFETCH": str(calls // resolvers + 100),
            "CALLERID_CRM_MAX_CONNECTIONS": str(calls // resolvers + 100),
        }
        crm_ms = calls / p.held_rate * 1000 + p.held_crm_after_last_ms
        crm_timeout = min(crm_ms / 1000 + 5, 30.0)
        with running(
            self.stack(
                "held",
                resolvers=resolvers,
                crm_latency_ms=crm_ms,
                crm_timeout=crm_timeout,
                extra_env=env,
            )
        ) as stack:
            assert stack.gateway is not None
            gateway = stack.gateway

            def sample_live(load_done: Callable[[], bool]) -> dict[str, Any]:
                peak = 0.0
                while not load_done():
                    time.sleep(0.25)
                    with contextlib.suppress(OSError):
                        peak = max(peak, metric_value(gateway.metrics(), LIVE_SESSIONS))
                return {"gateway_peak_live_sessions": peak}

            self.load(
                "held_5000",
                stack_fleet(stack),
                self.loadgen(
                    stack,
                    "--rate",
                    p.held_rate,
                    "--calls",
                    calls,
                    "--duration",
                    0,
                    "--mix",
                    "miss",
                    "--timeout",
                    str(crm_timeout + 20),
                    "--max-in-flight",
                    str(calls + 10),
                    "--id-offset",
                    str(self.ids()),
                ),
                during=sample_live,
            )
            self.scenarios["held_5000"]["crm_latency_ms"] = round(crm_ms, 1)

    def ppc(self, stack: Stack) -> None:
        started = time.monotonic()
        result = ppc.run(self.params.ppc_calls, self.redis_url, stack.crm_url + "/identify")
        result["wall_s"] = round(time.monotonic() - started, 2)
        self.scenarios["process_per_call"] = result
        print(f"process_per_call: {result}", flush=True)

    def profiler(
        self, stack: Stack, seconds: float
    ) -> Callable[[Callable[[], bool]], dict[str, Any]] | None:
        """py-spy on the gateway and one resolver while the load runs (if asked and found)."""
        py_spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        if not self.profile or seconds <= 0 or py_spy is None:
            return None
        assert stack.gateway is not None
        targets = {"gateway": stack.gateway.pid, "resolver-0": stack.resolver_procs[0].pid}

        def run(_load_done: Callable[[], bool]) -> dict[str, Any]:
            time.sleep(self.params.warmup + 1)
            procs = {
                name: subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(seconds)),
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--rate",
                        "200",
                        "--output",
                        str(self.workdir / f"profile-{name}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, pid in targets.items()
            }
            profiles: dict[str, Any] = {}
            for name, proc in procs.items():
                try:
                    proc.wait(seconds + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                profiles[name] = top_frames(self.workdir / f"profile-{name}.txt")
            return {"profile": profiles}

        return run


@contextlib.contextmanager
def running(thing: Any) -> Iterator[Any]:
    """Start a Stack or a Floor; stop it by PID whatever happens."""
    try:
        yield thing.start()
    finally:
        thing.stop()


def _one_line(name: str, result: dict[str, Any]) -> str:
    lat = result["latency_ms"]
    return (
        f"{name}: {result['identifications_per_s']}/s p50={lat['p50']} p90={lat['p90']} "
        f"p99={lat['p99']} ms failures={result['failures']['total']} "
        f"cpu_ms/id={result['cpu_ms_per_identification_total']} "
        f"other_load={result['other_load_cores']}"
        + (f" DISTURBED ({result['disturbed']})" if "disturbed" in result else "")
    )
