"""shared/waits.py: waiting on futures with a time limit, never cancelling what is waited for."""

from __future__ import annotations

import asyncio

import pytest

from shared.waits import done_within, first_done


async def test_done_within_returns_at_once_for_a_done_future() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    future.set_result(1)
    assert await done_within(future, 0)


async def test_done_within_wakes_when_the_future_is_done() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    loop.call_soon(future.set_result, 7)
    assert await done_within(future, 30)  # the 30 s timer would make a slow test, not a pass
    assert future.result() == 7


async def test_done_within_gives_up_without_cancelling_and_leaves_no_callback() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    assert not await done_within(future, 0.01)
    assert not future.done()
    future.set_result(3)  # no callback of ours is left to run on a finished waiter
    await asyncio.sleep(0)
    assert future.result() == 3


async def test_a_cancelled_caller_leaves_the_future_alone() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.ensure_future(done_within(future, 30))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not future.cancelled()


async def test_first_done_wakes_on_any_and_cancels_none() -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(3)]
    loop.call_soon(futures[1].set_result, None)
    await first_done(futures, 30)
    assert [f.done() for f in futures] == [False, True, False]
    assert not any(f.cancelled() for f in futures)


async def test_first_done_returns_after_the_time_with_none_done() -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(2)]
    started = loop.time()
    await first_done(futures, 0.02)
    assert loop.time() - started >= 0.015  # the timer fired (not a speed bound)
    assert not any(f.done() for f in futures)


async def test_first_done_with_one_already_done_does_not_wait() -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future(), loop.create_future()]
    futures[0].set_result(None)
    await first_done(futures, 30)
