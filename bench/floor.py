"""The floor: the least exchange a real Asterisk accepts for a correct node, and nothing else.

Every benchmark figure is also given as a ratio to the floor measured in the same run: whatever
the product costs beyond it is the price of its features. So the floor makes exactly the hops
and round trips an identification cannot do without, on both sides:

- The client is the product's own: `tools.loadgen.agi_caller` over `tools.asterisk_sim`
  (the simulated Asterisk 22 the product is driven with), the same "miss" mix, with
  verification off (any decision counts: the floor has no nodes). Latency is therefore the
  same figure as the product's: the caller's last digit to OML_IDENT_OUTCOME being set.
- The server takes the gateway's place as a minimal FastAGI server. Per call: accept; let the
  environment block go by up to its blank line (not parsed: no byte of it is kept); then, one
  command per round trip, each a pre-built byte string in one write:

      EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"   → 200 result=0
      EXEC Read "CALLERID_ENTRY,customer-id-prompt,8"            → 200 result=0
      GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"         → 200 result=1 (<id>,OK)

  the id is one slice of that reply line; then the RabbitMQ RPC (publisher confirms,
  mandatory, direct reply-to, correlation id) → worker: Redis GET, then an HTTP POST to the CRM
  (`idContact=<id>`) when it misses (it always does: the floor writes no cache) → reply, ack;
  then the decision in one command, formatted once from the id and the worker's answer,

      EXEC MSet "__OML_CUSTOMER_ID=<id>,__OMLCODCLI=<id>,OML_DEST_TYPE=..,OML_DEST_ID=..,
                 OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=.."                → 200 result=0

  and close. Four commands, four writes, four reply lines read; never two commands in one
  write.

Why these round trips: Asterisk 22 does not read pipelined AGI commands (res_agi reads with
fgets on a stdio FILE but waits with poll on the raw socket: a second command written before
the first is answered sits unseen in the stdio buffer), so each command costs a full round
trip. Read() is how a node gets its entry with a first-digit and an inter-digit timeout, which
it takes from TIMEOUT(response) and TIMEOUT(digit): one MSet before it. Read() answers
`200 result=0` whatever happened and leaves the digits and READSTATUS in variables: one GET
FULL VARIABLE reads both. The decision is one MSet whose last pair is the outcome. That is the
product's exchange (services/agi_gateway/channel.py, collect.py, routing.py) with nothing of
its own: no parsing of the environment, no validation, no pydantic, no metrics, no per-node
deadline (the reply wait is bounded at 10 s only so a lost reply cannot hold a call), no cache
write, no retries, no hang-up handling (the floor's calls do not hang up).

The server is an `asyncio.Protocol` with a step counter, as the gateway's session is one:
each reply is handled in `data_received` and the next command written there and then. Streams
would add, per reply, a StreamReader buffer copy, a future and a wake-up of the call's task;
here the only coroutine per call is the RPC (its publish confirm and reply are awaited).

It runs as separate processes, like the product (`python -m bench.floor server|worker|client`),
on uvloop (`run_fast`) and the lowest-level clients the product's stack offers (aiormq,
redis.asyncio, and the product's own HTTP/1.1 client `crm_resolver.http1`, which replaced
aiohttp's for CRM lookups: a floor on aiohttp would no longer be a floor). Server and worker
print `ready` once they can serve; the client is `tools.loadgen.drive`, so the figures are
computed exactly as for the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from pamqp.commands import Basic

from tools.loadgen import (
    ID_LENGTH,
    LoadPlan,
    Mix,
    agi_caller,
    drive,
    parse_mix,
    raise_fd_limit,
    run_fast,
)

if TYPE_CHECKING:
    # Imported where they are used: the client process loads none of them (half a second of
    # CPU that would count against the floor's load generator).
    import aiormq
    from aiormq.abc import DeliveredMessage

REPLY_TO = "amq.rabbitmq.reply-to"
# The queue goes away on its own if a run dies without cleaning up.
QUEUE_ARGUMENTS: dict[str, aiormq.abc.FieldValue] = {"x-expires": 120_000}
RPC_TIMEOUT = 10.0
CLIENT_TIMEOUT = 30.0  # per call, as the load generator's default

# The commands before the lookup, as the gateway sends them for a node with the default
# timeouts (5 s first digit, 3 s between digits) and the load generator's id length.
SET_TIMEOUTS = b'EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"\n'
READ_ENTRY = b'EXEC Read "CALLERID_ENTRY,customer-id-prompt,%d"\n' % ID_LENGTH
GET_ENTRY = b'GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"\n'
# `200 result=1 (<id>,OK)\n`: the id is [ID_START:-ID_END_BACK] of the line.
ID_START = len(b"200 result=1 (")
ID_END_BACK = len(b",OK)\n")
# The decision: what follows `OML_DEST_TYPE=` for each answer of the worker (the CRM's
# `destination`), as the product's nodes map them; any other answer is a destination "type,id".
DECISION = b'EXEC MSet "__OML_CUSTOMER_ID=%b,__OMLCODCLI=%b,OML_DEST_TYPE=%b"\n'
TAILS = {
    b"true": b"1,OML_DEST_ID=3,OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=identified",
    b"false": b"1,OML_DEST_ID=4,OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=not_identified",
}
DESTINATION_TAIL = b",OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=crm_destination"


def decision(customer: bytes, answer: bytes) -> bytes:
    """The decision command for the worker's answer: one formatting of pre-built parts."""
    tail = TAILS.get(answer)
    if tail is None:  # "type,id"
        tail = answer.replace(b",", b",OML_DEST_ID=", 1) + DESTINATION_TAIL
    return DECISION % (customer, customer, tail)


