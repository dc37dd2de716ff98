"""Settings common to both services, read once at start-up from `CALLERID_*` env and flags.

Each service has one settings class built on `CommonSettings`; nothing else reads the
environment. Command-line flags override the environment (see each service's `app`).
"""

from __future__ import annotations

import argparse
import logging
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) into its parts; ValueError with the bad text."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CALLERID_", extra="ignore")

    nodes: str = Field(
        default="examples/nodes.yaml",
        description="Path to the nodes YAML file, or redis://host:port/db for OMniLeads hashes.",
    )
    amqp_url: str | None = None
    amqp_prefix: str = Field(
        default="callerid",
        pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
        description="Prefix of every RabbitMQ name (isolates stacks sharing a broker).",
    )
    redis_url: str | None = None
    http_listen: str = "0.0.0.0:9100"
    log_level: str = "INFO"
    reload_interval: float = Field(default=5.0, ge=0.5, le=3600)
    crm_ca_bundle: str | None = None
    crm_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated CRM hosts requests may go to ('*.example.com' allowed); "
        "empty: any host.",
    )
    crm_allow_metadata: bool = Field(
        default=False,
        description="Let CRM requests reach link-local and cloud metadata addresses.",
    )
    cache_key_pepper: str = ""
    cache_timeout: float = Field(default=0.05, ge=0.001, le=5, description="Redis timeout (s).")
    show_customer_ids: bool = Field(
        default=False, description="Debug only: log customer ids in clear."
    )

    @field_validator("http_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("crm_allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(host.strip() for host in value.split(",") if host.strip())
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if logging.getLevelName(value.upper()) == f"Level {value.upper()}":
            raise ValueError(f"unknown log level {value!r}")
        return value.upper()


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", help="nodes YAML path or redis:// URL (CALLERID_NODES)")
    parser.add_argument("--amqp-url", help="RabbitMQ URL (CALLERID_AMQP_URL)")
    parser.add_argument("--redis-url", help="Redis URL for the cache (CALLERID_REDIS_URL)")
    parser.add_argument("--http-listen", help="host:port for /metrics, /healthz, /readyz")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as settings fields (flags beat the environment)."""
    return {key: value for key, value in vars(args).items() if value is not None}


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # aio-pika/aiormq log every reconnect attempt at INFO; our own lines say what matters.
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, logging.getLevelName(level)))
