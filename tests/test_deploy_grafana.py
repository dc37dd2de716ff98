"""The provisioned Grafana dashboard: identity, variables, the panels issue 4 asks for, and
provisioning files that point where docker-compose mounts them."""

from __future__ import annotations

from typing import Any

import yaml

from tests import deploy_helpers as h

PROVISIONING = h.DEPLOY / "grafana" / "provisioning"


def _panel(title: str) -> dict[str, Any]:
    matches = [p for p in h.dashboard_panels() if p["title"] == title]
    assert len(matches) == 1, f"expected one panel titled {title!r}"
    return matches[0]


def _metrics(panel: dict[str, Any]) -> set[str]:
    return {
        s.name
        for target in panel["targets"]
        for s in h.selectors(h.grafana_to_promql(target["expr"]))
    }


def test_dashboard_has_a_stable_uid_and_title() -> None:
    """The uid is fixed, so links and provisioning updates keep pointing at the same board."""
    dashboard = h.load_dashboard()
    assert dashboard["uid"] == "callerid-overview"
    assert dashboard.get("id") is None, "a provisioned dashboard carries no database id"
    assert dashboard["title"]


def test_dashboard_has_datasource_and_node_variables() -> None:
    """A Prometheus datasource variable and a multi-value `node` variable from the calls."""
    variables = {v["name"]: v for v in h.load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    node = variables["node"]
    assert node["type"] == "query"
    query = node["query"]["query"] if isinstance(node["query"], dict) else node["query"]
    assert query == "label_values(callerid_calls_total, node)"
    assert node["multi"] is True
    assert node["includeAll"] is True


def test_every_panel_queries_through_the_datasource_variable() -> None:
    """No panel or target is pinned to one datasource uid; all use ${datasource}."""
    for panel in h.dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_callerid_panels_filter_on_the_node_variable() -> None:
    """Every per-node callerid series in the dashboard honours the node selection."""
    for panel in h.dashboard_panels():
        for target in panel.get("targets", []):
            for selector in h.selectors(h.grafana_to_promql(target["expr"])):
                has_node = any(label == "node" for label, _, _ in selector.matchers)
                per_node = selector.name.startswith("callerid_") and any(
                    "node" in s.labels for s in h.exported_series() if s.name == selector.name
                )
                if per_node and selector.name != "callerid_late_replies_total":
                    assert has_node, f"{panel['title']}: {selector.name} ignores $node"


def test_dashboard_answers_the_operator_questions() -> None:
    """The panels of issue 4 exist and read the metrics that answer them."""
    expected = {
        "Calls per outcome per node": {"callerid_calls_total"},
        "Identification rate per node": {"callerid_calls_total"},
        "CRM latency p50 / p95 / p99 per node": {"callerid_crm_request_duration_seconds_bucket"},
        "Cache hit ratio": {
            "callerid_calls_total",
            "callerid_cache_lookups_total",
            "callerid_gateway_cache_lookups_total",
        },
        "CRM errors per node": {"callerid_crm_requests_total"},
        "CRM circuit state": {"callerid_crm_circuit_state"},
        "Expired requests and late replies": {
            "callerid_expired_requests_total",
            "callerid_late_replies_total",
        },
        "Live calls": {"callerid_agi_sessions_live"},
        "Request queue depth": {"rabbitmq_queue_messages_ready"},
        "Resolver consumers and in-flight": {"rabbitmq_queue_consumers"},
    }
    for title, metrics in expected.items():
        assert metrics <= _metrics(_panel(title)), title
    latency = [t["expr"] for t in _panel("CRM latency p50 / p95 / p99 per node")["targets"]]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}," in e for e in latency), quantile
    identification = _panel("Identification rate per node")["targets"][0]["expr"]
    assert 'outcome=~"identified|crm_destination"' in identification


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    """Panel ids are unique and no two panels share a grid cell."""
    panels = h.dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps at {(x, y)}"
                cells.add((x, y))


def test_provisioning_points_at_the_mounted_dashboards() -> None:
    """The dashboard provider reads the directory compose mounts the dashboard JSON into,
    and the datasource points at the compose Prometheus."""
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "callerid.yml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    compose = yaml.safe_load(h.COMPOSE_FILE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{entry['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
