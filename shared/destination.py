"""A routing destination: OMniLeads' `(type, id)` pair.

Types used by OMniLeads: 1 inbound campaign, 2 time validation, 3 IVR, 5 hang-up,
9 another identification node. Both parts are non-negative integers, so a destination can
always be written to the AGI socket as digits.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_ALLOWED_TYPES: frozenset[int] = frozenset({1, 2, 3, 5, 9})
IDENTIFICATION_NODE_TYPE = 9

# "1,3", "(1,3)", " 1 , 3 " and "[1, 3]" are what real CRMs and OMniLeads' hashes contain.
_PAIR = re.compile(r"[ \t]*[\(\[]?[ \t]*([0-9]{1,10})[ \t]*,[ \t]*([0-9]{1,10})[ \t]*[\)\]]?[ \t]*")


class Destination(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: int = Field(ge=0, le=999)
    id: int = Field(ge=0, le=2_147_483_647)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse OMniLeads' `"type,id"` string; raise ValueError naming the bad text."""
        match = _PAIR.fullmatch(text)
        if match is None:
            raise ValueError(f'expected "type,id" with two integers, got {text[:40]!r}')
        return cls(type=int(match.group(1)), id=int(match.group(2)))

    @model_validator(mode="before")
    @classmethod
    def _accept_pair_forms(cls, value: Any) -> Any:
        if isinstance(value, str):
            parsed = cls.parse(value)
            return {"type": parsed.type, "id": parsed.id}
        if isinstance(value, list | tuple) and len(value) == 2:
            return {"type": value[0], "id": value[1]}
        return value

    def __str__(self) -> str:
        return f"{self.type},{self.id}"
