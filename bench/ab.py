"""A/B of the gateway, interleaved in one run: `python -m bench.ab --base REV` (~2 min).

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

With `--scaled-out` each side is a gateway over the local RabbitMQ with one resolver and the
Redis answer cache (every id new: misses); `--concurrency 1` makes the rounds one call at a
time, for latency.

Per round: calls/s, p50/p99, the gateway's CPU per call (utime+stime from /proc, warm-up
included), the mock CRM's, and scaled out the resolver's. The summary gives the median of
each side and B/A. A round with failures (a wrong decision, a protocol error) is reported
and left out of the medians.

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

from bench.measure import cpu_seconds
from bench.peers.run import Server, check_decisions, measure
from tools.loadgen import LOADGEN_CRM_TABLE, LOADGEN_NODES, LoadPlan, raise_fd_limit
from tools.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("CALLERID_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("CALLERID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
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


def start_side(name: str, workdir: Path, code: Path, scaled_out: bool) -> Stack:
    """A gateway (embedded, or over RabbitMQ with one resolver and the Redis cache) and its
    mock CRM, running the packages of the checkout `code`."""
    # First on the path: the installed entry point would otherwise import the checkout the
    # virtualenv was installed from, which need not be this one.
    extra = {"PYTHONPATH": os.pathsep.join([str(code / "services"), str(code)])}
    stack = Stack(
        workdir / name,
        amqp_url=AMQP_URL if scaled_out else None,
        redis_url=REDIS_URL if scaled_out else None,
        resolvers=1,
        nodes_template=LOADGEN_NODES,
        crm_table=dict(LOADGEN_CRM_TABLE),
        crm_args=["--log-level", "WARNING"],
        extra_env=extra,
    )
    return stack.start()


def measure_side(name: str, stack: Stack, plan: LoadPlan, offset: int) -> dict[str, Any]:
    """`bench.peers.run.measure` on the side's gateway, plus its resolver's CPU per call."""
    assert stack.gateway is not None
    assert stack.crm is not None
    server = Server(name, stack.gateway, stack.agi_address[1])
    resolvers = [proc.pid for proc in stack.resolver_procs]
    before = [cpu_seconds(pid) or 0.0 for pid in resolvers]
    result = measure(name, server, stack.crm.pid, plan, offset)
    if resolvers:
        spent = sum((cpu_seconds(pid) or 0.0) - b for pid, b in zip(resolvers, before, strict=True))
        calls = max(int(result["calls"]), 1)
        result["cpu_ms_per_call"]["resolver"] = round(spent * 1000 / calls, 4)
    return result


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
            **(
                {
                    "resolver_cpu_ms_per_call": statistics.median(
                        r["cpu_ms_per_call"]["resolver"] for r in valid
                    )
                }
                if "resolver" in valid[0]["cpu_ms_per_call"]
                else {}
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
    parser.add_argument("--concurrency", type=int, default=64, help="calls at once (1: latency)")
    parser.add_argument(
        "--scaled-out",
        action="store_true",
        help=f"gateway over RabbitMQ ({AMQP_URL}) with one resolver and Redis ({REDIS_URL})",
    )
    parser.add_argument("--out", type=Path, help="write every round as JSON here")
    args = parser.parse_args(argv)
    raise_fd_limit(4 * 1024)
    with tempfile.TemporaryDirectory(prefix="callerid-ab-") as tmp:
        workdir = Path(tmp)
        code = worktree(args.base, workdir)
        sides: dict[str, Stack] = {}
        rounds: list[dict[str, Any]] = []
        try:
            sides["A"] = start_side("A", workdir, code, args.scaled_out)
            sides["B"] = start_side("B", workdir, ROOT, args.scaled_out)
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
                offset += ID_BLOCK
                result = measure_side(f"{name}#{index // 2}", sides[name], plan, offset)
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
