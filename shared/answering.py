"""Running a `RequestHandler` for a transport: a request always gets a reply.

Business errors are reply envelopes, so a handler that raises has a bug. Every transport that
delivers requests (the RabbitMQ worker, the in-memory bus) answers it the same way: the
`internal` error envelope, which the gateway turns into the node's failover, and one log line
with the traceback. Cancellation is not an error and goes through.
"""

from __future__ import annotations

import logging

from shared.messages import IdentifyReply, IdentifyRequest
from shared.outcomes import ErrorCode
from shared.ports import RequestHandler

log = logging.getLogger(__name__)


async def answer_request(handler: RequestHandler, request: IdentifyRequest) -> IdentifyReply:
    """`handler`'s reply to `request`, or the `internal` error envelope if it raised."""
    try:
        return await handler(request)
    except Exception:
        log.exception("request handler failed for request %s", request.request_id)
        return IdentifyReply.failure(request.request_id, ErrorCode.INTERNAL)
