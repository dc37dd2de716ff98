"""Gateway metrics (prefix `callerid_`). Labels: `node` (configured node names) and enums.

Calls for a node id that is not configured are counted under node="unknown", so a caller
cannot create series by dialling into random node paths.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agi_gateway.limits import Limit
from shared.metrics import SLO_BUCKETS, UNKNOWN_NODE, children, zero_init
from shared.outcomes import CacheLookup, Outcome, Source

RPC_RESULTS = ("reply", "timeout", "unavailable")
REJECTION_REASONS = (
    "over_capacity",
    "draining",
    "bad_environment",
    "peer_not_allowed",
    "peer_limit",
    "closed_before_call",
)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "callerid_calls_total",
            "Calls that left an identification node, by node, outcome and decision source.",
            ["node", "outcome", "source"],
            registry=registry,
        )
        self.identification_wait = Histogram(
            "callerid_identification_wait_seconds",
            "Gateway wait for an identification decision (caller's last digit to decision).",
            ["node"],
            buckets=SLO_BUCKETS,
            registry=registry,
        )
        self.identify_requests = Counter(
            "callerid_identify_requests_total",
            "Identification requests made by the gateway (answered from its cache or by a "
            "resolver), by node and result.",
            ["node", "result"],
            registry=registry,
        )
        self.cache_lookups = Counter(
            "callerid_gateway_cache_lookups_total",
            "Answer-cache lookups by the gateway before asking a resolver, by node and result "
            "(hit, miss, error; skipped: not read while few recent requests were in the cache).",
            ["node", "result"],
            registry=registry,
        )
        self.identifications_limited = Counter(
            "callerid_identifications_limited_total",
            "CRM lookups refused by an enumeration limit (the call took its failover), by node "
            "and limit (caller_lookups, caller_failures, anonymous_lookups, node_rate).",
            ["node", "limit"],
            registry=registry,
        )
        self.late_replies = Counter(
            "callerid_late_replies_total",
            "Replies that arrived after their call had given up, or for no known request.",
            registry=registry,
        )
        self.sessions_live = Gauge(
            "callerid_agi_sessions_live",
            "AGI sessions currently open.",
            registry=registry,
        )
        self.identify_pending = Gauge(
            "callerid_identify_pending",
            "Identification requests waiting for their reply (returns to 0 when idle).",
            registry=registry,
        )
        self.sessions_rejected = Counter(
            "callerid_agi_sessions_rejected_total",
            "AGI connections refused or not counted as calls, by reason (over_capacity, "
            "draining, bad_environment, peer_not_allowed, peer_limit, closed_before_call).",
            ["reason"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "callerid_config_reloads_total",
            "Node configuration loads by result (ok, error); on error the last good set stays.",
            ["result"],
            registry=registry,
        )
        self.nodes_configured = Gauge(
            "callerid_nodes_configured",
            "Identification nodes in the active configuration.",
            registry=registry,
        )
        # The series every call touches, looked up once per label values (shared.metrics).
        self.calls_of = children(self.calls)
        self.identification_wait_of = children(self.identification_wait)
        self.identify_requests_of = children(self.identify_requests)

    def init_nodes(self, node_names: Iterable[str]) -> None:
        names = [*node_names, UNKNOWN_NODE]
        zero_init(
            self.calls,
            ((n, o.value, s.value) for n in names for o in Outcome for s in Source),
        )
        zero_init(self.identify_requests, ((n, r) for n in names for r in RPC_RESULTS))
        zero_init(self.cache_lookups, ((n, r.value) for n in names for r in CacheLookup))
        zero_init(self.identifications_limited, ((n, lim.value) for n in names for lim in Limit))
        zero_init(self.config_reloads, (("ok",), ("error",)))
        zero_init(
            self.sessions_rejected,
            ((reason,) for reason in REJECTION_REASONS),
        )
        for name in names:
            self.identification_wait.labels(name)
