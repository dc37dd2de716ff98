"""One vocabulary: the words of shared.outcomes are complete, keep the label values dashboards
and alerts use, and are what the metrics export and the docs tables list.

Adding a word is one enum member plus its entry in the tables beside it; these tests fail until
the tables, the README and docs/design.md have it too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agi_gateway.metrics import GatewayMetrics
from crm_resolver.metrics import CRM_RESULTS, ResolverMetrics
from shared.outcomes import CacheLookup, CircuitState, ErrorCode, Outcome, Source, Verdict

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"

FAILOVERS = {o for o in Outcome if o.is_failover}


# --- the words and what they imply -----------------------------------------------------------


def test_label_values_do_not_change() -> None:
    """Dashboards, alerts and operators' queries use these strings: they stay as they are and
    keep their meaning (new words may be added beside them)."""
    assert {"hit", "miss", "error", "skipped"} <= {r.value for r in CacheLookup}
    assert {s.value: s.level for s in CircuitState} == {"closed": 0, "half_open": 1, "open": 2}
    assert {"crm_timeout", "crm_error", "crm_bad_response"} <= {o.value for o in FAILOVERS}
    assert {"hit", "miss", "error"} <= {r.value for r in CacheLookup if r.read}
    assert set(CRM_RESULTS) >= {
        "true",
        "false",
        "destination",
        "crm_timeout",
        "crm_unreachable",
        "crm_http_status",
        "crm_status_fail",
        "crm_circuit_open",
        "crm_bad_response",
        "crm_disallowed_destination",
    }


# The outcome of each error code that exists today: DESIGN.md §2's "when" column (no answer in
# time is crm_timeout; an answer the node cannot use, crm_bad_response; any other failure,
# crm_error). A new code needs no line here: the completeness test below covers it.
KNOWN_ERROR_OUTCOMES = {
    ErrorCode.CRM_TIMEOUT: Outcome.CRM_TIMEOUT,
    ErrorCode.EXPIRED: Outcome.CRM_TIMEOUT,
    ErrorCode.CRM_UNREACHABLE: Outcome.CRM_ERROR,
    ErrorCode.CRM_HTTP_STATUS: Outcome.CRM_ERROR,
    ErrorCode.CRM_STATUS_FAIL: Outcome.CRM_ERROR,
    ErrorCode.CRM_CIRCUIT_OPEN: Outcome.CRM_ERROR,
    ErrorCode.CRM_BAD_RESPONSE: Outcome.CRM_BAD_RESPONSE,
    ErrorCode.CRM_DISALLOWED_DESTINATION: Outcome.CRM_BAD_RESPONSE,
    ErrorCode.UNKNOWN_NODE: Outcome.CRM_ERROR,
    ErrorCode.INTERNAL: Outcome.CRM_ERROR,
}


def test_existing_error_codes_keep_their_outcomes() -> None:
    assert {code: code.outcome for code in KNOWN_ERROR_OUTCOMES} == KNOWN_ERROR_OUTCOMES


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_a_failover_outcome(code: ErrorCode) -> None:
    """The table behind `ErrorCode.outcome` names every code (no silent default), and an
    error always leads to a failover: the CRM could not decide."""
    assert code.outcome.is_failover


def test_every_failover_outcome_is_reachable_from_an_error_code() -> None:
    """A failover outcome no error code leads to would be a word nothing produces."""
    assert {code.outcome for code in ErrorCode} == FAILOVERS


def test_circuit_levels_are_distinct() -> None:
    assert sorted(s.level for s in CircuitState) == list(range(len(CircuitState)))


# --- the metrics iterate the words -------------------------------------------------------------


def series(registry: CollectorRegistry, name: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and label in sample.labels
    }


def test_gateway_series_are_created_for_every_word() -> None:
    registry = CollectorRegistry()
    GatewayMetrics(registry).init_nodes(["x"])
    assert series(registry, "callerid_calls_total", "outcome") == {o.value for o in Outcome}
    assert series(registry, "callerid_calls_total", "source") == {s.value for s in Source}
    assert series(registry, "callerid_gateway_cache_lookups_total", "result") == {
        r.value for r in CacheLookup
    }


def test_resolver_series_are_created_for_every_word() -> None:
    registry = CollectorRegistry()
    ResolverMetrics(registry).init_nodes(["x"])
    assert series(registry, "callerid_cache_lookups_total", "result") == {
        r.value for r in CacheLookup if r.read
    }
    assert series(registry, "callerid_crm_requests_total", "result") == {
        *(v.value for v in Verdict if v is not Verdict.ERROR),
        *(code.value for code in ErrorCode if code.is_crm_result),
    }
    assert series(registry, "callerid_resolver_requests_total", "verdict") == {
        v.value for v in Verdict
    }
    closed = registry.get_sample_value("callerid_crm_circuit_state", {"node": "x"})
    assert closed == CircuitState.CLOSED.level


# --- the docs list the words -------------------------------------------------------------------


def first_table_after(path: Path, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table under the heading matching `heading` (a regex)."""
    text = path.read_text()
    match = re.search(rf"^#+ {heading}\n(.*?)(?=^#+ |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{path.name} has no section {heading!r}"
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows[2:]]


@pytest.mark.parametrize(
    ("path", "heading"),
    [(README, r"Outcomes"), (DESIGN, r"2\. Outcomes[^\n]*")],
    ids=["README", "design"],
)
def test_outcome_tables_list_exactly_the_outcomes(path: Path, heading: str) -> None:
    """Each outcome table has one row per outcome, and the rows whose destination is
    `on_error` (else on_not_identified) are exactly the failover outcomes."""
    rows = first_table_after(path, heading)
    listed = [row[0].strip("`") for row in rows]
    assert sorted(listed) == sorted(o.value for o in Outcome)
    to_on_error = {row[0].strip("`") for row in rows if row[-1].startswith("`on_error`")}
    assert to_on_error == {o.value for o in FAILOVERS}


def metric_labels(metric: str) -> dict[str, set[str]]:
    """The label values the README's metric table lists for `metric`: `label` (a / b / c)."""
    row = next(
        (r for r in first_table_after(README, "Metrics") if r[0] == f"`{metric}`"),
        None,
    )
    assert row is not None, f"README's metric table has no row for {metric}"
    return {
        label: {value.strip() for value in values.split("/")}
        for label, values in re.findall(r"`(\w+)` \(([^)]*)\)", row[3])
    }


@pytest.mark.parametrize(
    ("metric", "label", "words"),
    [
        ("callerid_calls_total", "outcome", {o.value for o in Outcome}),
        ("callerid_calls_total", "source", {s.value for s in Source}),
        ("callerid_gateway_cache_lookups_total", "result", {r.value for r in CacheLookup}),
        ("callerid_cache_lookups_total", "result", {r.value for r in CacheLookup if r.read}),
        ("callerid_crm_requests_total", "result", set(CRM_RESULTS)),
        ("callerid_resolver_requests_total", "verdict", {v.value for v in Verdict}),
    ],
)
def test_metric_table_lists_the_label_values(metric: str, label: str, words: set[str]) -> None:
    assert metric_labels(metric).get(label) == words
