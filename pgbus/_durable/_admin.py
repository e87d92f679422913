"""
Looking after durable channels: retention (the janitor), group statistics, dead letters.

`group_status` is what ``pgbus groups`` prints and what ``pgbus status`` can show.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from .._errors import DatabaseError, DatabaseUnavailableError
from .._pg import Connection, Database
from ._rules import loose_scan
from ._schedule import FORGET_SCHEDULE_AFTER, FORGET_SCHEDULES, FORGET_SLOTS, SLOT_HISTORY
from ._schema import lock_holders

log = logging.getLogger("pgbus.durable")

JANITOR_EVERY = 2.0
"""Seconds between two retention passes of one consumer process."""

JANITOR_WARN_AFTER = 5
"""Passes in a row a channel's janitor lock may be held elsewhere before a warning names who."""

DELETE_BATCH = 20000
"""The most messages one retention pass deletes (the next pass goes on)."""

VACUUM_AFTER = 50000
"""Deleted messages after which the janitor vacuums pgbus's tables when autovacuum is off."""

# A message is claimed by group g when it is visible in the group's tick_from, or in the open
# batch (visible in tick_to) at or before the batch's marker; a group last moved by a
# version-2 member (tick_from NULL) has claimed up to (position_xid, position_id).
_CLAIMED_BY_G = """(CASE WHEN g.tick_from IS NULL
            THEN (m.xid, m.id) <= (g.position_xid, g.position_id)
            ELSE pg_visible_in_snapshot(m.xid, g.tick_from)
                 OR (g.tick_to IS NOT NULL AND pg_visible_in_snapshot(m.xid, g.tick_to)
                     AND (m.xid, m.id) <= (g.batch_xid, g.batch_id)) END)"""

_RETIRE_GROUPS = """
WITH retired AS (
    DELETE FROM pgbus.groups
     WHERE channel = $1 AND seen_at < now() - make_interval(secs => $2)
    RETURNING group_name
), ticks AS (
    DELETE FROM pgbus.group_ticks k USING retired r
     WHERE k.channel = $1 AND k.group_name = r.group_name
)
DELETE FROM pgbus.deliveries d USING retired r
 WHERE d.channel = $1 AND d.group_name = r.group_name
"""

# Only each group's newest tick row is its position; the older ones are history.
_FORGET_OLD_TICKS = """
DELETE FROM pgbus.group_ticks k
 USING (SELECT group_name, max(seq) AS newest FROM pgbus.group_ticks
         WHERE channel = $1 GROUP BY group_name) n
 WHERE k.channel = $1 AND k.group_name = n.group_name AND k.seq < n.newest
"""

_HAS_GROUP = "SELECT EXISTS (SELECT FROM pgbus.groups WHERE channel = $1)"

# What happens to the rows a retention pass is done with: deleted, except a message whose
# deduplication key is still in its window, which becomes that key's holder (channel '', no
# payload, xid = the key's expiry in Unix seconds: see `pgbus._durable._schema`'s version 6)
# so the key keeps its message's id until the window ends, outside the channel's range.
# created_at = the key's expiry, as for every holder (see `pgbus._durable._schema`). By ctid:
# TID scans, not an index probe per row (measured on PostgreSQL 15 here, medians of 7: 20,000
# handled messages deleted in 21 ms instead of 34, keyed ones made holders in 125 instead of 138).
# A row changed since the batch was chosen has another ctid and waits for the next pass.
_DONE_WITH = """
, kept AS (
    UPDATE pgbus.messages m
       SET channel = '', payload = '', traceparent = NULL, created_at = m.dedup_until,
           xid = floor(extract(epoch FROM m.dedup_until))::bigint::text::xid8
     WHERE m.ctid = ANY(ARRAY(SELECT ctid FROM doomed WHERE keep))
)
DELETE FROM pgbus.messages m WHERE m.ctid = ANY(ARRAY(SELECT ctid FROM doomed WHERE NOT keep))
"""

