"""Storing durable messages: one INSERT and one wake-up NOTIFY per batch."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence

import attrs

from .. import _tracing
from .._channel import Channel
from .._codec import check_payload
from .._errors import DatabaseError, PgbusError, SettingError
from .._outbound import OutboundBridge
from .._pg import Connection, Database
from ._rules import DEFAULT_DEDUP_WINDOW, MOVER_CHANNEL, WAKE_CHANNEL, validate_dedup_key

log = logging.getLogger("pgbus.durable")

# One statement, so one transaction when sent alone: the rows, then one wake-up for the batch.
_STORE = """
WITH stored AS (
    INSERT INTO pgbus.messages (channel, payload) SELECT $1, p FROM unnest($2::text[]) AS p
)
SELECT pg_notify($3, $1)
"""

# One message, its id back, and the wake-up: one statement.
# $4 / $3: the publish span's traceparent, NULL when nothing is traced.
_STORE_ONE = """
WITH stored AS (
    INSERT INTO pgbus.messages (channel, payload, traceparent) VALUES ($1, $2, $4) RETURNING id
)
SELECT id, pg_notify($3, $1) FROM stored
"""
_STORE_ONE_ONLY = (
    "INSERT INTO pgbus.messages (channel, payload, traceparent) VALUES ($1, $2, $3) RETURNING id"
)

# Inside a caller's transaction: the wake-up is sent once, just before COMMIT (PostgreSQL would
# merge repeated ones anyway).
_STORE_ONLY = (
    "INSERT INTO pgbus.messages (channel, payload) SELECT $1, p FROM unnest($2::text[]) AS p"
)
_WAKE = "SELECT pg_notify($1, $2)"

# The same, with the publish span's context stored with each message (only while tracing).
_STORE_TRACED = """
WITH stored AS (
    INSERT INTO pgbus.messages (channel, payload, traceparent)
    SELECT $1, p, $4 FROM unnest($2::text[]) AS p
)
SELECT pg_notify($3, $1)
"""
_STORE_ONLY_TRACED = (
    "INSERT INTO pgbus.messages (channel, payload, traceparent)"
    " SELECT $1, p, $3 FROM unnest($2::text[]) AS p"
)

# Keyed and/or delayed messages, one statement: the batched INSERT of `_STORE` with each
# message's key (qualified by its channel, see `pgbus._durable._schema`'s version 6) in
# pgbus.messages' unique index, taken by ON CONFLICT DO NOTHING: a row comes back only for a
# key that was free, and only those messages are stored; a concurrent publisher of the same
# key waits on the first one's uncommitted row (and stores if that transaction rolls back).
# Ids are drawn up front in the batch's order (so delivery follows it) and rows inserted in
# key order, so two batches sharing keys cannot deadlock. A delayed message's key is held by
# a row of its own (channel '', xid = the key's expiry in Unix seconds) that the mover turns
# into the message itself. $4: the window (seconds); $5/$6: delay seconds / absolute time
# (NULL both: deliver now); $7: send the wake-up NOTIFY (not inside a caller's transaction).
_STORE_TIMED = """
WITH due AS MATERIALIZED (
    SELECT CASE WHEN $5::float8 IS NULL AND $6::timestamptz IS NULL THEN NULL
                ELSE coalesce($6::timestamptz,
                              statement_timestamp() + make_interval(secs => $5::float8)) END AS at,
           now() + make_interval(secs => $4::float8) AS until
), input AS MATERIALIZED (
    SELECT u.payload, u.ord, nextval('pgbus.messages_id_seq') AS id,
           CASE WHEN u.key IS NOT NULL THEN octet_length($1) || ':' || $1 || u.key END AS qkey
      FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS u(payload, key, ord)
), now_rows AS (
    INSERT INTO pgbus.messages AS m (id, channel, payload, dedup_key, dedup_until)
    OVERRIDING SYSTEM VALUE
    SELECT i.id, $1, i.payload, i.qkey, CASE WHEN i.qkey IS NOT NULL THEN due.until END
      FROM input i, due WHERE due.at IS NULL ORDER BY i.qkey COLLATE "C", i.ord
    ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
    RETURNING m.id
), holders AS (
    INSERT INTO pgbus.messages AS m (id, xid, channel, payload, dedup_key, dedup_until,
                                     created_at)
    OVERRIDING SYSTEM VALUE
    SELECT i.id, floor(extract(epoch FROM due.until))::bigint::text::xid8, '', '', i.qkey,
           due.until, due.until
      FROM input i, due WHERE due.at IS NOT NULL AND i.qkey IS NOT NULL
     ORDER BY i.qkey COLLATE "C"
    ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
    RETURNING m.id
), later_rows AS (
    INSERT INTO pgbus.delayed (id, channel, payload, deliver_at)
    SELECT i.id, $1, i.payload, due.at FROM input i, due
     WHERE due.at IS NOT NULL AND (i.qkey IS NULL OR i.id IN (SELECT h.id FROM holders h))
     ORDER BY i.ord
    RETURNING id
), stored AS (
    SELECT id FROM now_rows UNION ALL SELECT id FROM later_rows
)
SELECT coalesce(array_agg(i.ord ORDER BY i.ord), '{}') AS ords,
       coalesce(array_agg(i.id ORDER BY i.ord), '{}') AS ids,
       (SELECT at FROM due) AS deliver_at,
       CASE WHEN $7 AND count(*) > 0 THEN
            CASE WHEN (SELECT at FROM due) IS NULL THEN pg_notify($8, $1)
                 ELSE pg_notify($9, $1) END END AS woken
  FROM stored s JOIN input i ON i.id = s.id
