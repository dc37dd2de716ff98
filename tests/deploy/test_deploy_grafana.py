"""The provisioned Grafana dashboard: identity, variables, the panels issue 4 asks for,
provisioning files that point where docker-compose mounts them, and every dashboard
round-tripped through grafana-foundation-sdk's typed models (no unknown or misspelt key).

How the SDK is used (grafana_foundation_sdk, the build for Grafana 11.2, the compose file's
Grafana): `cog.plugins.register_default_plugins()` registers the typed panel options, field
configs and query models; `models.dashboard.Dashboard.from_json(dict)` builds the typed
dashboard, keeping only the keys its models declare (an unknown key is dropped silently, a bad
enum value is kept as given); `json.dumps(model, cls=cog.encoder.JSONEncoder)` writes it back,
with defaults filled in. A key of the file that does not come back is one the models do not
know; a value of an enum-typed attribute that is none of the enum's values is checked here.
"""

from __future__ import annotations

import copy
import enum
import fnmatch
import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import deploy_helpers as h

PROVISIONING = h.DEPLOY / "grafana" / "provisioning"
DASHBOARDS = sorted((h.DEPLOY / "grafana" / "dashboards").glob("*.json"))
# Keys Grafana's UI writes that the SDK's models do not carry (paths, `*` for any list index):
# a query variable's `definition` is the text its editor shows for the query.
UI_ONLY = ("/templating/list/*/definition",)


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


# --- grafana-foundation-sdk round trip ----------------------------------------------------


def _round_trip(dashboard: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The typed model of `dashboard` and the JSON the model writes back."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    model = Dashboard.from_json(copy.deepcopy(dashboard))
    written: dict[str, Any] = json.loads(json.dumps(model, cls=JSONEncoder))
    return model, written


def _lost(original: Any, written: Any, path: str = "") -> Iterator[str]:
    """Paths of `original` that `written` lacks or changed (keys the models added are fine)."""
    if isinstance(original, dict) and isinstance(written, dict):
        for key, value in original.items():
            if key not in written:
                yield f"{path}/{key}"
            else:
                yield from _lost(value, written[key], f"{path}/{key}")
    elif isinstance(original, list) and isinstance(written, list) and len(original) == len(written):
        for index, (item, back) in enumerate(zip(original, written, strict=True)):
            yield from _lost(item, back, f"{path}/{index}")
    elif original != written:
        yield f"{path} (was {original!r}, came back {written!r})"


def _unknown_keys(dashboard: dict[str, Any]) -> list[str]:
    _, written = _round_trip(dashboard)
    return [
        lost
        for lost in _lost(dashboard, written)
        if not any(fnmatch.fnmatchcase(lost, pattern) for pattern in UI_ONLY)
    ]


def _bad_enum_values(model: Any, path: str = "") -> Iterator[str]:
    """Attributes of the typed model annotated with an enum whose value is none of its values
    (the models keep whatever string the file held)."""
    if isinstance(model, list):
        for index, item in enumerate(model):
            yield from _bad_enum_values(item, f"{path}/{index}")
        return
    if isinstance(model, dict):
        for key, item in model.items():
            yield from _bad_enum_values(item, f"{path}/{key}")
        return
    if isinstance(model, enum.Enum) or not type(model).__module__.startswith(
        "grafana_foundation_sdk."
    ):
        return
    for name, hint in typing.get_type_hints(type(model)).items():
        value = getattr(model, name, None)
        enums = [
            t
            for t in typing.get_args(hint) or (hint,)
            if isinstance(t, type) and issubclass(t, enum.Enum)
        ]
        typed = value is None or isinstance(value, enum.Enum)
        if enums and not typed and all(value not in {m.value for m in e} for e in enums):
            names = " or ".join(e.__name__ for e in enums)
            yield f"{path}/{name}: {value!r} is not a {names}"
        yield from _bad_enum_values(value, f"{path}/{name}")


def _typed_panels(model: Any) -> Iterator[Any]:
    for panel in model.panels or []:
        yield panel
        yield from getattr(panel, "panels", None) or []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_round_trip_through_the_sdk_models(path: Path) -> None:
    """Every key of every dashboard survives the SDK's typed models (allow-listed UI-only keys
    aside), and panel options, field configs and queries were typed, not carried as raw
    dicts (which would let any key through)."""
    from grafana_foundation_sdk.cog.runtime import UnknownDataquery
    from grafana_foundation_sdk.models.dashboard import RowPanel

    dashboard = json.loads(path.read_text())
    assert _unknown_keys(dashboard) == []
    model, _ = _round_trip(dashboard)
    assert list(_bad_enum_values(model)) == []
    for panel in _typed_panels(model):
        if isinstance(panel, RowPanel):
            continue
        assert not isinstance(panel.options, dict), f"{panel.title}: options not typed"
        assert not isinstance(panel.field_config.defaults.custom, dict), panel.title
        for target in panel.targets:
            assert not isinstance(target, UnknownDataquery), f"{panel.title}: query not typed"


def test_dashboards_exist() -> None:
    """The round trip above has something to check."""
    assert h.DASHBOARD in DASHBOARDS


def _first(dashboard: dict[str, Any], panel_type: str) -> dict[str, Any]:
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    panels = dashboard["panels"] + [p for row in rows for p in row.get("panels", [])]
    return next(p for p in panels if p["type"] == panel_type)


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize(
    ("misspell", "reported"),
    [
        (lambda d: _rename(_first(d, "stat"), "gridPos", "gridpos"), "/gridpos"),
        (lambda d: _rename(_first(d, "stat")["options"], "colorMode", "colourMode"), "/colourMode"),
        (
            lambda d: _rename(_first(d, "timeseries")["fieldConfig"], "defaults", "default"),
            "/default",
        ),
        (lambda d: _rename(d["templating"]["list"][1], "multi", "mutli"), "/mutli"),
        (lambda d: _rename(d, "refresh", "autoRefresh"), "/autoRefresh"),
    ],
    ids=["panel gridpos", "stat colourMode", "fieldConfig default", "variable mutli", "refresh"],
)
def test_a_misspelt_key_is_rejected(misspell: Any, reported: str) -> None:
    """The round trip can fail: a misspelt key, at any depth, is reported by its path."""
    dashboard = h.load_dashboard()
    misspell(dashboard)
    unknown = _unknown_keys(dashboard)
    assert len(unknown) == 1, unknown
    assert unknown[0].endswith(reported), unknown


def test_a_wrong_enum_value_is_rejected() -> None:
    """A value outside an enum the models type the key with is reported."""
    dashboard = h.load_dashboard()
    _first(dashboard, "stat")["options"]["colorMode"] = "rainbow"
    (bad,) = _bad_enum_values(_round_trip(dashboard)[0])
    assert bad.endswith("/options/color_mode: 'rainbow' is not a BigValueColorMode"), bad


def test_every_ui_only_key_is_still_needed() -> None:
    """Each allow-listed key is in a dashboard and really lost by the models: the allow-list
    cannot grow stale and hide a key the models learnt."""
    for pattern in UI_ONLY:
        found = [
            lost
            for path in DASHBOARDS
            for dashboard in [json.loads(path.read_text())]
            for lost in _lost(dashboard, _round_trip(dashboard)[1])
            if fnmatch.fnmatchcase(lost, pattern)
        ]
        assert found, pattern
