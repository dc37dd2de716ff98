"""One robust RabbitMQ connection, its channel and its consumers, as both services hold them.

What belongs here: connecting (with a connection name the broker's UI shows), opening the one
channel each adapter uses, declaring the topology and keeping it declared, consuming, telling
whether all of it is up, and closing. What does not: the names and arguments of the topology
(`shared.topology`) and publishing or handling messages (the adapters).

Consumers are aiormq's, on the channel under aio-pika's robust one: aio-pika's own consumer
wraps every delivery in an `aio_pika.IncomingMessage` and runs the callback in a second task,
which is about a tenth of a resolver's AMQP work per request and buys these services nothing.
The robust channel does not know about them, nor about the topology (declared on aiormq's
channel too), so the link declares the topology and starts the consumers again once the
channel has reopened after a reconnect; `consuming` is false from the channel's loss until then.

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
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import ConsumerCallback, DeliveredMessage

from shared.amqp_coalesce import CoalescingConnection
from shared.topology import Topology

log = logging.getLogger(__name__)

OnDelivery = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]

RETRY_FIRST = 0.1  # seconds before the second attempt to declare the topology again
RETRY_MAX = 2.0  # the longest wait between attempts (the robust connection's own interval)
ATTEMPT_TIMEOUT = 5.0  # one attempt (wait for the channel, declare, consume), at most


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
        url: str,
        connection_name: str,
        *,
        reconnect_interval: float,
        topology: Topology | None = None,
        retry_max: float = RETRY_MAX,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._url = url
        self._ssl_context = ssl_context
        self._connection_name = connection_name
        self._reconnect_interval = reconnect_interval
        self._topology = topology
        self._retry_max = retry_max
        self._connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
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

    async def open(self, *, on_return_raises: bool = False) -> AbstractRobustChannel:
        """Connect, open a channel with publisher confirms and declare the topology (if the
        link has one); reconnects, and declares again, by itself after."""
        self._connection = await aio_pika.connect_robust(
            self._url,
            client_properties={"connection_name": self._connection_name},
            reconnect_interval=self._reconnect_interval,
            connection_class=CoalescingConnection,
            # amqps:// URLs only: the broker's certificate is always verified, against this
            # context's CAs (CALLERID_AMQP_CA_BUNDLE) or the system's.
            ssl_context=self._ssl_context,
        )
        channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=on_return_raises
        )
        self.channel = cast(AbstractRobustChannel, channel)
        self.channel.close_callbacks.add(self._on_channel_closed)
        # Run after the robust channel has reopened (and restored its QoS).
        self.channel.reopen_callbacks.add(self._on_channel_reopened)
        if self._topology is not None:
            await self._topology.declare(await self.publisher())
        return self.channel

    async def publisher(self) -> aiormq.Channel:
        """aiormq's channel under the robust one, to publish and ack without building an
        aio_pika.Message each time. The concrete class, whose basic_publish and basic_ack take
        `wait` (see `shared.amqp_coalesce`). Waits while the robust channel reopens."""
        channel = self.channel
        assert channel is not None, "publisher() before open()"
        return cast(aiormq.Channel, await channel.get_underlay_channel())

    async def consume(self, queue: str, on_delivery: OnDelivery, *, no_ack: bool = False) -> None:
        """Deliver `queue`'s messages to `on_delivery` (one task each, started by aiormq), on
        this channel and on every channel that replaces it after a reconnect; started again
        if the broker cancels it (the queue was deleted and is declared again)."""
        consumer = _Consumer(queue, on_delivery, no_ack)
        async with self._consume_lock:
            await self._start(consumer, await self.publisher())
            self._consumers.append(consumer)

    async def cancel_consumers(self) -> None:
        """No new deliveries; those already delivered go on. Raises what aiormq raises.
        Nothing to do when nothing consumes (never started, or cancelled already)."""
        async with self._consume_lock:  # not while the healer is starting one again
            consumers, self._consumers = self._consumers, []
        if not consumers:
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

    @property
    def up(self) -> bool:
        """Connected and the channel open (a robust channel is reopened after a reconnect)."""
        connection, channel = self._connection, self.channel
        return (
            connection is not None
            and connection.connected.is_set()
            and channel is not None
            and not channel.is_closed
        )

    async def close(self) -> None:
        self._closing = True
        healer, self._healer = self._healer, None
        if healer is not None:
            healer.cancel()
            await asyncio.gather(healer, return_exceptions=True)
        connection, self._connection = self._connection, None
        for consumer in self._consumers:
            consumer.tag = None
        if connection is not None:
            await connection.close()

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
        connection, whose reopen callback starts this again. The wait between attempts lives
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
        A channel or connection lost mid-attempt says nothing: the reconnect is logged."""
        refused = _refused(exc)
        if refused and self._lost_since is None:
            # Declaring it again after a reopen failed: that is how this loss showed.
            self.topology_missing(f"declaring it failed: {exc!r}")
            self._failure_logged = True
        elif (refused or self.up) and self._lost_since is not None and not self._failure_logged:
            self._failure_logged = True
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


def amqp_ssl_context(url: str, ca_bundle: str | None) -> ssl.SSLContext | None:
    """The TLS context for an `amqps://` URL: the system's CAs plus `ca_bundle`, always
    verified (a URL that asks aiormq not to verify is refused: `no_verify_ssl`)."""
    if not url.startswith("amqps://"):
        return None
    if "no_verify_ssl" in url:
        raise ValueError("CALLERID_AMQP_URL: no_verify_ssl is refused: TLS is always verified")
    return ssl.create_default_context(cafile=ca_bundle)
