"""Shared metric helpers: the SLO bucket edges and zero-initialisation of labelled series."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter

# Label for a node id that is not configured: callers cannot create series by dialling
# random node paths, and a resolver never labels by an id taken from a message.
UNKNOWN_NODE = "unknown"

# Bucket edges on the SLO lines (seconds): what a caller notices, up to the longest budget.
SLO_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    4.0,
    8.0,
)


def zero_init(counter: Counter, label_sets: Iterable[tuple[str, ...]]) -> None:
    """Create every series up front so rates and alerts see 0, not absence."""
    for labels in label_sets:
        counter.labels(*labels)
