"""Shared metric helpers: the SLO bucket edges, zero-initialisation of labelled series, and
remembered children for the per-call path."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TypeVar

from prometheus_client import Counter
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

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


def children(metric: M) -> Callable[..., M]:
    """`metric.labels`, remembered per label values.

    `labels()` takes the metric's lock and builds tuples on every call, and the gateway counts
    several series per call; a child, once made, is the same object for good (no series is
    ever removed here), so it is looked up once. Label values come from configured node names
    and enums only, so the number of children is bounded; the cache is capped all the same.
    """
    return functools.lru_cache(maxsize=4096)(metric.labels)
