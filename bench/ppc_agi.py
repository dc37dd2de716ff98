#!/usr/bin/env python3
"""The process-per-call baseline: an AGI script as older setups run it, one process per call.

Asterisk's `AGI(ppc_agi.py)` forks and execs this for every call, with the AGI environment on
stdin and commands on stdout. It does what such scripts typically do: read the environment,
prompt for the id, read Redis, POST the id to the CRM, set the variables. Deliberately plain,
with the usual libraries (redis-py, urllib); it is measured, not used.

Usage (set up by bench/ppc.py): ppc_agi.py <redis_url> <crm_url>
"""

import json
import sys
import urllib.parse
import urllib.request

import redis


def command(line: str) -> str:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return sys.stdin.readline().strip()


def main() -> int:
    env = {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        key, _, value = line.partition(": ")
        env[key] = value
    redis_url, crm_url = sys.argv[1], sys.argv[2]
    command("ANSWER")
    reply = command("GET DATA customer-id-prompt 5000 8")
    digits = reply.partition("result=")[2].split(" ")[0]
    if not digits.isdigit():
        command('SET VARIABLE OML_IDENT_OUTCOME "no_input"')
        return 0
    cached = redis.Redis.from_url(redis_url).get(f"ppc:{digits}")
    if not isinstance(cached, bytes):
        body = urllib.parse.urlencode({"idContact": digits}).encode()
        request = urllib.request.Request(crm_url, data=body, headers={"User-Agent": "OMniLeads"})
        with urllib.request.urlopen(request, timeout=5) as response:
            destination = str(json.loads(response.read())["destination"])
    else:
        destination = cached.decode()
    outcome = "identified" if destination == "true" else "not_identified"
    command(f'SET VARIABLE __OMLCODCLI "{digits}"')
    command(f'SET VARIABLE OML_IDENT_OUTCOME "{outcome}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
