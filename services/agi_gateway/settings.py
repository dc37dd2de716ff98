"""Gateway settings: `CALLERID_*` environment variables, overridable by flags."""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from agi_gateway.admission import parse_networks
from agi_gateway.limits import LimitSettings
from agi_gateway.routing import JumpTemplates
from shared.destination import Destination
from shared.settings import CommonSettings, parse_listen


class GatewaySettings(CommonSettings):
    agi_listen: str = "0.0.0.0:4573"
    http_listen: str = "0.0.0.0:9100"
    embedded: bool = Field(
        default=False,
        description="Run the resolver in this process (the default when no AMQP URL is set).",
    )
    agi_allowed_peers: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated addresses or CIDRs that may open FastAGI sessions (your "
        "Asterisk servers); others are closed at accept. Empty: any peer (warned at start-up).",
    )
    agi_max_calls_per_peer: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="Live FastAGI sessions one address may hold; 0: no cap below "
        "CALLERID_MAX_CALLS. Beyond it a call gets config_error and the fallback.",
    )
    caller_lookups_per_hour: int = Field(
        default=30,
        ge=1,
        le=1_000_000,
        description="CRM lookups one calling number may cause per hour (enumeration limit).",
    )
    caller_failures_per_hour: int = Field(
        default=10,
        ge=1,
        le=1_000_000,
        description="Invalid or unknown ids one calling number may enter per hour before its "
        "lookups are refused (enumeration limit).",
    )
    anonymous_lookups_per_hour: int = Field(
        default=600,
        ge=1,
        le=1_000_000,
        description="CRM lookups per hour and node shared by all calls without a calling number.",
    )
    node_lookups_per_second: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="CRM lookups per second and node; 0: no limit.",
    )
    drain_timeout: float = Field(default=20.0, ge=0, le=3600)
    max_calls: int = Field(default=5000, ge=1, le=100_000)
    command_timeout: float = Field(default=10.0, ge=0.5, le=120)
    # Asterisk sends the whole environment block as soon as it connects; a connection that
    # has not within this time holds no call slot meanwhile and is then dropped.
    environment_timeout: float = Field(default=2.0, ge=0.1, le=60)
    fallback_destination: Destination | None = None
    jump_templates: dict[str, str] = Field(default_factory=dict)
    max_hops: int = Field(default=5, ge=0, le=20)
    # Bounded by the call's time left as well. 0.5 s failed requests that were in fact
    # delivered on a busy box (the confirm arrived late); the benchmark measured it.
    publish_timeout: float = Field(default=2.0, ge=0.01, le=10)
    embedded_concurrency: int = Field(default=1024, ge=1, le=100_000)
    gateway_cache: bool = Field(
        default=True,
        description="Answer cached callers from the cache before asking a resolver.",
    )

    @field_validator("agi_allowed_peers", mode="before")
    @classmethod
    def _peers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(peer.strip() for peer in value.split(",") if peer.strip())
        parse_networks(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("agi_listen")
    @classmethod
    def _agi_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        # Both listeners on one port: the second bind would fail as "in use", pointing the
        # operator at another process that does not exist.
        agi_host, agi_port = parse_listen(self.agi_listen)
        http_host, http_port = parse_listen(self.http_listen)
        anywhere = ("0.0.0.0", "::")
        if (
            agi_port
            and agi_port == http_port
            and (agi_host == http_host or agi_host in anywhere or http_host in anywhere)
        ):
            raise ValueError(
                f"CALLERID_HTTP_LISTEN: {self.http_listen} takes the port CALLERID_AGI_LISTEN "
                f"{self.agi_listen} listens on (choose two different ports)"
            )
        return self

    @field_validator("jump_templates")
    @classmethod
    def _jumps(cls, value: dict[str, str]) -> dict[str, str]:
        JumpTemplates(value)  # raises ValueError naming the bad template
        return value

    @property
    def runs_embedded(self) -> bool:
        return self.embedded or not self.amqp_url

    @property
    def limits(self) -> LimitSettings:
        return LimitSettings(
            caller_lookups_per_hour=self.caller_lookups_per_hour,
            caller_failures_per_hour=self.caller_failures_per_hour,
            anonymous_lookups_per_hour=self.anonymous_lookups_per_hour,
            node_lookups_per_second=self.node_lookups_per_second,
        )
