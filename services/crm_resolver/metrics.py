"""Resolver metrics (prefix `callerid_`). Labels: `node` (configured node names) and enums."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import SLO_BUCKETS, zero_init
from shared.outcomes import CacheLookup, CircuitState, ErrorCode, Verdict

# The label values, from the shared vocabulary (shared.outcomes): a resolver always reads its
# cache (never `skipped`); a CRM request ends in a verdict or in a CRM error code.
CACHE_RESULTS = tuple(result for result in CacheLookup if result.read)
CRM_RESULTS = tuple(v.value for v in Verdict if v is not Verdict.ERROR) + tuple(
    code.value for code in ErrorCode if code.is_crm_result
)


class ResolverMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "callerid_resolver_requests_total",
            "Identification requests answered by resolvers, by node and reply verdict.",
            ["node", "verdict"],
            registry=registry,
        )
        self.crm_requests = Counter(
            "callerid_crm_requests_total",
            "HTTP requests made to a CRM, by node and result (verdict or error code).",
            ["node", "result"],
            registry=registry,
        )
        self.crm_duration = Histogram(
            "callerid_crm_request_duration_seconds",
            "Time from sending a CRM request to having its answer or error.",
            ["node"],
            buckets=SLO_BUCKETS,
            registry=registry,
        )
        self.cache_lookups = Counter(
            "callerid_cache_lookups_total",
            "Cache lookups by node and result (hit, miss, error).",
            ["node", "result"],
            registry=registry,
        )
        self.merged = Counter(
            "callerid_crm_lookups_merged_total",
            "Requests answered by another caller's CRM call: joined in this process, or taken "
            "from another resolver through the cache.",
            ["node"],
            registry=registry,
        )
        self.expired = Counter(
            "callerid_expired_requests_total",
            "Requests dropped because their deadline had passed (no CRM call made).",
            ["node"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "callerid_resolver_in_flight",
            "Identification requests being worked on by this resolver.",
            registry=registry,
        )
        self.circuit_state = Gauge(
            "callerid_crm_circuit_state",
            "CRM circuit breaker state by node: 0 closed, 1 half-open, 2 open.",
            ["node"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "callerid_dead_lettered_total",
            "Request messages that could not be parsed and went to the dead-letter queue.",
            registry=registry,
        )

    def init_nodes(self, node_names: Iterable[str]) -> None:
        names = list(node_names)
        zero_init(self.requests, ((n, v.value) for n in names for v in Verdict))
        zero_init(self.crm_requests, ((n, r) for n in names for r in CRM_RESULTS))
        zero_init(self.cache_lookups, ((n, r.value) for n in names for r in CACHE_RESULTS))
        zero_init(self.merged, ((n,) for n in names))
        zero_init(self.expired, ((n,) for n in names))
        for name in names:
            self.crm_duration.labels(name)
            self.circuit_state.labels(name).set(CircuitState.CLOSED.level)
