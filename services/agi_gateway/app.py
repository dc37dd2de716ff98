"""Composition root of the gateway: the only place gateway objects are built from settings.

Two ways to get decisions behind the same `Identifier` port:
- embedded (the default when no AMQP URL is set, or `--embedded`): the resolver runs in this
  process behind the in-memory bus; Redis is used for the cache if `CALLERID_REDIS_URL` is set;
- scaled out: requests go to RabbitMQ and any number of `crm-resolver` processes answer.
Either way, when there is a cache (embedded: always; scaled out: when `CALLERID_REDIS_URL`
is set) the gateway reads it first and asks a resolver only on a miss (`cache_first`).

Shutdown on SIGTERM/SIGINT: /readyz turns 503, the listener closes, live calls finish within
`drain_timeout`, the rest take their failover decision, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys

from prometheus_client import CollectorRegistry

from agi_gateway.admission import Admission, parse_networks
from agi_gateway.amqp_identifier import AmqpIdentifier
from agi_gateway.cache_first import CacheFirstIdentifier
from agi_gateway.flow import CallFlow, FlowSettings
from agi_gateway.metrics import GatewayMetrics
from agi_gateway.routing import JumpTemplates
from agi_gateway.server import AgiServer
from agi_gateway.settings import GatewaySettings
from crm_resolver.app import build_cache, build_resolver, unknown_environment
from crm_resolver.crm_auth import CrmCredentials
from crm_resolver.metrics import ResolverMetrics
from crm_resolver.ports import Cache
from crm_resolver.settings import ResolverSettings
from shared import runtime, startup_errors
from shared.amqp_link import amqp_ssl_context
from shared.http_endpoints import bound_port, start_http
from shared.memory_bus import MemoryBus
from shared.node_sources import CheckedSource, NodeSource, NodeStore, source_from_setting
from shared.nodes import ConfigError, NodeSet
from shared.ports import Identifier
from shared.settings import NODES_REQUIRED, add_common_flags, parse_listen, settings_epilog
from shared.topology import Topology

log = logging.getLogger(__name__)

DESCRIPTION = """\
The FastAGI server Asterisk hands inbound calls to, to identify the caller.

