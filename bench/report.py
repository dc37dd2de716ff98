"""Ratios to the floor, the targets each met or missed, and the Markdown report.

Part of `python -m bench.run` (bench/run.py says what the benchmark does).
"""

from __future__ import annotations

import json
import os
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


# Where a product process and a floor process do the same job: CPU per id side by side.
ROLES = {
    "FastAGI server": ("floor-server", "gateway"),
    "worker / resolver": ("floor-worker-0", "resolver-0"),
    "mock CRM": ("mock-crm", "mock-crm"),
    "RabbitMQ": ("rabbitmq", "rabbitmq"),
    "Redis": ("redis", "redis"),
    "load generator": ("loadgen", "loadgen"),
}


Target = dict[str, Any]


def _get(tree: dict[str, Any] | None, *path: str) -> Any:
    """tree[path[0]][path[1]]..., or None where any step is missing."""
    node: Any = tree
    for step in path:
        if not isinstance(node, dict):
            return None
        node = node.get(step)
    return node


def _target(name: str, value: float | None, op: str, bound: float, valid: bool = True) -> Target:
    met = None if value is None else valid and (value >= bound if op == ">=" else value <= bound)
    return {"name": name, "value": value, "target": f"{op} {bound:g}", "met": met}


def targets(
    scenarios: dict[str, Any], peers: dict[str, Any] | None, pbx: dict[str, Any] | None
) -> list[Target]:
    """Issue 17's targets, each a ratio of two figures measured in this run."""

    def per_s(name: str) -> float | None:
        value = _get(scenarios, name, "identifications_per_s")
        return float(value) if value is not None else None

    def clean(*names: str) -> bool:
        return all(_get(scenarios, n, "failures", "total") == 0 for n in names)

    floor_t = per_s("floor_throughput")
    miss_t, hit_t, emb_t = (
        per_s("miss_throughput"),
        per_s("hit_throughput"),
        per_s("embedded_throughput"),
    )
    found: list[Target] = []
    # Ours against the best peer, in the peers' own runs (same node, CRM, client, seconds).
    through = _get(peers, "throughput") or {}
    ours = through.get("ours")
    rivals = {k: v for k, v in through.items() if k != "ours" and v.get("valid")}
    best = max(rivals.values(), key=lambda r: r["identifications_per_s"], default=None)
    ours_t = _get(ours, "identifications_per_s")
    best_t = _get(best, "identifications_per_s")
    ours_cpu = _get(ours, "cpu_ms_per_call", "server")
    best_cpu = _get(best, "cpu_ms_per_call", "server")
    ours_valid = bool(ours and ours.get("valid"))
    found.append(
        _target(
            f"embedded misses / best peer's throughput ({best['server'] if best else '-'})",
            _ratio(ours_t, best_t),
            ">=",
            1.5,
            ours_valid,
        )
    )
    found.append(
        _target(
            f"embedded CPU per call / best peer's ({best['server'] if best else '-'})",
            _ratio(ours_cpu, best_cpu),
            "<=",
            0.6,
            ours_valid,
        )
    )
    found.append(
        _target(
            "scaled-out misses / floor throughput",
            _ratio(miss_t, floor_t),
            ">=",
            0.85,
            clean("miss_throughput"),
        )
    )
    found.append(
        _target(
            "cache hits / cache misses", _ratio(hit_t, miss_t), ">=", 2.0, clean("hit_throughput")
        )
    )
    found.append(
        _target(
            "embedded misses / floor throughput",
            _ratio(emb_t, floor_t),
            ">=",
            1.5,
            clean("embedded_throughput"),
        )
    )
    found.append(
        _target(
            "one call at a time: p50 / floor p50",
            _ratio(
                _get(scenarios, "latency_one_at_a_time", "latency_ms", "p50"),
                _get(scenarios, "floor_latency", "latency_ms", "p50"),
            ),
            "<=",
            1.3,
            clean("latency_one_at_a_time"),
        )
    )
    found.append(
        _target(
            "steady 200 calls/s: p99 / floor p99 at the same rate",
            _ratio(
                _get(scenarios, "steady_200", "latency_ms", "p99"),
                _get(scenarios, "floor_steady_200", "latency_ms", "p99"),
            ),
            "<=",
            3.0,
            clean("steady_200"),
        )
    )
    held_rss = _get(scenarios, "held_5000", "peak_rss_mib", "gateway")
    found.append(
        _target(
            "held calls, all decided correctly: gateway peak RSS (MB)",
            None if held_rss is None else round(held_rss * 2**20 / 1e6, 1),
            "<=",
            150,
            clean("held_5000"),
        )
    )
    pbx_eval = _get(pbx, "evaluation") or {}
    pbx_valid = pbx_eval.get("met") is not None
    found.append(
        _target(
            "real Asterisk, embedded: gateway CPU per call / Asterisk's",
            pbx_eval.get("gateway_per_asterisk_cpu"),
            "<=",
            0.10,
            pbx_valid,
        )
    )
    return found


def where_time_goes(scenarios: dict[str, Any]) -> dict[str, Any]:
    """CPU ms per identification of each process on the path, beside the floor's in its role
    (cache misses over RabbitMQ against the floor's throughput run)."""
    product = _get(scenarios, "miss_throughput", "cpu_ms_per_identification") or {}
    floor = _get(scenarios, "floor_throughput", "cpu_ms_per_identification") or {}
    rows: dict[str, Any] = {}
    for role, (floor_name, product_name) in ROLES.items():
        ours, theirs = product.get(product_name), floor.get(floor_name)
        rows[role] = {"floor": theirs, "product": ours, "x_floor": _ratio(ours, theirs)}
    return rows


