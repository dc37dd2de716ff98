"""The docs follow what the services export (README) and alert on (docs/operations.md)."""

from __future__ import annotations

import re

from tests import deploy_helpers as h

OPERATIONS = h.ROOT / "docs" / "operations.md"
README = h.ROOT / "README.md"


def _documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(callerid_[a-z_]+)` \|", README.read_text(), re.MULTILINE))


def test_every_exported_metric_is_documented() -> None:
    """The README's metric table lists each metric family of both services, and nothing else."""
    families = set()
    for registry in (h.gateway_registry(), h.resolver_registry()):
        for family in registry.collect():
            families.add(family.name + ("_total" if family.type == "counter" else ""))
    assert _documented_metrics() == families


def test_every_alert_is_documented() -> None:
    """The alert table names each alert rule of deploy/prometheus/alerts.yml."""
    documented = set(re.findall(r"^\| `(Callerid\w+)` \|", OPERATIONS.read_text(), re.MULTILINE))
    assert documented == {r["alert"] for r in h.load_alert_rules() if "alert" in r}
