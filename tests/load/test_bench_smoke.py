"""The benchmark's smoke form (what CI runs of `make bench`): it completes, measures, cleans up.

The figures of a seconds-long run on a shared machine say nothing; what this checks is that
the command still starts everything, runs every scenario without a failed call, writes its
results, and leaves no process of its own behind. How long it takes is not checked either (about
45 s on a quiet 2-core box, far more on a loaded one); the time limits below only stop a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import LOCAL_AMQP, LOCAL_REDIS, find_service

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {
    "floor_throughput",
    "floor_latency",
    "miss_throughput",
    "latency_one_at_a_time",
    "steady_200",
    "floor_steady_200",
    "hit_prewarm",
    "hit_throughput",
    "resolvers_1",
    "resolvers_2",
    "miss_no_gateway_cache",
    "hit_no_gateway_cache",
    "embedded_throughput",
    "embedded_hit_throughput",
    "held_5000",
}
SHARED_SERVICES = {"rabbitmq", "redis"}


MARKERS = ("agi-gateway", "crm-resolver", "callerid-mock-crm", "bench.floor", "bench.peers")
TARGET_KEYS = {"name", "value", "target", "met"}


def _ours_and_alive(pid: int) -> bool:
    """Still running (not a zombie) and one of the bench's programs: a reused PID is not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return state != "Z" and any(marker in cmdline for marker in MARKERS)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_smoke_run_completes_and_cleans_up(tmp_path: Path) -> None:
    """`python -m bench.run --smoke` exits 0, with every scenario and no failure."""
    env = dict(
        os.environ,
        CALLERID_AMQP_URL=find_service("RabbitMQ", "CALLERID_TEST_AMQP_URL", LOCAL_AMQP, 5672),
        CALLERID_REDIS_URL=find_service("Redis", "CALLERID_TEST_REDIS_URL", LOCAL_REDIS, 6379),
    )
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [p for p in tmp_path.glob("*-smoke.json") if p.name != "latest-smoke.json"]
    assert len(results) == 1
    run = json.loads(results[0].read_text())
    assert run == json.loads((tmp_path / "latest-smoke.json").read_text())
    assert run["complete"]
    # Issue 17's targets, every one present with its value and bound (a smoke run judges none).
    found = run["evaluation"]["targets"]
    assert len(found) == 9
    assert all(set(entry) == TARGET_KEYS and entry["met"] is None for entry in found)
    assert all(entry["value"] is not None for entry in found if "Asterisk" not in entry["name"])
    # The peers ran beside ours, each checked before it was timed.
    assert set(run["peers"]["throughput"]) == {"ours", "panoramisk", "pystrix"}
    assert all(not check["failures"] for check in run["peers"]["checks"].values())
    # Through a real Asterisk where there is one (CI builds it; elsewhere it may be skipped).
    assert run["pbx"].get("evaluation") or run["pbx"].get("skipped")
    if os.environ.get("CI") == "true":
        assert run["pbx"]["evaluation"]["gateway_per_asterisk_cpu"] is not None
    scenarios = run["scenarios"]
    assert set(scenarios) >= SCENARIOS
    server_cpu = []
    for name in SCENARIOS:
        assert scenarios[name]["failures"]["total"] == 0, (name, scenarios[name])
        assert scenarios[name]["identifications_all"] > 0, name
        process = "gateway" if "floor" not in name else "floor-server"
        cpu = scenarios[name]["cpu_ms_per_identification"][process]
        assert cpu >= 0, name
        server_cpu.append(cpu)
    # CPU is read in 10 ms clock ticks: one seconds-long smoke scenario may read 0, all of
    # them reading 0 means the measurement is broken.
    assert sum(server_cpu) > 0
    assert scenarios["latency_one_at_a_time"]["latency_ms"]["count"] > 0
    assert scenarios["held_5000"]["peak_rss_mib"]["gateway"] > 0
    ppc = scenarios["process_per_call"]
    assert ppc["good"] == ppc["calls"]
    assert ppc["cpu_ms_per_call"] > 0
    assert "ratios" in run["evaluation"]
    assert (tmp_path / "latest-smoke.md").read_text().startswith("# Benchmark")
    for name, result in scenarios.items():
        for proc, pid in result.get("pids", {}).items():
            if proc not in SHARED_SERVICES:
                assert not _ours_and_alive(pid), f"{proc} (pid {pid}) of {name} is still running"
