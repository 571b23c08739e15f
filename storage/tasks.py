"""Stopping the background tasks a process runs (catalogue refresh, ledger
heartbeat, ledger writer), and giving up on work that does not answer."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Work given up on by :func:`within`, still ending.
_ABANDONED: set[asyncio.Future[Any]] = set()


def _abandon(task: asyncio.Future[Any]) -> None:
    task.cancel()
    _ABANDONED.add(task)
    task.add_done_callback(_ABANDONED.discard)


async def within(work: Coroutine[Any, Any, T], seconds: float) -> T:
    """``work``'s answer if it comes within ``seconds``; else ``TimeoutError``
    at once. Work given up on is cancelled and left to end on its own: the
    clean-up of a frozen database's connection, say, can take seconds more
    than the wait (``asyncio.timeout`` would wait for it)."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise TimeoutError(f"no answer within {seconds:g} s")
    return task.result()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and return once it has ended.

    The task's own cancellation is expected and absorbed; a cancellation of
    the caller while it waits is passed on, never mistaken for the task's."""
    current = asyncio.current_task()
    # The caller may itself be winding down from a cancellation (a server
    # stopping runs its cleanup in the cancelled task): only one that comes
    # while it waits here is the caller's own to pass on.
    before = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > before:
            raise
