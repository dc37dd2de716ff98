"""The end-to-end benchmark: `python -m bench.run` (full, ~6 min) or `--smoke` (CI, ~45 s).

One command starts what it needs on this machine's RabbitMQ and Redis (`tools.stack.Stack`:
mock CRM, resolvers, gateway as real processes on loopback; the floor's processes), runs the
scenarios with `tools.loadgen` as a separate process, stops every process it started by PID
(also on failure), and writes `bench/results/<timestamp>.json` and `latest.md`.

Measured per scenario and per process (ours, the load generator, and the shared RabbitMQ and
Redis servers, which are only read): CPU from /proc/<pid>/stat utime+stime deltas, divided by
the identifications made; peak RSS from VmHWM (reset at the scenario's start where the kernel
allows it). Every figure is also given as a ratio to the floor (`bench.floor`) measured in the
same run, because on a shared 2-core box absolute numbers move with whatever else runs. The
floor is the least exchange a real Asterisk accepts for a correct node (a bare FastAGI server:
timeouts, Read(), one variable read, the RPC to a bare worker over the same RabbitMQ, Redis and
CRM, one decision MSet; one command per round trip), driven by the same simulated Asterisk and
load generator as the product, so both sides of the floor cost what they cost for the product.

Scenarios: floor throughput, then cache-miss throughput over RabbitMQ; floor one-at-a-time
latency, then the product's one call at a time (each pair back to back, as the VM drifts); a
steady 200 calls/s of the realistic mix; cache-hit throughput; 1, 2 and 3 resolvers; misses and
hits again with the gateway's cache read off (A/B); embedded mode, misses and repeat callers;
5,000 calls held at once with the CRM answering after 3 s; the process-per-call AGI baseline
(`bench.ppc`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import ppc
from tools.loadgen import LOADGEN_CRM_TABLE, LOADGEN_NODES, raise_fd_limit
from tools.stack import Proc, Stack, free_port, metric_value, url_answers

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
ID_BLOCK = 1_000_000  # each scenario's cache-miss ids come from its own block
LIVE_SESSIONS = "callerid_agi_sessions_live"
Arg = str | float | int
# What our processes log when the shared broker is stopped under them (someone's fault test).
OUTAGE_MARKERS = (b"CONNECTION_FORCED", b"Connection refused")


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
)


# --- per-process measurements ------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, in seconds (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, own processes); silently kept otherwise."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def service_pids() -> dict[str, int]:
    """The local RabbitMQ and Redis servers, to report their CPU share (never touched)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            comm = (entry / "comm").read_text().strip()
            name = {"beam.smp": "rabbitmq", "redis-server": "redis"}.get(comm)
            if name and name not in found:
                found[name] = int(entry.name)
    return found


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- processes ---------------------------------------------------------------------------


