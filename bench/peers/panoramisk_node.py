# The peer libraries are the optional `peers` extra and ship no type information: without
# this, mypy (strict) would fail here wherever they are, or are not, installed.
# mypy: disable-error-code="import-untyped,import-not-found"
"""The node on panoramisk 1.4 (asyncio), written as its users write FastAGI code.

    python -m bench.peers.panoramisk_node --listen 127.0.0.1:4574 --crm-url URL

prints `ready` once listening. The node is `tools.loadgen.LOADGEN_NODES` node 1 (a
crm_true_false node: `tools.stack.DEFAULT_NODES` node 1 with 8-digit ids, the load generator's):
prompt, collect the entry (3 attempts), POST `idContact` to the CRM, set the decision's
variables: true → 1,3 identified; false → 1,4 not_identified; any CRM error (transport,
timeout, status, body) → 1,9 crm_error (source failover); no valid entry after 3 attempts →
1,4 no_input / invalid_input (source local).

Code shape, in panoramisk's own idiom (its docstrings are its documentation): a
`fast_agi.Application` (a dict, so shared objects live in it as in aiohttp), one route
`app.add_route("identify/1", identify)` (panoramisk routes on `agi_network_script` exactly),
`asyncio.start_server(app.handler, ...)`, and a coroutine that `await request.send_command(
"...")` for each AGI command and reads the parsed dict it returns
(`{"result": (value, data), ...}`, or `{"error": ...}` for a hang-up / 5xx). The CRM client is
the one an asyncio user picks, aiohttp: ONE `ClientSession` for the process (connections
reused; `User-Agent: OMniLeads` as a session header; `ClientTimeout(total=crm_timeout)`).

Per call, on the happy path (one attempt), the exchange is ours byte for byte — four commands,
each its own round trip — and one HTTP POST:

    EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"
    EXEC Read "CALLERID_ENTRY,customer-id-prompt,8"
    GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"
    POST <crm> idContact=<digits>      (aiohttp, pooled connection)
    EXEC MSet "__OML_CUSTOMER_ID=<id>,__OMLCODCLI=<id>,OML_DEST_TYPE=1,OML_DEST_ID=3,
               OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=identified"

Choices made for fairness, all in the peer's favour or neutral:
- Read (with TIMEOUT(response)/TIMEOUT(digit)), not GET DATA: GET DATA is what a panoramisk
  user might reach for first, but it has ONE timeout for the first digit and between digits,
  so it is not the same node; Read + GET FULL VARIABLE is our exchange.
- Variables are set with one `EXEC MSet` each time, as ours does. Idiomatic panoramisk (and
  AGI) code would send `SET VARIABLE name value` per variable: 2 commands for the timeouts and
  6 for the decision, i.e. 11 round trips per call instead of 4. We did not make it pay that.
- Same settings as ours: uvloop (panoramisk runs on whatever asyncio loop is current; ours
  runs on uvloop), logging at WARNING (panoramisk logs each request at INFO), CRM connection
  reuse, the node's 1 s CRM timeout.

Pipelining (a real Asterisk 22 reads one command at a time): panoramisk is safe.
`Request.send_command` (panoramisk/fast_agi.py, 1.4) writes one command, drains, then waits
for its reply line before returning:

    35        self.writer.write(command.encode(self.encoding))
    36        await self.writer.drain()
    38        agi_result = await self._read_result()      # 55: await self.reader.readline()

and a route awaits each call, so there is never a second command in flight.

Known defects of panoramisk 1.4 met here (not worked around: its users get them too):
- `Application.handler` reads the environment with
      146        while b'\\n\\n' not in buffer:
      147            buffer += await reader.read(self.buf_size)
  A peer that closes before the blank line makes `reader.read` return b"" at once, forever,
  and without ever suspending (asyncio's `StreamReader.read` only awaits
  `if not self._buffer and not self._eof`): the loop never gets control back, so the process
  spins at 100 % of a core and serves no other call again, live ones included, until it is
  killed. `bench.peers.run` reproduces it (apart from the timing runs).
- On a hang-up Asterisk sends the interrupted command's reply and then an unprompted
  `HANGUP` line; panoramisk hands that line to the NEXT command as its reply (an error dict),
  so the node stops at the first error reply rather than trusting what follows.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp
import uvloop
from panoramisk import fast_agi

log = logging.getLogger("panoramisk_node")

ROUTE = "identify/1"
PROMPT = "customer-id-prompt"
ATTEMPTS = 3
SET_TIMEOUTS = 'EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"'
GET_ENTRY = 'GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"'
# CRM destination → (OML_DEST_TYPE, OML_DEST_ID, OML_IDENT_OUTCOME), as the node maps them.
DECISIONS = {"true": ("1", "3", "identified"), "false": ("1", "4", "not_identified")}
ON_ERROR = ("1", "9", "crm_error")


class CallEnded(Exception):
    """Asterisk answered with an error (the caller hung up, or a dead channel)."""


async def command(request: Any, line: str) -> dict[str, Any]:
    result: dict[str, Any] = await request.send_command(line)
    if "error" in result:
        raise CallEnded(f"{line!r}: {result['error']}")
    return result


async def ask_crm(app: Any, customer: str) -> str | None:
    """The CRM's `destination` for the customer, or None on any failure."""
    session: aiohttp.ClientSession = app["crm_session"]
    try:
        async with session.post(app["crm_url"], data={"idContact": customer}) as response:
            if response.status != 200:
                return None
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("status") != "ok":
        return None
    return str(body.get("destination"))


