"""
Durable channels (design section 9): messages kept in pgbus's own tables, NOTIFY only as the
wake-up. At-least-once, replayable, shared by the members of consumer groups.

- `_rules`: `DurableMessage`, defaults and validators (no driver; the TOML loader uses them).
- `_schema`: the ``pgbus`` schema and its migrations.
- `_publish`: storing messages (bridge, one-off, inside a caller's transaction).
- `_consumer`: `DurableConsumer`, one member of a group feeding a Trio channel.
- `_admin`: retention, group status, dead letters.

`DurableSupport` is what a `Bus` holds: the schema check done once, the consumers, the janitor.
"""

from __future__ import annotations

import trio

from .._pg import Database
from ._admin import GroupStatus, group_status, serve_janitor
from ._consumer import DurableConsumer
from ._rules import DurableMessage
from ._schema import SCHEMA_VERSION, SchemaError, ensure_schema, migrate

__all__ = [
    "SCHEMA_VERSION",
    "DurableConsumer",
    "DurableMessage",
    "DurableSupport",
    "GroupStatus",
    "SchemaError",
    "ensure_schema",
    "group_status",
    "migrate",
]


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
