"""Fixtures shared by the whole suite: real service URLs and isolation helpers; the markers
each folder of tests implies.

The folders say what a test needs (README, "Test"): tests/unit nothing but this machine's
loopback (the fast loop: `pytest tests/unit`), tests/integration the real RabbitMQ and Redis,
tests/load the same under load and faults, tests/asterisk a real Asterisk, tests/deploy the
deploy tools and a container engine.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from tests import services

# Markers a folder implies, so `-m "not integration"` and the Makefile's selections follow
# the layout without each module repeating them.
FOLDER_MARKERS = {"integration": ("integration",), "load": ("integration",)}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath / "tests"
    for item in items:
        try:
            folder = item.path.relative_to(root).parts[0]
        except ValueError:
            continue
        for marker in FOLDER_MARKERS.get(folder, ()):
            if item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return services.amqp_url()


@pytest.fixture(scope="session")
def redis_base_url() -> str:
    return services.redis_url()


@pytest.fixture
def unique_name() -> str:
    """A name no other test (or test run) uses: for queues, key prefixes and vhosts."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw(redis_base_url: str, unique_name: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain Redis client to look at what a test wrote; deletes the keys under the test's
    `unique_name` prefix afterwards."""
    client = redis.asyncio.Redis.from_url(redis_base_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{unique_name}:*", count=1000)]
    if keys:
        await client.unlink(*keys)
    await client.aclose()
