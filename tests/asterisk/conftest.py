"""Fixtures of the real-PBX tier: the Asterisk binary and one private Asterisk per session.

Calls share the instance but not their results: each carries its own call id, and each test
uses node ids of its own, so tests cannot see each other's calls.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests import services
from tools import pbx

ENABLE_HINT = (
    "set CALLERID_TEST_ASTERISK=/path/to/sbin/asterisk, put asterisk on PATH, "
    "or run tools/asterisk/ensure_asterisk.sh to build it"
)


def pytest_configure(config: pytest.Config) -> None:
    # Registered here as well as in pyproject.toml, so --strict-markers accepts the tier
    # whichever is read first; a repeated registration is harmless.
    config.addinivalue_line("markers", "asterisk: drives a real, private Asterisk (tools/pbx.py)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Find (or build) Asterisk before any test runs, when a selected test needs it.

    A first build takes about 10 minutes, far beyond a test's 60 s timeout, which covers
    fixture set-up too; here, after -m/-k deselection (trylast), no timeout applies. The
    answer is cached for the session fixture.
    """
    if not any(item.get_closest_marker("asterisk") for item in items):
        return
    cached = Path(os.environ.get("CALLERID_CACHE", Path.home() / ".cache" / "callerid"))
    ready = (
        os.environ.get("CALLERID_TEST_ASTERISK")
        or shutil.which("asterisk")
        or (cached / "asterisk-22.10.1" / ".built").exists()
    )
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if not ready and reporter is not None:
        reporter.write_line("asterisk tier: building Asterisk 22.10.1 (about 10 minutes, once)")
    pbx.find_asterisk()


@pytest.fixture(scope="session")
def asterisk_binary() -> Path:
    path = pbx.find_asterisk()
    if path is None:
        reason = pbx.asterisk_unavailable_reason()
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs Asterisk for the asterisk tier: {reason}", pytrace=False)
        pytest.skip(f"no Asterisk ({reason}): {ENABLE_HINT}")
    return path


@pytest.fixture(scope="session")
def private_asterisk(
    asterisk_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pbx.PrivateAsterisk]:
    """One running private Asterisk for the tier; its full log is in its workdir/log/full."""
    # Verbosity 3 puts every dialplan step in the full log: what you want when a test fails.
    with pbx.PrivateAsterisk(
        asterisk_binary, tmp_path_factory.mktemp("asterisk"), verbose=3
    ) as instance:
        yield instance


@contextlib.contextmanager
def omnileads_redis(db: int) -> Iterator[redis.Redis]:
    """A client on Redis db `db` with no OMniLeads node hashes in it, before and after: the
    hashes have OMniLeads' fixed key names, so each test module keeps a db of its own."""
    base = services.redis_url().rsplit("/", 1)[0]
    client = redis.Redis.from_url(f"{base}/{db}", decode_responses=True)

    def clear() -> None:
        keys = list(client.scan_iter(match="OML:CUSTOMERID:*"))
        if keys:
            client.delete(*keys)

    clear()
    try:
        yield client
    finally:
        clear()
        client.close()