def evaluate(
    scenarios: dict[str, Any],
    smoke: bool,
    peers: dict[str, Any] | None = None,
    pbx: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ratios to the floor, issue 17's targets (each met or missed), and the report-only
    figures (gateway cache on/off, process-per-call, scaling, where the time goes)."""
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
    found = targets(scenarios, peers, pbx)
    if smoke:  # tiny runs: the figures say nothing; only that the bench works
        for entry in found:
            entry["met"] = None
    return {"ratios": ratios, "targets": found, "reports": reports(scenarios)}


def reports(scenarios: dict[str, Any]) -> dict[str, Any]:
    """Figures reported beside the targets, with no bound of their own."""
    get = scenarios.get
    miss = get("miss_throughput", {})
    gw_cache: dict[str, Any] = {}
    for kind in ("miss", "hit"):
        on = get(f"{kind}_throughput", {}).get("identifications_per_s")
        off_t = get(f"{kind}_no_gateway_cache", {}).get("identifications_per_s")
        gw_cache[kind] = {"on_per_s": on, "off_per_s": off_t, "on_x_off": _ratio(on, off_t)}
    gw_cache["one_at_a_time_p50_ms"] = {
        "on": _get(scenarios, "latency_one_at_a_time", "latency_ms", "p50"),
        "off": _get(scenarios, "latency_one_at_a_time_no_gateway_cache", "latency_ms", "p50"),
    }
    # The script replaces the gateway and the resolvers; RabbitMQ, Redis and the CRM are
    # extra for the product, so the ratio is also given against everything.
    product_all = miss.get("cpu_ms_per_identification_total")
    product_services = sum(
        v
        for k, v in miss.get("cpu_ms_per_identification", {}).items()
        if k == "gateway" or k.startswith("resolver")
    )
    ppc_result = get("process_per_call", {})
    ppc_cpu = ppc_result.get("cpu_ms_per_call")
    return {
        "embedded, repeat callers (ids/s)": _get(
            scenarios, "embedded_hit_throughput", "identifications_per_s"
        ),
        "gateway cache read on vs off": gw_cache,
        "process-per-call CPU ratio": {
            "ppc_cpu_ms_per_call": ppc_cpu,
            "ppc_peak_rss_mib_per_call": ppc_result.get("peak_rss_mib_per_call"),
            "product_gateway_resolvers_cpu_ms": round(product_services, 4),
            "ratio_vs_gateway_resolvers": _ratio(ppc_cpu, product_services or None),
            "product_all_processes_cpu_ms": product_all,
            "ratio_vs_all_processes": _ratio(ppc_cpu, product_all),
        },
        "throughput by resolver count": {
            name: scenarios[name]["identifications_per_s"]
            for name in sorted(scenarios)
            if name.startswith("resolvers_")
        },
        "where the time goes (CPU ms per id, misses vs the floor)": where_time_goes(scenarios),
    }


def targets_table(found: list[Target]) -> list[str]:
    lines = ["| target | value | bound | met |", "|---|---|---|---|"]
    for entry in found:
        mark = {True: "met", False: "MISSED", None: "-"}[entry["met"]]
        lines.append(f"| {entry['name']} | {entry['value']} | {entry['target']} | {mark} |")
    return lines


def peers_table(peers: dict[str, Any]) -> list[str]:
    """Ours (embedded) beside the FastAGI peers: closed-loop throughput and one at a time."""
    if not peers:
        return []
    lines = [
        "",
        "FastAGI peers (same node, mock CRM, simulated Asterisk and load generator; a server "
        "is timed only when every checked call got the right decision):",
        "",
        "| server | run | calls/s | p50 ms | p99 ms | server CPU ms/call | peak RSS MiB | "
        "failures | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("throughput", "latency"):
        for name, r in peers.get(kind, {}).items():
            lines.append(
                f"| {name} | {kind} | {r['identifications_per_s']} | {r['latency_ms']['p50']} | "
                f"{r['latency_ms']['p99']} | {r['cpu_ms_per_call'].get('server')} | "
                f"{r['server_peak_rss_mib']} | {r['failures']['total']} | "
                f"{r['other_load_cores']} |"
            )
    for name, probe in peers.get("early_close", {}).items():
        lines.append(
            f"- {name}, a peer closing before the end of the environment: CPU share after it "
            f"{probe['cpu_share_after_early_close']}, next call decided: "
            f"{probe['next_call_decided']}"
        )
    return lines


def markdown(run: dict[str, Any]) -> str:
    scenarios = run["scenarios"]
    lines = [
        f"# Benchmark {run['started']} ({'smoke' if run['smoke'] else 'full'})",
        "",
        f"Command: `{run['command']}`  ",
        f"Machine: {run['cpus']} CPUs, load average before {run['load_before']}, "
        f"after {run['load_after']}; RabbitMQ mode with {run['params']['resolvers']} resolvers.",
        "",
        *targets_table(run["evaluation"]["targets"]),
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
    lines += peers_table(run.get("peers") or {})
    pbx_eval = _get(run.get("pbx"), "evaluation")
    lines += ["", f"Real Asterisk, embedded: {json.dumps(pbx_eval or run.get('pbx'))}"]
    lines += ["", "Reported (no bound):", ""]
    for name, value in run["evaluation"]["reports"].items():
        lines.append(f"- {name}: {json.dumps(value)}")
    for name, result in scenarios.items():
        for who, prof in result.get("profile", {}).items():
            if "self_pct" not in prof:
                continue
            lines += ["", f"Profile ({name}, {who}, {prof['samples']} samples), self %:", ""]
            lines += [f"- {pct}% {frame}" for frame, pct in prof["self_pct"][:10]]
            lines += ["", "inclusive %:", ""]
            lines += [f"- {pct}% {frame}" for frame, pct in prof["inclusive_pct"][:12]]
    return "\n".join(lines) + "\n"
