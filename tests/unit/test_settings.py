"""Service settings: bad values stop the start with one line per field, exit code 2."""

from __future__ import annotations

import logging

import pytest

from agi_gateway.app import main as gateway_main
from crm_resolver.app import main as resolver_main


def _error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--agi-listen", "bad"], "--agi-listen: expected host:port, got 'bad' (write host:port"),
        (["--drain-timeout", "-1"], "--drain-timeout: must be from 0 to 3600, got -1.0"),
        (["--http-listen", "host:99999"], "--http-listen: expected host:port"),
        (["--log-level", "LOUD"], "--log-level: unknown log level 'LOUD'"),
    ],
)
def test_gateway_refuses_bad_settings(
    argv: list[str], says: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad flag exits 2 before anything starts, naming the flag."""
    assert gateway_main(argv) == 2
    assert _error_lines(caplog) == [_error_lines(caplog)[0]]
    assert _error_lines(caplog)[0].startswith(f"cannot start: {says}")


def test_bad_jump_template_is_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A jump template that could not render a Goto target stops the gateway at start-up."""
    monkeypatch.setenv("CALLERID_JUMP_TEMPLATES", '{"*": "ctx,{id}"}')
    assert gateway_main([]) == 2
    assert _error_lines(caplog)[0].startswith(
        "cannot start: CALLERID_JUMP_TEMPLATES: jump template 'ctx,{id}': must render to"
    )


def test_resolver_refuses_bad_settings(caplog: pytest.LogCaptureFixture) -> None:
    """The resolver checks its settings the same way."""
    assert resolver_main(["--prefetch", "0"]) == 2
    assert _error_lines(caplog)[0].startswith("cannot start: --prefetch: must be from 1 to 10000")
