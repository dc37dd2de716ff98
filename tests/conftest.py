"""Fixtures shared by the whole suite: real service URLs and isolation helpers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from tests import services


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
