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
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry

from agi_gateway.settings import GatewaySettings
from crm_resolver.address_policy import AddressPolicy
from crm_resolver.amqp_worker import AmqpWorker
from crm_resolver.circuit import BreakerRegistry
from crm_resolver.crm_auth import CrmCredentials
from crm_resolver.crm_http import CrmHttpSettings, HttpCrmClient
from crm_resolver.memory_cache import MemoryCache
from crm_resolver.metrics import ResolverMetrics
from crm_resolver.ports import Cache
from crm_resolver.redis_cache import RedisCache
from crm_resolver.resolver import Resolver
from crm_resolver.settings import ResolverSettings
from shared import runtime, startup_errors
from shared.amqp_link import amqp_ssl_context
from shared.http_endpoints import start_http
from shared.metrics import UNKNOWN_NODE
from shared.node_auth import env_names
from shared.node_sources import CheckedSource, NodeStore, source_from_setting
from shared.nodes import ConfigError, NodeSet
from shared.settings import (
    NODES_REQUIRED,
    CommonSettings,
    add_common_flags,
    parse_listen,
    setting_variables,
    settings_epilog,
    unknown_variables,
)
from shared.topology import Topology

log = logging.getLogger(__name__)

DESCRIPTION = """\
One worker of the pool that answers the gateways' caller-identification requests.

It takes requests from RabbitMQ (CALLERID_AMQP_URL, required), answers each from the Redis
answer cache (CALLERID_REDIS_URL) or by calling the node's CRM over HTTP, and replies. Run as
many as the call rate needs, all with the same CALLERID_AMQP_URL, CALLERID_NODES and
CALLERID_REDIS_URL. A CRM token or secret is an environment variable the node names in its
auth: section (or crm_token_env / crm_signing_secret_env). For one box without a broker, run
`agi-gateway --embedded` instead: it contains a resolver.

Configured by CALLERID_* environment variables; the few with a flag take the flag first.
CALLERID_NODES (or --nodes) is required. At start-up a CALLERID_* variable that is not a
setting is logged as a warning; an invalid value stops the resolver (exit 2)."""

EPILOG_SETTINGS = (
    ("nodes", "nodes YAML file or redis://host:port/db, the same as the gateway's"),
    ("amqp_url", "RabbitMQ URL, or a cluster's node URLs comma-separated; required"),
    ("redis_url", "Redis answer cache shared with other resolvers and the gateway"),
    ("cache_key_pepper", "secret mixed into cache keys; the same on every service"),
    ("http_listen", "/metrics, /healthz, /readyz"),
    ("prefetch", "requests worked on at once"),
    ("crm_allowed_hosts", "comma-separated hosts CRM requests may go to, empty for any"),
    ("breaker_failures", "consecutive CRM failures that open its circuit breaker"),
    ("stop_timeout", "seconds to finish in-flight requests on SIGTERM"),
    ("log_level", "DEBUG, INFO, WARNING, ERROR"),
)


def unknown_environment(environ: Mapping[str, str], nodes: NodeSet | None) -> list[str]:
    """Start-up warnings for the `CALLERID_*` variables neither service reads.

    A setting of either service counts as known (compose files and shared env files give both
    the same environment), and so does a secret a node names in its `auth:` section (or
    the older `crm_token_env` / `crm_signing_secret_env`); `nodes` is None when they could
    not be loaded."""
    secrets = {name for node in nodes or () for name in env_names(node.auth)}
    return unknown_variables(
        environ, setting_variables(GatewaySettings, ResolverSettings), also_read=secrets
    )


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
    breakers = BreakerRegistry(
        failure_threshold=settings.breaker_failures, reset_after=settings.breaker_reset
    )
    resolver = Resolver(lambda: store.current, crm, cache, metrics, breakers=breakers)
    stack.push_async_callback(resolver.close)
    return resolver


async def serve(settings: ResolverSettings) -> int:
    if not settings.amqp_url:
        raise startup_errors.StartupError(
            "amqp_url",
            "not set: the resolver takes its requests from RabbitMQ",
            "set it, e.g. amqp://user:password@rabbitmq:5672/; for one box without a broker "
            "run `agi-gateway --embedded` instead",
        )
    if settings.nodes is None:
        for message in unknown_environment(os.environ, None):  # a typo may be why
            log.warning("%s", message)
        raise ConfigError(NODES_REQUIRED)  # one line and the exit status: shared.startup_errors
    # Before anything slow: a SIGTERM while starting (a deploy rolled back, a pod evicted)
    # then stops the service cleanly once it has started, instead of killing it mid-start.
    stop = runtime.stop_on_signals()
    credentials = CrmCredentials(os.environ)
    try:
        # A reload naming a secret that is not in the environment is refused like any bad one.
        source = source_from_setting(
            settings.nodes,
            omnileads_confirm=settings.omnileads_confirm,
            omnileads_confirm_audio=settings.omnileads_confirm_audio,
        )
        store = NodeStore(CheckedSource(source, credentials))
        await store.load_initial()
    except ConfigError:
        for message in unknown_environment(os.environ, None):
            log.warning("%s", message)
        raise
    for message in unknown_environment(os.environ, store.current):
        log.warning("%s", message)
    if not len(store.current):
        log.warning(
            "no identification nodes in %s: every request is answered with an error "
            "(unknown_node) until the source has some",
            store.source.description,
        )
    registry = CollectorRegistry()
    async with contextlib.AsyncExitStack() as stack:
        metrics = ResolverMetrics(registry)
        resolver = await build_resolver(stack, settings, store, metrics, credentials)
        if settings.redis_url:
            await startup_errors.warn_if_cache_unreachable(settings.redis_url)  # starts anyway
        worker = AmqpWorker(
            settings.amqp_url,
            resolver,
            metrics,
            topology=Topology(prefix=settings.amqp_prefix, queue_type=settings.amqp_queue_type),
            prefetch=settings.prefetch,
            node_label=node_labeler(store),
            ssl_context=amqp_ssl_context(settings.amqp_url, settings.amqp_ca_bundle),
        )
        # Listening first: a port that is taken stops the start before anything is consumed.
        host, port = parse_listen(settings.http_listen)
        with startup_errors.listening("http_listen", settings.http_listen):
            http = await start_http(host, port, registry, lambda: worker.ready)
        stack.push_async_callback(http.cleanup)
        # In the background: not ready (/readyz 503) until a node of CALLERID_AMQP_URL
        # answers; retried with growing waits meanwhile (shared.amqp_link).
        await worker.start(wait=False)
        runtime.heap_settled()
        await runtime.wait_first(stop, store.watch(settings.reload_interval))
        log.info("stopping: finishing %d in-flight requests", worker.in_flight)
        await worker.stop(drain_timeout=settings.stop_timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: operator-facing help, and flags for the settings that have one."""
    parser = argparse.ArgumentParser(
        prog="crm-resolver",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(parser)
    parser.add_argument(
        "--prefetch", type=int, help="requests worked on at once (CALLERID_PREFETCH)"
    )
    parser.epilog = settings_epilog(parser, ResolverSettings, EPILOG_SETTINGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return runtime.start_service(build_parser(), argv, ResolverSettings, serve)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