# For the rest of a retention pass's transaction: index scans only, in index order. The queue
# tables' statistics are often stale (analyzed while pgbus.deliveries was empty, then a burst
# fills it): a planner trusting them probed 100,000 messages each against a full scan of
# pgbus.deliveries (a pass of 36 s on 2 cores, in the middle of bench W6D), or sorted every
# candidate instead of stopping after the batch. One round trip, SET LOCAL's effect.
PLAN_BY_INDEX = (
    "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_sort', 'off', true),"
    " set_config('enable_bitmapscan', 'off', true)"
)

# A message every group of its channel has claimed (visible in each group's tick_from, or at
# or before a version-2 group's position) and none still holds (no delivery row: not in flight,
# not waiting for a retry, not a dead letter). Only xids below each group's newest snapshot
# can qualify: tick_to while a batch is open (a claim that filled its limit exactly leaves it
# open until more messages come), else tick_from.
# MATERIALIZED: the batch is chosen once, whatever the planner thinks of the table's size
# (inlined, a table nobody analyzed can turn this into a loop per row); the groups' positions
# are read once (not the view once per message); "no delivery row" is a scalar subquery, so an
# index probe per message (as NOT EXISTS, a planner believing pgbus.deliveries empty joins it
# by a scan of the whole table per message).
_DELETE_HANDLED = (
    """
WITH positions AS MATERIALIZED (
    SELECT * FROM pgbus.group_positions WHERE channel = $1
), horizon AS (
    SELECT min(coalesce(pg_snapshot_xmax(coalesce(tick_to, tick_from)), position_xid)) AS xid,
           min(position_xid) AS settled
      FROM positions
), doomed AS MATERIALIZED (
    SELECT m.ctid, m.dedup_key IS NOT NULL AND m.dedup_until > now() AS keep
      FROM pgbus.messages m, horizon h
     WHERE m.channel = $1 AND m.xid <= h.xid
       AND (m.xid < h.settled  -- older than every group's position_xid: claimed by all
            OR NOT EXISTS (SELECT FROM positions g WHERE NOT {claimed}))
       AND (SELECT d.message_id FROM pgbus.deliveries d WHERE d.message_id = m.id LIMIT 1)
           IS NULL
     ORDER BY m.channel, m.xid, m.id
     LIMIT $2
)"""
    + _DONE_WITH
).replace("{claimed}", _CLAIMED_BY_G)

# With no group at all, messages are kept for the retention period (a group joining with
# start = "earliest" gets them), then deleted.
_DELETE_AGED = (
    """
WITH doomed AS MATERIALIZED (
    SELECT m.ctid, m.dedup_key IS NOT NULL AND m.dedup_until > now() AS keep
      FROM pgbus.messages m
     WHERE m.channel = $1 AND m.created_at < now() - make_interval(secs => $2)
     ORDER BY m.channel, m.xid, m.id
     LIMIT $3
)"""
    + _DONE_WITH
)


# Every channel with a group or a message: pgbus.groups, plus a loose index scan of
# pgbus.messages (one probe per distinct channel, not a pass over the table).
_CHANNELS = f"""
WITH RECURSIVE {loose_scan("c", "pgbus.messages", "channel")}
SELECT channel FROM c WHERE channel IS NOT NULL
 UNION
SELECT channel FROM pgbus.groups
"""


