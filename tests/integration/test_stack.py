"""tools.stack's clean-up on the real broker: a stopped stack leaves no topology behind."""

from __future__ import annotations

import aio_pika
import pytest

from shared.topology import Topology
from tools.stack import delete_topology


@pytest.mark.integration
async def test_a_stacks_topology_is_deleted_from_the_broker(
    amqp_url: str, unique_name: str
) -> None:
    topology = Topology(prefix=unique_name)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await topology.declare(await connection.channel())

        # Called from a running loop, as async tests and fixtures stop their stacks.
        assert delete_topology(amqp_url, unique_name)

        for queue in (topology.request_queue, topology.dead_letter_queue):
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await (await connection.channel()).declare_queue(queue, passive=True)
        for exchange in (topology.request_exchange, topology.dead_letter_exchange):
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await (await connection.channel()).get_exchange(exchange, ensure=True)


def test_an_unreachable_broker_is_reported_not_raised(
    unique_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not delete_topology("amqp://guest:guest@127.0.0.1:1/", unique_name, timeout=2.0)
    assert f"stack {unique_name}: RabbitMQ topology not deleted" in capsys.readouterr().err
