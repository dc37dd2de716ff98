"""What the services check when they start: unknown `CALLERID_*` variables are warned about,
bad values stop them with one line naming the variable, `CALLERID_NODES` is required, and an
empty node set is warned about (the service runs; every call gets config_error).
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agi_gateway.app import main as gateway_main
from crm_resolver.app import main as resolver_main
from crm_resolver.app import unknown_environment
from shared.nodes import build_nodes

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


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CALLERID_MAX_CALLS", "abc", "invalid setting max_calls: Input should be a valid integer"),
        ("CALLERID_JUMP_TEMPLATES", "{not json", "invalid setting jump_templates: not valid JSON"),
        ("CALLERID_EMBEDDED", "maybe", "invalid setting embedded: Input should be a valid boolean"),
    ],
)
def test_a_bad_value_stops_the_gateway_with_one_line_naming_the_variable(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    says: str,
) -> None:
    """Exit 2 and one stderr line naming setting and variable; never a traceback."""
    clean_env.setenv(variable, value)
    assert gateway_main([]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"agi-gateway: {lines[0].removeprefix('agi-gateway: ')}"]
    assert says in lines[0]
    assert lines[0].endswith(f"({variable})")


def test_a_bad_flag_is_named_as_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """When the bad value came from a flag, the line names the flag, not the variable."""
    assert resolver_main(["--prefetch", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("(--prefetch)")


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
    assert errors[0].startswith("cannot start: CALLERID_NODES is not set")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "CALLERID_NODE: not a setting, ignored; did you mean CALLERID_NODES?" in warnings


def _stderr_until(process: subprocess.Popen[str], wanted: list[str], timeout: float) -> str:
    """The process's stderr, read until every `wanted` text appeared (or the time is up)."""
    assert process.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while not all(text in seen for text in wanted) and time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                line = process.stderr.readline()
                if not line:
                    break
                seen += line
    return seen


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
            log = _stderr_until(process, wanted, timeout=30)
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
