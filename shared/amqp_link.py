"""The RabbitMQ connection, its channel and its consumers, as both services hold them.

What belongs here: connecting to one of the nodes CALLERID_AMQP_URL lists (with a connection
name the broker's UI shows), opening the one channel each adapter uses, declaring the topology
and keeping it declared, consuming, telling whether all of it is up, and closing. What does
not: the names and arguments of the topology (`shared.topology`), reading the setting
(`shared.amqp_urls`), and publishing or handling messages (the adapters).

Nodes. aio-pika's robust connection reconnects to the one URL it was given, and only to it;
the link goes through the list itself. A connection (`NodeConnection`) is to one node and
never reconnects by itself: when it is lost, the link connects to the next node of the list
(the one after the node that went away first), opens a channel, sets its QoS, declares the
topology and starts the consumers there. An attempt that fails moves on to the next node after
a wait that doubles from 0.1 s up to `reconnect_interval` (2 s), each wait drawn from its
upper half (jitter: a fleet of services restarted together does not knock in step). It never
gives up while the process runs: a service started before its broker connects when the broker
comes, and is not ready (/readyz 503) until then. The first failure of an outage is one
WARNING (wrong credentials: one ERROR naming CALLERID_AMQP_URL), later ones DEBUG, with a
WARNING reminder every minute (`REMIND_EVERY`); the connection at INFO, with how long it took.
`open()` (tests, tools) instead connects at once and raises when no node answers.

Consumers are aiormq's, on the channel under aio-pika's robust one: aio-pika's own consumer
wraps every delivery in an `aio_pika.IncomingMessage` and runs the callback in a second task,
which is about a tenth of a resolver's AMQP work per request and buys these services nothing.
The robust channel (reopened by aio-pika after a channel error, on the same connection) does
not know about them, nor about the topology (declared on aiormq's channel too), so the link
declares the topology and starts the consumers again once the channel has reopened, or on the
new channel after a reconnect; `consuming` is false from the channel's loss until then.

The topology heals. A queue or exchange deleted on a live broker (`rabbitmqctl delete_queue`,
a mistaken click in the management UI) is noticed by whichever of these comes first:

- the broker cancels a consumer (basic.cancel: its queue was deleted). aiormq handles that
  frame by dropping the consumer from its channel's table and tells nobody, so the link
  watches that table (`_ConsumerTable`);
- the adapter reports it (`topology_missing`): the gateway's mandatory publish came back
  unroutable (basic.return: no queue bound any more);
- the broker closes the channel with 404 NOT_FOUND (a publish to a deleted exchange, a consume
  from a deleted queue).

Then the link is not `topology_whole` (the services' /readyz answers 503), logs one WARNING,
and one task declares the whole topology again (idempotent) and restarts the consumers that
are not running. An attempt that fails is retried after 0.1 s, doubling up to `retry_max`
(2 s): never a busy loop, and never given up while the process runs (an operator who fixes the
broker gets the service back by itself). The first failure is logged at WARNING with its
reason, later ones at DEBUG; the heal at INFO, with how long it took. A report from a publish
made before the last re-declaration (`generation`) is stale and ignored, so a burst of calls
returned by one deletion is one loss, logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.abc import ConsumerCallback, DeliveredMessage
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from shared.amqp_coalesce import CoalescingConnection
from shared.amqp_urls import SETTING, hide_password, node_address, split_amqp_urls
from shared.topology import Topology

log = logging.getLogger(__name__)

OnDelivery = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]
OnChannelClosed = Callable[[Any, BaseException | None], Any]

RETRY_FIRST = 0.1  # seconds before the second attempt to declare the topology again
RETRY_MAX = 2.0  # the longest wait between attempts (the robust connection's own interval)
ATTEMPT_TIMEOUT = 5.0  # one attempt (wait for the channel, declare, consume), at most
RECONNECT_FIRST = 0.1  # seconds before the second attempt to connect; doubles after each
CONNECT_TIMEOUT = 5.0  # one attempt to connect to one node (TCP, TLS, AMQP handshake)
REMIND_EVERY = 60.0  # seconds between WARNING reminders while no node can be reached
RECYCLE_EVERY = 1.0  # seconds between two reconnects for nacks that are not overload
_AUTH_ERRORS = (
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.AuthenticationError,
)


class NodeChannel(aio_pika.RobustChannel):
    """A robust channel that reopens after a channel error (the broker closed it: 404 on a
    deleted exchange, say) and not after its connection is lost: the link then opens a new
    channel on the next node, and a reopen on the dead connection would only wait."""

    async def _on_close(self, closing: asyncio.Future[Any]) -> BaseException | None:
        with contextlib.suppress(asyncio.CancelledError):
            if isinstance(closing.exception(), aiormq.exceptions.AMQPChannelError):
                return await super()._on_close(closing)
        return await aio_pika.Channel._on_close(self, closing)


class _KeepsWriter(TransportFactory):
    """The connection's transport factory, keeping the writer it made: aiormq leaves it open
    when the broker's end closed first (EOF: a node killed), and `NodeConnection.close`
    closes it (else one socket leaked per node lost)."""

    def __init__(self, inner: TransportFactory) -> None:
        self.inner = inner
        self.writer: asyncio.StreamWriter | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, self.writer = await self.inner.create(url, **kwargs)
        return reader, self.writer


class NodeConnection(CoalescingConnection):
    """A connection to one node that never reconnects by itself (see the module docstring)."""

    CHANNEL_CLASS = NodeChannel

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        inner = self.kwargs.get("transport_factory") or (
            TLSTransportFactory() if self.url.scheme == "amqps" else TCPTransportFactory()
        )
        self._transports = _KeepsWriter(inner)
        self.kwargs["transport_factory"] = self._transports

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Connection's handling (close callbacks, `connected` cleared), not RobustConnection's,
        # which would reconnect to this same node.
        await aio_pika.Connection._on_connection_close(self, closing)

    async def close(self, exc: Any = asyncio.CancelledError) -> None:
        try:
            await super().close(exc)
        finally:
            writer = self._transports.writer
            if writer is not None and not writer.is_closing():
                writer.close()


@dataclass
class _Consumer:
    queue: str
    on_delivery: OnDelivery
    no_ack: bool
    tag: str | None = None  # on the current channel; None until (re)started


class _ConsumerTable(dict[str, ConsumerCallback]):
    """aiormq's table of a channel's consumers (`Channel.consumers`), telling the link which
    ones go. aiormq pops a consumer from it on basic.cancel (from the broker) and cancel-ok
    (to our own cancel), and surfaces the broker's cancel in no other way."""

    def __init__(
        self, entries: dict[str, ConsumerCallback], on_removed: Callable[[str], None]
    ) -> None:
        super().__init__(entries)
        self._on_removed = on_removed

    def pop(self, key: str, default: Any = None) -> Any:
        removed = super().pop(key, default)
        if removed is not None:
            self._on_removed(key)
        return removed