async def identify(request: Any) -> None:
    app = request.app
    length: int = app["expected_length"]
    try:
        await command(request, SET_TIMEOUTS)
        entry = ""
        for _ in range(ATTEMPTS):
            await command(request, f'EXEC Read "CALLERID_ENTRY,{PROMPT},{length}"')
            reply = await command(request, GET_ENTRY)
            entry = str(reply["result"][1]).rpartition(",")[0]
            if len(entry) == length and entry.isdigit():
                break
        else:
            outcome = "invalid_input" if entry else "no_input"
            await command(
                request,
                'EXEC MSet "OML_DEST_TYPE=1,OML_DEST_ID=4,OML_IDENT_SOURCE=local,'
                f'OML_IDENT_OUTCOME={outcome}"',
            )
            return
        destination = await ask_crm(app, entry)
        decision = DECISIONS.get(destination or "")
        source = "crm" if decision else "failover"
        dest_type, dest_id, outcome = decision or ON_ERROR
        await command(
            request,
            f'EXEC MSet "__OML_CUSTOMER_ID={entry},__OMLCODCLI={entry},OML_DEST_TYPE={dest_type},'
            f'OML_DEST_ID={dest_id},OML_IDENT_SOURCE={source},OML_IDENT_OUTCOME={outcome}"',
        )
    except CallEnded as exc:
        log.info("call ended: %s", exc)


async def serve(listen: str, crm_url: str, crm_timeout: float, expected_length: int) -> None:
    host, _, port = listen.rpartition(":")
    async with aiohttp.ClientSession(
        headers={"User-Agent": "OMniLeads"},
        timeout=aiohttp.ClientTimeout(total=crm_timeout),
    ) as session:
        app = fast_agi.Application()
        app["crm_session"] = session
        app["crm_url"] = crm_url
        app["expected_length"] = expected_length
        app.add_route(ROUTE, identify)
        server = await asyncio.start_server(app.handler, host, int(port))
        print("ready", flush=True)
        async with server:
            await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.panoramisk_node")
    parser.add_argument("--listen", required=True, help="host:port for FastAGI")
    parser.add_argument("--crm-url", required=True, help="the node's CRM URL (POST)")
    parser.add_argument("--crm-timeout", type=float, default=1.0, help="seconds")
    parser.add_argument("--expected-length", type=int, default=8, help="digits of an id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(serve(args.listen, args.crm_url, args.crm_timeout, args.expected_length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
