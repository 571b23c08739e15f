"""Stopping the background tasks a process runs (catalogue refresh, ledger
heartbeat, ledger writer)."""

from __future__ import annotations

import asyncio
from typing import Any


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
