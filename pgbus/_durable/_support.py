"""`DurableSupport`: what a `Bus` holds for durable channels, and their metrics source."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .._metrics import DurableGroupSample, add_durable_source
from .._pg import Database
from ._admin import serve_janitor
from ._consumer import DurableConsumer
from ._rules import DEFAULT_RETENTION
from ._schema import ensure_schema

if TYPE_CHECKING:
    from .._bus import Bus


class DurableSupport:
    """
    A bus's durable state: schema checked once, the consumers it runs, their janitor, and the
    mover of delayed messages (started by *on_ready* once the schema is there).
    """

    def __init__(
        self,
        db: Database,
        max_payload: int,
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.db = db
        self.max_payload = max_payload
        self.on_ready = on_ready
        self._schema_ready = False
        self._schema_lock = trio.Lock()
        self.consumers: list[DurableConsumer] = []
        self.janitor_started = False

    async def ensure_schema(self) -> None:
        """Create or migrate the schema the first time this bus needs it."""
        if self._schema_ready:
            return
        async with self._schema_lock:
            if not self._schema_ready:
                await ensure_schema(self.db)
                self._schema_ready = True
                if self.on_ready is not None:
                    await self.on_ready()

    def channels(self) -> list[str]:
        return sorted({c.pg_channel for c in self.consumers})

    def retention(self, channel: str) -> float:
        """This process's retention for *channel*; the default for channels it does not consume."""
        mine = [c.retention for c in self.consumers if c.pg_channel == channel]
        return max(mine) if mine else DEFAULT_RETENTION

    async def serve_janitor(self, *, task_status: trio.TaskStatus[None]) -> None:
        await serve_janitor(self.db, self.retention, task_status=task_status)


async def durable_samples(bus: Bus) -> list[DurableGroupSample]:
    """Every group of the durable channels *bus* consumes, read at scrape time."""
    support = bus._durable
    if support is None or not support.consumers:
        return []
    samples = []
    for channel in support.channels():
        for status in await bus.durable_groups(channel):
            samples.append(
                DurableGroupSample(
                    status.channel,
                    status.group,
                    lag=status.lag,
                    dead_letters=status.dead_letters,
                    in_flight=status.in_flight,
                )
            )
    return samples


add_durable_source(durable_samples)
