"""Ports: the protocols business logic depends on, implemented by adapters.

- `Identifier`: what the call flow uses to get a decision for an entry. Implemented by the
  in-memory bus (embedded mode) and by the RabbitMQ RPC client.
- `RequestHandler`: what a bus delivers requests to (the resolver).

Exception tree raised through `Identifier.identify`:

    IdentifyError
    ├── IdentifyTimeout      no reply before the request's deadline
    └── IdentifyUnavailable  the request could not be delivered (no broker, no consumer,
                             unroutable, rejected); raised at once, not at the deadline
"""

from __future__ import annotations

from typing import Protocol

from shared.messages import IdentifyReply, IdentifyRequest


class IdentifyError(Exception):
    """The identification RPC did not produce a reply."""


class IdentifyTimeout(IdentifyError):
    """No reply arrived before the request's deadline."""


class IdentifyUnavailable(IdentifyError):
    """The request could not be delivered to any resolver."""


class Identifier(Protocol):
    @property
    def pending(self) -> int:
        """Requests waiting for their reply right now."""
        ...

    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        """Return the reply, or raise IdentifyTimeout by the deadline / IdentifyUnavailable."""
        ...


class RequestHandler(Protocol):
    async def __call__(self, request: IdentifyRequest, /) -> IdentifyReply:
        """Answer one request; never raises for business errors (they are reply envelopes)."""
        ...
