"""
Keyed actors' dead letters (``pgbus.entity_dead``): messages a handler failed on
``max_attempts`` times. Listed, given back to their key's mailbox, or forgotten; the commands
``pgbus entity-dead-letters list|retry|purge`` (see `pgbus._entities._cli`).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from .._pg import Connection
from ._entity import WAKE_CHANNEL, shard_of

# $1 kind; $2 one key or NULL; $3 some ids or NULL.
_WHICH = (
    "d.kind = $1 AND ($2::text IS NULL OR d.key = $2) AND ($3::int8[] IS NULL OR d.id = ANY($3))"
)

_LIST = f"""
SELECT d.id, d.key, d.attempts, d.error, d.message,
       to_char(d.failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
  FROM pgbus.entity_dead d WHERE {_WHICH} ORDER BY d.id
"""

_LOCK = f"SELECT d.id, d.key FROM pgbus.entity_dead d WHERE {_WHICH} ORDER BY d.id FOR UPDATE"

# Back to the end of its key's mailbox (after what waits there now: a new id), with a fresh
# count of attempts; each shard touched is woken once, at COMMIT.
_RETRY = f"""
WITH moved AS (
    DELETE FROM pgbus.entity_dead d USING unnest($2::int8[], $3::int4[]) AS u(id, shard)
     WHERE d.kind = $1 AND d.id = u.id
    RETURNING d.id, d.key, u.shard, d.message
), stored AS (
    INSERT INTO pgbus.entity_mail (kind, key, shard, message)
    SELECT $1, m.key, m.shard, m.message FROM moved m ORDER BY m.id
    RETURNING shard
)
SELECT count(*),
       (SELECT count(pg_notify('{WAKE_CHANNEL}', $1 || ':' || s.shard))
          FROM (SELECT DISTINCT shard FROM stored) s)
  FROM stored
"""

_PURGE = f"DELETE FROM pgbus.entity_dead d WHERE {_WHICH}"


@attrs.frozen
class EntityDeadLetter:
    """A message a keyed actor's handler failed on `max_attempts` times."""

    id: int
    kind: str
    key: str
    attempts: int
    error: str | None
    message: Any
    """The message, decoded (it was stored as JSON)."""
    failed_at: str
    """When it became a dead letter (ISO 8601, UTC)."""


async def entity_dead_letters(
    connection: Connection, kind: str, key: str | None = None, ids: list[int] | None = None
) -> list[EntityDeadLetter]:
    rows = await connection.fetch(_LIST, kind, key, ids)
    return [EntityDeadLetter(r[0], kind, r[1], r[2], r[3], json.loads(r[4]), r[5]) for r in rows]


async def retry_entity_dead_letters(
    connection: Connection, kind: str, key: str | None = None, ids: list[int] | None = None
) -> int:
    """Give dead letters back to their keys' mailboxes (at the end), woken; how many."""
    async with connection.transaction():
        rows = await connection.fetch(_LOCK, kind, key, ids)
        if not rows:
            return 0
        letters = [r[0] for r in rows]
        shards = [shard_of(r[1]) for r in rows]
        return int(await connection.fetchval(_RETRY, kind, letters, shards))


async def purge_entity_dead_letters(
    connection: Connection, kind: str, key: str | None = None, ids: list[int] | None = None
) -> int:
    """Forget dead letters; how many."""
    tag = await connection.execute(_PURGE, kind, key, ids)
    return int(tag.split()[-1])
