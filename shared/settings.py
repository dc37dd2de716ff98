"""Settings common to both services, read once at start-up from `CALLERID_*` env and flags.

Each service has one settings class built on `CommonSettings`; nothing else reads the
environment. Command-line flags override the environment (see each service's `app`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import ssl
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.amqp_urls import split_amqp_urls

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) into its parts; ValueError with the bad text."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


MIN_CACHE_SECRET = 16


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CALLERID_", extra="ignore")

    # No default: a service that silently served a built-in file would route real callers by
    # example nodes. The services refuse to start without it (`make run` names the example).
    nodes: str | None = Field(
        default=None,
        description="Required. Path to the nodes YAML file, or redis://host:port/db for "
        "OMniLeads hashes.",
    )
    amqp_url: str | None = Field(
        default=None,
        description="RabbitMQ URL, or the URLs of one cluster's nodes, comma-separated: the "
        "services connect to the first that answers and move on to the next when it goes away.",
    )
    amqp_queue_type: Literal["classic", "quorum"] = Field(
        default="classic",
        description="Type of the request and dead-letter queues: classic (one node holds them; "
        "no disk write per request), or quorum (replicated: outlives a node of a cluster). "
        "The same on every service; changing it means deleting the queues.",
    )
    amqp_prefix: str = Field(
        default="callerid",
        pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
        description="Prefix of every RabbitMQ name (isolates stacks sharing a broker).",
    )
    amqp_ca_bundle: str | None = Field(
        default=None,
        description="Extra CA file to verify RabbitMQ's certificate with (amqps:// URLs; "
        "verification is never off).",
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
    cache_key_pepper: str = Field(
        default="",
        description="The secret cache keys are an HMAC-SHA256 with (16+ characters, the same on "
        "every service); required when CALLERID_REDIS_URL is set.",
    )
    cache_timeout: float = Field(default=0.05, ge=0.001, le=5, description="Redis timeout (s).")
    show_customer_ids: bool = Field(
        default=False, description="Debug only: log customer ids in clear."
    )
    # Nodes read from OMniLeads' hashes (CALLERID_NODES=redis://...) read the entry back and
    # ask for 1, as OMniLeads' own dialplan always does (docs/omnileads.md).
    omnileads_confirm: bool = Field(
        default=True,
        description="Nodes from OMniLeads' Redis hashes read the entry back and ask for 1.",
    )
    omnileads_confirm_audio: str = Field(
        default="oml/en/oml-to-confirm-press-one",
        # An Asterisk sound name, as a node's `confirm_audio` (no "." or ".." segment).
        pattern=r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_.\-]*[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*$",
        description="The 'press 1 to confirm' prompt of nodes from OMniLeads' hashes.",
    )

    @model_validator(mode="after")
    def _cache_secret(self) -> Self:
        # With a shared Redis the cache keys are the only thing between a reader of Redis and
        # the customer ids: without a secret they are recovered by hashing every candidate.
        if self.redis_url and len(self.cache_key_pepper) < MIN_CACHE_SECRET:
            raise ValueError(
                f"CALLERID_CACHE_KEY_PEPPER: a secret of at least {MIN_CACHE_SECRET} characters "
                "is required when CALLERID_REDIS_URL is set (set one, the same on every gateway "
                "and resolver, e.g. `openssl rand -hex 32`)"
            )
        return self

    @field_validator("amqp_url")
    @classmethod
    def _amqp_urls(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        split_amqp_urls(value)  # raises ValueError naming the bad entry
        return value.strip()

    @field_validator("nodes")
    @classmethod
    def _nodes_blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("http_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("amqp_ca_bundle", "crm_ca_bundle")
    @classmethod
    def _ca_bundle(cls, value: str | None) -> str | None:
        # Loaded once here, so a wrong path is a start-up error naming the setting rather than
        # a failure deep in the first TLS connection (or a traceback from the client).
        if value:
            try:
                ssl.create_default_context(cafile=value)
            except ssl.SSLError as exc:  # read, but no PEM certificate in it
                reason = str(exc.reason or "unreadable").replace("_", " ").lower()
                raise ValueError(f"{value!r} holds no usable CA certificate: {reason}") from None
            except OSError as exc:
                raise ValueError(f"{value!r} cannot be read: {exc.strerror or exc}") from None
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
    parser.add_argument(
        "--nodes", help="nodes YAML path or redis://host:port/db; required (CALLERID_NODES)"
    )
    parser.add_argument("--amqp-url", help="RabbitMQ URL (CALLERID_AMQP_URL)")
    parser.add_argument("--redis-url", help="Redis URL for the cache (CALLERID_REDIS_URL)")
    parser.add_argument(
        "--http-listen", help="host:port for /metrics, /healthz, /readyz (CALLERID_HTTP_LISTEN)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (CALLERID_LOG_LEVEL)")


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as settings fields (flags beat the environment)."""
    return {key: value for key, value in vars(args).items() if value is not None}


