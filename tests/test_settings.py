"""Service settings: bad values stop the start with one line per field, exit code 2."""

from __future__ import annotations

import pytest

from agi_gateway.app import main as gateway_main
from crm_resolver.app import main as resolver_main


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--agi-listen", "bad"], "agi_listen"),
        (["--drain-timeout", "-1"], "drain_timeout"),
        (["--http-listen", "host:99999"], "http_listen"),
        (["--log-level", "LOUD"], "log_level"),
    ],
)
def test_gateway_refuses_bad_settings(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag exits 2 before anything starts, naming the setting."""
    assert gateway_main(argv) == 2
    assert f"agi-gateway: invalid setting {field}:" in capsys.readouterr().err


def test_bad_jump_template_is_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A jump template that could not render a Goto target stops the gateway at start-up."""
    monkeypatch.setenv("CALLERID_JUMP_TEMPLATES", '{"*": "ctx,{id}"}')
    assert gateway_main([]) == 2
    assert "invalid setting jump_templates" in capsys.readouterr().err


def test_resolver_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """The resolver checks its settings the same way."""
    assert resolver_main(["--prefetch", "0"]) == 2
    assert "crm-resolver: invalid setting prefetch:" in capsys.readouterr().err
