"""Run the process-per-call baseline (`ppc_agi.py`) as Asterisk would: one process per call.

Each call forks and execs the script, writes the AGI environment to its stdin and answers its
commands with `tools.asterisk_sim.SimulatedChannel` (res_agi's replies), then reaps it with
`os.wait4`, whose rusage gives that one process's CPU time and peak RSS. Calls run one after
another: the figure wanted is the cost per call, not a throughput.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools.asterisk_sim import OUTCOME_VARIABLE, CallScript, SimulatedChannel, environment_writes

SCRIPT = Path(__file__).with_name("ppc_agi.py")


def one_call(python: str, redis_url: str, crm_url: str, customer_id: str) -> dict[str, Any]:
    """Place one call; its CPU seconds, peak RSS (KiB), wall time and outcome."""
    script = CallScript(entries=[customer_id])
    channel = SimulatedChannel(script)
    started = time.monotonic()
    proc = subprocess.Popen(
        [python, str(SCRIPT), redis_url, crm_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write(b"".join(environment_writes(script, "127.0.0.1", 0)))
        proc.stdin.flush()
        for raw in proc.stdout:
            proc.stdin.write(channel.handle(raw.rstrip(b"\n")).encode() + b"\n")
            proc.stdin.flush()
    finally:
        proc.stdin.close()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_kib": usage.ru_maxrss,
        "wall_s": time.monotonic() - started,
        "outcome": channel.variables.get(OUTCOME_VARIABLE),
        "exit": proc.returncode,
    }


def run(calls: int, redis_url: str, crm_url: str, python: str = sys.executable) -> dict[str, Any]:
    """`calls` sequential calls with distinct ids (cache misses, so each one POSTs)."""
    results = [one_call(python, redis_url, crm_url, f"1{index:07d}") for index in range(calls)]
    cpu = [r["cpu_s"] for r in results]
    good = sum(r["outcome"] == "identified" and r["exit"] == 0 for r in results)
    return {
        "calls": calls,
        "good": good,
        "cpu_ms_per_call": round(statistics.mean(cpu) * 1000, 2),
        "cpu_ms_per_call_p50": round(statistics.median(cpu) * 1000, 2),
        "peak_rss_mib_per_call": round(max(r["rss_kib"] for r in results) / 1024, 1),
        "wall_ms_per_call_p50": round(statistics.median(r["wall_s"] for r in results) * 1000, 1),
    }