def env_name(settings_type: type[BaseSettings], field: str) -> str:
    """The environment variable of a settings field: `max_calls` -> `CALLERID_MAX_CALLS`."""
    return f"{settings_type.model_config.get('env_prefix', '')}{field}".upper()


def setting_variables(*settings_types: type[BaseSettings]) -> set[str]:
    """Every environment variable the given settings classes read."""
    return {env_name(kind, field) for kind in settings_types for field in kind.model_fields}


# Read by the project's test and build tools, never by the services: not typos.
TOOL_VARIABLES = frozenset(
    {"CALLERID_ASTERISK_TARBALL", "CALLERID_CACHE", "CALLERID_CHAOS_SEED", "CALLERID_FUZZ_EXAMPLES"}
)
TOOL_PREFIX = "CALLERID_TEST_"


def unknown_variables(
    environ: Mapping[str, str], settings: Collection[str], also_read: Collection[str] = ()
) -> list[str]:
    """One message per `CALLERID_*` variable in `environ` that nothing reads (a typo, or a
    setting that does not exist), naming the closest of `settings` when one is close.

    `settings` are the variables the services read as settings; `also_read` others they read
    (the secrets nodes name in `crm_token_env`). Names compare case-insensitively, as the
    settings do."""
    known = {name.upper() for name in settings} | {name.upper() for name in also_read}
    messages = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("CALLERID_") or upper in known or upper in TOOL_VARIABLES:
            continue
        if upper.startswith(TOOL_PREFIX):
            continue
        candidates = sorted({setting.upper() for setting in settings})
        close = difflib.get_close_matches(upper, candidates, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}?" if close else "see README, Service settings"
        messages.append(f"{name}: not a setting, ignored; {hint}")
    return messages


NODES_REQUIRED = (
    "CALLERID_NODES: not set, and there is no built-in default (name the nodes YAML file or a "
    "redis://host:port/db URL, or pass --nodes; `make run` uses examples/nodes.yaml)"
)
# Settings without a default: the services refuse to start without them.
REQUIRED_SETTINGS = frozenset({"nodes"})


def describe_default(settings_type: type[BaseSettings], field: str) -> str:
    """A field's default as the README and `--help` write it: `unset`, `empty`, `5`, `true`."""
    if field in REQUIRED_SETTINGS:
        return "required"
    value = settings_type.model_fields[field].get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value in ("", ()):
        return "empty"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def settings_epilog(
    parser: argparse.ArgumentParser,
    settings_type: type[BaseSettings],
    rows: Sequence[tuple[str, str]],
) -> str:
    """`--help`'s list of the settings that matter most: `(field, meaning)` rows rendered with
    their variable, flag and default as the model and the parser have them."""
    flags = {action.dest: action.option_strings[-1] for action in parser._actions}
    lines = ["most used settings (environment variable, and its flag where there is one):"]
    for field, meaning in rows:
        variable = env_name(settings_type, field)
        default = describe_default(settings_type, field)
        lines.append(f"  {variable:<30} {flags.get(field, '')}".rstrip())
        lines.append(
            f"      {meaning} ({default if default == 'required' else 'default: ' + default})"
        )
    lines.append("")
    lines.append('Every setting, with its default and flag: README.md, "Service settings".')
    return "\n".join(lines)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # aio-pika/aiormq log every reconnect attempt at INFO; our own lines say what matters.
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, logging.getLevelName(level)))
