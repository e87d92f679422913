"""
Delayed durable messages: the mover that brings due rows of ``pgbus.delayed`` into
``pgbus.messages``.

Every bus with durable support runs one. Several at once are safe: each takes due rows with
``FOR UPDATE SKIP LOCKED`` and deletes them in the transaction that inserts them into
``pgbus.messages`` (keeping their ids) and NOTIFYs the consumers, so each row moves exactly
once, and a mover killed mid-move leaves its rows in place for the next. The database's clock
decides what is due, so nothing is delivered early whatever the clocks of the processes say.
"""

from __future__ import annotations

import logging

import trio

from .._errors import DatabaseError, DatabaseUnavailableError
from .._pg import Connection, Database
from ._rules import WAKE_CHANNEL

log = logging.getLogger("pgbus.durable")

MOVE_BATCH = 1000
"""The most delayed messages one mover transaction moves (the next goes on at once)."""

MOVER_MAX_SLEEP = 1.0
"""A mover looks at least this often (seconds), NOTIFY or not: the bound on lateness when a
wake-up is missed (a reconnect, a poll-only bus behind a transaction pooler)."""

MOVER_BUSY_SLEEP = 0.05
"""Seconds a mover waits when due rows exist but another mover holds them all."""

# Due rows (by the server's clock) in due order, skipping those another mover holds; deleted
# and stored with their ids in one statement, then one wake-up per channel. A keyed delayed
# message's key is held by a row of pgbus.messages with its id (channel ''): that row becomes
# the message (xid: this transaction's, for the consumers' ticks), so the key is never free;
# the others are inserted.
_MOVE = """
WITH due AS (
    SELECT id FROM pgbus.delayed WHERE deliver_at <= now()
     ORDER BY deliver_at, id
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), moved AS MATERIALIZED (
    DELETE FROM pgbus.delayed d USING due WHERE d.id = due.id
    RETURNING d.id, d.channel, d.payload, d.deliver_at
), held AS (
    UPDATE pgbus.messages m
       SET channel = v.channel, payload = v.payload, xid = pg_current_xact_id(),
           created_at = now()
      FROM moved v
     WHERE m.id = v.id AND m.channel = ''
    RETURNING m.id, m.channel
), inserted AS (
    INSERT INTO pgbus.messages (id, channel, payload) OVERRIDING SYSTEM VALUE
    SELECT v.id, v.channel, v.payload FROM moved v
     WHERE v.id NOT IN (SELECT h.id FROM held h)
     ORDER BY v.deliver_at, v.id
    RETURNING id, channel
), stored AS (
    SELECT channel FROM held UNION ALL SELECT channel FROM inserted
)
SELECT (SELECT count(*) FROM stored),
       (SELECT count(pg_notify($2, s.channel)) FROM (SELECT DISTINCT channel FROM stored) s)
"""

_NEXT_DUE = """
SELECT extract(epoch FROM min(deliver_at) - clock_timestamp())::float8 FROM pgbus.delayed
"""


async def move_due(connection: Connection, limit: int = MOVE_BATCH) -> int:
    """Move up to *limit* due delayed messages into their channels; how many moved."""
    row = await connection.fetchrow(_MOVE, limit, WAKE_CHANNEL)
    return int(row[0])


class DelayedMover:
    """
    Moves delayed messages when due: sleeps until the earliest ``deliver_at`` it knows (at
    most `MOVER_MAX_SLEEP`), and earlier when `wake` is called (a NOTIFY from a publisher of
    a delayed message). On its own connection, reconnected when lost.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.moved = 0
        """Messages this mover has moved."""
        self._woken = trio.Event()

    def wake(self, _payload: str = "") -> None:
        """Look again now (a publisher stored a delayed message, or the listener reconnected)."""
        self._woken.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        connection: Connection | None = None
        try:
            while True:
                # Reset before looking: a wake-up that comes while we look is not lost.
                self._woken = trio.Event()
                wait: float | None = MOVER_MAX_SLEEP
                try:
                    if connection is None or connection.closed:
                        connection = await self.db.connect("delayed mover")
                    moved = await move_due(connection)
                    self.moved += moved
                    if moved >= MOVE_BATCH:
                        continue
                    wait = await connection.fetchval(_NEXT_DUE)
                    if wait is not None and wait <= 0 and moved == 0:
                        wait = MOVER_BUSY_SLEEP  # due, but another mover holds them
                except (DatabaseUnavailableError, DatabaseError) as exc:
                    log.debug("delayed mover: %s", exc)  # the next round tries again
                    wait = MOVER_MAX_SLEEP
                wait = MOVER_MAX_SLEEP if wait is None else max(0.0, min(wait, MOVER_MAX_SLEEP))
                with trio.move_on_after(wait):
                    await self._woken.wait()
        finally:
            if connection is not None:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
