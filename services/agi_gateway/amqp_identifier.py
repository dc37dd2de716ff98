"""The gateway side of the identification RPC over RabbitMQ (implements `shared.ports.Identifier`).

What belongs here: publishing requests, matching replies to callers, and translating every
aio-pika/aiormq failure into the `shared.ports` tree once (`from exc`). What does not: names
and queue arguments (`shared.topology`), deciding what a reply means (the call flow).

How a call goes:

- One robust connection, one channel with publisher confirms and `on_return_raises`, and ONE
  long-lived consumer on direct reply-to (no_ack). Requests are published on that same channel
  (direct reply-to requires it) with `correlation_id = request_id`.
- Each call owns a future in `_pending` (correlation id → future). The entry is removed in a
  `finally`, whatever happens, so the map only ever holds calls that are still waiting.
- The publish (including its confirm) is bounded by `min(publish_timeout, time left)`: a
  broker outage must never hold a caller for its whole budget. Unroutable (basic.return),
  nacked (request queue full), not connected or too slow → `IdentifyUnavailable` at once.
- Then the caller waits for the reply until the request's deadline → `IdentifyTimeout`.
- A reply whose correlation id is not pending (its caller gave up: a late reply) is dropped
  and counted in `late_replies`; so is an unparseable reply, which also fails its caller at
  once (`IdentifyUnavailable`) rather than leaving it in silence until the deadline.
- Direct reply-to is bound to the channel: when the channel or connection drops, replies to
  requests already sent can never arrive, so those callers fail at once. The link starts the
  reply consumer again once the channel has reopened, or on the next node of
  CALLERID_AMQP_URL once it has connected there (`shared.amqp_link`). Until then
  `ready` is false and calls fail at once: RabbitMQ closes a channel that publishes with direct
  reply-to before consuming from it.
- A request returned unroutable means the request queue (or its binding) is gone: the link is
  told (`topology_missing`), declares the topology again, and `ready` is false until it has;
  meanwhile calls fail at once. A deleted exchange shows as the broker closing the channel
  with 404, which the link notices by itself. Either way the loss is logged once, not per call.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pydantic import ValidationError

from agi_gateway.metrics import GatewayMetrics
from shared.amqp_link import AmqpLink, writable
from shared.messages import IdentifyReply, IdentifyRequest
from shared.ports import IdentifyTimeout, IdentifyUnavailable
from shared.topology import JSON, REPLY_TO, TRANSIENT, Topology

log = logging.getLogger(__name__)

LOG_EVERY = 100  # log the first bad reply, then one in LOG_EVERY: a flood must not flood logs

# Everything a publish can raise once the channel is in a bad state; translated in one place.
_PUBLISH_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError)


class AmqpIdentifier:
    def __init__(
        self,
        url: str,
        metrics: GatewayMetrics,
        *,
        topology: Topology = Topology(),  # noqa: B008 - frozen dataclass, safe as a default
        connection_name: str = "callerid-gateway",
        publish_timeout: float = 0.5,
        reconnect_interval: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._metrics = metrics
        self._topology = topology
        self._publish_timeout = publish_timeout
        self._link = AmqpLink(
            url,
            connection_name,
            reconnect_interval=reconnect_interval,
            topology=topology,
            ssl_context=ssl_context,
            on_channel_closed=self._on_channel_closed,
        )
        self._closed = False
        self._pending: dict[str, asyncio.Future[IdentifyReply]] = {}
        self._bad_replies = 0

    async def start(self, *, wait: bool = True) -> None:
        """Connect and consume replies. `wait`: now, raising if no node answers (tests);
        else in the background (the gateway, which serves calls meanwhile: not `ready`, so
        CRM nodes fail over at once)."""
        if not wait:
            self._link.start(on_return_raises=True)
            await self._link.consume(REPLY_TO, self._on_reply, no_ack=True)
            return
        started = False
        try:
            await self._link.open(on_return_raises=True)  # declares the topology
            await self._link.consume(REPLY_TO, self._on_reply, no_ack=True)
            started = True
        finally:
            if not started:
                await self._link.close()

    async def close(self) -> None:
        self._closed = True
        self._fail_pending("the identifier is closing")
        await self._link.close()

    @property
    def ready(self) -> bool:
        """Connected, channel open, consuming replies and the topology whole (not being
        declared again after a queue or exchange was deleted): requests can be answered."""
        link = self._link
        return not self._closed and link.consuming and link.up and link.topology_whole

    @property
    def pending(self) -> int:
        """Calls waiting for a reply right now (0 when idle: entries never outlive calls)."""
        return len(self._pending)

    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        left = request.deadline - time.time()
        if left <= 0:
            raise IdentifyTimeout("the request's deadline had passed before it was sent")
        if not self.ready:
            raise IdentifyUnavailable(self._why_not_ready())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + left
        correlation_id = request.request_id
        if correlation_id in self._pending:
            raise ValueError(f"request id {correlation_id!r} is already waiting for a reply")
        future: asyncio.Future[IdentifyReply] = loop.create_future()
        self._pending[correlation_id] = future
        generation = self._link.generation  # a return is news only if nothing healed since
        try:
            properties = Basic.Properties(
                content_type=JSON,
                delivery_mode=TRANSIENT,
                correlation_id=correlation_id,
                # Unique already; else aiormq would make up a random one for every publish.
                message_id=correlation_id,
                reply_to=REPLY_TO,
                # RabbitMQ drops the request once the caller has stopped waiting for it.
                expiration=str(max(1, int(left * 1000))),
            )
            try:
                async with asyncio.timeout(min(self._publish_timeout, left)):
                    underlay = await self._link.publisher()
                    # It may have waited for a reopen (the reply consumer may lag), or the
                    # broker may have just closed the channel: a publish then would cost the
                    # whole connection (see `writable`).
                    if not (self.ready and writable(underlay)):
                        raise IdentifyUnavailable(self._why_not_ready())
                    await underlay.basic_publish(
                        request.model_dump_json().encode(),
                        exchange=self._topology.request_exchange,
                        routing_key=self._topology.routing_key,
                        properties=properties,
                        mandatory=True,
                        # The confirm is awaited: no drain per frame (see amqp_coalesce).
                        wait=False,
                    )
            except TimeoutError as exc:
                if left <= self._publish_timeout:  # the deadline, not the broker, ran out
                    raise IdentifyTimeout("the deadline passed while publishing") from exc
                raise IdentifyUnavailable("the broker did not confirm the request in time") from exc
            except aiormq.exceptions.PublishError as exc:
                self._link.topology_missing("a request came back unroutable", generation)
                raise IdentifyUnavailable("no queue is bound for identification requests") from exc
            except aiormq.exceptions.DeliveryError as exc:
                self._link.publish_nacked()  # the queue full, or a channel gone stale: it looks
                raise IdentifyUnavailable("the broker rejected the request (queue full)") from exc
            except _PUBLISH_ERRORS as exc:
                raise IdentifyUnavailable(f"publishing failed: {exc!r}") from exc
            # At the deadline the future itself fails (a loop timer: cheaper than a timeout
            # context, and this runs on every call).
            timer = loop.call_at(deadline, _give_up, future)
            try:
                return await future
            finally:
                timer.cancel()
        finally:
            del self._pending[correlation_id]
            if not future.done():
                future.cancel()

    async def _on_reply(self, message: DeliveredMessage) -> None:
        future = self._pending.get(message.header.properties.correlation_id or "")
        if future is None or future.done():
            self._metrics.late_replies.inc()
            return
        try:
            reply = IdentifyReply.model_validate_json(message.body)
        except ValidationError as exc:
            self._metrics.late_replies.inc()
            self._bad_replies += 1
            if self._bad_replies % LOG_EVERY == 1:
                log.warning(
                    "unparseable identification reply (%d so far): %s",
                    self._bad_replies,
                    exc.errors(include_url=False, include_input=False)[:3],
                )
            future.set_exception(IdentifyUnavailable("the resolver's reply was unparseable"))
            return
        future.set_result(reply)

    def _why_not_ready(self) -> str:
        if not self._closed and self._link.up and not self._link.topology_whole:
            return "the request queue or exchange is missing: declaring it again"
        return "not connected to the broker"

    def _on_channel_closed(self, _sender: Any, exc: BaseException | None) -> None:
        # Direct reply-to is tied to the channel: nothing sent before this can be answered.
        if self._pending:
            # A 404 is a deleted exchange: the link logs that loss at WARNING, once.
            missing = isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity)
            log.log(
                logging.INFO if missing else logging.WARNING,
                "broker channel closed (%r): failing %d waiting calls",
                exc,
                self.pending,
            )
        self._fail_pending("the broker connection was lost")

    def _fail_pending(self, why: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(IdentifyUnavailable(why))
                # A caller still publishing never awaits its future; mark the exception seen so
                # asyncio does not log it. A caller that does await it still gets it raised.
                future.exception()


def _give_up(future: asyncio.Future[IdentifyReply]) -> None:
    if not future.done():
        future.set_exception(IdentifyTimeout("no reply before the request's deadline"))
