"""The floor: the same hops as an identification, with no product features.

TCP line exchange (one connection per call: the client writes an id line, reads one reply
line) → RabbitMQ RPC (publisher confirms, mandatory, direct reply-to, correlation id) →
Redis GET → HTTP POST to the CRM (`idContact=<id>`) → reply. No AGI, no validation, no
pydantic, no metrics, no deadlines, no cache write, no retries: whatever the product costs
beyond this is the price of its features, which is why every benchmark figure is also given
as a ratio to the floor measured in the same run.

It runs as separate processes, like the product (`python -m bench.floor server|worker`), on
uvloop and the lowest-level clients the product's stack offers (aiormq, redis.asyncio,
aiohttp). Each prints `ready` once it can serve. The client side is `line_caller`, driven by
`tools.loadgen.drive`, so the figures are computed exactly as for the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence

import aiohttp
import aiormq
import redis.asyncio as aioredis
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from tools.loadgen import (
    CallFn,
    CallRecord,
    LoadPlan,
    Mix,
    PlannedCall,
    drive,
    parse_mix,
    raise_fd_limit,
    run_fast,
)

REPLY_TO = "amq.rabbitmq.reply-to"
# The queue goes away on its own if a run dies without cleaning up.
QUEUE_ARGUMENTS: dict[str, aiormq.abc.FieldValue] = {"x-expires": 120_000}


async def _declare(channel: aiormq.abc.AbstractChannel, queue: str) -> None:
    await channel.queue_declare(queue, durable=False, auto_delete=False, arguments=QUEUE_ARGUMENTS)


async def serve(listen: str, amqp_url: str, queue: str) -> None:
    """The gateway's part: accept a call, publish its id, wait for the reply, answer, close."""
    connection = await aiormq.connect(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await _declare(channel, queue)
    pending: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(message: DeliveredMessage) -> None:
        future = pending.pop(message.header.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    await channel.basic_consume(REPLY_TO, on_reply, no_ack=True)
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            correlation = uuid.uuid4().hex
            future: asyncio.Future[bytes] = loop.create_future()
            pending[correlation] = future
            await channel.basic_publish(
                line.strip(),
                routing_key=queue,
                properties=Basic.Properties(correlation_id=correlation, reply_to=REPLY_TO),
                mandatory=True,
            )
            answer = await asyncio.wait_for(future, 10.0)
            writer.write(answer + b"\n")
            await writer.drain()
        finally:
            writer.close()

    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(handle, host, int(port), backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def work(amqp_url: str, queue: str, redis_url: str, crm_url: str, prefetch: int) -> None:
    """The resolver's part: Redis GET, then the CRM when it misses; reply, then ack."""
    connection = await aiormq.connect(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.basic_qos(prefetch_count=prefetch)
    await _declare(channel, queue)
    cache = aioredis.Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as http:

        async def on_request(message: DeliveredMessage) -> None:
            customer = message.body.decode()
            answer = await cache.get(f"floor:{customer}")
            if answer is None:
                async with http.post(crm_url, data={"idContact": customer}) as response:
                    answer = (await response.json(content_type=None))["destination"].encode()
            properties = message.header.properties
            await channel.basic_publish(
                answer,
                routing_key=properties.reply_to or "",
                properties=Basic.Properties(correlation_id=properties.correlation_id),
            )
            assert message.delivery_tag is not None
            await channel.basic_ack(message.delivery_tag)

        await channel.basic_consume(queue, on_request)
        print("ready", flush=True)
        await asyncio.Event().wait()


def line_caller(host: str, port: int, *, timeout: float = 30.0) -> CallFn:
    """Client side of the floor: the last digit is the id line going out, the decision is
    the reply line coming back. Any reply counts as the expected decision."""

    async def call(planned: PlannedCall) -> CallRecord:
        started = time.monotonic()
        customer = next((e for e in planned.script.entries if e), "0")
        failure: str | None = None
        latency: float | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    sent = time.monotonic()
                    writer.write(customer.encode() + b"\n")
                    reply = await reader.readline()
                    latency = time.monotonic() - sent
                finally:
                    writer.close()
            if not reply.endswith(b"\n"):
                failure, latency = "no_decision: connection closed without a reply", None
        except (OSError, TimeoutError) as exc:
            failure = f"connection: {type(exc).__name__}: {exc}"[:200]
        return CallRecord(
            planned.kind,
            started,
            time.monotonic(),
            None if failure else "floor",
            None,
            latency,
            failure,
            failure is None,
        )

    return call


def _client(args: argparse.Namespace) -> int:
    plan = LoadPlan(
        duration=args.duration,
        concurrency=args.concurrency if args.rate is None else None,
        rate=args.rate,
        calls=args.calls,
        warmup=args.warmup,
    )
    raise_fd_limit((args.concurrency or 1000) + 256)
    mix = Mix(parse_mix("miss"), id_offset=args.id_offset)
    report = run_fast(drive(plan, mix.next, line_caller("127.0.0.1", args.port)))
    result = report.to_json(plan, mix="floor")
    with open(args.output, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    return 0 if result["failures"]["total"] == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--listen", required=True)
    server.add_argument("--amqp-url", required=True)
    server.add_argument("--queue", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("--amqp-url", required=True)
    worker.add_argument("--queue", required=True)
    worker.add_argument("--redis-url", required=True)
    worker.add_argument("--crm-url", required=True)
    worker.add_argument("--prefetch", type=int, default=64)
    client = sub.add_parser("client", help="tools.loadgen's driver over the line exchange")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--concurrency", type=int)
    client.add_argument("--rate", type=float)
    client.add_argument("--duration", type=float, default=10.0)
    client.add_argument("--calls", type=int)
    client.add_argument("--warmup", type=float, default=0.0)
    client.add_argument("--id-offset", type=int, default=0)
    client.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.role == "client":
        return _client(args)
    if args.role == "server":
        run_fast(serve(args.listen, args.amqp_url, args.queue))
    else:
        run_fast(work(args.amqp_url, args.queue, args.redis_url, args.crm_url, args.prefetch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
