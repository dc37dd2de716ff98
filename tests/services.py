"""Find the real RabbitMQ and Redis the integration tests use (docs/design.md §10).

Order: URLs from the environment (CALLERID_TEST_AMQP_URL / CALLERID_TEST_REDIS_URL), the local
defaults, testcontainers when a Docker engine answers. When nothing answers, the test fails
under CI=true with a message saying what to start, and is skipped only on a developer machine.
"""

from __future__ import annotations

import os

import pytest

from tools.stack import url_answers

LOCAL_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"

START_HINTS = {
    "RabbitMQ": "start it with `rabbitmq-server -detached` (or set CALLERID_TEST_AMQP_URL)",
    "Redis": "start it with `redis-server --daemonize yes --port 6379 --save ''` "
    "(or set CALLERID_TEST_REDIS_URL)",
}


def _docker_engine_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


def _missing(what: str) -> None:
    message = f"{what} is not reachable: {START_HINTS[what]}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def find_service(what: str, env_name: str, local: str, default_port: int) -> str:
    url = os.environ.get(env_name, local)
    if url_answers(url, default_port):
        return url
    if _docker_engine_answers():  # pragma: no cover - this machine has no Docker engine
        from testcontainers.rabbitmq import RabbitMqContainer
        from testcontainers.redis import RedisContainer

        if what == "Redis":
            redis = RedisContainer().start()
            return f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"
        rabbit = RabbitMqContainer().start()
        port = rabbit.get_exposed_port(5672)
        return f"amqp://guest:guest@{rabbit.get_container_host_ip()}:{port}/"
    _missing(what)
    raise AssertionError("unreachable")


def amqp_url() -> str:
    return find_service("RabbitMQ", "CALLERID_TEST_AMQP_URL", LOCAL_AMQP, 5672)


def redis_url() -> str:
    return find_service("Redis", "CALLERID_TEST_REDIS_URL", LOCAL_REDIS, 6379)
