"""Helpers shared by the asyncio-based peers (asyncpg on asyncio and uvloop, psycopg)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable


@contextlib.asynccontextmanager
async def background(coro: Awaitable[None]) -> AsyncIterator[None]:
    """Run *coro* as a task for the duration of the block, then cancel it."""
    task = asyncio.ensure_future(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until_woken_or_stopped(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> None:
    """An idle worker's sleep: until *stop* or *wake* is set, at most *timeout* seconds."""
    stopping = asyncio.ensure_future(stop.wait())
    woken = asyncio.ensure_future(wake.wait())
    await asyncio.wait({stopping, woken}, timeout=timeout, return_when="FIRST_COMPLETED")
    stopping.cancel()
    woken.cancel()
