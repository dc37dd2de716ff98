"""AmqpLink against the real broker: its consumers survive their channel being replaced, its
topology heals when a queue is deleted under it, and it goes through the nodes of
CALLERID_AMQP_URL: the first that answers, the next when that one goes away, and a broker that
comes late.

"Nodes" here are TCP fronts (`Front`) on loopback ports before the one real broker: each can
refuse connections, cut the ones it carries (as a node's death does), and be started late. The
real cluster (three RabbitMQ nodes, a quorum queue, a node killed) is
tests/integration/test_broker_ha.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from shared import amqp_link
from shared.amqp_link import AmqpLink
from shared.amqp_urls import split_amqp_urls
from shared.settings import CommonSettings
from shared.topology import Topology
from tests.waiting import eventually
from tools.stack import free_port

pytestmark = pytest.mark.integration

LOST = "lost ("
REFUSED = "could not declare the RabbitMQ topology again"
HEALED = "declared again after"
FAILED_AGAIN = "declaring the topology again failed"


@pytest.fixture
async def admin(amqp_url: str, unique_name: str) -> AsyncIterator[AbstractChannel]:
    """A plain channel to delete what the link declared; deletes the topology afterwards."""
    connection = await aio_pika.connect(amqp_url)
    yield await connection.channel()
    async with connection.channel() as channel:
        await Topology(prefix=unique_name).delete(channel)
    await connection.close()


ADVICE = "CALLERID_AMQP_QUEUE_TYPE is classic"  # several nodes, classic queue: the advice


def link_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == amqp_link.__name__ and r.levelno == level and ADVICE not in r.getMessage()
    ]


async def test_a_consumer_is_started_again_when_its_channel_is_replaced(
    amqp_url: str, unique_name: str
) -> None:
    link = AmqpLink(amqp_url, unique_name, reconnect_interval=0.1)
    channel = await link.open()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_delivery(message: DeliveredMessage) -> None:
        received.put_nowait(message.body)

    try:
        queue = await channel.declare_queue(unique_name, auto_delete=True)
        await link.consume(queue.name, on_delivery, no_ack=True)
        assert link.consuming
        underlay = await link.publisher()
        await underlay.basic_publish(b"before", routing_key=queue.name)
        assert await asyncio.wait_for(received.get(), 3.0) == b"before"

        # A channel error (publishing to an exchange that does not exist) makes the broker
        # close the channel; the robust channel opens a new one, without our consumer.
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await underlay.basic_publish(b"x", exchange=f"{unique_name}-missing", routing_key="x")
        await eventually(lambda: link.consuming and link.up)

        replaced = await link.publisher()
        assert replaced is not underlay
        await replaced.basic_publish(b"after", routing_key=queue.name)
        assert await asyncio.wait_for(received.get(), 3.0) == b"after"

        await link.cancel_consumers()
        assert not link.consuming
    finally:
        await link.close()


async def test_a_consumer_the_broker_cancels_is_started_again_on_the_queue_declared_again(
    amqp_url: str, unique_name: str, admin: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting the queue a link consumes makes the broker cancel the consumer: the link
    counts one loss (not whole until healed), declares its topology again by itself and
    consumes the new queue. The loss is logged once at WARNING, the heal once at INFO."""
    caplog.set_level(logging.INFO, logger=amqp_link.__name__)
    topology = Topology(prefix=unique_name)
    link = AmqpLink(amqp_url, unique_name, reconnect_interval=0.1, topology=topology)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_delivery(message: DeliveredMessage) -> None:
        received.put_nowait(message.body)

    try:
        await link.open()
        await link.consume(topology.request_queue, on_delivery, no_ack=True)
        assert link.consuming
        assert link.topology_whole

        await admin.queue_delete(topology.request_queue)
        await eventually(lambda: link.topology_losses == 1 and link.topology_whole)
        await eventually(lambda: link.consuming)

        underlay = await link.publisher()
        await underlay.basic_publish(
            b"after", exchange=topology.request_exchange, routing_key=topology.routing_key
        )
        assert await asyncio.wait_for(received.get(), 3.0) == b"after"
        warnings = link_lines(caplog, logging.WARNING)
        assert len(warnings) == 1
        assert LOST in warnings[0]
        assert f"the broker cancelled the consumer of {topology.request_queue}" in warnings[0]
        infos = link_lines(caplog, logging.INFO)
        assert len(infos) == 1
        assert HEALED in infos[0]
    finally:
        await link.close()


