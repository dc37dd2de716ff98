"""A/B of the embedded gateway, interleaved in one run: `python -m bench.ab --base REV` (~2 min).

The question it answers: did a change make a cache miss cheaper? Two embedded gateways run side by
side on loopback, each with its own mock CRM (the same LOADGEN_CRM_TABLE): "A" is the code of
`--base` (a git revision, checked out with `git worktree` into a temporary directory and put
first on the gateway's PYTHONPATH, so the installed entry point imports it instead of the
checkout it was installed from), "B" is the checkout this module is in, as it is, uncommitted
changes included (first on its PYTHONPATH in the same way). Rounds alternate A, B, A,
B, ... with the load of `bench.peers.run`'s throughput runs (the same node, mix and load
generator: 64 calls at once, closed loop, new ids every round, every decision checked), because
this machine's speed drifts within minutes: a ratio of neighbouring rounds holds where absolute
figures do not.

Per round: calls/s, p50/p99, the gateway's CPU per call (utime+stime from /proc, warm-up
included) and the mock CRM's. The summary gives the median of each side and B/A. A round with
failures (a wrong decision, a protocol error) is reported and left out of the medians.

Writes nothing under bench/results unless `--out` names a file (JSON of every round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.peers.run import Server, check_decisions, measure
from tools.loadgen import LOADGEN_CRM_TABLE, LOADGEN_NODES, LoadPlan, raise_fd_limit
from tools.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
ID_BLOCK = 1_000_000


def worktree(base: str, into: Path) -> Path:
    """`base` checked out (detached) under `into`; the caller removes it with `drop_worktree`."""
    path = into / "base"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), base],
        check=True,
    )
    return path


def drop_worktree(path: Path) -> None:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
    )


def start_side(name: str, workdir: Path, code: Path) -> Stack:
    """An embedded gateway and its mock CRM running the packages of the checkout `code`."""
    # First on the path: the installed entry point would otherwise import the checkout the
    # virtualenv was installed from, which need not be this one.
    extra = {"PYTHONPATH": os.pathsep.join([str(code / "services"), str(code)])}
    stack = Stack(
        workdir / name,
        amqp_url=None,
        redis_url=None,
        nodes_template=LOADGEN_NODES,
        crm_table=dict(LOADGEN_CRM_TABLE),
        crm_args=["--log-level", "WARNING"],
        extra_env=extra,
    )
    return stack.start()


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in ("A", "B"):
        valid = [r for r in rounds if r["side"] == side and r["valid"]]
        if not valid:
            out[side] = None
            continue
        out[side] = {
            "rounds": len(valid),
            "calls_per_s": statistics.median(r["identifications_per_s"] for r in valid),
            "gateway_cpu_ms_per_call": statistics.median(
                r["cpu_ms_per_call"]["server"] for r in valid
            ),
            "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in valid),
            "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in valid),
        }
    if out.get("A") and out.get("B"):
        a, b = out["A"], out["B"]
        out["B/A"] = {key: round(b[key] / a[key], 3) for key in a if key != "rounds" and a[key]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--base", default="HEAD", help="git revision for side A (default HEAD)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per side")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write every round as JSON here")
    args = parser.parse_args(argv)
    raise_fd_limit(4 * 1024)
    with tempfile.TemporaryDirectory(prefix="callerid-ab-") as tmp:
        workdir = Path(tmp)
        code = worktree(args.base, workdir)
        sides: dict[str, Stack] = {}
        rounds: list[dict[str, Any]] = []
        try:
            sides["A"] = start_side("A", workdir, code)
            sides["B"] = start_side("B", workdir, ROOT)
            offset = 0
            servers = {}
            for name, stack in sides.items():
                assert stack.gateway is not None
                assert stack.crm is not None
                servers[name] = Server(name, stack.gateway, stack.agi_address[1])
                offset += ID_BLOCK
                check = check_decisions(servers[name], offset)
                if check["failures"]:
                    print(f"side {name} decides wrongly: {check['failures'][:3]}", flush=True)
                    return 1
            plan = LoadPlan(
                duration=args.duration, concurrency=args.concurrency, warmup=args.warmup
            )
            for index in range(args.rounds * 2):
                name = "AB"[index % 2]
                stack = sides[name]
                assert stack.crm is not None
                offset += ID_BLOCK
                result = measure(f"{name}#{index // 2}", servers[name], stack.crm.pid, plan, offset)
                rounds.append({"side": name, **result})
        finally:
            for stack in sides.values():
                stack.stop()
            drop_worktree(code)
    result = {"base": args.base, "argv": sys.argv[1:], "summary": summary(rounds)}
    print(json.dumps(result["summary"], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps({**result, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
