"""Gateway settings: `CALLERID_*` environment variables, overridable by flags."""

from __future__ import annotations

from pydantic import Field, field_validator

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
    drain_timeout: float = Field(default=20.0, ge=0, le=3600)
    max_calls: int = Field(default=5000, ge=1, le=100_000)
    command_timeout: float = Field(default=10.0, ge=0.5, le=120)
    environment_timeout: float = Field(default=5.0, ge=0.1, le=60)
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

    @field_validator("agi_listen")
    @classmethod
    def _agi_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("jump_templates")
    @classmethod
    def _jumps(cls, value: dict[str, str]) -> dict[str, str]:
        JumpTemplates(value)  # raises ValueError naming the bad template
        return value

    @property
    def runs_embedded(self) -> bool:
        return self.embedded or not self.amqp_url
