"""The real console scripts, started with one thing wrong each: they exit at once with a
non-zero status and one ERROR line naming the setting and the fix, never a traceback
(`shared.startup_errors`; README, "When it will not start").

Each case is a fresh `agi-gateway`, `crm-resolver` or `callerid-cache-purge` process on
private loopback ports. A port "in use" is held by a socket this module binds first. The
processes run a few at a time (they spend most of their life importing), each with a deadline;
a case that hangs fails.

Before `shared.startup_errors`, the cases marked `traceback_before` ended in a Python traceback
(bind errors, a CA file that is not there, a Redis URL of another scheme, the two listeners on
one port, the purge tool's settings), and the others in a line without the variable's name or
a level, or (nodes from a Redis that does not answer) with exit status 2.

A peer missing at start is not a start-up failure (the cache fails open, the broker is
retried): those starts run on, with one line naming the setting. Before, a broker that did not
answer or refused the credentials ended the start in a traceback, and a cache Redis that did
not answer was not mentioned at all.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.startup_errors import warn_if_cache_unreachable
from tests import services
from tests.waiting import stderr_until

# The first case's setup runs every process (a few at a time): on a loaded 2-core box that is
# well over the suite's 60 s per test.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent
DEADLINE = 60.0
"""Seconds one process may take to give up (it takes 1-4 s on a loaded 2-core box)."""
AT_ONCE = max(2, os.cpu_count() or 2)

CONFIGURATION, ENVIRONMENT = 2, 1
LINE = re.compile(
    r"^\S+ \S+ ERROR (?:agi-gateway|crm-resolver|callerid-cache-purge): cannot start: "
    r"(?P<setting>CALLERID_[A-Z0-9_]+): (?P<problem>.+) \((?P<fix>[^()]+)\)$"
)
NODES = """\
nodes:
  - id: 1
    name: gold
    audio: prompt
    on_identified: "1,3"
    on_not_identified: "1,4"
