"""Stopping background tasks (``storage.tasks``)."""

from __future__ import annotations

import asyncio

import pytest

from storage.tasks import cancel_and_wait


async def _forever() -> None:
    await asyncio.Event().wait()


async def _stubborn(release: asyncio.Event) -> None:
    """Ends only once ``release`` is set, cancelled or not."""
    try:
        await asyncio.Event().wait()
    finally:
        await release.wait()


async def test_stops_the_task() -> None:
    task = asyncio.create_task(_forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_works_in_cleanup_after_the_caller_was_cancelled() -> None:
    """A server's cleanup runs in its cancelled main task: stopping a
    background task there must not raise the task's cancellation."""
    background = asyncio.create_task(_forever())

    async def main() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await cancel_and_wait(background)  # cleanup
            return "cleaned up"
        return "not cancelled"

    runner = asyncio.create_task(main())
    await asyncio.sleep(0)
    runner.cancel()
    assert await runner == "cleaned up"
    assert background.cancelled()


async def test_a_cancellation_of_the_caller_while_waiting_is_passed_on() -> None:
    release = asyncio.Event()
    background = asyncio.create_task(_stubborn(release))
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(background))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not stopper.done()
    stopper.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert background.done()
