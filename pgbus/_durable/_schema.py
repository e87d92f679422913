"""
pgbus's own schema ``pgbus``: versioned migrations, applied once, under an advisory lock.

Tables (version 1; version 2 replaced the claim function; `_V_CLUSTER` added the cluster's
registry ``pgbus.cluster_nodes``):

- ``pgbus.messages``: one row per durable message: ``id``, ``xid`` (the publishing transaction,
  ``pg_current_xact_id()``), ``channel``, ``payload``, ``created_at``.
- ``pgbus.groups``: per (channel, group) the position up to which the group has claimed, as the
  pair ``(xid, id)``, and when a member was last seen.
- ``pgbus.deliveries``: one row per message a group has claimed and not yet acknowledged: its
  member, attempts, and ``available_at`` (the lease's end, a retry's time, or ``infinity`` for
  a dead letter).
- ``pgbus.claim(...)``: acknowledges a batch, then claims due retries (when asked) and new
  messages.

Why positions are ``(xid, id)`` and not ids alone: ids are drawn when a row is inserted, but
transactions commit in another order; a reader moving past id 101 while id 100's transaction is
still open would skip 100 forever. A claim takes only messages whose transaction is older than
every transaction still running (``xid < pg_snapshot_xmin(pg_current_snapshot())``): that set
never grows behind the position, so nothing is skipped.
"""

from __future__ import annotations

import logging

from .._errors import DatabaseError, PgbusError
from .._pg import Connection, Database

log = logging.getLogger("pgbus.durable")

SCHEMA = "pgbus"
MIGRATION_LOCK = 0x70676275_73000001  # "pgbus" + 1: pg_advisory_xact_lock key for migrations

_V1 = r"""
CREATE TABLE pgbus.messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    channel text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_position ON pgbus.messages (channel, xid, id);

CREATE TABLE pgbus.groups (
    channel text NOT NULL,
    group_name text NOT NULL,
    position_xid xid8 NOT NULL,
    position_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, group_name)
);

CREATE TABLE pgbus.deliveries (
    message_id bigint NOT NULL,
    group_name text NOT NULL,
    channel text NOT NULL,
    member text,
    attempts integer NOT NULL,
    available_at timestamptz NOT NULL,
    last_error text,
    PRIMARY KEY (message_id, group_name)
);
CREATE INDEX deliveries_due ON pgbus.deliveries (channel, group_name, available_at);

-- One round trip per consumer cycle: acknowledge what was handled, then claim up to p_limit,
-- due retries and expired leases first, then new messages in (xid, id) order. The planner
-- settings pin the claim to its indexes whatever the statistics say (a deep backlog in a table
-- nobody has analyzed must not turn into a sequential scan and a sort).
CREATE FUNCTION pgbus.claim(
    p_channel text, p_group text, p_member text, p_limit integer, p_lease double precision,
    p_ack_ids bigint[], p_ack_attempts integer[]
) RETURNS TABLE (id bigint, attempt integer, payload text)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
DECLARE
    v_xid xid8;
    v_pos bigint;
    v_seen timestamptz;
    v_taken integer := 0;
    v_ids bigint[];
    v_xids xid8[];
    v_payloads text[];
BEGIN
    IF cardinality(p_ack_ids) > 0 THEN
        DELETE FROM pgbus.deliveries d
         USING unnest(p_ack_ids, p_ack_attempts) AS a(id, attempt)
         WHERE d.message_id = a.id AND d.group_name = p_group
           AND d.attempts = a.attempt AND d.member = p_member;
    END IF;
    IF p_limit <= 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH due AS (
        SELECT d.message_id FROM pgbus.deliveries d
         WHERE d.channel = p_channel AND d.group_name = p_group AND d.available_at <= now()
         ORDER BY d.channel, d.group_name, d.available_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), taken AS (
        UPDATE pgbus.deliveries d
           SET member = p_member, attempts = d.attempts + 1,
               available_at = now() + make_interval(secs => p_lease)
          FROM due
         WHERE d.message_id = due.message_id AND d.group_name = p_group
        RETURNING d.message_id, d.attempts
    )
    SELECT t.message_id, t.attempts, m.payload
      FROM taken t JOIN pgbus.messages m ON m.id = t.message_id;
    GET DIAGNOSTICS v_taken = ROW_COUNT;
    IF v_taken >= p_limit THEN
        RETURN;
    END IF;

    -- Members of a group take turns here: the lock is held until this transaction commits.
    SELECT g.position_xid, g.position_id, g.seen_at INTO v_xid, v_pos, v_seen
      FROM pgbus.groups g
     WHERE g.channel = p_channel AND g.group_name = p_group
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgbus: group % of channel % is not registered', p_group, p_channel
              USING ERRCODE = 'P0002';
    END IF;

    -- array_agg keeps the order of the sorted subquery.
    SELECT array_agg(b.id), array_agg(b.xid), array_agg(b.payload)
      INTO v_ids, v_xids, v_payloads
      FROM (SELECT m.id, m.xid, m.payload
              FROM pgbus.messages m
             WHERE m.channel = p_channel
               AND (m.xid, m.id) > (v_xid, v_pos)
               AND m.xid < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY m.channel, m.xid, m.id
             LIMIT p_limit - v_taken) b;

    IF v_ids IS NULL THEN
        IF v_seen < now() - interval '60 seconds' THEN
            UPDATE pgbus.groups SET seen_at = now()
             WHERE channel = p_channel AND group_name = p_group;
        END IF;
        RETURN;
    END IF;
    INSERT INTO pgbus.deliveries (message_id, group_name, channel, member, attempts, available_at)
    SELECT u.id, p_group, p_channel, p_member, 1, now() + make_interval(secs => p_lease)
      FROM unnest(v_ids) AS u(id);
    UPDATE pgbus.groups
       SET position_xid = v_xids[cardinality(v_xids)], position_id = v_ids[cardinality(v_ids)],
           seen_at = now()
     WHERE channel = p_channel AND group_name = p_group;
    RETURN QUERY SELECT u.id, 1, u.payload FROM unnest(v_ids, v_payloads) AS u(id, payload);
END
$$;
"""