"""
PEPPER = "0123456789abcdef-startup-errors"
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1


@dataclass(frozen=True)
class Case:
    """One start that must fail: the script, its environment (over a clean one with a valid
    nodes file and ephemeral ports), and what the one line must say."""

    script: str
    env: dict[str, str]
    setting: str
    says: str
    status: int = CONFIGURATION
    argv: tuple[str, ...] = ()
    traceback_before: bool = False  # for the record: what this start did before the fix


def cases(busy: str, nodes_file: str) -> dict[str, Case]:
    """The cases; `busy` is a host:port held by this module."""
    return {
        "a setting out of range": Case(
            "agi-gateway",
            {"CALLERID_MAX_CALLS": "0"},
            "CALLERID_MAX_CALLS",
            "must be from 1 to 100000, got '0'",
        ),
        "invalid JSON in CALLERID_JUMP_TEMPLATES": Case(
            "agi-gateway",
            {"CALLERID_JUMP_TEMPLATES": '{"*": oml-dest}'},
            "CALLERID_JUMP_TEMPLATES",
            "not valid JSON",
        ),
        "the AGI port in use": Case(
            "agi-gateway",
            {"CALLERID_AGI_LISTEN": busy},
            "CALLERID_AGI_LISTEN",
            f"{busy} is already in use",
            ENVIRONMENT,
            traceback_before=True,
        ),
        "the gateway's HTTP port in use": Case(
            "agi-gateway",
            {"CALLERID_HTTP_LISTEN": busy},
            "CALLERID_HTTP_LISTEN",
            f"{busy} is already in use",
            ENVIRONMENT,
            traceback_before=True,
        ),
        "the resolver's HTTP port in use": Case(
            "crm-resolver",
            # RabbitMQ need not answer: the resolver listens before it connects.
            {"CALLERID_HTTP_LISTEN": busy, "CALLERID_AMQP_URL": NO_BROKER},
            "CALLERID_HTTP_LISTEN",
            f"{busy} is already in use",
            ENVIRONMENT,
            traceback_before=True,
        ),
        "both listeners on one port": Case(
            "agi-gateway",
            {"CALLERID_AGI_LISTEN": "127.0.0.1:47999", "CALLERID_HTTP_LISTEN": "0.0.0.0:47999"},
            "CALLERID_HTTP_LISTEN",
            "takes the port CALLERID_AGI_LISTEN 127.0.0.1:47999 listens on",
            traceback_before=True,
        ),
        "a CRM CA file that is not there": Case(
            "crm-resolver",
            {
                "CALLERID_CRM_CA_BUNDLE": "/nonexistent/ca.pem",
                "CALLERID_AMQP_URL": NO_BROKER,
            },
            "CALLERID_CRM_CA_BUNDLE",
            "'/nonexistent/ca.pem' cannot be read: No such file or directory",
            traceback_before=True,
        ),
        "a Redis URL of another scheme": Case(
            "agi-gateway",
            {"CALLERID_REDIS_URL": "http://127.0.0.1:1/0", "CALLERID_CACHE_KEY_PEPPER": PEPPER},
            "CALLERID_REDIS_URL",
            "is not a Redis URL",
            traceback_before=True,
        ),
        "a nodes file that is not there": Case(
            "agi-gateway",
            {"CALLERID_NODES": nodes_file + ".missing"},
            "CALLERID_NODES",
            "cannot read: No such file or directory",
        ),
        "no CALLERID_NODES": Case(
            "crm-resolver",
            {"CALLERID_NODES": "", "CALLERID_AMQP_URL": NO_BROKER},
            "CALLERID_NODES",
            "not set",
        ),
        "nodes from a Redis that does not answer": Case(
            "agi-gateway",
            {"CALLERID_NODES": "redis://127.0.0.1:1/0"},
            "CALLERID_NODES",
            "cannot read nodes from redis://127.0.0.1:1/0",
            ENVIRONMENT,
        ),
        "the cache purge tool with a Redis and no cache-key secret": Case(
            "callerid-cache-purge",
            {"CALLERID_REDIS_URL": "redis://127.0.0.1:1/0"},
            "CALLERID_CACHE_KEY_PEPPER",
            "a secret of at least 16 characters is required",
            argv=("--node", "1"),
            traceback_before=True,
        ),
        "a resolver without CALLERID_AMQP_URL": Case(
            "crm-resolver",
            {},
            "CALLERID_AMQP_URL",
            "not set",
        ),
    }


@dataclass(frozen=True)
class Ended:
    status: int | None  # None: still running at the deadline (killed)
    output: str


def start(case: Case, nodes_file: str) -> Ended:
    """Run the case's console script to its end (or its deadline) and collect its output."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CALLERID_")}
    env.update(
        CALLERID_NODES=nodes_file,
        CALLERID_AGI_LISTEN="127.0.0.1:0",
        CALLERID_HTTP_LISTEN="127.0.0.1:0",
        CALLERID_AGI_ALLOWED_PEERS="127.0.0.1",
    )
    env.update(case.env)
    try:
        done = subprocess.run(
            [str(BIN / case.script), *case.argv],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # run() killed it
        output = (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
        return Ended(None, output)
    return Ended(done.returncode, done.stdout + done.stderr)


@pytest.fixture(scope="module")
def busy() -> Iterator[str]:
    """A loopback address a socket of this module listens on: "in use" for the services."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield f"127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture(scope="module")
def nodes_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("startup") / "nodes.yaml"
    path.write_text(NODES)
    return str(path)


@pytest.fixture(scope="module")
def ended(busy: str, nodes_file: str) -> dict[str, Ended]:
    """Every case's process, run a few at a time (the module's time is their import time)."""
    for script in {case.script for case in cases("", "").values()}:
        if not (BIN / script).exists():
            pytest.fail(f"{BIN / script} is missing: `pip install -e .` installs it")
    table = cases(busy, nodes_file)
    with ThreadPoolExecutor(AT_ONCE) as pool:
        futures = {name: pool.submit(start, case, nodes_file) for name, case in table.items()}
        return {name: future.result() for name, future in futures.items()}


CASE_NAMES = list(cases("127.0.0.1:1", "nodes.yaml"))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_line_naming_the_setting_and_a_non_zero_exit(
    name: str, ended: dict[str, Ended], busy: str, nodes_file: str
) -> None:
    """The process exits by itself with the case's status (2: fix the configuration; 1: this
    host is not ready), its output holds exactly one ERROR line, in the form `<service>:
    cannot start: <CALLERID_*>: <what is wrong> (<the fix>)` naming the case's setting, and
    no traceback."""
    case = cases(busy, nodes_file)[name]
    result = ended[name]
    assert result.status is not None, f"still running after {DEADLINE} s:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.output
    line = LINE.match(errors[0])
    assert line is not None, errors[0]
    assert line.group("setting") == case.setting, errors[0]
    assert case.says in line.group("problem"), errors[0]
    assert result.status == case.status, result.output


DEGRADED = {
    # name: (script, argv, environment, the line's level, what the line says)
    "a cache Redis that does not answer": (
        "agi-gateway",
        ("--embedded",),
        {"CALLERID_REDIS_URL": "redis://:a-password@127.0.0.1:1/0"},
        "WARNING",
        "CALLERID_REDIS_URL: no usable answer from redis://***@127.0.0.1:1/0",
    ),
    "RabbitMQ that does not answer": (
        "agi-gateway",
        (),
        {"CALLERID_AMQP_URL": "amqp://guest:a-password@127.0.0.1:1/"},
        "WARNING",
        "cannot connect to RabbitMQ at 127.0.0.1:1",
    ),
    "RabbitMQ refusing the credentials": (
        "crm-resolver",
        (),
        {"CALLERID_AMQP_URL": "amqp://guest:a-password@{broker}/"},
        "ERROR",
        "refused the credentials of CALLERID_AMQP_URL",
    ),
}


@pytest.mark.parametrize("name", list(DEGRADED))
def test_a_peer_missing_at_start_is_one_line_and_the_service_runs(
    name: str, nodes_file: str
) -> None:
    """Not start-up failures (README, "When it will not start"): the cache fails open and the
    broker is retried, so the service starts and runs, says so in one line naming the setting
    (the password hidden), and stops cleanly on SIGTERM; no traceback."""
    script, argv, extra, level, says = DEGRADED[name]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CALLERID_")}
    env.update(
        CALLERID_NODES=nodes_file,
        CALLERID_AGI_LISTEN="127.0.0.1:0",
        CALLERID_HTTP_LISTEN="127.0.0.1:0",
        CALLERID_AGI_ALLOWED_PEERS="127.0.0.1",
        CALLERID_CACHE_KEY_PEPPER=PEPPER,
    )
    if "{broker}" in str(extra):  # the real RabbitMQ, asked with a wrong password
        broker = services.amqp_url().split("@")[-1].rstrip("/")
        extra = {key: value.format(broker=broker) for key, value in extra.items()}
    env.update(extra)
    with subprocess.Popen(
        [str(BIN / script), *argv], env=env, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            log = stderr_until(process, [says], timeout=DEADLINE)
            assert process.poll() is None, log
        finally:
            process.terminate()
            _, rest = process.communicate(timeout=DEADLINE)
    log += rest
    # The SIGTERM handler is installed before the broker connection starts (services' serve()):
    # whenever the signal lands, the service stops cleanly.
    assert process.returncode == 0, log
    lines = [line for line in log.splitlines() if says in line]
    assert len(lines) == 1, log
    assert f" {level} " in lines[0]
    assert [line for line in log.splitlines() if " ERROR " in line] == (
        lines if level == "ERROR" else []
    ), log
    assert "a-password" not in log
    assert "Traceback" not in log


async def test_a_cache_redis_that_answers_is_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The start-up ping against the real Redis: it answers, nothing is logged; a port where
    nothing listens is one WARNING."""
    assert await warn_if_cache_unreachable(services.redis_url(), timeout=10)  # a busy Redis
    assert not await warn_if_cache_unreachable("redis://127.0.0.1:1/0")
    ours = [r for r in caplog.records if r.name == "shared.startup_errors"]
    assert [r.getMessage().split(" (")[0] for r in ours] == [
        "CALLERID_REDIS_URL: no usable answer from redis://127.0.0.1:1/0"
    ]
    assert ours[0].levelno == logging.WARNING