async def serve_janitor(
    db: Database,
    retention: Callable[[str], float],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Every `JANITOR_EVERY` seconds, for every durable channel of the database (not only those
    this process consumes): retire groups not seen for ``retention(channel)`` seconds and
    delete the messages every group has handled. Only one process does a pass of a channel at
    a time (a transaction-level advisory lock); the others skip it. A channel skipped
    `JANITOR_WARN_AFTER` passes in a row gets a warning naming the session holding its lock.
    """
    task_status.started()
    deleted_since_vacuum = 0
    autovacuum: bool | None = None
    connection: Connection | None = None
    skipped: dict[str, int] = {}
    try:
        while True:
            await trio.sleep(JANITOR_EVERY)
            try:
                if connection is None or connection.closed:
                    connection = await db.connect("janitor")
                if autovacuum is None:
                    setting = await connection.fetchval("SELECT current_setting('autovacuum')")
                    autovacuum = setting == "on"
                deleted_since_vacuum += await janitor_pass(connection, retention, skipped)
                if not autovacuum and deleted_since_vacuum >= VACUUM_AFTER:
                    deleted_since_vacuum = 0
                    await vacuum(connection)
            except (DatabaseUnavailableError, DatabaseError) as exc:
                log.debug("janitor: %s", exc)  # the next pass tries again
    finally:
        if connection is not None:
            await connection.aclose()


async def janitor_pass(
    connection: Connection, retention: Callable[[str], float], skipped: dict[str, int]
) -> int:
    """
    One retention pass over every channel; the messages deleted. *skipped* counts, per
    channel, the passes in a row another session held its lock (a warning at
    `JANITOR_WARN_AFTER`, then every `JANITOR_WARN_AFTER` more).
    """
    deleted = 0
    # '': the holders of deduplication keys, purged below by their expiry (never by retention).
    channels = [r[0] for r in await connection.fetch(_CHANNELS) if r[0] != ""]
    for channel in channels:
        done = await retain(connection, channel, retention(channel))
        if done is not None:
            deleted += done
            skipped.pop(channel, None)
            continue
        skipped[channel] = count = skipped.get(channel, 0) + 1
        if count % JANITOR_WARN_AFTER == 0:
            holders = await lock_holders(connection, await _janitor_key(connection, channel))
            log.warning(
                "janitor: retention of durable channel %r skipped %d passes in a row: its "
                "lock is held by %s",
                channel,
                count,
                holders,
            )
    for channel in set(skipped) - set(channels):
        del skipped[channel]
    await connection.execute(_PURGE_DEDUP, DELETE_BATCH)
    await connection.execute(FORGET_SLOTS, SLOT_HISTORY, DELETE_BATCH)
    await connection.execute(FORGET_SCHEDULES, FORGET_SCHEDULE_AFTER)
    return deleted


# Holders of deduplication keys whose window has passed (skipping those a publisher or a
# mover is working on now, and a delayed message's holder, which its mover turns into the
# message): one range scan of messages_position, where holders are ordered by expiry. By
# ctid: a TID scan whatever the planner thinks of the table.
_PURGE_DEDUP = """
DELETE FROM pgbus.messages WHERE channel = '' AND ctid = ANY(ARRAY(
    SELECT m.ctid FROM pgbus.messages m
     WHERE m.channel = '' AND m.xid < floor(extract(epoch FROM now()))::bigint::text::xid8
       AND NOT EXISTS (SELECT FROM pgbus.delayed d WHERE d.id = m.id)
     ORDER BY m.channel, m.xid, m.id LIMIT $1 FOR UPDATE SKIP LOCKED
))
"""


async def _janitor_key(connection: Connection, channel: str) -> int:
    return int(await connection.fetchval(_JANITOR_KEY, channel))


_JANITOR_KEY = "SELECT hashtextextended('pgbus.janitor:' || $1, 0)"  # as retain() takes it


async def retain(connection: Connection, channel: str, retention: float) -> int | None:
    """
    One retention pass over *channel*: the number of messages deleted, or None if another
    session holds the channel's janitor lock.
    """
    async with connection.transaction():
        got = await connection.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('pgbus.janitor:' || $1, 0))",
            channel,
        )
        if not got:
            return None
        await connection.execute(PLAN_BY_INDEX)
        await connection.execute(_RETIRE_GROUPS, channel, retention)
        await connection.execute(_FORGET_OLD_TICKS, channel)
        if await connection.fetchval(_HAS_GROUP, channel):
            tag = await connection.execute(_DELETE_HANDLED, channel, DELETE_BATCH)
        else:
            tag = await connection.execute(_DELETE_AGED, channel, retention, DELETE_BATCH)
        return int(tag.split()[-1])


async def vacuum(connection: Connection) -> None:
    """Reclaim the space of deleted rows (what autovacuum would do), if this role may."""
    try:
        await connection.execute(
            "VACUUM pgbus.messages, pgbus.deliveries, pgbus.groups, pgbus.group_ticks"
        )
    except DatabaseError as exc:
        log.debug("janitor: VACUUM refused: %s", exc)


@attrs.frozen
class GroupStatus:
    """One consumer group of one durable channel, right now."""

    channel: str
    group: str
    lag: int
    """Messages published and not yet claimed by the group."""
    in_flight: int
    """Claimed and not yet acknowledged (leased, or waiting for a retry)."""
    dead_letters: int
    seen_at: str
    """When a member was last seen (ISO 8601)."""


_GROUP_STATUS = """
SELECT g.channel, g.group_name,
       (SELECT count(*) FROM pgbus.messages m
         WHERE m.channel = g.channel AND m.xid >= g.position_xid
           AND NOT {claimed}) AS lag,
       (SELECT count(*) FROM pgbus.deliveries d
         WHERE d.channel = g.channel AND d.group_name = g.group_name
           AND d.available_at < 'infinity') AS in_flight,
       (SELECT count(*) FROM pgbus.deliveries d
         WHERE d.channel = g.channel AND d.group_name = g.group_name
           AND d.available_at = 'infinity') AS dead,
       to_char(g.seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS seen_at
  FROM pgbus.group_positions g
 WHERE $1::text IS NULL OR g.channel = $1
 ORDER BY g.channel, g.group_name
""".replace("{claimed}", _CLAIMED_BY_G)


async def group_status(connection: Connection, channel: str | None = None) -> list[GroupStatus]:
    """Every group (of *channel*, or of all channels): lag, in-flight and dead letters."""
    rows = await connection.fetch(_GROUP_STATUS, channel)
    return [GroupStatus(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), r[5]) for r in rows]


@attrs.frozen
class DeadLetter:
    """A message a group gave up on after its last attempt."""

    id: int
    channel: str
    group: str
    attempts: int
    error: str | None
    payload: str


_LIST_DEAD = """
SELECT d.message_id, d.channel, d.group_name, d.attempts, d.last_error, m.payload
  FROM pgbus.deliveries d JOIN pgbus.messages m ON m.id = d.message_id
 WHERE d.channel = $1 AND d.group_name = $2 AND d.available_at = 'infinity'
   AND ($3::bigint[] IS NULL OR d.message_id = ANY($3))
 ORDER BY d.message_id
"""

_RETRY_DEAD = """
UPDATE pgbus.deliveries SET available_at = now(), attempts = 0, member = NULL
 WHERE channel = $1 AND group_name = $2 AND available_at = 'infinity'
   AND ($3::bigint[] IS NULL OR message_id = ANY($3))
"""

_PURGE_DEAD = """
DELETE FROM pgbus.deliveries
 WHERE channel = $1 AND group_name = $2 AND available_at = 'infinity'
   AND ($3::bigint[] IS NULL OR message_id = ANY($3))
"""


async def dead_letters(
    connection: Connection, channel: str, group: str, ids: list[int] | None = None
) -> list[DeadLetter]:
    rows = await connection.fetch(_LIST_DEAD, channel, group, ids)
    return [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


async def retry_dead_letters(
    connection: Connection, channel: str, group: str, ids: list[int] | None = None
) -> int:
    """Give dead letters back to their group, with a fresh count of attempts; how many."""
    tag = await connection.execute(_RETRY_DEAD, channel, group, ids)
    return int(tag.split()[-1])


async def purge_dead_letters(
    connection: Connection, channel: str, group: str, ids: list[int] | None = None
) -> int:
    """Forget dead letters (the janitor then deletes the messages); how many."""
    tag = await connection.execute(_PURGE_DEAD, channel, group, ids)
    return int(tag.split()[-1])


async def storage(connection: Connection) -> dict[str, int]:
    """Rows and bytes (with indexes and TOAST) of pgbus's tables: for the bench and tests."""
    row = await connection.fetchrow(
        "SELECT (SELECT count(*) FROM pgbus.messages),"
        " (SELECT count(*) FROM pgbus.deliveries),"
        " pg_total_relation_size('pgbus.messages'),"
        " pg_total_relation_size('pgbus.deliveries')"
    )
    return {
        "messages": int(row[0]),
        "deliveries": int(row[1]),
        "messages_bytes": int(row[2]),
        "deliveries_bytes": int(row[3]),
    }
