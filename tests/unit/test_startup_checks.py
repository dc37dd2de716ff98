"""What the services check when they start: unknown `CALLERID_*` variables are warned about,
bad values stop them with one line naming the variable, `CALLERID_NODES` is required, and an
empty node set is warned about (the service runs; every call gets config_error).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from agi_gateway.app import build_parser
from agi_gateway.app import main as gateway_main
from agi_gateway.settings import GatewaySettings
from crm_resolver.app import main as resolver_main
from crm_resolver.app import unknown_environment
from shared import runtime
from shared.node_sources import source_from_setting
from shared.nodes import ConfigError, build_nodes
from shared.settings import parse_listen
from shared.startup_errors import (
    StartupError,
    from_config_error,
    from_settings,
    listening,
    origins,
)
from tests.waiting import stderr_until

NODE = {
    "id": 1,
    "name": "gold",
    "audio": "prompt",
    "on_identified": "1,3",
    "on_not_identified": "1,4",
    "crm_token_env": "CALLERID_CRM_TOKEN_GOLD",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CALLERID_* variable of the developer's shell leaks into the service under test."""
    for name in list(os.environ):
        if name.upper().startswith("CALLERID_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    """One message per variable nothing reads; settings of either service, secrets a node
    names and the test suite's variables are not reported."""
    environ = {
        "CALLERID_MAXCALLS": "10",
        "CALLERID_BREAKER_FAILURE": "3",
        "CALLERID_FROBNICATE": "1",
        "CALLERID_MAX_CALLS": "10",  # a gateway setting
        "callerid_prefetch": "8",  # a resolver setting, in lower case
        "CALLERID_CRM_TOKEN_GOLD": "secret",  # named by the node
        "CALLERID_TEST_SLOW": "1",
        "PATH": "/usr/bin",
    }
    messages = unknown_environment(environ, build_nodes([NODE]))
    assert messages == [
        "CALLERID_BREAKER_FAILURE: not a setting, ignored; did you mean CALLERID_BREAKER_FAILURES?",
        "CALLERID_FROBNICATE: not a setting, ignored; see README, Service settings",
        "CALLERID_MAXCALLS: not a setting, ignored; did you mean CALLERID_MAX_CALLS?",
    ]
    # Without the nodes (they failed to load) the secret's name is not known to be read.
    assert any(m.startswith("CALLERID_CRM_TOKEN_GOLD:") for m in unknown_environment(environ, None))


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CALLERID_MAX_CALLS", "abc", "CALLERID_MAX_CALLS: must be a whole number, got 'abc'"),
        ("CALLERID_MAX_CALLS", "0", "CALLERID_MAX_CALLS: must be from 1 to 100000, got '0'"),
        ("CALLERID_JUMP_TEMPLATES", "{not json", "CALLERID_JUMP_TEMPLATES: not valid JSON"),
        ("CALLERID_EMBEDDED", "maybe", "CALLERID_EMBEDDED: must be true or false, got 'maybe'"),
        ("CALLERID_LOG_LEVEL", "LOUD", "CALLERID_LOG_LEVEL: unknown log level 'LOUD'"),
        ("CALLERID_AGI_ALLOWED_PEERS", "10.0.0.300/8", "CALLERID_AGI_ALLOWED_PEERS: '10.0.0.300"),
        ("CALLERID_AMQP_PREFIX", "a b", "CALLERID_AMQP_PREFIX: not in the form it must have"),
        ("CALLERID_AMQP_CA_BUNDLE", "/nonexistent/ca.pem", "CALLERID_AMQP_CA_BUNDLE: '/nonex"),
        ("CALLERID_CRM_CA_BUNDLE", "/etc/hostname", "holds no usable CA certificate"),
        ("CALLERID_HTTP_LISTEN", "0.0.0.0:4573", "CALLERID_HTTP_LISTEN: 0.0.0.0:4573 takes"),
    ],
)
def test_a_bad_value_stops_the_gateway_with_one_line_naming_the_variable(
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
    value: str,
    says: str,
) -> None:
    """Exit 2 and one ERROR line from the service, `cannot start: <variable>: <what is
    wrong> (<the fix>)`, in plain words rather than pydantic's; never a traceback."""
    clean_env.setenv(variable, value)
    assert gateway_main([]) == 2
    errors = _errors(caplog)
    assert [r.name for r in errors] == ["agi-gateway"]
    line = errors[0].getMessage()
    assert line.startswith("cannot start: ")
    assert says in line
    assert re.fullmatch(r"cannot start: (\S+): .+ \([^()]+\)", line), line
    assert "Input should" not in line
    assert errors[0].exc_info is None


