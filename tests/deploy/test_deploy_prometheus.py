"""Prometheus side of operations: alert rules, their unit tests, the scrape config, the
exposition format of both services, and the PromQL of the dashboard and the alerts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests import deploy_helpers as h

REQUIRED_ALERTS = {
    "CalleridCrmErrorRate",
    "CalleridCrmLatencyHigh",
    "CalleridFailoverShareHigh",
    "CalleridNoResolversConsuming",
    "CalleridRequestsExpiring",
    "CalleridGatewayDown",
}


def test_alert_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts deploy/prometheus/alerts.yml."""
    h.assert_tool_ok(h.run_tool(h.promtool(), "check", "rules", h.ALERTS))


def test_alert_unit_tests_pass() -> None:
    """`promtool test rules` passes every case in deploy/prometheus/alerts_test.yml."""
    result = h.run_tool(h.promtool(), "test", "rules", h.ALERTS_TEST)
    h.assert_tool_ok(result)
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_fail_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The alert unit tests can fail: expecting silence where an alert fires is reported."""
    data = yaml.safe_load(h.ALERTS_TEST.read_text())
    data["rule_files"] = [str(h.ALERTS)]
    for test in data["tests"]:
        for case in test["alert_rule_test"]:
            case["exp_alerts"] = []
    broken = tmp_path / "alerts_test.yml"
    broken.write_text(yaml.safe_dump(data))
    result = h.run_tool(h.promtool(), "test", "rules", broken)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert rule has a unit-test case where it fires and one where it stays quiet."""
    data = yaml.safe_load(h.ALERTS_TEST.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in data["tests"]:
        for case in test["alert_rule_test"]:
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in h.load_alert_rules() if "alert" in rule}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def test_required_alerts_exist_with_severity_summary_and_description() -> None:
    """The six alerts of issue 4 exist; every alert has severity, summary and description."""
    rules = [rule for rule in h.load_alert_rules() if "alert" in rule]
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_failover_alert_uses_the_failover_source() -> None:
    """The failover-share alert counts calls with source="failover", not an outcome."""
    (rule,) = [r for r in h.load_alert_rules() if r.get("alert") == "CalleridFailoverShareHigh"]
    assert ("source", "=", "failover") in {m for s in h.selectors(rule["expr"]) for m in s.matchers}


def test_prometheus_config_is_valid() -> None:
    """`promtool check config` accepts the compose stack's prometheus.yml and its rules."""
    h.assert_tool_ok(h.run_tool(h.promtool(), "check", "config", h.PROMETHEUS_CONFIG))


def test_prometheus_scrapes_gateway_resolvers_and_rabbitmq() -> None:
    """Scrape jobs: gateway, resolvers by DNS (so --scale works), RabbitMQ per-object on 15692.

    The job names are the ones the alert rules select on.
    """
    config = yaml.safe_load(h.PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["callerid-gateway"]["static_configs"][0]["targets"] == ["gateway:9100"]
    resolver_sd = jobs["callerid-resolver"]["dns_sd_configs"][0]
    assert resolver_sd["names"] == ["resolver"]
    assert resolver_sd["port"] == 9101
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object"
    assert config["rule_files"] == ["alerts.yml"]
    used_jobs = {
        value
        for expression in h.alert_expressions()
        for selector in h.selectors(expression.promql)
        for label, _, value in selector.matchers
        if label == "job"
    }
    assert used_jobs <= set(jobs)


@pytest.mark.parametrize(
    ("service", "registry"),
    [("gateway", h.gateway_registry), ("resolver", h.resolver_registry)],
)
def test_exposition_passes_promtool_check_metrics(service: str, registry: object) -> None:
    """`promtool check metrics` finds nothing to lint in either service's metric set."""
    assert callable(registry)
    h.promtool_check_metrics(h.exposition(registry()))


def test_promtool_check_metrics_helper_rejects_bad_exposition() -> None:
    """The helper the live /metrics test uses fails on a metric without help text."""
    with pytest.raises(AssertionError, match="no help text"):
        h.promtool_check_metrics(b"# TYPE callerid_bad counter\ncallerid_bad_total 1\n")


def test_every_promql_expression_parses_with_promtool(tmp_path: Path) -> None:
    """Every dashboard and alert expression parses as PromQL (as recording rules, promtool)."""
    expressions = h.all_expressions()
    rules = [
        {"record": f"callerid_check:expr_{i}", "expr": e.promql} for i, e in enumerate(expressions)
    ]
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    result = h.run_tool(h.promtool(), "check", "rules", path)
    h.assert_tool_ok(result)
    assert f"{len(rules)} rules found" in result.stdout


def test_promtool_parse_check_rejects_broken_promql(tmp_path: Path) -> None:
    """The parse check can fail: an unbalanced expression is rejected by promtool."""
    path = tmp_path / "broken.yml"
    rule = {"record": "callerid_check:broken", "expr": "sum(rate(callerid_calls_total[5m])"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": [rule]}]}))
    assert h.run_tool(h.promtool(), "check", "rules", path).returncode != 0


def test_every_metric_used_is_exported() -> None:
    """Each metric in the dashboard and alerts is exported by a service or by RabbitMQ."""
    exported = h.exported_names() | h.RABBITMQ_QUEUE_METRICS | {"up"}
    missing = {
        f"{e.where}: {s.name}"
        for e in h.all_expressions()
        for s in h.selectors(e.promql)
        if s.name not in exported
    }
    assert missing == set()


def test_metric_check_catches_an_unknown_name() -> None:
    """The exported-name check can fail: a misspelt metric is not in the exported set."""
    (selector,) = h.selectors("rate(callerid_call_total[5m])")
    assert selector.name not in h.exported_names()


def test_label_matchers_name_real_labels_and_values() -> None:
    """Label matchers in the dashboard and alerts use labels the metric has, and an equality
    matcher on a callerid metric names a value that is exported (so no panel stays empty)."""
    series = h.exported_series()
    labels_of: dict[str, set[str]] = {}
    values_of: dict[tuple[str, str], set[str]] = {}
    for s in series:
        labels_of.setdefault(s.name, set()).update(s.labels)
        for label, value in s.labels.items():
            values_of.setdefault((s.name, label), set()).add(value)
    problems = []
    for expression in h.all_expressions():
        for selector in h.selectors(expression.promql):
            allowed: frozenset[str] | set[str]
            if selector.name in h.RABBITMQ_QUEUE_METRICS:
                allowed = h.RABBITMQ_QUEUE_LABELS
            elif selector.name == "up":
                allowed = h.TARGET_LABELS
            else:
                allowed = labels_of[selector.name] | h.TARGET_LABELS
            for label, op, value in selector.matchers:
                if label not in allowed:
                    problems.append(f"{expression.where}: {selector.name} has no {label}")
                elif op == "=" and value not in values_of.get((selector.name, label), {value}):
                    problems.append(f"{expression.where}: {label}={value!r} never exported")
    assert problems == []


def test_queue_metrics_select_the_request_queue() -> None:
    """Every RabbitMQ queue metric used is filtered to the callerid request queue."""
    for expression in h.all_expressions():
        for selector in h.selectors(expression.promql):
            if selector.name in h.RABBITMQ_QUEUE_METRICS:
                assert ("queue", "=", h.REQUEST_QUEUE) in selector.matchers, expression.where
