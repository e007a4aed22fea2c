"""``stop_task``: a stopped task ends even if it swallows a cancellation, and the caller's own
cancellation is never swallowed on the way."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mqchat.tasks import stop_task


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what Python 3.11's wait_for can do by accident

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, again_after=0.05), 5)
    assert task.cancelled() and swallowed == 1


async def test_the_callers_own_cancellation_is_raised() -> None:
    released = asyncio.Event()

    async def never_ends() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    task = asyncio.create_task(never_ends())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(stop_task(task, again_after=10))
    await asyncio.sleep(0.05)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert not task.done()  # what the caller does next is its own choice
    released.set()
    await task


async def test_an_error_the_task_ends_with_is_raised() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await stop_task(task)


async def test_a_task_already_done_is_left_as_it_is() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await stop_task(task)
    assert not task.cancelled()


async def test_a_task_that_never_ends_is_left_after_its_attempts(caplog: pytest.LogCaptureFixture) -> None:
    released = asyncio.Event()
    cancels = 0

    async def deaf() -> None:
        nonlocal cancels
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                cancels += 1

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, again_after=0.02, attempts=3), 5)
    assert cancels == 3 and not task.done()
    assert "did not end after 3 cancellations" in caplog.text
    released.set()
    await task