async def test_a_refused_declaration_is_retried_with_growing_waits_until_it_succeeds(
    amqp_url: str, unique_name: str, admin: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """While another queue holds the request queue's name (other arguments), declaring the
    topology again is refused (PRECONDITION_FAILED): the link stays not whole and retries,
    each wait at least as long as the one before, doubling from 0.1 s up to `retry_max` (never
    a busy loop). Logged: the loss at WARNING, the first refusal at ERROR (the operator must
    act: it names the fix), later refusals at DEBUG only. Once the name is free the link
    declares the topology and says so once at INFO."""
    caplog.set_level(logging.DEBUG, logger=amqp_link.__name__)
    topology = Topology(prefix=unique_name)
    link = AmqpLink(amqp_url, unique_name, reconnect_interval=0.1, topology=topology, retry_max=0.4)
    try:
        await link.open()
        await admin.queue_delete(topology.request_queue)
        await admin.declare_queue(
            topology.request_queue, durable=True, arguments={"x-max-length": 1}
        )
        # As the gateway does when a request comes back unroutable.
        link.topology_missing("a request came back unroutable", link.generation)
        assert not link.topology_whole

        def refusals() -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if r.name == amqp_link.__name__
                and (REFUSED in r.getMessage() or FAILED_AGAIN in r.getMessage())
            ]

        await eventually(lambda: len(refusals()) >= 5, within=10)
        assert not link.topology_whole
        times = [r.created for r in refusals()]
        waits = [later - earlier for earlier, later in itertools.pairwise(times)]
        floors = [min(amqp_link.RETRY_FIRST * 2**n, 0.4) for n in range(len(waits))]
        # Lower bounds only: a busy machine makes the waits longer, never shorter.
        assert all(wait >= floor * 0.9 for wait, floor in zip(waits, floors, strict=False)), waits

        await admin.queue_delete(topology.request_queue)
        await eventually(lambda: link.topology_whole, within=5)
        declared = await admin.declare_queue(
            topology.request_queue, durable=True, arguments=topology.request_queue_arguments()
        )
        assert declared.name == topology.request_queue  # ours again: same arguments accepted
        warnings = link_lines(caplog, logging.WARNING)
        assert len(warnings) == 1, warnings
        assert LOST in warnings[0]
        errors = link_lines(caplog, logging.ERROR)
        assert len(errors) == 1, errors
        assert REFUSED in errors[0]
        assert "PRECONDITION_FAILED" in errors[0]
        assert "CALLERID_AMQP_QUEUE_TYPE" in errors[0]  # the setting that most often causes it
        infos = link_lines(caplog, logging.INFO)
        assert len(infos) == 1
        assert HEALED in infos[0]
    finally:
        await link.close()


