"""The resolver side of the identification RPC over RabbitMQ: consume requests, publish replies.

What belongs here: the consumer, per-message acknowledgement, reply and dead-letter publishing,
graceful stop. What does not: names and queue arguments (`shared.topology`), answering a
request (the injected `RequestHandler`, i.e. the resolver).

Per message (delivery is at-least-once; handlers are idempotent):

- Unparseable, invalid, or without `reply_to` → the body, without customer ids or caller
  numbers (`redacted`), is published to the dead-letter
  exchange with the reason in `DEAD_REASON_HEADER`, the original is acked, `dead_lettered`
  counted. Nothing is requeued: a poison message must not loop.
- Deadline already passed → acked and dropped without starting the handler; `expired` counted
  (label: the node's configured name, via `node_label`).
- Otherwise `await handler(request)`, publish the reply to `reply_to` with publisher confirms,
  and only then ack. If the reply cannot be published, the request is requeued while its
  deadline still leaves time (another worker may manage), else acked and dropped.
- A handler that raises (a bug) gets an `internal` error envelope sent for it; a bug in this
  module rejects the message (no requeue) rather than leave it unacked.

Acks are queued, not sent at once: a reply published in the meantime takes them along (one send
to the broker for the acks and the reply), else they go at the end of the loop turn (ACK_DELAY),
together with whatever else is queued for the broker. A resolver that dies in between gets its
requests redelivered and answered again; the gateway drops the second reply as late. Replies
and acks are published without aiormq's per-frame drain, so the frames aiormq's writer takes in
one go leave in one send (`shared.amqp_coalesce`).

Concurrency: aiormq starts a task per delivery, so up to `prefetch` handlers run at once.

A deleted request queue: the broker cancels the consumer; the link (`shared.amqp_link`) logs
it once, declares the topology again and consumes again, and `ready` is false until it has.
Requests already delivered are still answered and acked (the acks of a deleted queue's
messages are accepted); those still queued were deleted with it, and their callers fail over.

Stop: cancel the consumer (no new deliveries), wait for in-flight handlers to finish and their
replies to be published (bounded by `drain_timeout`), send the queued acks, then close.
Anything still unacked when the channel closes goes back to the queue for another worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import cast

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pydantic import ValidationError

from crm_resolver.batch import Batch
from crm_resolver.metrics import ResolverMetrics
from shared.amqp_link import AmqpLink, writable
from shared.answering import answer_request
from shared.messages import IdentifyReply, IdentifyRequest
from shared.ports import RequestHandler
from shared.topology import DEAD_REASON_HEADER, JSON, TRANSIENT, Topology

log = logging.getLogger(__name__)

PERSISTENT = 2  # AMQP delivery mode of dead letters: kept for someone to look at
MIN_REPLY_WAIT = 0.05  # seconds granted to a reply publish even when the deadline is near
# How long an ack may wait for a reply to go out with. 0: to the end of the loop turn, which
# under load already batches it with other frames (5 ms measured no better, twice).
ACK_DELAY = 0.0
_AMQP_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError)


class AmqpWorker:
    def __init__(
        self,
        url: str,
        handler: RequestHandler,
        metrics: ResolverMetrics,
        *,
        topology: Topology = Topology(),  # noqa: B008 - frozen dataclass, safe as a default
        prefetch: int = 64,
        connection_name: str = "callerid-resolver",
        clock: Callable[[], float] = time.time,
        node_label: Callable[[str], str] = lambda node_id: node_id,
        reconnect_interval: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._handler = handler
        self._metrics = metrics
        self._topology = topology
        self._clock = clock
        self._node_label = node_label
        self._link = AmqpLink(
            url,
            connection_name,
            reconnect_interval=reconnect_interval,
            topology=topology,
            ssl_context=ssl_context,
            prefetch=prefetch,
        )
        self._in_flight = 0
        self._acks: Batch[tuple[aiormq.Channel, int]] = Batch(
            ACK_DELAY, self._send_acks
        )  # see _ack_soon
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, *, wait: bool = True) -> None:
        """Connect and consume requests. `wait`: now, raising if no node answers (tests);
        else in the background, retrying until a node answers (the service: not `ready`
        until then)."""
        if not wait:
            self._link.start()
            await self._link.consume(self._topology.request_queue, self._on_message)
            return
        started = False
        try:
            await self._link.open()  # declares the topology, sets the QoS
            await self._link.consume(self._topology.request_queue, self._on_message)
            started = True
        finally:
            if not started:
                await self._link.close()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, finish the ones in flight (up to `drain_timeout` s), then close."""
        try:
            await self._link.cancel_consumers()
        except _AMQP_ERRORS as exc:
            log.warning("could not cancel the request consumer: %r", exc)
        # Deliveries that arrived before cancel-ok have tasks scheduled but not started:
        # let them start, so they are finished here rather than requeued at close.
        await asyncio.sleep(0)
        try:
            async with asyncio.timeout(drain_timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "stopping with %d requests in flight: they will be redelivered", self._in_flight
            )
        await self._acks.flush()
        await self._link.close()

    @property
    def ready(self) -> bool:
        """Connected, channel open, consuming requests and the topology whole (not being
        declared again after a queue or exchange was deleted)."""
        link = self._link
        return link.consuming and link.up and link.topology_whole

    @property
    def in_flight(self) -> int:
        """Requests delivered to this worker and not yet settled (an ack may still be queued)."""
        return self._in_flight

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._in_flight += 1
        self._idle.clear()
        try:
            try:
                requeue = await self._handle(message)
            except _AMQP_ERRORS:
                raise
            except Exception:
                log.exception("failed to handle a request message")
                # The safety net for a bug: the message is rejected, not left in limbo.
                if writable(_channel(message)):  # else the broker requeues it by itself
                    await _channel(message).basic_reject(_tag(message), requeue=False)
                return
            await self._settle(message, requeue=requeue)
        except _AMQP_ERRORS as exc:
            # The broker went away mid-request (a restart, a network cut): expected, and the
            # unacked request is redelivered to whichever resolver is connected next.
            log.warning("request not finished, broker connection lost: %r", exc)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _handle(self, message: DeliveredMessage) -> bool:
        """Answer, dead-letter or drop one request; True if it should be requeued."""
        try:
            request = IdentifyRequest.model_validate_json(message.body)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            await self._dead_letter(message, f"invalid request: {where}: {first['msg']}")
            return False
        reply_to = message.header.properties.reply_to
        if not reply_to:
            await self._dead_letter(message, "no reply_to")
            return False
        if request.deadline <= self._clock():
            self._metrics.expired.labels(self._node_label(request.node_id)).inc()
            return False
        reply = await answer_request(self._handler, request)
        try:
            await self._reply(message, reply_to, reply, request.deadline)
        except (*_AMQP_ERRORS, TimeoutError) as exc:
            retry = request.deadline > self._clock()
            log.warning(
                "reply to %s not published (%r); %s",
                request.request_id,
                exc,
                "requeueing the request" if retry else "dropping it: its deadline has passed",
            )
            return retry
        return False

    async def _reply(
        self, message: DeliveredMessage, reply_to: str, reply: IdentifyReply, deadline: float
    ) -> None:
        body = reply.model_dump_json().encode()
        # Bounded: past the deadline nobody waits for this reply, so neither should we.
        async with asyncio.timeout(max(MIN_REPLY_WAIT, deadline - self._clock())):
            # aiormq's publish under aio-pika's robust channel, as the gateway publishes: the
            # same frames and confirm, without building an aio_pika.Message for every reply.
            underlay = await self._link.publisher()
            if not writable(underlay):  # the broker has just closed it: see `writable`
                raise aiormq.exceptions.ChannelInvalidStateError("the channel is closing")
            # The acks waiting go out with this reply: one send to the broker for all of them.
            await self._send_acks(self._acks.take())
            await underlay.basic_publish(
                body,
                exchange="",
                routing_key=reply_to,
                properties=Basic.Properties(
                    content_type=JSON,
                    correlation_id=message.header.properties.correlation_id,
                    delivery_mode=TRANSIENT,
                ),
                # Not mandatory: a reply whose caller has gone is unroutable by design.
                mandatory=False,
                # The confirm is awaited: no drain per frame (see shared/amqp_coalesce.py).
                wait=False,
            )

    async def _dead_letter(self, message: DeliveredMessage, reason: str) -> None:
        self._metrics.dead_lettered.inc()
        try:
            underlay = await self._link.publisher()
            if not writable(underlay):  # the broker has just closed it: see `writable`
                raise aiormq.exceptions.ChannelInvalidStateError("the channel is closing")
            # Confirmed (wait=True, aiormq's default): dead letters are rare, and kept.
            await underlay.basic_publish(
                redacted(message.body),
                exchange=self._topology.dead_letter_exchange,
                routing_key=self._topology.routing_key,
                properties=Basic.Properties(
                    headers={DEAD_REASON_HEADER: reason[:200]},
                    content_type=message.header.properties.content_type,
                    correlation_id=message.header.properties.correlation_id,
                    delivery_mode=PERSISTENT,
                ),
                mandatory=False,
            )
        except _AMQP_ERRORS as exc:
            # Requeueing a poison message would loop it; losing it is the lesser harm.
            log.error("could not dead-letter a message (%s): %r; dropping it", reason, exc)

    async def _settle(self, message: DeliveredMessage, *, requeue: bool) -> None:
        if not requeue:
            self._ack_soon(message)
            return
        channel = _channel(message)
        if not writable(channel):
            return  # the broker requeues every unacked message of a closed channel by itself
        try:
            await channel.basic_nack(_tag(message), requeue=True)
        except _AMQP_ERRORS as exc:
            # The channel is gone: the broker requeues every unacked message by itself.
            log.info("could not requeue a request message (%r); the broker will redeliver", exc)

    def _ack_soon(self, message: DeliveredMessage) -> None:
        """Queue the ack: it goes out with the next reply, or after ACK_DELAY without one.

        An ack needs no answer, so it can wait for a frame going the same way: the resolver
        then makes one send to the broker per request instead of two. If this process dies
        in the meantime the request is redelivered and answered twice; the gateway drops the
        second reply as late, and handlers are idempotent.
        """
        self._acks.add([(_channel(message), _tag(message))])

    async def _send_acks(self, acks: list[tuple[aiormq.Channel, int]]) -> None:
        for channel, tag in acks:
            if not writable(channel):
                continue  # a tag is only valid on its channel; the broker requeued these
            try:
                # No drain per ack: the frames of this turn leave together.
                await channel.basic_ack(tag, wait=False)
            except _AMQP_ERRORS as exc:
                log.info("could not ack a request message (%r); the broker will redeliver", exc)


def _channel(message: DeliveredMessage) -> aiormq.Channel:
    """The channel a request came on, the only one its delivery tag is valid on: aiormq's
    concrete class, whose basic_ack takes `wait`."""
    return cast(aiormq.Channel, message.channel)


def _tag(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None  # a delivery to a consumer with acks: always tagged
    return tag


# A dead letter is kept on disk for someone to look at: it must not keep customer data.
_PERSONAL_FIELDS = ("customer_id", "caller_number")
_DIGIT_RUN = re.compile(rb"[0-9]{3,}")


def redacted(body: bytes) -> bytes:
    """The body of a dead letter without customer ids or caller numbers: a JSON object's
    `customer_id` and `caller_number` are replaced; in anything else (it could not be parsed,
    so nobody knows where an id is) every run of three or more digits is masked."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict):
        for name in _PERSONAL_FIELDS:
            if name in document:
                document[name] = "[redacted]"
        return json.dumps(document, separators=(",", ":")).encode()
    return _DIGIT_RUN.sub(lambda match: b"#" * len(match[0]), body)
