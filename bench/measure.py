"""Per-process measurements for the benchmark: CPU, RSS, load, and a profile's top frames.

Part of `python -m bench.run` (bench/run.py says what the benchmark does).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")


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
