"""Composition root of the resolver: the only place resolver objects are built from settings.

`build_resolver` is shared with the gateway's embedded mode, so the resolver runs the same way
in-process and as the `crm-resolver` service (RabbitMQ consumer). Shutdown on SIGTERM: stop
consuming, finish in-flight requests (up to `stop_timeout`), then exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from crm_resolver.address_policy import AddressPolicy
from crm_resolver.amqp_worker import AmqpWorker
from crm_resolver.circuit import BreakerRegistry
from crm_resolver.crm_http import CrmHttpSettings, HttpCrmClient
from crm_resolver.memory_cache import MemoryCache
from crm_resolver.metrics import ResolverMetrics
from crm_resolver.ports import Cache
from crm_resolver.redis_cache import RedisCache
from crm_resolver.resolver import Resolver
from crm_resolver.settings import ResolverSettings
from crm_resolver.signing import CheckedSource, CrmCredentials
from shared import runtime
from shared.http_endpoints import start_http
from shared.metrics import UNKNOWN_NODE
from shared.node_sources import NodeStore, source_from_setting
from shared.nodes import ConfigError
from shared.settings import CommonSettings, add_common_flags, parse_listen
from shared.topology import Topology

log = logging.getLogger(__name__)


def node_labeler(store: NodeStore) -> Callable[[str], str]:
    """Metric label for a node id: its configured name (ids never become labels)."""

    def label(node_id: str) -> str:
        node = store.current.get(node_id)
        return node.name if node is not None else UNKNOWN_NODE

    return label


def build_cache(stack: contextlib.AsyncExitStack, settings: CommonSettings) -> Cache:
    """The answer cache the settings name: Redis when `redis_url` is set, else in-process.

    The gateway reads the same cache (to answer repeat callers without a resolver), so both
    services build it here, with the same key pepper and timeout."""
    if not settings.redis_url:
        return MemoryCache()
    redis_cache = RedisCache.from_url(
        settings.redis_url,
        timeout=settings.cache_timeout,
        pepper=settings.cache_key_pepper,
    )
    stack.push_async_callback(redis_cache.close)
    return redis_cache


async def build_resolver(
    stack: contextlib.AsyncExitStack,
    settings: ResolverSettings,
    store: NodeStore,
    metrics: ResolverMetrics,
    credentials: CrmCredentials | None = None,
    cache: Cache | None = None,
) -> Resolver:
    """The resolver with its CRM client and cache; closers go on `stack`.

    `credentials` resolves the nodes' CRM secrets (default: this process's environment, read
    now, once); a node naming a secret that is not there is a ConfigError here. `cache`
    (default: `build_cache`) lets an embedding gateway share the resolver's cache."""
    metrics.init_nodes(store.current.names())
    if credentials is None:
        credentials = CrmCredentials(os.environ)
    credentials.check(store.current)
    crm = HttpCrmClient(
        CrmHttpSettings(
            ca_bundle=settings.crm_ca_bundle,
            max_connections=settings.crm_max_connections,
            policy=AddressPolicy.from_settings(
                settings.crm_allowed_hosts, settings.crm_allow_metadata
            ),
        ),
        credentials=credentials,
    )
    await crm.start()
    stack.push_async_callback(crm.close)
    if cache is None:
        cache = build_cache(stack, settings)
    # Resolvers sharing a Redis merge identical lookups across processes through it; alone
    # on a memory cache, the in-process single-flight is all there is to merge.
    flights = cache if isinstance(cache, RedisCache) else None
    breakers = BreakerRegistry(
        failure_threshold=settings.breaker_failures, reset_after=settings.breaker_reset
    )
    resolver = Resolver(
        lambda: store.current, crm, cache, metrics, breakers=breakers, flights=flights
    )
    stack.push_async_callback(resolver.close)
    return resolver


async def serve(settings: ResolverSettings) -> int:
    if not settings.amqp_url:
        log.error("crm-resolver needs CALLERID_AMQP_URL (or run `agi-gateway --embedded`)")
        return 2
    credentials = CrmCredentials(os.environ)
    try:
        # A reload naming a secret that is not in the environment is refused like any bad one.
        store = NodeStore(CheckedSource(source_from_setting(settings.nodes), credentials))
        await store.load_initial()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    registry = CollectorRegistry()
    async with contextlib.AsyncExitStack() as stack:
        metrics = ResolverMetrics(registry)
        resolver = await build_resolver(stack, settings, store, metrics, credentials)
        worker = AmqpWorker(
            settings.amqp_url,
            resolver,
            metrics,
            topology=Topology(prefix=settings.amqp_prefix),
            prefetch=settings.prefetch,
            node_label=node_labeler(store),
        )
        await worker.start()
        host, port = parse_listen(settings.http_listen)
        http = await start_http(host, port, registry, lambda: worker.ready)
        stack.push_async_callback(http.cleanup)
        stop = runtime.stop_on_signals()
        await runtime.wait_first(stop, store.watch(settings.reload_interval))
        log.info("stopping: finishing %d in-flight requests", worker.in_flight)
        await worker.stop(drain_timeout=settings.stop_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crm-resolver", description=__doc__)
    add_common_flags(parser)
    parser.add_argument(
        "--prefetch", type=int, help="requests worked on at once (CALLERID_PREFETCH)"
    )
    return runtime.start_service(parser, argv, ResolverSettings, serve)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
