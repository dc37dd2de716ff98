"""Resolver settings: `CALLERID_*` environment variables, overridable by flags."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class ResolverSettings(CommonSettings):
    http_listen: str = "0.0.0.0:9101"
    prefetch: int = Field(default=64, ge=1, le=10_000)
    stop_timeout: float = Field(default=15.0, ge=0, le=3600)
    crm_max_connections: int = Field(default=200, ge=1, le=10_000)
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    breaker_reset: float = Field(default=5.0, ge=0.1, le=600)