"""

# The out-bridge's batch of keyed messages, delivered now, while no key of it is taken (the
# common case: keys are there to catch the rare repeat): `_STORE` with the keys, and no ON
# CONFLICT. The unique index still decides: a key taken by a committed message makes the
# statement fail (unique_violation, nothing stored) and the batch goes again through
# `_STORE_TIMED`; a key held by an uncommitted one makes it wait for that transaction first,
# as ON CONFLICT would (two such batches waiting on each other's keys: PostgreSQL aborts one,
# which goes through `_STORE_TIMED` too). A speculative insertion (ON CONFLICT) costs about
# twice a plain one.
_STORE_KEYED = """
WITH stored AS (
    INSERT INTO pgbus.messages (channel, payload, dedup_key, dedup_until)
    SELECT $1, u.payload, octet_length($1) || ':' || $1 || u.key,
           now() + make_interval(secs => $4::float8)
      FROM unnest($2::text[], $3::text[]) AS u(payload, key)
)
SELECT pg_notify($5, $1)
"""
UNIQUE_VIOLATION = "23505"
DEADLOCK_DETECTED = "40P01"

# After the statement above: who holds the keys it did not take, and whether the holder's
# window has passed (a new statement, so a new snapshot in READ COMMITTED: it sees the row a
# concurrent publisher committed meanwhile).
_KEY_HOLDERS = """
SELECT u.key, m.id, m.dedup_until > now()
  FROM unnest($2::text[]) AS u(key)
  JOIN pgbus.messages m ON m.dedup_key = octet_length($1) || ':' || $1 || u.key
"""

# Keys whose window has passed are given up by their holders (the janitor would, later).
_FREE_EXPIRED = """
UPDATE pgbus.messages SET dedup_key = NULL
 WHERE dedup_key = ANY(ARRAY(SELECT octet_length($1) || ':' || $1 || k
                               FROM unnest($2::text[]) AS k))
   AND dedup_until <= now()
"""

_ACK_IN_TRANSACTION = """
DELETE FROM pgbus.deliveries
 WHERE message_id = $1 AND group_name = $2 AND member = $3 AND attempts = $4
"""


async def store(
    connection: Connection, channel: str, payloads: Sequence[str], *, root: bool = False
) -> None:
    """
    Store *payloads* in *channel*, in order, and wake its consumers: one statement.

    While tracing, in a ``publish {channel}`` span (the current span's child, or a root with
    *root*) whose context is stored with each of them.
    """
    with _tracing.publishing(channel, len(payloads), root=root) as traceparent:
        if traceparent is None:
            await connection.execute(_STORE, channel, list(payloads), WAKE_CHANNEL)
        else:
            await connection.execute(
                _STORE_TRACED, channel, list(payloads), WAKE_CHANNEL, traceparent
            )


async def store_one(connection: Connection, channel: str, payload: str, *, wake: bool) -> int:
    """Store one message (waking its consumers with *wake*); its id. Traced as `store` is."""
    with _tracing.publishing(channel, 1) as traceparent:
        if wake:
            row = await connection.fetchrow(_STORE_ONE, channel, payload, WAKE_CHANNEL, traceparent)
            return int(row[0])
        return int(await connection.fetchval(_STORE_ONE_ONLY, channel, payload, traceparent))


async def store_in_transaction(
    connection: Connection, channel: str, payloads: Sequence[str]
) -> None:
    """Store *payloads* inside the transaction open on *connection* (no wake-up yet); traced
    as `store` is."""
    with _tracing.publishing(channel, len(payloads)) as traceparent:
        if traceparent is None:
            await connection.execute(_STORE_ONLY, channel, list(payloads))
        else:
            await connection.execute(_STORE_ONLY_TRACED, channel, list(payloads), traceparent)


async def wake(connection: Connection, channels: Sequence[str]) -> None:
    for channel in channels:
        await connection.execute(_WAKE, WAKE_CHANNEL, channel)


@attrs.frozen
class Stored:
    """What `store_timed` did: each payload's message id, and whether anything was delayed."""

    ids: list[int]
    """Per payload, in order: its id, or the id of the message already holding its key."""
    new: list[bool]
    """Per payload: True if it was stored, False if its key was taken (nothing stored)."""
    delayed: bool
    """Something was stored in ``pgbus.delayed`` (the movers should be woken)."""


