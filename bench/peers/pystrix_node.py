# The peer libraries are the optional `peers` extra and ship no type information: without
# this, mypy (strict) would fail here wherever they are, or are not, installed.
# mypy: disable-error-code="import-untyped,import-not-found"
"""The node on pystrix 1.3 (threads), written as its users write FastAGI code.

    python -m bench.peers.pystrix_node --listen 127.0.0.1:4575 --crm-url URL

prints `ready` once listening. The node is `tools.loadgen.LOADGEN_NODES` node 1 (a
crm_true_false node: `tools.stack.DEFAULT_NODES` node 1 with 8-digit ids, the load generator's):
prompt, collect the entry (3 attempts), POST `idContact` to the CRM, set the decision's
variables: true → 1,3 identified; false → 1,4 not_identified; any CRM error (transport,
timeout, status, body) → 1,9 crm_error (source failover); no valid entry after 3 attempts →
1,4 no_input / invalid_input (source local).

Code shape, in pystrix's own idiom (its README's FastAGI example): a
`pystrix.agi.FastAGIServer` (socketserver's ThreadingMixIn: one new thread per call), a
handler `(agi, args, kwargs, match, path)` registered with `register_script_handler(regex,
handler)`, and `agi.execute(pystrix.agi.core.<Action>(...))` per AGI command: `Exec` for
applications (it quotes and comma-joins the options), `GetFullVariable` for the entry. The
CRM client is the one a threaded user picks, requests: ONE `requests.Session` shared by the
call threads (urllib3's pool is thread-safe; a Session per thread would reuse nothing, since
ThreadingMixIn starts a new thread per call), its adapter's pool as large as our CRM client's
(200), `User-Agent: OMniLeads` as a session header, `timeout=crm_timeout` per request.

Per call, on the happy path (one attempt), the exchange is ours byte for byte — four commands,
each its own round trip — and one HTTP POST:

    EXEC MSet "TIMEOUT(response)=5.000,TIMEOUT(digit)=3.000"
    EXEC Read "CALLERID_ENTRY,customer-id-prompt,8"
    GET FULL VARIABLE "${CALLERID_ENTRY},${READSTATUS}"
    POST <crm> idContact=<digits>      (requests, pooled connection)
    EXEC MSet "__OML_CUSTOMER_ID=<id>,__OMLCODCLI=<id>,OML_DEST_TYPE=1,OML_DEST_ID=3,
               OML_IDENT_SOURCE=crm,OML_IDENT_OUTCOME=identified"

Choices made for fairness, all in the peer's favour or neutral:
- Read (with TIMEOUT(response)/TIMEOUT(digit)), not pystrix's `core.GetData`: GET DATA has
  ONE timeout for the first digit and between digits, so it is not the same node; Read +
  GET FULL VARIABLE is our exchange.
- Variables are set with one `core.Exec("MSet", ...)` each time, as ours does. pystrix's own
  idiom is `core.SetVariable(name, value)` per variable: 2 commands for the timeouts and 6 for
  the decision, i.e. 11 round trips per call instead of 4. We did not make it pay that.
- Same settings as ours where they exist: CRM connection reuse, the node's 1 s CRM timeout,
  logging at WARNING. There is no event loop to choose (no uvloop): the server is threads.

Pipelining (a real Asterisk 22 reads one command at a time): pystrix is safe.
`_AGI.execute` (pystrix/agi/agi_core.py, 1.3.0) sends one command and blocks on its reply:

    104        self._send_command(action.command)    # 264-265: self._wfile.write(command);
                                                     #          self._wfile.flush()
    105        return action.process_response(self._get_result(action.check_hangup))
                                                     # 221: line = self._rfile.readline()

(the handler's wfile is unbuffered: socketserver.StreamRequestHandler.wbufsize = 0). The
unprompted `HANGUP` line Asterisk sends after a hang-up is skipped by `_read_line` (231) and
the command's own reply read; a closed socket raises `AGISIGPIPEHangup` (236), which the
handler below treats as the end of the call. A peer that closes before the end of the
environment ends that call's thread with the same exception: no spin.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

import pystrix
import requests
from pystrix.agi import core
from requests.adapters import HTTPAdapter

log = logging.getLogger("pystrix_node")

ROUTE = re.compile(r"^identify/1$")
PROMPT = "customer-id-prompt"
ATTEMPTS = 3
# CRM destination → (OML_DEST_TYPE, OML_DEST_ID, OML_IDENT_OUTCOME), as the node maps them.
DECISIONS = {"true": ("1", "3", "identified"), "false": ("1", "4", "not_identified")}
ON_ERROR = ("1", "9", "crm_error")
CRM_CONNECTIONS = 200  # our CRM client's connection limit (CALLERID_CRM_MAX_CONNECTIONS)


class Node:
    """The node's settings and its CRM session; `handle` is the pystrix script handler."""

    def __init__(self, crm_url: str, crm_timeout: float, expected_length: int) -> None:
        self.crm_url = crm_url
        self.crm_timeout = crm_timeout
        self.expected_length = expected_length
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "OMniLeads"
        self.session.mount("http://", HTTPAdapter(pool_maxsize=CRM_CONNECTIONS))
        self.session.mount("https://", HTTPAdapter(pool_maxsize=CRM_CONNECTIONS))

    def ask_crm(self, customer: str) -> str | None:
        """The CRM's `destination` for the customer, or None on any failure."""
        try:
            response = self.session.post(
                self.crm_url, data={"idContact": customer}, timeout=self.crm_timeout
            )
            if response.status_code != 200:
                return None
            body = response.json()
        except (requests.RequestException, ValueError):
            return None
        if not isinstance(body, dict) or body.get("status") != "ok":
            return None
        return str(body.get("destination"))

    def handle(self, agi: Any, args: Any, kwargs: Any, match: Any, path: Any) -> None:
        length = self.expected_length
        try:
            agi.execute(core.Exec("MSet", ("TIMEOUT(response)=5.000", "TIMEOUT(digit)=3.000")))
            entry = ""
            for _ in range(ATTEMPTS):
                agi.execute(core.Exec("Read", ("CALLERID_ENTRY", PROMPT, length)))
                value = agi.execute(core.GetFullVariable("${CALLERID_ENTRY},${READSTATUS}"))
                entry = str(value or "").rpartition(",")[0]
                if len(entry) == length and entry.isdigit():
                    break
            else:
                outcome = "invalid_input" if entry else "no_input"
                agi.execute(
                    core.Exec(
                        "MSet",
                        (
                            "OML_DEST_TYPE=1",
                            "OML_DEST_ID=4",
                            "OML_IDENT_SOURCE=local",
                            f"OML_IDENT_OUTCOME={outcome}",
                        ),
                    )
                )
                return
            destination = self.ask_crm(entry)
            decision = DECISIONS.get(destination or "")
            source = "crm" if decision else "failover"
            dest_type, dest_id, outcome = decision or ON_ERROR
            agi.execute(
                core.Exec(
                    "MSet",
                    (
                        f"__OML_CUSTOMER_ID={entry}",
                        f"__OMLCODCLI={entry}",
                        f"OML_DEST_TYPE={dest_type}",
                        f"OML_DEST_ID={dest_id}",
                        f"OML_IDENT_SOURCE={source}",
                        f"OML_IDENT_OUTCOME={outcome}",
                    ),
                )
            )
        except pystrix.agi.AGIException as exc:
            log.info("call ended: %r", exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.pystrix_node")
    parser.add_argument("--listen", required=True, help="host:port for FastAGI")
    parser.add_argument("--crm-url", required=True, help="the node's CRM URL (POST)")
    parser.add_argument("--crm-timeout", type=float, default=1.0, help="seconds")
    parser.add_argument("--expected-length", type=int, default=8, help="digits of an id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    host, _, port = args.listen.rpartition(":")
    node = Node(args.crm_url, args.crm_timeout, args.expected_length)
    server = pystrix.agi.FastAGIServer(interface=host, port=int(port))
    server.register_script_handler(ROUTE, node.handle)
    print("ready", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
