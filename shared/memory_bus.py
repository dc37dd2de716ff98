"""The identification RPC in memory (embedded mode): the same contract as RabbitMQ, no broker.

What belongs here: handing a request to the bound `RequestHandler` and enforcing the
`Identifier` contract around it. What does not: anything about what the handler does.

The contract kept, as on RabbitMQ (the same tests run against both):

- No handler bound (or closed) → `IdentifyUnavailable` at once. Deadline already passed on
  entry → `IdentifyTimeout` at once.
- The handler runs in its own task, at most `concurrency` at a time, so a caller that gives up
  at its deadline gets `IdentifyTimeout` on time while the handler may still finish; that reply
  is then dropped and `on_late_reply()` is called, like a late reply off the broker. A request
  whose caller gave up while it waited for a concurrency slot never reaches the handler.
- A handler that raises (a bug: business errors are reply envelopes) yields an `internal`
  error envelope, as a resolver worker would send (both through `shared.answering`).
- Requests and replies are passed as the frozen pydantic objects themselves: no JSON round
  trip, and one task plus one future per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from shared.answering import answer_request
from shared.messages import IdentifyReply, IdentifyRequest
from shared.ports import IdentifyTimeout, IdentifyUnavailable, RequestHandler


class MemoryBus:
    def __init__(
        self,
        *,
        concurrency: int = 256,
        on_late_reply: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._slots = asyncio.Semaphore(concurrency)
        self._on_late_reply = on_late_reply
        self._clock = clock
        self._handler: RequestHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._waiting = 0

    def bind(self, handler: RequestHandler) -> None:
        """Deliver requests to `handler` from now on (the resolver side)."""
        self._handler = handler

    def unbind(self) -> None:
        """Stop delivering: new requests fail with `IdentifyUnavailable`."""
        self._handler = None

    @property
    def pending(self) -> int:
        """Callers waiting for a reply right now (0 when idle)."""
        return self._waiting

    @property
    def running(self) -> int:
        """Handler tasks not finished yet, including ones whose caller already gave up."""
        return len(self._tasks)

    async def identify(self, request: IdentifyRequest) -> IdentifyReply:
        handler = self._handler
        if handler is None or self._closed:
            raise IdentifyUnavailable("no resolver is bound to the in-memory bus")
        left = request.deadline - self._clock()
        if left <= 0:
            raise IdentifyTimeout("the request's deadline had passed before it was sent")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[IdentifyReply] = loop.create_future()
        task = loop.create_task(self._deliver(handler, request, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._waiting += 1
        # At the deadline the answer itself fails (a loop timer: cheaper than a timeout
        # context around the wait); giving up touches only the future, and the handler goes on
        # (its answer may still warm the cache).
        timer = loop.call_later(left, _give_up, answer)
        try:
            return await answer
        finally:
            timer.cancel()
            self._waiting -= 1

    async def _deliver(
        self,
        handler: RequestHandler,
        request: IdentifyRequest,
        answer: asyncio.Future[IdentifyReply],
    ) -> None:
        try:
            async with self._slots:
                if answer.done():  # the caller gave up while this waited for a slot
                    return
                reply = await answer_request(handler, request)
        except asyncio.CancelledError:
            if not answer.done():  # close(): the caller learns now, not at its deadline
                answer.set_exception(IdentifyUnavailable("the in-memory bus is closing"))
            raise
        if answer.done():
            self._on_late_reply()
        else:
            answer.set_result(reply)

    async def close(self) -> None:
        """Refuse new requests, cancel running handlers and wait for them to end."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _give_up(answer: asyncio.Future[IdentifyReply]) -> None:
    if not answer.done():
        answer.set_exception(IdentifyTimeout("no reply before the request's deadline"))