async def test_a_report_from_before_the_last_declaration_is_ignored(
    amqp_url: str, unique_name: str, admin: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests published before the topology was declared again that come back unroutable
    afterwards are old news: they do not start a second loss (one deletion, one WARNING)."""
    caplog.set_level(logging.INFO, logger=amqp_link.__name__)
    topology = Topology(prefix=unique_name)
    link = AmqpLink(amqp_url, unique_name, reconnect_interval=0.1, topology=topology)
    try:
        await link.open()
        before = link.generation
        await admin.queue_delete(topology.request_queue)
        link.topology_missing("a request came back unroutable", before)
        link.topology_missing("a request came back unroutable", before)  # the same burst
        await eventually(lambda: link.topology_whole)
        link.topology_missing("a request came back unroutable", before)  # returned late

        assert link.topology_whole
        assert link.topology_losses == 1
        assert len(link_lines(caplog, logging.WARNING)) == 1
        assert len(link_lines(caplog, logging.INFO)) == 1
    finally:
        await link.close()


# --- the nodes of CALLERID_AMQP_URL ----------------------------------------------------------


class Front:
    """A loopback port that pipes connections to the real broker: a "node" a test can start
    late (`open`), stop accepting on and cut what it carries (`cut`, as a node's death)."""

    def __init__(self, broker_url: str, port: int | None = None) -> None:
        parts = urlsplit(broker_url)
        self._broker = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._credentials = f"{parts.username}:{parts.password}"
        self.port = port if port is not None else free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"amqp://{self._credentials}@127.0.0.1:{self.port}/"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Stop listening and drop every connection, as a node killed with -9 does."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(*self._broker)
        self._writers.update((writer, up_writer))
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@contextlib.asynccontextmanager
async def fronts(amqp_url: str, count: int) -> AsyncIterator[list[Front]]:
    made = [Front(amqp_url) for _ in range(count)]
    try:
        yield made
    finally:
        for front in made:
            await front.cut()


async def test_the_link_connects_to_the_first_node_that_answers_and_moves_on_when_it_dies(
    amqp_url: str, unique_name: str, admin: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """CALLERID_AMQP_URL names three nodes (a classic queue: advised once to use quorum);
    the first is down: the link connects to the second. When the second dies, the link is
    not up, logs the loss once (WARNING), and connects to the next node (the third), where it
    declares the topology and consumes again: a message published there is delivered."""
    caplog.set_level(logging.INFO, logger=amqp_link.__name__)
    topology = Topology(prefix=unique_name)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_delivery(message: DeliveredMessage) -> None:
        received.put_nowait(message.body)

    async with fronts(amqp_url, 3) as (dead, second, third):
        await second.open()
        await third.open()
        urls = ",".join(front.url for front in (dead, second, third))
        link = AmqpLink(urls, unique_name, reconnect_interval=0.2, topology=topology)
        try:
            await link.open()
            await link.consume(topology.request_queue, on_delivery, no_ack=True)
            assert link.node == f"127.0.0.1:{second.port}"
            assert (second.accepted, third.accepted) == (1, 0)

            await second.cut()
            await eventually(lambda: not link.up)
            await eventually(lambda: link.up and link.consuming, within=10)
            assert link.node == f"127.0.0.1:{third.port}"
            assert link.connections == 2

            underlay = await link.publisher()
            await underlay.basic_publish(
                b"after", exchange=topology.request_exchange, routing_key=topology.routing_key
            )
            assert await asyncio.wait_for(received.get(), 5.0) == b"after"
        finally:
            await link.close()
    warnings = link_lines(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert f"lost the connection to RabbitMQ at 127.0.0.1:{second.port}" in warnings[0]
    # Three nodes with a classic queue: said once, at start-up (the queue would die with its
    # node; tests/integration/test_broker_ha.py runs the quorum queue on a real cluster).
    assert sum(ADVICE in r.getMessage() for r in caplog.records) == 1


async def test_open_raises_when_no_node_answers(amqp_url: str, unique_name: str) -> None:
    """`open` (tests, tools) makes one pass through the nodes and raises the last failure."""
    async with fronts(amqp_url, 2) as nodes:
        link = AmqpLink(",".join(f.url for f in nodes), unique_name, reconnect_interval=0.1)
        with pytest.raises(aiormq.exceptions.AMQPConnectionError):
            await link.open()
        await link.close()


async def test_a_started_link_waits_for_a_broker_that_comes_late(
    amqp_url: str, unique_name: str, admin: AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """`start` never raises: with no node answering, the link is not up, logs one WARNING
    naming CALLERID_AMQP_URL (then DEBUG only), retries with waits that grow up to
    `reconnect_interval`, and once a node answers it connects, declares the topology and
    starts the consumer registered meanwhile, and says so once at INFO."""
    caplog.set_level(logging.DEBUG, logger=amqp_link.__name__)
    topology = Topology(prefix=unique_name)
    async with fronts(amqp_url, 2) as nodes:
        link = AmqpLink(
            ",".join(f.url for f in nodes), unique_name, reconnect_interval=0.4, topology=topology
        )
        try:
            link.start()
            await link.consume(topology.request_queue, lambda _m: asyncio.sleep(0), no_ack=True)

            def failures() -> list[logging.LogRecord]:
                return [r for r in caplog.records if "RabbitMQ at" in r.getMessage()]

            await eventually(lambda: len(failures()) >= 6, within=10)
            assert not link.up
            assert not link.consuming
            times = [r.created for r in failures()]
            waits = [later - earlier for earlier, later in itertools.pairwise(times)]
            # Each wait is drawn from the upper half of its bound: at least half the bound.
            floors = [min(amqp_link.RECONNECT_FIRST * 2**n, 0.4) / 2 for n in range(len(waits))]
            assert all(w >= f * 0.9 for w, f in zip(waits, floors, strict=False)), waits
            assert max(waits) < 0.4 + 0.5, waits  # capped (generous: a loaded box is slower)

            await nodes[1].open()
            await eventually(lambda: link.up and link.consuming, within=5)
            assert link.node == f"127.0.0.1:{nodes[1].port}"
            await admin.declare_queue(topology.request_queue, passive=True)  # declared
        finally:
            await link.close()
    warnings = link_lines(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "cannot connect to RabbitMQ at" in warnings[0]
    assert "CALLERID_AMQP_URL" in warnings[0]
    assert "connection refused" in warnings[0].lower()
    assert any("connected to RabbitMQ at" in line for line in link_lines(caplog, logging.INFO))
    assert link_lines(caplog, logging.ERROR) == []


async def test_wrong_credentials_are_one_error_naming_the_setting(
    amqp_url: str, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ACCESS_REFUSED is an ERROR naming CALLERID_AMQP_URL and the user (never the password),
    logged once however many attempts follow; the link keeps trying (the user may be fixed on
    the broker) and is not up meanwhile."""
    caplog.set_level(logging.DEBUG, logger=amqp_link.__name__)
    parts = urlsplit(amqp_url)
    url = f"amqp://{parts.username}:not-the-password@{parts.hostname}:{parts.port or 5672}/"
    link = AmqpLink(url, unique_name, reconnect_interval=0.2)
    try:
        link.start()
        await eventually(
            lambda: sum("failed" in r.getMessage() for r in caplog.records) >= 3, within=15
        )
        assert not link.up
    finally:
        await link.close()
    errors = link_lines(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert "CALLERID_AMQP_URL" in errors[0]
    assert "ACCESS_REFUSED" in errors[0]
    assert repr(parts.username) in errors[0]
    assert "not-the-password" not in "".join(r.getMessage() for r in caplog.records)
    assert link_lines(caplog, logging.WARNING) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("amqp://u:p@h1:5672/,", "entry 2 of 2 is empty"),
        (
            "amqp://u:secret@h1:5672/,amqp://u:secret@h2:x/",
            "entry 2 of 2 (amqp://***@h2:x/) is not a URL",
        ),
        ("http://h1/", "the URL (http://h1/) must start with amqp:// or amqps://"),
    ],
)
def test_a_bad_entry_of_the_url_list_is_named(value: str, message: str) -> None:
    """CALLERID_AMQP_URL is checked at start-up: a bad entry is refused with its number and
    its text, the password hidden (`shared.runtime` prints it as one line naming the
    setting)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        split_amqp_urls(value)
    with pytest.raises(ValueError, match="amqp_url") as raised:
        CommonSettings(amqp_url=value)
    assert "secret" not in str(raised.value.errors(include_input=False))
