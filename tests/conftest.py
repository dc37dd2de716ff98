"""Fixtures shared by the whole suite: real service URLs and isolation helpers."""

from __future__ import annotations

import uuid

import pytest

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