async def store_message(
    connection: Connection,
    channel: str,
    payload: str,
    *,
    key: str | None,
    window: float,
    delay: float | None,
    at: datetime.datetime | None,
    wake: bool,
) -> Stored:
    """
    Store one (already validated) message: the plain statement when it has no key and no delay,
    else `store_timed`'s. The one rule of `Bus.notify` and `Transaction.publish`.
    """
    if not delay and at is None and key is None:
        message_id = await store_one(connection, channel, payload, wake=wake)
        return Stored([message_id], [True], False)
    return await store_timed(
        connection, channel, [payload], [key], window=window, delay=delay or None, at=at, wake=wake
    )


async def store_timed(
    connection: Connection,
    channel: str,
    payloads: Sequence[str],
    keys: Sequence[str | None],
    *,
    window: float,
    delay: float | None = None,
    at: datetime.datetime | None = None,
    wake: bool = True,
) -> Stored:
    """
    Store *payloads* in *channel* with deduplication *keys* (None: no key) taken for *window*
    seconds, delivered now or after *delay* seconds / at *at* (by the database's clock).

    One statement (so one transaction when sent alone, or part of the caller's). A key already
    taken (within its window) stores nothing: that payload's id is the holder's. A key repeated
    inside *payloads* counts once, for its first payload. With *wake*, the statement NOTIFYs
    the channel's consumers (or the movers, for delayed messages).
    """
    first: dict[str, int] = {}
    sent_keys: list[str | None] = []
    for index, key in enumerate(keys):
        if key is not None and key in first:
            sent_keys.append(None)  # a repeat: not sent; takes its first's id below
            continue
        if key is not None:
            first[key] = index
        sent_keys.append(key)
    repeats = [i for i, key in enumerate(keys) if key is not None and first[key] != i]
    skip = set(repeats)
    positions = [i for i in range(len(payloads)) if i not in skip]
    sent = [payloads[i] for i in positions]
    sent_k = [sent_keys[i] for i in positions]
    ids: list[int | None] = [None] * len(payloads)
    new = [False] * len(payloads)
    delayed = False
    for _attempt in range(3):
        row = await connection.fetchrow(
            _STORE_TIMED,
            channel,
            sent,
            sent_k,
            window,
            delay,
            at,
            wake,
            WAKE_CHANNEL,
            MOVER_CHANNEL,
        )
        for ord_, message_id in zip(row[0], row[1], strict=True):
            ids[positions[ord_ - 1]] = message_id
            new[positions[ord_ - 1]] = True
        delayed = delayed or (row[2] is not None and len(row[0]) > 0)
        missing = {sent_k[j]: j for j in range(len(sent)) if ids[positions[j]] is None}
        if not missing:
            break
        expired = []
        for key, message_id, alive in await connection.fetch(_KEY_HOLDERS, channel, list(missing)):
            if alive:
                ids[positions[missing.pop(key)]] = message_id
            else:
                expired.append(key)
        if not missing:
            break
        if expired:
            await connection.execute(_FREE_EXPIRED, channel, expired)
        # Keys expired, or whose holder went away between the statements: try those again.
        sent = [sent[j] for j in missing.values()]
        positions = [positions[j] for j in missing.values()]
        sent_k = list(missing)
    else:
        raise DatabaseError(
            "55000",
            f"could not take or read deduplication keys {sorted(k for k in sent_k if k)!r} of "
            f"channel {channel!r} after 3 tries",
        )
    for i in repeats:
        key = keys[i]
        assert key is not None
        ids[i] = ids[first[key]]
    return Stored([int(i) if i is not None else 0 for i in ids], new, delayed)