async def _declare(channel: aiormq.abc.AbstractChannel, queue: str) -> None:
    await channel.queue_declare(queue, durable=False, auto_delete=False, arguments=QUEUE_ARGUMENTS)


class Gateway:
    """The gateway's RabbitMQ side: one channel, one direct reply-to consumer, pending RPCs."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, queue: str) -> None:
        self.channel = channel
        self.queue = queue
        self.pending: dict[str, asyncio.Future[bytes]] = {}
        self.loop = asyncio.get_running_loop()

    async def on_reply(self, message: DeliveredMessage) -> None:
        future = self.pending.pop(message.header.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def identify(self, transport: asyncio.Transport, customer: bytes) -> None:
        """Publish the id, wait for the worker's answer, write the decision command."""
        correlation = uuid.uuid4().hex
        future: asyncio.Future[bytes] = self.loop.create_future()
        self.pending[correlation] = future
        try:
            await self.channel.basic_publish(
                customer,
                routing_key=self.queue,
                properties=Basic.Properties(correlation_id=correlation, reply_to=REPLY_TO),
                mandatory=True,
            )
            answer = await asyncio.wait_for(future, RPC_TIMEOUT)
        except BaseException:
            self.pending.pop(correlation, None)
            transport.close()  # the call ends without a decision: the client counts a failure
            raise
        if not transport.is_closing():
            transport.write(decision(customer, answer))


class Call(asyncio.Protocol):
    """One FastAGI connection, driven by a step counter: each reply line writes the next."""

    __slots__ = ("_gateway", "_partial", "_step", "_task", "_transport")

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._transport: asyncio.Transport | None = None
        self._step = 0  # 0 environment, 1..3 replies before the lookup, 4 the decision's
        self._partial = b""  # an unfinished line (a segment that does not end with "\n")
        self._task: asyncio.Task[None] | None = None  # the RPC, referenced while it runs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        # Asterisk sends nothing after the environment's blank line, or after a reply, until
        # the next command: a segment ending with "\n" ends what we wait for.
        if data[-1:] != b"\n":
            self._partial += data
            return
        if self._partial:
            data, self._partial = self._partial + data, b""
        transport = self._transport
        assert transport is not None
        step = self._step
        if step == 0:
            # The blank line: "\n\n" at the end, or a lone "\n" after a segment that ended
            # with one (any other segment ending with "\n" was handled, not kept).
            if data[-2:] == b"\n\n" or data == b"\n":
                transport.write(SET_TIMEOUTS)
                self._step = 1
        elif step == 1:
            transport.write(READ_ENTRY)
            self._step = 2
        elif step == 2:
            transport.write(GET_ENTRY)
            self._step = 3
        elif step == 3:
            self._step = 4
            self._task = self._gateway.loop.create_task(
                self._gateway.identify(transport, data[ID_START:-ID_END_BACK])
            )
        else:
            transport.close()


async def serve(listen: str, amqp_url: str, queue: str) -> None:
    """The gateway's part: the AGI exchange above around one RPC per call."""
    import aiormq

    connection = await aiormq.connect(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await _declare(channel, queue)
    gateway = Gateway(channel, queue)
    await channel.basic_consume(REPLY_TO, gateway.on_reply, no_ack=True)
    host, _, port = listen.rpartition(":")
    server = await gateway.loop.create_server(lambda: Call(gateway), host, int(port), backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def work(amqp_url: str, queue: str, redis_url: str, crm_url: str, prefetch: int) -> None:
    """The resolver's part: Redis GET, then the CRM when it misses; reply, then ack."""
    import aiormq
    import redis.asyncio as aioredis
    from aiohttp.resolver import DefaultResolver

    from crm_resolver.http1 import Http1Client, target_of

    connection = await aiormq.connect(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.basic_qos(prefetch_count=prefetch)
    await _declare(channel, queue)
    cache = aioredis.Redis.from_url(redis_url)
    # The product's own HTTP/1.1 client, bare: kept-alive connections, one POST, no checks.
    http = Http1Client(DefaultResolver(), max_connections=200, keepalive=30.0)
    crm = target_of(crm_url)
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    async def on_request(message: DeliveredMessage) -> None:
        answer = await cache.get(b"floor:" + message.body)
        if answer is None:
            _, body = await http.request(
                "POST",
                crm,
                form,
                b"idContact=" + message.body,
                tls=None,
                connect_timeout=1.0,
                max_body=65536,
            )
            answer = json.loads(body)["destination"].encode()
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
    # The product's simulated Asterisk; any decision counts (the floor has no nodes to check).
    caller = agi_caller("127.0.0.1", args.port, timeout=CLIENT_TIMEOUT, verify=False)
    report = run_fast(drive(plan, mix.next, caller))
    result = report.to_json(plan, mix="floor")
    with open(args.output, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    return 0 if result["failures"]["total"] == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    client = sub.add_parser("client", help="tools.loadgen's simulated Asterisk calls, miss mix")
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