# Version 2: due retries and expired leases are looked for only when the caller asks
# (p_reclaim, about once a second): one index scan less on the hot path.
_V2 = r"""
DROP FUNCTION pgbus.claim(text, text, text, integer, double precision, bigint[], integer[]);

-- One round trip per consumer cycle: acknowledge what was handled, then claim up to p_limit,
-- due retries and expired leases first, then new messages in (xid, id) order. The planner
-- settings pin the claim to its indexes whatever the statistics say (a deep backlog in a table
-- nobody has analyzed must not turn into a sequential scan and a sort).
CREATE FUNCTION pgbus.claim(
    p_channel text, p_group text, p_member text, p_limit integer, p_lease double precision,
    p_ack_ids bigint[], p_ack_attempts integer[], p_reclaim boolean
) RETURNS TABLE (id bigint, attempt integer, payload text)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
DECLARE
    v_xid xid8;
    v_pos bigint;
    v_seen timestamptz;
    v_taken integer := 0;
    v_ids bigint[];
    v_xids xid8[];
    v_payloads text[];
BEGIN
    IF cardinality(p_ack_ids) > 0 THEN
        DELETE FROM pgbus.deliveries d
         USING unnest(p_ack_ids, p_ack_attempts) AS a(id, attempt)
         WHERE d.message_id = a.id AND d.group_name = p_group
           AND d.attempts = a.attempt AND d.member = p_member;
    END IF;
    IF p_limit <= 0 THEN
        RETURN;
    END IF;

    IF p_reclaim THEN  -- the caller asks for these about once a second, not every cycle
        RETURN QUERY
        WITH due AS (
            SELECT d.message_id FROM pgbus.deliveries d
             WHERE d.channel = p_channel AND d.group_name = p_group AND d.available_at <= now()
             ORDER BY d.channel, d.group_name, d.available_at
             LIMIT p_limit
               FOR UPDATE SKIP LOCKED
        ), taken AS (
            UPDATE pgbus.deliveries d
               SET member = p_member, attempts = d.attempts + 1,
                   available_at = now() + make_interval(secs => p_lease)
              FROM due
             WHERE d.message_id = due.message_id AND d.group_name = p_group
            RETURNING d.message_id, d.attempts
        )
        SELECT t.message_id, t.attempts, m.payload
          FROM taken t JOIN pgbus.messages m ON m.id = t.message_id;
        GET DIAGNOSTICS v_taken = ROW_COUNT;
        IF v_taken >= p_limit THEN
            RETURN;
        END IF;
    END IF;

    -- Members of a group take turns here: the lock is held until this transaction commits.
    SELECT g.position_xid, g.position_id, g.seen_at INTO v_xid, v_pos, v_seen
      FROM pgbus.groups g
     WHERE g.channel = p_channel AND g.group_name = p_group
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgbus: group % of channel % is not registered', p_group, p_channel
              USING ERRCODE = 'P0002';
    END IF;

    -- array_agg keeps the order of the sorted subquery.
    SELECT array_agg(b.id), array_agg(b.xid), array_agg(b.payload)
      INTO v_ids, v_xids, v_payloads
      FROM (SELECT m.id, m.xid, m.payload
              FROM pgbus.messages m
             WHERE m.channel = p_channel
               AND (m.xid, m.id) > (v_xid, v_pos)
               AND m.xid < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY m.channel, m.xid, m.id
             LIMIT p_limit - v_taken) b;

    IF v_ids IS NULL THEN
        IF v_seen < now() - interval '60 seconds' THEN
            UPDATE pgbus.groups SET seen_at = now()
             WHERE channel = p_channel AND group_name = p_group;
        END IF;
        RETURN;
    END IF;
    INSERT INTO pgbus.deliveries (message_id, group_name, channel, member, attempts, available_at)
    SELECT u.id, p_group, p_channel, p_member, 1, now() + make_interval(secs => p_lease)
      FROM unnest(v_ids) AS u(id);
    UPDATE pgbus.groups
       SET position_xid = v_xids[cardinality(v_xids)], position_id = v_ids[cardinality(v_ids)],
           seen_at = now()
     WHERE channel = p_channel AND group_name = p_group;
    RETURN QUERY SELECT u.id, 1, u.payload FROM unnest(v_ids, v_payloads) AS u(id, payload);
END
$$;
"""