@dataclass
class Fleet:
    """Everything one scenario watches: process name → PID."""

    pids: dict[str, int] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)  # scanned for broker outages

    def log_sizes(self) -> dict[Path, int]:
        return {path: path.stat().st_size if path.exists() else 0 for path in self.logs}

    def outages_since(self, sizes: dict[Path, int]) -> int:
        """Lines telling that the broker went away, written since `sizes` was taken."""
        count = 0
        for path, size in sizes.items():
            with contextlib.suppress(OSError), path.open("rb") as log:
                log.seek(size)
                count += sum(log.read().count(marker) for marker in OUTAGE_MARKERS)
        return count

    def cpu(self) -> dict[str, float | None]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def reset_peaks(self) -> None:
        for pid in self.pids.values():
            reset_peak_rss(pid)

    def peaks_mib(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            kib = status_kib(pid, "VmHWM")
            out[name] = None if kib is None else round(kib / 1024, 1)
        return out


def stack_fleet(stack: Stack) -> Fleet:
    fleet = Fleet()
    assert stack.gateway is not None
    assert stack.crm is not None
    fleet.pids["gateway"] = stack.gateway.pid
    for proc in stack.resolver_procs:
        if proc.alive:
            fleet.pids[proc.name] = proc.pid
    fleet.pids["mock-crm"] = stack.crm.pid
    fleet.pids.update(service_pids())
    fleet.logs = [stack.gateway.log_path, *(p.log_path for p in stack.resolver_procs)]
    return fleet


def wait_for_line(proc: Proc, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            if text in proc.log_path.read_text(errors="replace"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready within {timeout:g} s:\n{proc.tail()}")


def _exited(pid: int) -> bool:
    """Whether a child has exited, without reaping it (its rusage is read by wait4 later)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


@dataclass
class Floor:
    """The floor's processes: one server (the gateway's place) and N workers."""

    workdir: Path
    amqp_url: str
    redis_url: str
    crm_url: str
    workers: int
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)

    def start(self) -> Floor:
        self.workdir.mkdir(parents=True, exist_ok=True)
        queue = f"bench-floor-{uuid.uuid4().hex[:10]}"
        base = [sys.executable, "-m", "bench.floor"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        server = Proc(
            "floor-server",
            [
                *base,
                "server",
                f"--listen=127.0.0.1:{self.port}",
                f"--queue={queue}",
                f"--amqp-url={self.amqp_url}",
            ],
            env,
            self.workdir / "floor-server.log",
        )
        self.procs.append(server)
        server.start()
        wait_for_line(server, "ready")
        for index in range(self.workers):
            worker = Proc(
                f"floor-worker-{index}",
                [
                    *base,
                    "worker",
                    f"--amqp-url={self.amqp_url}",
                    f"--queue={queue}",
                    f"--redis-url={self.redis_url}",
                    f"--crm-url={self.crm_url}",
                ],
                env,
                self.workdir / f"floor-worker-{index}.log",
            )
            self.procs.append(worker)
            worker.start()
            wait_for_line(worker, "ready")
        return self

    def fleet(self, crm_pid: int) -> Fleet:
        fleet = Fleet({p.name: p.pid for p in self.procs}, [p.log_path for p in self.procs])
        fleet.pids["mock-crm"] = crm_pid
        fleet.pids.update(service_pids())
        return fleet

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=5)


# --- scenarios ---------------------------------------------------------------------------


@dataclass
class Runner:
    params: Params
    workdir: Path
    amqp_url: str
    redis_url: str
    profile: bool
    scenarios: dict[str, Any] = field(default_factory=dict)
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
            profiler = self.profiler(stack, p.profile_seconds)
            if profiler is not None:
                # Apart from the measured run: py-spy takes CPU from the 2 cores it samples.
                seconds = p.profile_seconds + p.warmup + 3
                self.closed_loop("miss_profiled", fleet, stack, "miss", seconds, during=profiler)
            self.load(
                "steady_200",
                fleet,
                self.loadgen(
                    stack,
                    *("--rate", p.steady_rate, "--duration", p.steady_duration),
                    *("--mix", "realistic", "--id-offset", self.ids()),
                ),
            )
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


def top_frames(path: Path, limit: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of the top functions in a py-spy raw (collapsed) profile."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {"error": "no profile (py-spy failed: ptrace not permitted?)"}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (", 1)[0] + " " + f.rsplit("/", 1)[-1] for f in stack.split(";")]
        leaf = frames[-1] if frames else "?"
        own[leaf] = own.get(leaf, 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return {"error": "empty profile"}

    def top(table: dict[str, int]) -> list[list[Any]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:limit]
        return [[name, round(100 * count / total, 1)] for name, count in ranked]

    return {"samples": total, "self_pct": top(own), "inclusive_pct": top(inclusive)}


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


# --- targets and report ------------------------------------------------------------------


def _ratio(value: float | None, floor: float | None) -> float | None:
    if value is None or not floor:
        return None
    return round(value / floor, 3)


def capacity(result: dict[str, Any]) -> float | None:
    """Identifications/s this box could do if every core were ours: cores / CPU per id.

    Counts every process's CPU, the load generator's too (it shares the cores). Unlike the
    measured rate it barely moves when someone else's tests take a core during the run.
    """
    cpu = result.get("cpu_ms_per_identification")
    if not cpu:
        return None
    total = sum(cpu.values())
    return round((os.cpu_count() or 1) * 1000 / total, 1) if total else None


def evaluate(scenarios: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """Ratios to the floor and the issue's targets, each met or missed."""
    get = scenarios.get
    floor_t = get("floor_throughput", {}).get("identifications_per_s")
    floor_p50 = get("floor_latency", {}).get("latency_ms", {}).get("p50")
    floor_cpu = get("floor_throughput", {}).get("cpu_ms_per_identification_total")
    floor_cap = capacity(get("floor_throughput", {}))
    ratios: dict[str, Any] = {}
    for name, result in scenarios.items():
        if name.startswith("floor") or "latency_ms" not in result:
            continue
        ratios[name] = {
            "throughput_x_floor": _ratio(result["identifications_per_s"], floor_t),
            "p50_x_floor": _ratio(result["latency_ms"]["p50"], floor_p50),
            "cpu_per_id_x_floor": _ratio(result["cpu_ms_per_identification_total"], floor_cpu),
            "capacity_x_floor": _ratio(capacity(result), floor_cap),
        }
    miss = get("miss_throughput", {})
    one = get("latency_one_at_a_time", {}).get("latency_ms", {})
    steady = get("steady_200", {}).get("latency_ms", {})
    hit = get("hit_throughput", {})
    emb = get("embedded_throughput", {})
    held = get("held_5000", {})
    ppc_result = get("process_per_call", {})
    miss_t = miss.get("identifications_per_s")
    targets: dict[str, dict[str, Any]] = {}

    def target(name: str, value: Any, met: bool | None) -> None:
        targets[name] = {"value": value, "met": met}

    def ok(value: Any, test: Callable[[Any], bool]) -> bool | None:
        return None if value is None else bool(test(value))

    r = _ratio(miss_t, floor_t)
    target(
        "miss throughput >= 0.8 x floor, no failure",
        {
            "per_s": miss_t,
            "x_floor": r,
            "failures": miss.get("failures", {}).get("total"),
            "other_load_cores": miss.get("other_load_cores"),
            "capacity_x_floor (noise-robust estimate)": _ratio(capacity(miss), floor_cap),
        },
        ok(r, lambda x: x >= 0.8 and miss["failures"]["total"] == 0),
    )
    p50 = one.get("p50")
    target(
        "one at a time p50 <= 3 ms and <= 1.5 x floor p50",
        {"p50_ms": p50, "x_floor": _ratio(p50, floor_p50)},
        ok(p50, lambda x: x <= 3 and x <= 1.5 * (floor_p50 or 0)),
    )
    target("steady 200/s p99 <= 25 ms", steady.get("p99"), ok(steady.get("p99"), lambda x: x <= 25))
    hit_t = hit.get("identifications_per_s")
    target(
        "cache hits >= 1.5 x miss throughput",
        {"per_s": hit_t, "x_miss": _ratio(hit_t, miss_t), "x_floor": _ratio(hit_t, floor_t)},
        ok(_ratio(hit_t, miss_t), lambda x: x >= 1.5),
    )
    emb_t = emb.get("identifications_per_s")
    target("embedded >= 2500/s (cache misses)", emb_t, ok(emb_t, lambda x: x >= 2500))
    emb_hit_t = get("embedded_hit_throughput", {}).get("identifications_per_s")
    target("embedded, repeat callers (report)", emb_hit_t, None)
    gw_cache: dict[str, Any] = {}
    for kind in ("miss", "hit"):
        on = get(f"{kind}_throughput", {}).get("identifications_per_s")
        off_t = get(f"{kind}_no_gateway_cache", {}).get("identifications_per_s")
        gw_cache[kind] = {"on_per_s": on, "off_per_s": off_t, "on_x_off": _ratio(on, off_t)}
    one_off = get("latency_one_at_a_time_no_gateway_cache", {}).get("latency_ms", {}).get("p50")
    gw_cache["one_at_a_time_p50_ms"] = {"on": p50, "off": one_off}
    target("gateway cache read on vs off (report)", gw_cache, None)
    gw_rss = held.get("peak_rss_mib", {}).get("gateway")
    decided = held.get("identifications_all")
    target(
        "5000 held: all decided correctly, gateway RSS <= 250 MB",
        {
            "calls": held.get("calls"),
            "decided_correctly": decided,
            "peak_live": held.get("gateway_peak_live_sessions"),
            "gateway_rss_mib": gw_rss,
        },
        ok(gw_rss, lambda x: x <= 250 * 1e6 / 2**20 and held["failures"]["total"] == 0),
    )
    # The script replaces the gateway and the resolvers; RabbitMQ, Redis and the CRM are
    # extra for the product, so the ratio is also given against everything.
    product_all = miss.get("cpu_ms_per_identification_total")
    product_services = sum(
        v
        for k, v in miss.get("cpu_ms_per_identification", {}).items()
        if k == "gateway" or k.startswith("resolver")
    )
    ppc_cpu = ppc_result.get("cpu_ms_per_call")
    target(
        "process-per-call CPU ratio (report)",
        {
            "ppc_cpu_ms_per_call": ppc_cpu,
            "ppc_peak_rss_mib_per_call": ppc_result.get("peak_rss_mib_per_call"),
            "product_gateway_resolvers_cpu_ms": round(product_services, 4),
            "ratio_vs_gateway_resolvers": _ratio(ppc_cpu, product_services or None),
            "product_all_processes_cpu_ms": product_all,
            "ratio_vs_all_processes": _ratio(ppc_cpu, product_all),
        },
        None,
    )
    scaling = {
        name: scenarios[name]["identifications_per_s"]
        for name in sorted(scenarios)
        if name.startswith("resolvers_")
    }
    target("throughput by resolver count (report)", scaling, None)
    if smoke:  # tiny runs: the figures say nothing; only that the bench works
        for entry in targets.values():
            entry["met"] = None
    return {"ratios": ratios, "targets": targets}


def markdown(run: dict[str, Any]) -> str:
    scenarios = run["scenarios"]
    lines = [
        f"# Benchmark {run['started']} ({'smoke' if run['smoke'] else 'full'})",
        "",
        f"Command: `{run['command']}`  ",
        f"Machine: {run['cpus']} CPUs, load average before {run['load_before']}, "
        f"after {run['load_after']}; RabbitMQ mode with {run['params']['resolvers']} resolvers.",
        "",
        "| scenario | ids/s | x floor | p50 ms | p90 ms | p99 ms | p50 x floor | "
        "CPU ms/id (all) | CPU x floor | capacity est. /s | x floor | failures | "
        "other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = run["evaluation"]["ratios"]
    for name, result in scenarios.items():
        if "latency_ms" not in result:
            continue
        lat = result["latency_ms"]
        ratio = ratios.get(name, {})
        lines.append(
            f"| {name} | {result['identifications_per_s']} | "
            f"{ratio.get('throughput_x_floor', '-')} | {lat['p50']} | {lat['p90']} | "
            f"{lat['p99']} | {ratio.get('p50_x_floor', '-')} | "
            f"{result['cpu_ms_per_identification_total']} | "
            f"{ratio.get('cpu_per_id_x_floor', '-')} | {capacity(result)} | "
            f"{ratio.get('capacity_x_floor', '-')} | {result['failures']['total']}"
            + (" (disturbed: shared service restarted)" if "disturbed" in result else "")
            + f" | {result.get('other_load_cores', '-')} |"
        )
    lines += [
        "",
        "Latency: the caller's last digit to OML_IDENT_OUTCOME, the floor's too (same"
        " simulated Asterisk). CPU ms/id (all): every watched process but the load generator,"
        " RabbitMQ and Redis included. Capacity est.: CPU cores / CPU per id with the load"
        " generator included, the rate if the box were ours alone. Other load: cores busy with"
        " processes this run does not watch (others' tests); a row with more than ~0.2 is"
        " not comparable with the floor's.",
        "",
        "CPU ms per identification, per process:",
        "",
    ]
    names = sorted({n for r in scenarios.values() for n in r.get("cpu_ms_per_identification", {})})
    lines.append("| scenario | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for name, result in scenarios.items():
        cpu = result.get("cpu_ms_per_identification")
        if cpu:
            lines.append(f"| {name} | " + " | ".join(str(cpu.get(n, "")) for n in names) + " |")
    lines += ["", "Peak RSS MiB (VmHWM), per process:", ""]
    lines.append("| scenario | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for name, result in scenarios.items():
        rss = result.get("peak_rss_mib")
        if rss:
            lines.append(f"| {name} | " + " | ".join(str(rss.get(n, "")) for n in names) + " |")
    ppc_result = scenarios.get("process_per_call")
    if ppc_result:
        lines += ["", f"Process-per-call AGI baseline: {ppc_result}"]
    lines += ["", "Targets:", ""]
    for name, entry in run["evaluation"]["targets"].items():
        mark = {True: "met", False: "MISSED", None: "-"}[entry["met"]]
        lines.append(f"- {mark}: {name}: {json.dumps(entry['value'])}")
    for name, result in scenarios.items():
        for who, prof in result.get("profile", {}).items():
            if "self_pct" not in prof:
                continue
            lines += ["", f"Profile ({name}, {who}, {prof['samples']} samples), self %:", ""]
            lines += [f"- {pct}% {frame}" for frame, pct in prof["self_pct"][:10]]
            lines += ["", "inclusive %:", ""]
            lines += [f"- {pct}% {frame}" for frame, pct in prof["inclusive_pct"][:12]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("BENCH_SMOKE", "") not in ("", "0"),
        help="seconds-long run that only proves the bench works (also BENCH_SMOKE=1)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--resolvers", type=int, help="resolver processes for the main scenarios")
    parser.add_argument("--miss-duration", type=float, help="seconds of cache-miss load")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy gateway and resolver in an extra miss run"
    )
    args = parser.parse_args(argv)
    params = SMOKE if args.smoke else FULL
    if args.resolvers is not None:
        params = Params(**{**params.__dict__, "resolvers": args.resolvers})
    if args.miss_duration is not None:
        params = Params(**{**params.__dict__, "miss_duration": args.miss_duration})
    amqp_url = os.environ.get("CALLERID_AMQP_URL") or DEFAULT_AMQP
    redis_url = os.environ.get("CALLERID_REDIS_URL") or DEFAULT_REDIS
    for url, port, what in ((amqp_url, 5672, "RabbitMQ"), (redis_url, 6379, "Redis")):
        if not url_answers(url, port):
            print(f"bench: {what} is not reachable at {url}: run `make services`", file=sys.stderr)
            return 2
    # One socket per held call, in the load generator and in the gateway (inherited).
    raise_fd_limit(2 * params.held_calls + 1024)
    started = time.strftime("%Y%m%dT%H%M%S")
    load_before = load_average()
    print(f"bench: load average {load_before} on {os.cpu_count()} CPUs", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="callerid-bench-"))
    runner = Runner(params, workdir, amqp_url, redis_url, profile=args.profile)
    # SIGTERM (CI's timeout, an operator) must still stop every process by PID: make it raise.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed = False
    try:
        runner.run_all()
    except Exception:
        failed = True
        traceback.print_exc()
        print(f"bench: failed; logs in {workdir}", file=sys.stderr)
    run = {
        "started": started,
        "smoke": args.smoke,
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_average(),
        "params": params.__dict__,
        "scenarios": runner.scenarios,
        "evaluation": evaluate(runner.scenarios, args.smoke),
        "complete": not failed,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{started}{'-smoke' if args.smoke else ''}.json").write_text(
        json.dumps(run, indent=2) + "\n"
    )
    table = markdown(run)
    (args.results_dir / ("latest-smoke.md" if args.smoke else "latest.md")).write_text(table)
    print(table)
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
