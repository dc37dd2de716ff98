"""The identification RPC: request and reply bodies (JSON, versioned).

A request carries an absolute deadline (Unix time, seconds); whoever holds it after the
deadline drops it. A reply is an explicit envelope: a verdict, and either a destination or an
error code, never both. These models are the same on the in-memory bus and on RabbitMQ.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.destination import Destination
from shared.outcomes import ErrorCode, Source, Verdict

SCHEMA_VERSION: Literal[1] = 1


class IdentifyRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    node_id: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    customer_id: str = Field(pattern=r"^[0-9]{1,30}$")
    caller_number: str = Field(default="", max_length=64)
    call_id: str = Field(default="", max_length=64)
    deadline: float


class IdentifyReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: Literal[1] = SCHEMA_VERSION
    request_id: str
    verdict: Verdict
    destination: Destination | None = None
    error: ErrorCode | None = None
    source: Source = Source.CRM
    crm_ms: float | None = None

    @model_validator(mode="after")
    def _envelope(self) -> Self:
        if (self.verdict is Verdict.ERROR) != (self.error is not None):
            raise ValueError("error is set exactly when verdict is 'error'")
        if (self.verdict is Verdict.DESTINATION) != (self.destination is not None):
            raise ValueError("destination is set exactly when verdict is 'destination'")
        return self

    @classmethod
    def failure(cls, request_id: str, error: ErrorCode, *, crm_ms: float | None = None) -> Self:
        return cls(request_id=request_id, verdict=Verdict.ERROR, error=error, crm_ms=crm_ms)
