"""Single-flight: sharing one call, propagating its error, surviving a waiter's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from crm_resolver.singleflight import SingleFlight


class Gated:
    """A factory whose calls wait at a gate and count how often they ran."""

    def __init__(self, result: str = "answer", error: Exception | None = None) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.result = result
        self.error = error

    async def __call__(self) -> str:
        self.runs += 1
        self.started.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_concurrent_calls_share_one_execution() -> None:
    """Callers with the same key while one is in flight get its result; only the first ran it."""
    flight: SingleFlight[str, str] = SingleFlight()
    factory = Gated()
    tasks = [asyncio.create_task(flight.run("k", factory)) for _ in range(10)]
    await factory.started.wait()
    factory.gate.set()
    results = await asyncio.gather(*tasks)
    assert factory.runs == 1
    assert results[0] == ("answer", False)
    assert results[1:] == [("answer", True)] * 9
    assert len(flight) == 0


async def test_different_keys_do_not_share() -> None:
    """Only identical keys are merged."""
    flight: SingleFlight[str, str] = SingleFlight()
    a, b = Gated("a"), Gated("b")
    task_a = asyncio.create_task(flight.run("a", a))
    task_b = asyncio.create_task(flight.run("b", b))
    await a.started.wait()
    await b.started.wait()
    a.gate.set()
    b.gate.set()
    assert await task_a == ("a", False)
    assert await task_b == ("b", False)


async def test_exception_reaches_every_caller_and_entry_is_removed() -> None:
    """The factory's error is raised to the first caller and to every joiner; nothing leaks."""
    flight: SingleFlight[str, str] = SingleFlight()
    factory = Gated(error=RuntimeError("crm exploded"))
    tasks = [asyncio.create_task(flight.run("k", factory)) for _ in range(3)]
    await factory.started.wait()
    factory.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "crm exploded" for r in results)
    assert factory.runs == 1
    assert len(flight) == 0


async def test_cancelling_one_waiter_does_not_cancel_the_shared_call() -> None:
    """The first caller is cancelled; the joiner still gets the result of the one execution."""
    flight: SingleFlight[str, str] = SingleFlight()
    factory = Gated()
    first = asyncio.create_task(flight.run("k", factory))
    await factory.started.wait()
    joiner = asyncio.create_task(flight.run("k", factory))
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    factory.gate.set()
    assert await joiner == ("answer", True)
    assert factory.runs == 1


async def test_entry_removed_after_success_and_next_call_runs_again() -> None:
    """After a call ends, the key is free: the next caller runs the factory anew."""
    flight: SingleFlight[str, str] = SingleFlight()
    factory = Gated()
    factory.gate.set()
    assert await flight.run("k", factory) == ("answer", False)
    assert len(flight) == 0
    assert await flight.run("k", factory) == ("answer", False)
    assert factory.runs == 2


async def test_abandoned_call_finishes_and_close_cancels_whatever_runs() -> None:
    """A call whose only caller left keeps running; close() cancels it and leaves nothing."""
    flight: SingleFlight[str, str] = SingleFlight()
    factory = Gated()
    caller = asyncio.create_task(flight.run("k", factory))
    await factory.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert len(flight) == 1
    await flight.close()
    assert len(flight) == 0
