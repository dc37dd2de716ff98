"""Ratios to the floor, the targets each met or missed, and the Markdown report.

Part of `python -m bench.run` (bench/run.py says what the benchmark does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


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