def test_several_bad_values_are_one_line_each(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("CALLERID_MAX_CALLS", "0")
    clean_env.setenv("CALLERID_DRAIN_TIMEOUT", "soon")
    assert gateway_main([]) == 2
    lines = [r.getMessage() for r in _errors(caplog)]
    assert len(lines) == 2
    assert any(line.startswith("cannot start: CALLERID_MAX_CALLS: ") for line in lines)
    assert any(
        line.startswith("cannot start: CALLERID_DRAIN_TIMEOUT: must be a number, got 'soon'")
        for line in lines
    )


def test_a_secret_is_never_quoted_back(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad setting that may hold a password is named, its value is not shown."""
    clean_env.setenv("CALLERID_REDIS_URL", "redis://:hunter2-password@127.0.0.1:6379/0")
    clean_env.setenv("CALLERID_CACHE_KEY_PEPPER", "short-secret")
    assert gateway_main([]) == 2
    line = _errors(caplog)[0].getMessage()
    assert line.startswith("cannot start: CALLERID_CACHE_KEY_PEPPER: a secret of at least 16")
    assert "hunter2" not in caplog.text
    assert "short-secret" not in caplog.text


def test_a_bad_flag_is_named_as_the_flag(caplog: pytest.LogCaptureFixture) -> None:
    """When the bad value came from a flag, the line names the flag, not the variable."""
    assert resolver_main(["--prefetch", "0"]) == 2
    line = _errors(caplog)[0].getMessage()
    assert line.startswith("cannot start: --prefetch: must be from 1 to 10000, got 0 (")


@pytest.mark.parametrize("service", ["gateway", "resolver"])
def test_nodes_are_required(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, service: str
) -> None:
    """Without CALLERID_NODES (or --nodes) neither service starts: no example nodes are
    served by default, in the image or anywhere else. A typo of the name is pointed out."""
    clean_env.setenv("CALLERID_NODE", "nodes.yaml")
    caplog.set_level(logging.WARNING)
    if service == "gateway":
        code = gateway_main(["--embedded", "--agi-listen", "127.0.0.1:0"])
    else:
        code = resolver_main(["--amqp-url", "amqp://guest:guest@127.0.0.1:1/"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [errors[0]]
    assert errors[0].startswith("cannot start: CALLERID_NODES: not set")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "CALLERID_NODE: not a setting, ignored; did you mean CALLERID_NODES?" in warnings


def test_gateway_warns_about_typos_and_empty_nodes_and_keeps_running(tmp_path: Path) -> None:
    """A real `agi-gateway` with `nodes: []` and a misspelt variable logs both warnings and
    serves on (it is not a start-up failure)."""
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("nodes: []\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CALLERID_")}
    env.update(
        CALLERID_NODES=str(nodes),
        CALLERID_MAXCALLS="7",
        CALLERID_AGI_LISTEN="127.0.0.1:0",
        CALLERID_HTTP_LISTEN="127.0.0.1:0",
    )
    wanted = [
        "CALLERID_MAXCALLS: not a setting, ignored; did you mean CALLERID_MAX_CALLS?",
        f"no identification nodes in file {nodes}: the gateway runs, but every call ends at once"
        " with config_error",
    ]
    with subprocess.Popen(
        [sys.executable, "-m", "agi_gateway", "--embedded"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            log = stderr_until(process, wanted, timeout=30)
            assert process.poll() is None, log
        finally:
            process.terminate()
            process.wait(timeout=30)
    for text in wanted:
        assert text in log
    assert "WARNING agi_gateway.app: CALLERID_MAXCALLS" in log


def test_a_shared_redis_without_a_cache_secret_is_refused() -> None:
    """With CALLERID_REDIS_URL set, the services refuse to start without a cache-key secret
    of 16+ characters, in one line naming the variable; without Redis none is needed."""
    from pydantic import ValidationError

    from shared.settings import CommonSettings

    with pytest.raises(ValidationError, match="CALLERID_CACHE_KEY_PEPPER"):
        CommonSettings(redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ValidationError, match="CALLERID_CACHE_KEY_PEPPER"):
        CommonSettings(redis_url="redis://127.0.0.1:6379/0", cache_key_pepper="short")
    assert CommonSettings(redis_url="redis://x/0", cache_key_pepper="s" * 16).redis_url
    assert CommonSettings().cache_key_pepper == ""


async def _listen(address: str) -> None:
    host, port = parse_listen(address)
    server = await asyncio.start_server(lambda r, w: None, host, port)
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    ("address", "says", "status"),
    [
        ("192.0.2.1:4573", "192.0.2.1:4573 is not an address of this host", 2),
        ("no-such-host.invalid:4573", "the host in 'no-such-host.invalid:4573' is not known", 2),
        ("held", "is already in use by another process", 1),
    ],
)
async def test_an_address_that_cannot_be_listened_on_is_named_by_its_setting(
    address: str, says: str, status: int
) -> None:
    """The OSError of a real bind becomes the setting's line: why, the fix, the status (2:
    the setting is wrong; 1: another process holds the port, which may change)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        if address == "held":
            address = f"127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises(StartupError) as caught, listening("agi_listen", address):
            await _listen(address)
    error = caught.value
    assert (error.setting, error.status) == ("agi_listen", status)
    assert says in error.problem
    assert error.line(lambda field: "CALLERID_AGI_LISTEN").startswith(
        "cannot start: CALLERID_AGI_LISTEN: "
    )


async def test_nodes_from_a_redis_that_does_not_answer_are_an_environment_error() -> None:
    """The same failure to read nodes is the host's (exit 1, retry) when the nodes' Redis does
    not answer, and the configuration's (exit 2) when the file is not there."""
    redis_source = source_from_setting("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError) as from_redis:
        await redis_source.load()
    await redis_source.close()
    with pytest.raises(ConfigError) as from_file:
        await source_from_setting("/nonexistent/nodes.yaml").load()
    redis_error = from_config_error(from_redis.value, "redis://127.0.0.1:1/0")
    file_error = from_config_error(from_file.value, "/nonexistent/nodes.yaml")
    assert (redis_error.setting, redis_error.status) == ("nodes", 1)
    assert (file_error.setting, file_error.status) == ("nodes", 2)
    assert "No such file or directory" in file_error.problem


def test_a_config_error_naming_its_setting_is_about_that_setting() -> None:
    """A message `CALLERID_X: problem (fix)` (a URL checked outside the settings class) is
    split into setting, problem and fix rather than blamed on CALLERID_NODES."""
    error = from_config_error(
        ConfigError("CALLERID_REDIS_URL: 'http://x' is not a Redis URL (e.g. redis://h:6379/0)"),
        None,
    )
    assert (error.setting, error.problem, error.fix) == (
        "CALLERID_REDIS_URL",
        "'http://x' is not a Redis URL",
        "e.g. redis://h:6379/0",
    )


@pytest.mark.parametrize(
    ("raised", "status", "says"),
    [
        (RuntimeError("boom"), 1, "stopped by an unexpected error: RuntimeError: boom (a bug"),
        (
            StartupError("agi_listen", "bad", "fix it", 2),
            2,
            "cannot start: CALLERID_AGI_LISTEN: bad (fix it)",
        ),
        (ConfigError("node '1': audio: missing"), 2, "cannot start: CALLERID_NODES: node '1'"),
    ],
)
def test_whatever_escapes_the_service_is_one_line_and_a_status(
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    raised: Exception,
    status: int,
    says: str,
) -> None:
    """The wrapper every console script runs in: one ERROR line for anything `serve` raises,
    the traceback of an unexpected one only at DEBUG."""
    caplog.set_level(logging.DEBUG)

    async def serve(settings: GatewaySettings) -> int:
        raise raised

    assert runtime.start_service(build_parser(), [], GatewaySettings, serve) == status
    errors = _errors(caplog)
    assert len(errors) == 1
    assert errors[0].getMessage().startswith(says)
    assert errors[0].exc_info is None
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(debug) == (1 if isinstance(raised, RuntimeError) else 0)


class _Choices(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CALLERID_")
    queue_type: Literal["classic", "quorum"] = "quorum"


def test_a_value_outside_a_set_of_choices_lists_them() -> None:
    """A setting that takes one of a few words says which, in plain words."""
    with pytest.raises(ValidationError) as caught:
        _Choices(queue_type="fast")  # type: ignore[arg-type]
    (error,) = from_settings(caught.value, _Choices)
    where = origins(build_parser(), _Choices, set())
    assert error.line(where) == (
        "cannot start: CALLERID_QUEUE_TYPE: not one of the values it may take, got 'fast' "
        "(use classic or quorum; unset, it is quorum)"
    )