The dialplan runs AGI(agi://<this host>:4573/identify/<node>). The gateway prompts the caller,
collects the customer id, gets a decision (locally, from the answer cache, or from the CRM
through a crm-resolver) and sets OML_IDENT_OUTCOME, OML_DEST_TYPE and OML_DEST_ID on the
channel, optionally jumping there. Without CALLERID_AMQP_URL (or with --embedded) it runs the
resolver itself: one process, no broker.

Configured by CALLERID_* environment variables; the few with a flag take the flag first.
CALLERID_NODES (or --nodes) is required. At start-up a CALLERID_* variable that is not a
setting is logged as a warning; an invalid value stops the gateway (exit 2)."""

EPILOG_SETTINGS = (
    ("nodes", "nodes YAML file, or redis://host:port/db for OMniLeads' hashes"),
    ("amqp_url", "RabbitMQ URL, or a cluster's node URLs comma-separated; unset: embedded"),
    ("redis_url", "Redis answer cache; scaled out, repeat callers are answered from it"),
    ("agi_listen", "FastAGI address Asterisk connects to"),
    ("http_listen", "/metrics, /healthz, /readyz"),
    ("fallback_destination", '"type,id" for config_error calls (unknown node, overload)'),
    ("jump_templates", 'JSON, destination type (or "*") -> "context,exten,priority" template'),
    ("max_calls", "live calls; beyond it calls get config_error and the fallback"),
    ("drain_timeout", "seconds live calls get to finish on SIGTERM"),
    ("log_level", "DEBUG, INFO, WARNING, ERROR"),
)


class Gateway:
    """A running gateway: started by `start`, stopped by `stop` (tests drive it directly)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self._stack = contextlib.AsyncExitStack()
        self._amqp: AmqpIdentifier | None = None
        self.store: NodeStore | None = None
        self._credentials: CrmCredentials | None = None
        self.server: AgiServer | None = None
        self.http_port = 0

    def _on_reload(self, ok: bool, nodes: NodeSet | None) -> None:
        self.metrics.config_reloads.labels("ok" if ok else "error").inc()
        if nodes is not None:
            self.metrics.init_nodes(nodes.names())
            self.metrics.nodes_configured.set(len(nodes))
            if not len(nodes):
                log.warning(
                    "no identification nodes in %s: the gateway runs, but every call ends at "
                    "once with config_error (to CALLERID_FALLBACK_DESTINATION if set)",
                    self.store.source.description if self.store else "the node source",
                )

    async def start(self) -> None:
        """Load nodes (ConfigError if they are bad), connect, listen."""
        settings = self.settings
        if settings.nodes is None:
            raise ConfigError(NODES_REQUIRED)
        source: NodeSource = source_from_setting(
            settings.nodes,
            omnileads_confirm=settings.omnileads_confirm,
            omnileads_confirm_audio=settings.omnileads_confirm_audio,
        )
        if settings.runs_embedded:
            # The embedded resolver needs the nodes' CRM secrets: a config naming one that is
            # not in the environment fails here (start-up) or is refused (reload).
            self._credentials = CrmCredentials(os.environ)
            source = CheckedSource(source, self._credentials)
        self.store = NodeStore(source, on_reload=self._on_reload)
        self._stack.push_async_callback(self.store.source.close)
        nodes = await self.store.load_initial()
        self._on_reload(True, nodes)
        identifier = await self._identifier()
        self.metrics.identify_pending.set_function(lambda: identifier.pending)
        store = self.store
        flow = CallFlow(
            lambda: store.current,
            identifier,
            self.metrics,
            FlowSettings(
                jumps=JumpTemplates(settings.jump_templates),
                fallback=settings.fallback_destination,
                max_hops=settings.max_hops,
                limits=settings.limits,
                show_customer_ids=settings.show_customer_ids,
            ),
        )
        admission = Admission(
            parse_networks(settings.agi_allowed_peers),
            max_per_peer=settings.agi_max_calls_per_peer,
        )
        if admission.open_to_all:
            log.warning(
                "CALLERID_AGI_ALLOWED_PEERS is not set: any host that reaches %s may open "
                "FastAGI sessions; set it to your Asterisk servers' addresses",
                settings.agi_listen,
            )
        self.server = AgiServer(
            flow,
            self.metrics,
            max_calls=settings.max_calls,
            command_timeout=settings.command_timeout,
            environment_timeout=settings.environment_timeout,
            admission=admission,
        )
        with startup_errors.listening("agi_listen", settings.agi_listen):
            await self.server.start(*parse_listen(settings.agi_listen))
        host, port = parse_listen(settings.http_listen)
        with startup_errors.listening("http_listen", settings.http_listen):
            http = await start_http(host, port, self.registry, self.ready)
        self._stack.push_async_callback(http.cleanup)
        self.http_port = bound_port(http)

    async def _identifier(self) -> Identifier:
        settings = self.settings
        assert self.store is not None
        store = self.store
        inner: Identifier
        cache: Cache | None = None
        if settings.runs_embedded:
            log.info("embedded mode: the resolver runs in this process (no broker)")
            bus = MemoryBus(
                concurrency=settings.embedded_concurrency,
                on_late_reply=self.metrics.late_replies.inc,
            )
            self._stack.push_async_callback(bus.close)
            cache = build_cache(self._stack, settings)
            resolver_settings = ResolverSettings.model_validate(settings.model_dump())
            resolver = await build_resolver(
                self._stack,
                resolver_settings,
                store,
                ResolverMetrics(self.registry),
                self._credentials,
                cache,
            )
            bus.bind(resolver)
            inner = bus
        else:
            assert settings.amqp_url is not None
            self._amqp = AmqpIdentifier(
                settings.amqp_url,
                self.metrics,
                topology=Topology(prefix=settings.amqp_prefix, queue_type=settings.amqp_queue_type),
                publish_timeout=settings.publish_timeout,
                ssl_context=amqp_ssl_context(settings.amqp_url, settings.amqp_ca_bundle),
            )
            # In the background: without a broker the gateway still serves calls (not ready;
            # nodes that need no CRM decide, CRM nodes fail over at once) and connects when
            # one of the CALLERID_AMQP_URL nodes answers (shared.amqp_link).
            await self._amqp.start(wait=False)
            self._stack.push_async_callback(self._amqp.close)
            inner = self._amqp
            # The resolvers' Redis, when the gateway is given it: repeat callers are then
            # answered here, without the RabbitMQ round trip.
            if settings.redis_url and settings.gateway_cache:
                cache = build_cache(self._stack, settings)
        if cache is None or not settings.gateway_cache:
            return inner
        return CacheFirstIdentifier(inner, cache, lambda: store.current, self.metrics.cache_lookups)

    def ready(self) -> bool:
        serving = self.server is not None and self.server.serving
        return serving and (self._amqp is None or self._amqp.ready)

    async def run_until(self, stop: asyncio.Event) -> None:
        assert self.store is not None
        await runtime.wait_first(stop, self.store.watch(self.settings.reload_interval))

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.drain(self.settings.drain_timeout)
        await self._stack.aclose()


async def serve(settings: GatewaySettings) -> int:
    gateway = Gateway(settings)
    # Before the start: a SIGTERM while starting then stops the gateway cleanly once it has
    # started (nothing to drain yet), instead of killing it mid-start.
    stop = runtime.stop_on_signals()
    try:
        await gateway.start()
    except Exception:
        for message in unknown_environment(os.environ, None):  # a typo may be why
            log.warning("%s", message)
        await gateway.stop()
        raise  # one line naming the setting, and the exit status: shared.startup_errors
    assert gateway.store is not None
    for message in unknown_environment(os.environ, gateway.store.current):
        log.warning("%s", message)
    if settings.redis_url and (settings.runs_embedded or settings.gateway_cache):
        await startup_errors.warn_if_cache_unreachable(settings.redis_url)  # serves either way
    runtime.heap_settled()
    await gateway.run_until(stop)
    await gateway.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: operator-facing help, and flags for the settings that have one."""
    parser = argparse.ArgumentParser(
        prog="agi-gateway",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(parser)
    parser.add_argument("--agi-listen", help="host:port for FastAGI (CALLERID_AGI_LISTEN)")
    parser.add_argument(
        "--embedded",
        action="store_true",
        default=None,
        help="run the resolver in this process: no broker needed (CALLERID_EMBEDDED)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds to let calls finish on SIGTERM (CALLERID_DRAIN_TIMEOUT)",
    )
    parser.epilog = settings_epilog(parser, GatewaySettings, EPILOG_SETTINGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return runtime.start_service(build_parser(), argv, GatewaySettings, serve)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
