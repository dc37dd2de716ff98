"""The end-to-end benchmark: `python -m bench.run` (full, ~6 min) or `--smoke` (CI, ~45 s).

One command starts what it needs on this machine's RabbitMQ and Redis (`tools.stack.Stack`:
mock CRM, resolvers, gateway as real processes on loopback; the floor's processes), runs the
scenarios with `tools.loadgen` as a separate process, stops every process it started by PID
(also on failure), and writes `bench/results/<timestamp>.json`, the same as `latest.json`, and
`latest.md` (bench/report.py: the targets of issue 17 first, each a ratio measured in this run).

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
latency, then the product's one call at a time, the floor at a steady 200 calls/s, then the
product at 200 calls/s of the realistic mix (each pair back to back, as the VM drifts); cache-
hit throughput; 1, 2 and 3 resolvers; misses and hits again with the gateway's cache read off
(A/B); embedded mode, misses and repeat callers; 5,000 calls held at once with the CRM answering
after 3 s; the process-per-call AGI baseline (`bench.ppc`); ours (embedded) beside the
panoramisk and pystrix nodes (`bench.peers.run`); embedded calls through a real Asterisk
(`bench.pbx_calls`), where one is found.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.measure import (
    load_average,
)
from bench.processes import ROOT
from bench.report import evaluate, markdown
from bench.scenarios import (
    FULL,
    SMOKE,
    Params,
    Runner,
)
from tools.loadgen import raise_fd_limit
from tools.stack import url_answers

RESULTS = ROOT / "bench" / "results"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


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
        "peers": runner.peers,
        "pbx": runner.pbx,
        "evaluation": evaluate(runner.scenarios, args.smoke, runner.peers, runner.pbx),
        "complete": not failed,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{started}{'-smoke' if args.smoke else ''}.json").write_text(
        json.dumps(run, indent=2) + "\n"
    )
    latest = "latest-smoke" if args.smoke else "latest"
    (args.results_dir / f"{latest}.json").write_text(json.dumps(run, indent=2) + "\n")
    table = markdown(run)
    (args.results_dir / f"{latest}.md").write_text(table)
    print(table)
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
