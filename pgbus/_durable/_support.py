"""`DurableSupport`: what a `Bus` holds for durable channels."""

from __future__ import annotations

import trio

from .._pg import Database
from ._admin import serve_janitor
from ._consumer import DurableConsumer
from ._schema import ensure_schema


class DurableSupport:
    """A bus's durable state: schema checked once, the consumers it runs, their janitor."""

    def __init__(self, db: Database, max_payload: int) -> None:
        self.db = db
        self.max_payload = max_payload
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

    def channels(self) -> list[str]:
        return sorted({c.pg_channel for c in self.consumers})

    def retention(self, channel: str) -> float:
        return max(c.retention for c in self.consumers if c.pg_channel == channel)

    async def serve_janitor(self, *, task_status: trio.TaskStatus[None]) -> None:
        await serve_janitor(
            self.db, self.channels, retention=self.retention, task_status=task_status
        )
