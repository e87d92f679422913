"""Storing messages in keyed actors' mailboxes: one statement each, the wake-up included."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._codec import check_payload, encoder
from .._pg import Connection
from ._entity import (
    WAKE_CHANNEL,
    UnknownEntityKindError,
    shard_of,
    validate_key,
    validate_kind,
)

_encode_json = encoder("json")

# One message: stored only for a kind some node has hosted (its shard rows exist), its id and
# the shard's owner back, and the owner woken (at COMMIT, inside a caller's transaction).
_STORE_ONE = f"""
WITH shard AS (
    SELECT owner FROM pgbus.entity_shards WHERE kind = $1 AND shard = $3
), stored AS (
    INSERT INTO pgbus.entity_mail (kind, key, shard, message, reply_to, ask_id, traceparent)
    SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM shard)
    RETURNING id
)
SELECT stored.id, (SELECT owner FROM shard), pg_notify('{WAKE_CHANNEL}', $1 || ':' || $3)
  FROM stored
"""

# A batch for one kind: one statement, and its wake-ups ($6: ``kind:shard`` for each shard
# touched, or ``kind:*`` for a batch touching many).
_STORE_MANY = f"""
WITH known AS (
    SELECT 1 FROM pgbus.entity_shards WHERE kind = $1 AND shard = 0
), stored AS (
    INSERT INTO pgbus.entity_mail (kind, key, shard, message, traceparent)
    SELECT $1, u.key, u.shard, u.message, $5
      FROM unnest($2::text[], $3::integer[], $4::text[])
           WITH ORDINALITY AS u(key, shard, message, n)
     WHERE EXISTS (SELECT 1 FROM known)
     ORDER BY u.n
    RETURNING 1
)
SELECT count(*), (SELECT count(pg_notify('{WAKE_CHANNEL}', w)) FROM unnest($6::text[]) AS w)
  FROM stored
"""
WAKE_ALL_ABOVE = 32
"""A batch touching more shards than this wakes each owner once for all of them."""


def encode_message(kind: str, key: str, message: object, limit: int) -> str:
    """*message* as JSON text for entity (*kind*, *key*), checked against *limit* bytes."""
    where = f"entity {kind}/{key}"
    return check_payload(where, _encode_json(where, message), "json", limit)


async def store_one(
    connection: Connection,
    kind: str,
    key: str,
    message: object,
    limit: int,
    *,
    reply_to: str | None = None,
    ask_id: int | None = None,
    traceparent: str | None = None,
) -> tuple[int, str | None]:
    """Store one message; (its id, the channel of the node owning its key now, or None)."""
    validate_kind(kind)
    validate_key(kind, key)
    payload = encode_message(kind, key, message, limit)
    row = await connection.fetchrow(
        _STORE_ONE,
        kind,
        key,
        shard_of(key),
        payload,
        reply_to,
        None if ask_id is None else str(ask_id),
        traceparent,
    )
    if row is None:
        raise UnknownEntityKindError(kind)
    return row[0], row[1]


async def store_many(
    connection: Connection,
    kind: str,
    items: Iterable[tuple[str, object]],
    limit: int,
    traceparent: str | None = None,
) -> int:
    """Store (key, message) pairs for *kind* in one statement; how many were stored."""
    validate_kind(kind)
    keys: list[str] = []
    shards: list[int] = []
    payloads: list[str] = []
    for key, message in items:
        validate_key(kind, key)
        keys.append(key)
        shards.append(shard_of(key))
        payloads.append(encode_message(kind, key, message, limit))
    if not keys:
        return 0
    touched = set(shards)
    wakes = [f"{kind}:*"] if len(touched) > WAKE_ALL_ABOVE else [f"{kind}:{s}" for s in touched]
    row: Any = await connection.fetchrow(
        _STORE_MANY, kind, keys, shards, payloads, traceparent, wakes
    )
    if row[0] == 0:
        raise UnknownEntityKindError(kind)
    return int(row[0])
