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
from collections.abc import Awaitable, Callable

import trio

from .._errors import DatabaseError, DatabaseUnavailableError
from .._pg import Backoff, Connection, Database, retrying_in
from ._rules import WAKE_CHANNEL

log = logging.getLogger("pgbus.durable")

MOVE_BATCH = 1000
"""The most delayed messages one mover transaction moves (the next goes on at once)."""

MOVER_MAX_SLEEP = 1.0
"""A mover looks at least this often (seconds), NOTIFY or not: the bound on lateness when a
wake-up is missed (a reconnect, a poll-only bus behind a transaction pooler)."""

MOVER_MAX_BACKOFF = 5.0
"""The longest a mover waits between attempts while the server refuses it (seconds)."""

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


Subscribe = Callable[[Callable[[str], None]], Awaitable[None]]
"""How a mover has its `DelayedMover.wake` called for each NOTIFY on the movers' channel."""


class DelayedMover:
    """
    Moves delayed messages when due: sleeps until the earliest ``deliver_at`` it knows (at
    most `MOVER_MAX_SLEEP`), and earlier when `wake` is called (a NOTIFY from a publisher of
    a delayed message). On its own connection, reconnected when lost.

    *subscribe*, when given, is awaited with `wake` before the first look (the bus's
    listening connection calls it for each NOTIFY on the movers' channel). Whatever fails
    (subscribing, connecting: a server that refuses, a session limit reached) is retried with
    capped backoff and said in one warning line (repeated at most every few seconds while it
    lasts, then one line when it works again): the mover never stops on its own.
    """

    def __init__(self, db: Database, subscribe: Subscribe | None = None) -> None:
        self.db = db
        self.subscribe = subscribe
        self.moved = 0
        """Messages this mover has moved."""
        self.failures = 0
        """Rounds that failed (nothing moved: the server refused, or the connection broke)."""
        self._woken = trio.Event()

    def wake(self, _payload: str = "") -> None:
        """Look again now (a publisher stored a delayed message, or the listener reconnected)."""
        self._woken.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        connection: Connection | None = None
        subscribed = self.subscribe is None
        backoff = Backoff(maximum=MOVER_MAX_BACKOFF)
        try:
            while True:
                # Reset before looking: a wake-up that comes while we look is not lost.
                self._woken = trio.Event()
                wait: float | None = MOVER_MAX_SLEEP
                try:
                    if not subscribed:
                        assert self.subscribe is not None
                        await self.subscribe(self.wake)
                        subscribed = True
                    if connection is None or connection.closed:
                        connection = await self.db.connect("delayed mover")
                    moved = await move_due(connection)
                    self.moved += moved
                    if backoff.failures:
                        log.warning("delayed mover: working again")
                        backoff.reset()
                    if moved >= MOVE_BATCH:
                        continue
                    wait = await connection.fetchval(_NEXT_DUE)
                    if wait is not None and wait <= 0 and moved == 0:
                        wait = MOVER_BUSY_SLEEP  # due, but another mover holds them
                except (DatabaseUnavailableError, DatabaseError) as exc:
                    self.failures += 1
                    wait = backoff.next_delay()
                    level = logging.WARNING if backoff.should_warn() else logging.DEBUG
                    what = "could not listen for wake-ups" if not subscribed else "cannot move"
                    log.log(
                        level,
                        "delayed mover: %s: %s; %s",
                        what,
                        exc,
                        retrying_in(wait, backoff.failures),
                    )
                    await trio.sleep(wait)
                    continue
                wait = MOVER_MAX_SLEEP if wait is None else max(0.0, min(wait, MOVER_MAX_SLEEP))
                with trio.move_on_after(wait):
                    await self._woken.wait()
        finally:
            if connection is not None:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