async def store_keyed(
    connection: Connection,
    channel: str,
    payloads: Sequence[str],
    keys: Sequence[str],
    window: float,
) -> bool:
    """
    Store *payloads* (each with its key of *keys*, all distinct, taken for *window* seconds)
    and wake the consumers, in one statement: True; False, storing nothing, if a key is
    taken (then `store_timed` sorts the batch out).
    """
    try:
        await connection.execute(_STORE_KEYED, channel, payloads, keys, window, WAKE_CHANNEL)
    except DatabaseError as exc:
        if exc.sqlstate in (UNIQUE_VIOLATION, DEADLOCK_DETECTED):
            return False
        raise
    return True


async def wake_movers(connection: Connection) -> None:
    await connection.execute(_WAKE, MOVER_CHANNEL, "")


async def ack_in_transaction(
    connection: Connection, message_id: int, group: str, member: str, attempt: int
) -> bool:
    """
    Delete the delivery inside the caller's transaction; False if this member no longer holds it.

    The row stays locked until the transaction ends, so no other member can claim it meanwhile.
    """
    tag = await connection.execute(_ACK_IN_TRANSACTION, message_id, group, member, attempt)
    return tag.endswith(" 1")


class DurableOutboundBridge(OutboundBridge):
    """
    An outbound bridge that stores what its channel receives in a durable channel.

    Each batch is one INSERT with one wake-up NOTIFY, in one transaction. Repeated payloads are
    fine here (they are rows, not notifications). Payloads are checked against *max_payload*.
    """

    direct = False  # each batch is a transaction of its own: always from the bridge's task

    def __init__(
        self,
        db: Database,
        channel: Channel,
        pg_channel: str,
        codec: str,
        max_payload: int,
        *,
        delay: float | None = None,
        dedup_key: Callable[[object], str | None] | None = None,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
    ) -> None:
        super().__init__(db, channel, pg_channel, codec)
        self.max_payload = max_payload
        self.delay = delay
        self.dedup_key = dedup_key
        self.dedup_window = dedup_window
        self._keys: list[str | None] = []  # with dedup_key: one per payload of the batch
        self._optimistic = True  # keyed batches try `store_keyed` first

    def _add(self, batch: list[str], message: object) -> None:
        try:
            payload = self._encode(self.pg_channel, message)
            checked = check_payload(self.pg_channel, payload, self.codec, self.max_payload)
            key = None
            if self.dedup_key is not None:
                try:
                    key = validate_dedup_key(self.dedup_key(message))
                except PgbusError:
                    raise
                except Exception as exc:
                    raise SettingError(
                        "dedup_key", f"function raised {type(exc).__name__}: {exc}"
                    ) from None
            batch.append(checked)
            if self.dedup_key is not None:
                self._keys.append(key)
        except PgbusError as exc:
            self.rejected += 1
            log.error(
                "durable outbound bridge %r -> %r refused a message: %s",
                self.channel.name,
                self.pg_channel,
                exc,
            )

    async def _publish(self, batch: list[str]) -> None:
        assert self._connection is not None
        keys = self._keys  # kept with the batch until it is stored or refused
        distinct = [k for k in keys if k is not None]
        try:
            if self.delay is None and self.dedup_key is None:
                # One span per batch, a root: the senders' spans stayed in their own tasks.
                await store(self._connection, self.pg_channel, batch, root=True)
            elif not (
                self._optimistic
                and self.delay is None
                and len(distinct) == len(batch)
                and len(set(distinct)) == len(batch)
                and await store_keyed(
                    self._connection, self.pg_channel, batch, distinct, self.dedup_window
                )
            ):
                stored = await store_timed(
                    self._connection,
                    self.pg_channel,
                    batch,
                    keys or [None] * len(batch),
                    window=self.dedup_window,
                    delay=self.delay,
                )
                # A batch with a repeat: the next goes through ON CONFLICT at once, until one
                # stores every message again.
                self._optimistic = all(stored.new)
        except DatabaseError as exc:
            log.error(
                "PostgreSQL refused %d durable message(s) for %r: %s",
                len(batch),
                self.pg_channel,
                exc,
            )
            self.rejected += len(batch)
        else:
            self.published += len(batch)
        batch.clear()
        self._keys = []