class AmqpLink:
    def __init__(
        self,
        urls: str | Sequence[str],
        connection_name: str,
        *,
        reconnect_interval: float,
        topology: Topology | None = None,
        retry_max: float = RETRY_MAX,
        ssl_context: ssl.SSLContext | None = None,
        prefetch: int | None = None,
        on_channel_closed: OnChannelClosed | None = None,
    ) -> None:
        """`urls`: CALLERID_AMQP_URL as it is set (comma-separated) or its entries.
        `reconnect_interval`: the longest wait between attempts to connect. `prefetch`: the
        QoS of every channel. `on_channel_closed(channel, exc)`: called whenever the channel in
        use closes (a channel error, or its connection lost)."""
        self._urls = split_amqp_urls(urls) if isinstance(urls, str) else tuple(urls)
        self._next = 0  # index in _urls of the next node to try
        self._ssl_context = ssl_context
        self._connection_name = connection_name
        self._reconnect_interval = reconnect_interval
        self._topology = topology
        self._retry_max = retry_max
        self._prefetch = prefetch
        self._on_channel_closed_hook = on_channel_closed
        self._on_return_raises = False
        self._connection: NodeConnection | None = None
        self._lost: asyncio.Event | None = None  # set when _connection is lost
        self.node: str | None = None
        """`host:port` of the node connected to (None while not connected)."""
        self.channel: AbstractRobustChannel | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._consumers: list[_Consumer] = []
        self._consume_lock = asyncio.Lock()  # consumers start and stop one task at a time
        self._closing = False
        self._lost_since: float | None = None  # monotonic; None while the topology is whole
        self._generation = 0  # times the topology (or the consumers) were declared again
        self._dirty = False  # something to declare or restart: the healer loops while set
        self._healer: asyncio.Task[None] | None = None
        self._attempts = 0  # since the last success
        self._retry_delay = RETRY_FIRST
        self._failure_logged = False  # since the last success
        self.topology_losses = 0
        """Times the topology was found missing since start (each logged once)."""
        self.connections = 0
        """Connections made since start (1 + the reconnects after a node was lost)."""
        self._nack_check: asyncio.Task[None] | None = None
        self._recycled_at = -RECYCLE_EVERY
        self._dropped = False  # the link closed the connection itself (publish_nacked)

    async def open(self, *, on_return_raises: bool = False) -> AbstractRobustChannel:
        """Connect now to the first node that answers (one pass through the list: the last
        failure is raised if none does), open a channel with publisher confirms and declare
        the topology (if the link has one); then stay connected in the background."""
        self._on_return_raises = on_return_raises
        self._advise()
        failure: BaseException | None = None
        for _ in self._urls:
            try:
                connection = await self._connect_next()
                break
            except CONNECTION_EXCEPTIONS as exc:
                failure = exc
        else:
            assert failure is not None
            raise failure
        try:
            await self._use(connection)
            await self._repair()  # the topology and any consumer, now, raising what fails
        except BaseException:
            self._connection = None
            await connection.close()
            raise
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        assert self.channel is not None
        return self.channel

    def start(self, *, on_return_raises: bool = False) -> None:
        """Connect in the background, now and whenever the connection is lost, until `close`:
        never raises, never waits. `up` (and the adapters' `ready`) tell when it is done."""
        self._on_return_raises = on_return_raises
        self._advise()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def publisher(self) -> aiormq.Channel:
        """aiormq's channel under the robust one, to publish and ack without building an
        aio_pika.Message each time. The concrete class, whose basic_publish and basic_ack take
        `wait` (see `shared.amqp_coalesce`). Waits while the robust channel reopens after a
        channel error; raises ChannelInvalidStateError while no node is connected."""
        channel, connection = self.channel, self._connection
        if channel is None or connection is None or not connection.connected.is_set():
            raise aiormq.exceptions.ChannelInvalidStateError("not connected to RabbitMQ")
        return cast(aiormq.Channel, await channel.get_underlay_channel())

    async def consume(self, queue: str, on_delivery: OnDelivery, *, no_ack: bool = False) -> None:
        """Deliver `queue`'s messages to `on_delivery` (one task each, started by aiormq), on
        this channel and on every channel that replaces it (a reopen, a reconnect); started
        again if the broker cancels it (the queue was deleted and is declared again). Started
        now when connected, else once connected."""
        consumer = _Consumer(queue, on_delivery, no_ack)
        async with self._consume_lock:
            if self.up:
                await self._start(consumer, await self.publisher())
            self._consumers.append(consumer)

    async def cancel_consumers(self) -> None:
        """No new deliveries; those already delivered go on. Raises what aiormq raises.
        Nothing to do when nothing consumes (never started, or cancelled already)."""
        async with self._consume_lock:  # not while the healer is starting one again
            consumers, self._consumers = self._consumers, []
        if not consumers or not self.up:
            return
        channel = await self.publisher()
        for consumer in consumers:
            tag, consumer.tag = consumer.tag, None
            if tag is not None:
                await channel.basic_cancel(tag)

    @property
    def consuming(self) -> bool:
        """Every consumer is started on the current channel."""
        return bool(self._consumers) and all(c.tag is not None for c in self._consumers)

    @property
    def topology_whole(self) -> bool:
        """Nothing the topology declares is known to be missing (see the module docstring)."""
        return self._lost_since is None

    @property
    def generation(self) -> int:
        """Read it before a publish, pass it to `topology_missing` if the publish finds the
        topology missing: a report from before the last re-declaration is then ignored."""
        return self._generation

    def topology_missing(self, why: str, generation: int | None = None) -> None:
        """Part of the topology is gone (`why` says how that showed): not `topology_whole`
        until it is declared again, which starts now. Logged once per loss."""
        if self._topology is None or self._closing:
            return
        if generation is not None and generation != self._generation:
            return  # declared again since that publish was made
        if self._lost_since is None:
            self._lost_since = time.monotonic()
            self.topology_losses += 1
            log.warning(
                "RabbitMQ topology %r lost (%s): not ready until it is declared again",
                self._topology.prefix,
                why,
            )
        self._heal_soon()

    def publish_nacked(self) -> None:
        """A publish to the request queue was nacked. Normally the queue is full (overload:
        `x-overflow: reject-publish`); but a channel that started publishing to a quorum
        queue while its leader was being elected can be left with every publish nacked, for
        good, while a new channel publishes fine (seen on RabbitMQ 3.10.8 when the leader's
        node was killed: tests/integration/test_broker_ha.py). So the link looks: if the
        queue holds less than half its limit, the nacks are not overload, and the link drops
        this connection and connects again (to the next node), with a new channel. At most
        once per `RECYCLE_EVERY` seconds, one look at a time."""
        if self._topology is None or self._closing or self._connection is None:
            return
        if self._nack_check is not None and not self._nack_check.done():
            return
        if time.monotonic() - self._recycled_at < RECYCLE_EVERY:
            return
        self._nack_check = asyncio.get_running_loop().create_task(self._check_nacks())

    async def _check_nacks(self) -> None:
        topology, connection = self._topology, self._connection
        assert topology is not None
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT):
                channel = await self.publisher()
                ok = await channel.queue_declare(topology.request_queue, passive=True)
        except Exception as exc:  # the channel's own trouble: the link handles that already
            log.debug("could not look at the request queue after a nack: %r", exc)
            return
        if ok.message_count is None or ok.message_count >= topology.max_requests // 2:
            return  # full, or nearly: overload, which the nacks rightly say
        if connection is None or connection is not self._connection:
            return
        self._recycled_at = time.monotonic()
        log.warning(
            "RabbitMQ at %s nacks requests while %s holds %d of at most %d messages: this "
            "channel lost track of the queue (its leader moved); connecting again",
            self.node,
            topology.request_queue,
            ok.message_count,
            topology.max_requests,
        )
        self._dropped = True  # said above: the supervisor need not report it as a loss
        await connection.close()  # the supervisor sees the loss and connects again

    @property
    def up(self) -> bool:
        """Connected to a node and the channel open (reopened after a channel error)."""
        connection, channel = self._connection, self.channel
        return (
            connection is not None
            and connection.connected.is_set()
            and channel is not None
            and not channel.is_closed
        )

    async def close(self) -> None:
        self._closing = True
        for task in (self._healer, self._supervisor, self._nack_check):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._healer = self._supervisor = self._nack_check = None
        connection, self._connection = self._connection, None
        for consumer in self._consumers:
            consumer.tag = None
        if connection is not None:
            await connection.close()

    # --- connecting to the nodes, one after the other --------------------------------------

    def _advise(self) -> None:
        topology = self._topology
        if len(self._urls) > 1 and topology is not None and topology.queue_type == "classic":
            log.warning(
                "%s names %d nodes but CALLERID_AMQP_QUEUE_TYPE is classic: the request queue "
                "lives on one node, and identification stops while that node is down; set "
                "CALLERID_AMQP_QUEUE_TYPE=quorum (docs/operations.md, Three brokers)",
                SETTING,
                len(self._urls),
            )

    async def _connect_next(self) -> NodeConnection:
        """One attempt, to the next node of the list; raises what the attempt raised."""
        url = self._urls[self._next]
        self._next = (self._next + 1) % len(self._urls)
        target = URL(url)
        if "name" not in target.query:
            # aiormq sends the URL's `name` as the connection name (the broker's UI shows it);
            # aio-pika does not pass client_properties on to it.
            target = target.update_query(name=self._connection_name)
        connection = NodeConnection(
            target,
            # amqps:// URLs only: the broker's certificate is always verified, against this
            # context's CAs (CALLERID_AMQP_CA_BUNDLE) or the system's.
            ssl_context=self._ssl_context if url.startswith("amqps://") else None,
        )
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await connection.connect(timeout=CONNECT_TIMEOUT)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        return connection

    async def _use(self, connection: NodeConnection) -> None:
        """Make `connection` the link's: open its channel, set the QoS, watch for its loss."""
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        channel = cast(
            AbstractRobustChannel,
            await connection.channel(
                publisher_confirms=True, on_return_raises=self._on_return_raises
            ),
        )
        if self._prefetch is not None:
            await channel.set_qos(prefetch_count=self._prefetch)
        channel.close_callbacks.add(self._on_channel_closed)
        if self._on_channel_closed_hook is not None:
            channel.close_callbacks.add(self._on_channel_closed_hook)
        # Run after the robust channel has reopened (and restored its QoS).
        channel.reopen_callbacks.add(self._on_channel_reopened)
        self._connection, self._lost, self.channel = connection, lost, channel
        self.node = node_address(str(connection.url))
        self.connections += 1

    async def _supervise(self) -> None:
        """Keep a connection: wait for the current one's loss, then connect to the next node."""
        while not self._closing:
            if self._connection is None:
                await self._connect()
            lost = self._lost
            assert lost is not None
            await lost.wait()
            connection, self._connection = self._connection, None
            node, self.node = self.node, None
            for consumer in self._consumers:
                consumer.tag = None
            if connection is not None:
                await connection.close()  # already lost: this only lets go of it
            dropped, self._dropped = self._dropped, False
            if not self._closing and not dropped:
                log.warning(
                    "lost the connection to RabbitMQ at %s: not ready; reconnecting through the "
                    "%d node%s of %s",
                    node,
                    len(self._urls),
                    "" if len(self._urls) == 1 else "s",
                    SETTING,
                )

    async def _connect(self) -> None:
        """Attempts to the nodes in turn, waiting longer after each failure, until one works."""
        failures = 0
        started = last_reminder = time.monotonic()
        while True:
            url = self._urls[self._next]
            try:
                connection = await self._connect_next()
                try:
                    await self._use(connection)
                except BaseException:
                    self._connection = None
                    await connection.close()
                    raise
            except CONNECTION_EXCEPTIONS as exc:  # TimeoutError and ssl's errors are OSErrors
                failures += 1
                now = time.monotonic()
                if failures == 1 or now - last_reminder >= REMIND_EVERY:
                    last_reminder = now
                    self._connect_failed(url, exc, failures, now - started)
                else:
                    log.debug("connecting to RabbitMQ at %s failed: %r", hide_password(url), exc)
                delay = min(self._reconnect_interval, RECONNECT_FIRST * 2 ** (failures - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            break
        if failures:
            log.info(
                "connected to RabbitMQ at %s after %.1f s (%d failed attempt%s)",
                self.node,
                time.monotonic() - started,
                failures,
                "" if failures == 1 else "s",
            )
        else:
            log.info("connected to RabbitMQ at %s", self.node)
        self._heal_soon()  # the topology, then the consumers, on the new channel

    def _connect_failed(self, url: str, exc: BaseException, failures: int, spent: float) -> None:
        node = node_address(url)
        retry = f"retrying every {self._reconnect_interval:g} s at most"
        if isinstance(exc, _AUTH_ERRORS):
            log.error(
                "RabbitMQ at %s refused the credentials of %s (user %r): %s; fix the user and "
                "password in the URL (or the user on the broker); not ready, %s",
                node,
                SETTING,
                URL(url).user,
                _reason(exc),
                retry,
            )
        elif failures == 1:
            log.warning(
                "cannot connect to RabbitMQ at %s (%s): not ready; trying the %d node%s of %s "
                "in turn, %s",
                node,
                _reason(exc),
                len(self._urls),
                "" if len(self._urls) == 1 else "s",
                SETTING,
                retry,
            )
        else:
            log.warning(
                "still no RabbitMQ node of %s reachable after %.0f s and %d attempts (last: %s: "
                "%s): not ready",
                SETTING,
                spent,
                failures,
                node,
                _reason(exc),
            )

    # --- starting consumers, noticing losses, healing -------------------------------------

    async def _start(self, consumer: _Consumer, channel: aiormq.Channel) -> None:
        if not isinstance(channel.consumers, _ConsumerTable):
            channel.consumers = _ConsumerTable(channel.consumers, self._on_consumer_removed)
        ok = await channel.basic_consume(
            consumer.queue, consumer.on_delivery, no_ack=consumer.no_ack
        )
        consumer.tag = ok.consumer_tag

    def _on_consumer_removed(self, tag: str) -> None:
        for consumer in self._consumers:
            if consumer.tag == tag:  # not one we cancelled: those are off the list already
                consumer.tag = None
                self.topology_missing(f"the broker cancelled the consumer of {consumer.queue}")
                self._heal_soon()  # a link without a topology still starts it again

    def _on_channel_closed(self, _sender: Any, exc: BaseException | None) -> None:
        for consumer in self._consumers:
            consumer.tag = None  # consumers die with their channel
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            self.topology_missing(f"the broker closed the channel: {exc}")

    def _on_channel_reopened(self, _sender: Any) -> None:
        self._heal_soon()

    def _heal_soon(self) -> None:
        self._dirty = True
        if self._closing or not self.up:
            return  # the channel's reopen calls this again
        if self._healer is None or self._healer.done():
            self._healer = asyncio.get_running_loop().create_task(self._heal())

    async def _heal(self) -> None:
        """Declare the topology and restart the consumers until it works (one task at most).

        Attempts are made on an open channel only: a closed one is reopened by the robust
        channel, whose reopen callback starts this again, or replaced by the link's reconnect,
        which does too. The wait between attempts lives
        on the link, so a reopen does not cut it short."""
        while self._dirty and self.up:
            self._dirty = False
            self._attempts += 1
            try:
                async with asyncio.timeout(ATTEMPT_TIMEOUT):
                    await self._repair()
            except Exception as exc:  # any failure is retried: the healer never dies
                self._dirty = True
                self._attempt_failed(exc)
                await asyncio.sleep(self._retry_delay)
                self._retry_delay = min(self._retry_delay * 2, self._retry_max)
                continue
            self._generation += 1
        if self._dirty:
            return  # the channel closed: its reopen goes on from here
        attempts, self._attempts = self._attempts, 0
        self._retry_delay = RETRY_FIRST
        self._failure_logged = False
        lost_since, self._lost_since = self._lost_since, None
        if lost_since is not None and self._topology is not None:
            log.info(
                "RabbitMQ topology %r declared again after %.2f s (%d attempt%s): ready",
                self._topology.prefix,
                time.monotonic() - lost_since,
                attempts,
                "" if attempts == 1 else "s",
            )

    def _attempt_failed(self, exc: Exception) -> None:
        """Log the first failure that says something about the topology; the rest at DEBUG.
        A channel or connection lost mid-attempt says nothing: the reconnect is logged.

        PRECONDITION_FAILED (a queue of that name with other arguments: another queue type,
        length limit or prefix clash) needs the operator, so it is an ERROR saying what to do."""
        refused = _refused(exc)
        if refused and self._lost_since is None:
            if not isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
                # Declaring it again after a reopen failed: that is how this loss showed.
                self.topology_missing(f"declaring it failed: {exc!r}")
                self._failure_logged = True
                return
            self._lost_since = time.monotonic()  # counted, and logged just below
            self.topology_losses += 1
        if (refused or self.up) and self._lost_since is not None and not self._failure_logged:
            self._failure_logged = True
            if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
                log.error(
                    "could not declare the RabbitMQ topology again (%s): a queue of that name "
                    "exists with other arguments. If CALLERID_AMQP_QUEUE_TYPE changed, stop "
                    "every gateway and resolver, delete the queue (rabbitmqctl delete_queue "
                    "NAME) and start them again, or set CALLERID_AMQP_QUEUE_TYPE to the queue's "
                    "type; not ready, retrying every %g s at most",
                    exc,
                    self._retry_max,
                )
                return
            log.warning(
                "could not declare the RabbitMQ topology again (%r); retrying every %g s at most",
                exc,
                self._retry_max,
            )
        else:
            log.debug("declaring the topology again failed: %r", exc)

    async def _repair(self) -> None:
        channel = await self.publisher()
        if self._topology is not None:
            await self._topology.declare(channel)
        async with self._consume_lock:
            for consumer in self._consumers:
                if consumer.tag is None or consumer.tag not in channel.consumers:
                    await self._start(consumer, channel)


def writable(channel: aiormq.abc.AbstractChannel) -> bool:
    """Whether a frame written on `channel` now reaches the broker on an open channel.

    aiormq writes a publish, ack or nack whatever the state of its channel, and marks a channel
    closed (`is_closed`) only a few steps after it has answered the broker's Close (a publish
    to a deleted exchange, say). A frame written in between reaches the broker on a channel
    number it has closed, and the broker closes the whole connection for it (504
    CHANNEL_ERROR "expected 'channel.open'"), failing every call waiting on it. The channel
    leaves its connection's table in the very step it answers, so that is what tells."""
    return not channel.is_closed and channel.connection.channels.get(channel.number) is channel


def _refused(exc: BaseException) -> bool:
    """The broker refused a declaration or consume: something conflicting holds the name (406,
    405), we may not (403), or it is missing (404). Not a connection that dropped mid-way."""
    return isinstance(
        exc,
        aiormq.exceptions.ChannelPreconditionFailed
        | aiormq.exceptions.ChannelLockedResource
        | aiormq.exceptions.ChannelAccessRefused
        | aiormq.exceptions.ChannelNotFoundEntity,
    )


def amqp_ssl_context(urls: str, ca_bundle: str | None) -> ssl.SSLContext | None:
    """The TLS context for the `amqps://` entries of CALLERID_AMQP_URL: the system's CAs plus
    `ca_bundle`, always verified (an entry that asks aiormq not to verify is refused:
    `no_verify_ssl`). None when no entry is amqps://."""
    entries = split_amqp_urls(urls)
    if any("no_verify_ssl" in url for url in entries):
        raise ValueError(f"{SETTING}: no_verify_ssl is refused: TLS is always verified")
    if not any(url.startswith("amqps://") for url in entries):
        return None
    return ssl.create_default_context(cafile=ca_bundle)


def _reason(exc: BaseException) -> str:
    """A failure to connect in a few words: `connection refused`, `ACCESS_REFUSED - ...`."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate is not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return os.strerror(exc.errno).lower()  # aiormq keeps the errno of a refused connect
    return str(exc) or repr(exc)


class _ReportedByTheLink(logging.Filter):
    """aiormq logs every connection attempt that fails (at ERROR, whatever the reason); the
    link reports those itself, once per outage (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("error when creating"))


logging.getLogger("aiormq.connection").addFilter(_ReportedByTheLink())
