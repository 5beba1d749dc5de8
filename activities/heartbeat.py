"""Background heartbeats for long activities, so a long SQL statement is not taken for a dead worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from temporalio import activity


@contextlib.asynccontextmanager
async def heartbeating(progress: Callable[[], Any]) -> AsyncIterator[None]:
    """Heartbeat ``progress()`` every third of the heartbeat timeout while the block runs."""
    timeout = activity.info().heartbeat_timeout
    if not timeout:
        yield
        return
    interval = max(timeout.total_seconds() / 3, 0.2)

    async def beat() -> None:
        while True:
            activity.heartbeat(progress())
            await asyncio.sleep(interval)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
