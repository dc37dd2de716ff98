"""The benchmark's processes: the fleet it measures and the floor's bare FastAGI server and worker.

Part of `python -m bench.run` (bench/run.py says what the benchmark does).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import (
    cpu_seconds,
    reset_peak_rss,
    service_pids,
    status_kib,
)
from tools.stack import Proc, Stack, free_port

ROOT = Path(__file__).resolve().parent.parent

# What our processes log when the shared broker is stopped under them (someone's fault test).
OUTAGE_MARKERS = (b"CONNECTION_FORCED", b"Connection refused")


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
