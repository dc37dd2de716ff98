"""Every RabbitMQ name the identification RPC uses, and the one function that declares them.

What belongs here: exchange, queue, routing-key and header names, the queue arguments, and
`declare`. What does not: publishing, consuming, acking (the adapters in
`agi_gateway.amqp_identifier` and `crm_resolver.amqp_worker` do that).

The shape, and why:

- Requests go to a durable direct exchange `<prefix>.identify` with routing key `identify`,
  bound to one durable queue `<prefix>.identify.requests` shared by every resolver.
  Request messages themselves are transient (delivery mode 1) and carry `expiration` = the time
  left: a request is worthless after a few seconds, so a classic queue never writes it to disk.
- The queue type (`queue_type`, CALLERID_AMQP_QUEUE_TYPE) is `classic` (one node holds the
  queue: the least work per request; the default) or `quorum` (replicated over the cluster's
  nodes with Raft: it outlives the loss of a minority of them, at the cost of writing every
  request, transient or not, to each member's log). Both queues take the same type: on a
  cluster, a classic dead-letter queue on a node that is down could not be declared again from
  another node (404 "home node ... is down"), and the whole topology would stay unready. What
  the topology uses works on both (checked on RabbitMQ 3.10.8): per-message `expiration` (quorum
  queues honour it since 3.10), `x-max-length` with `reject-publish` (a quorum queue enforces
  it to within a message or so) and `drop-head`. A quorum queue cannot be exclusive nor
  non-durable, which the topology never asks for; replies use direct reply-to, no queue.
- The request queue is bounded (`x-max-length`, default 5000) with `x-overflow:
  reject-publish`: when resolvers fall that far behind, the broker nacks new requests and the
  gateway fails them at once (`IdentifyUnavailable`) instead of queueing calls that would only
  expire. 5000 is more than a few seconds of the target load (800 requests/s for a 4 s budget).
- There is no queue-level dead-letter exchange: it would also collect every *expired* request,
  which is normal traffic under overload, not something to investigate. Resolvers publish only
  unparseable messages, explicitly, to the fanout exchange `<prefix>.dead`, bound to the bounded
  queue `<prefix>.identify.dead` (oldest dropped first), with the reason in `DEAD_REASON_HEADER`.
- Replies use RabbitMQ direct reply-to (`REPLY_TO`): no reply queue to declare or clean up.

`declare` is idempotent and every service calls it at start-up, so whichever starts first
creates the topology; it declares on aiormq's channel, so aio-pika's robust channel does not
record what it declared (it would declare it again on every reopen, one more copy each time).
Each service also declares it again whenever it finds part of it missing (a queue or exchange
deleted on a live broker): see `shared.amqp_link`. RabbitMQ refuses to re-declare a queue with
different arguments (PRECONDITION_FAILED), so every service must use the same `Topology`
values; changing `max_requests` or `queue_type` on a live system means stopping every service,
then deleting both queues (a running service would re-declare them with its old arguments at
once). The link logs that refusal as one ERROR saying so (`shared.amqp_link`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import aiormq.abc
from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel

REPLY_TO = "amq.rabbitmq.reply-to"
"""RabbitMQ's direct reply-to pseudo-queue: consumed with no_ack on the publishing channel."""

DEAD_REASON_HEADER = "x-callerid-dead-reason"
"""Header on a dead-lettered message saying why it could not be handled."""

ROUTING_KEY = "identify"
JSON = "application/json"
QueueType = Literal["classic", "quorum"]
TRANSIENT = 1
"""AMQP delivery mode of requests and replies: never written to disk (they live seconds)."""


@dataclass(frozen=True)
class Topology:
    """The names for one deployment; tests use a unique prefix to isolate themselves."""

    prefix: str = "callerid"
    max_requests: int = 5000
    max_dead_letters: int = 10_000
    queue_type: QueueType = "classic"

    @property
    def request_exchange(self) -> str:
        return f"{self.prefix}.identify"

    @property
    def request_queue(self) -> str:
        return f"{self.prefix}.identify.requests"

    @property
    def routing_key(self) -> str:
        return ROUTING_KEY

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.identify.dead"

    @property
    def reply_to(self) -> str:
        return REPLY_TO

    def request_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": self.queue_type,
            "x-max-length": self.max_requests,
            "x-overflow": "reject-publish",
        }

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": self.queue_type,
            "x-max-length": self.max_dead_letters,
            "x-overflow": "drop-head",
        }

    async def declare(self, channel: AbstractChannel | aiormq.abc.AbstractChannel) -> None:
        """Declare exchanges, queues and bindings (idempotent; same arguments everywhere).

        On aio-pika's channel (tests, tooling) or on aiormq's under it (the services)."""
        if isinstance(channel, AbstractChannel):
            channel = await channel.get_underlay_channel()
        await channel.exchange_declare(
            self.request_exchange, exchange_type=ExchangeType.DIRECT.value, durable=True
        )
        await channel.queue_declare(
            self.request_queue, durable=True, arguments=self.request_queue_arguments()
        )
        await channel.queue_bind(self.request_queue, self.request_exchange, self.routing_key)
        await channel.exchange_declare(
            self.dead_letter_exchange, exchange_type=ExchangeType.FANOUT.value, durable=True
        )
        await channel.queue_declare(
            self.dead_letter_queue, durable=True, arguments=self.dead_letter_queue_arguments()
        )
        await channel.queue_bind(
            self.dead_letter_queue, self.dead_letter_exchange, self.routing_key
        )

    async def delete(self, channel: AbstractChannel) -> None:
        """Remove everything `declare` created (tests and tear-down tooling only)."""
        await channel.queue_delete(self.request_queue)
        await channel.queue_delete(self.dead_letter_queue)
        await channel.exchange_delete(self.request_exchange)
        await channel.exchange_delete(self.dead_letter_exchange)