# The cluster's registry (see pgbus._cluster._membership). Until this migration, nodes created
# the table with CREATE TABLE IF NOT EXISTS on every join: a database may already have it, so
# this is idempotent, and it only adds (a released node keeps reading and writing its columns).
# sender_pids: the backends a node sends requests and replies from; receivers accept replies
# only from those.
_V_CLUSTER = r"""
CREATE TABLE IF NOT EXISTS pgbus.cluster_nodes (
    pid integer PRIMARY KEY,
    name text NOT NULL,
    channel text NOT NULL,
    host text NOT NULL,
    os_pid integer NOT NULL,
    started timestamptz NOT NULL DEFAULT now(),
    public text[] NOT NULL DEFAULT '{}',
    singletons text[] NOT NULL DEFAULT '{}',
    inbound text[] NOT NULL DEFAULT '{}'
);
ALTER TABLE pgbus.cluster_nodes
    ADD COLUMN IF NOT EXISTS sender_pids integer[] NOT NULL DEFAULT '{}';
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V_CLUSTER)
"""Migration *n* (1-based) brings the schema from version n-1 to n; never edit a released one."""

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaError(PgbusError):
    """pgbus's schema cannot be created or is newer than this pgbus."""


async def schema_version(connection: Connection) -> int:
    """The version of the ``pgbus`` schema in this database (0: none yet)."""
    exists = await connection.fetchval("SELECT to_regclass('pgbus.migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await connection.fetchval("SELECT coalesce(max(version), 0) FROM pgbus.migrations"))


async def migrate(connection: Connection, where: str) -> tuple[int, int]:
    """
    Bring the schema to `SCHEMA_VERSION`; returns (version before, version after).

    Safe when many processes do it at once: they queue on one advisory lock, and each applies
    only what is still missing once it holds it. Each migration commits with its version row.

    Raises:
        SchemaError: the role may not create the schema (one line, with what to do), or the
            schema is newer than this pgbus.
    """
    version = await schema_version(connection)
    if version == SCHEMA_VERSION:
        return version, version
    before = version
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await connection.execute("CREATE SCHEMA IF NOT EXISTS pgbus")
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS pgbus.migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            version = int(
                await connection.fetchval("SELECT coalesce(max(version), 0) FROM pgbus.migrations")
            )
            before = min(before, version)
            for number in range(version + 1, SCHEMA_VERSION + 1):
                await connection.execute(MIGRATIONS[number - 1])
                await connection.execute(
                    "INSERT INTO pgbus.migrations (version) VALUES ($1)", number
                )
                log.info("pgbus schema at %s migrated to version %d", where, number)
            version = max(version, SCHEMA_VERSION)
    except DatabaseError as exc:
        if exc.sqlstate == "42501":  # insufficient_privilege
            role = await _current_role(connection)
            raise SchemaError(
                f"cannot create pgbus's schema at {where} as role {role!r} ({exc.message}); "
                "run 'python -m pgbus migrate --dsn ...' once as a role that may (the "
                "database owner), then grant this role use of schema pgbus."
            ) from None
        raise
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the pgbus schema at {where} is at version {version}, newer than this pgbus "
            f"({SCHEMA_VERSION}); upgrade pgbus."
        )
    return before, version


async def _current_role(connection: Connection) -> str:
    try:
        return str(await connection.fetchval("SELECT current_user"))
    except PgbusError:
        return "?"


async def ensure_schema(database: Database) -> None:
    """Migrate on a connection of its own (the fast path is one read when already current)."""
    async with database.connection("migrate") as connection:
        await migrate(connection, database.where)
