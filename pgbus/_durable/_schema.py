"""
pgbus's own schema ``pgbus``: versioned migrations, applied once, under an advisory lock.

Tables (version 1; version 2 replaced the claim function; version 3 added the tick columns and
``pgbus.claim_v3``; version 4 made the cluster's registry ``pgbus.cluster_nodes`` part of the
schema; version 5 added ``pgbus.messages.traceparent``; version 6 deduplication keys
(``pgbus.messages.dedup_key``, ``dedup_until``) and the tables of delayed messages and schedule
slots):

- ``pgbus.messages``: one row per durable message: ``id``, ``xid`` (the publishing transaction,
  ``pg_current_xact_id()``), ``channel``, ``payload``, ``created_at``, ``traceparent`` (the
  publish span's W3C context when the publisher traces, else NULL).
- ``pgbus.groups``: per (channel, group) when a member was last seen, the tick it joined at,
  and ``position_xid``/``position_id`` (version 2's position, kept as a watermark); where it
  is now is in ``pgbus.group_ticks`` (below).
- ``pgbus.deliveries``: one row per message a group has claimed and not yet acknowledged: its
  member, attempts, and ``available_at`` (the lease's end, a retry's time, or ``infinity`` for
  a dead letter).
- ``pgbus.claim_v3(...)``: acknowledges a batch, renews the leases its member holds, claims due
  retries and expired leases (when asked), then new messages. ``pgbus.claim(...)`` (version 2's
  signature) is kept as a wrapper for members of the previous release.

Snapshot ticks (version 3, after PgQ). Ids are drawn when a row is inserted, but transactions
commit in another order: a reader moving past id 101 while id 100's transaction is still open
would skip 100 forever. Versions 1 and 2 therefore took only messages older than every running
transaction (``xid < pg_snapshot_xmin(pg_current_snapshot())``), so any writing transaction held
open anywhere on the server (xids are cluster-wide: another database counts) stalled every
durable channel for its whole length (8 s open, 8.05 s delivery).

Now a group's position is a **tick**: a snapshot, ``pg_current_snapshot()``, taken by a claim.
``tick_from`` is the tick up to which the group has claimed everything (all messages whose
transaction is visible in it); a claim takes the next tick, ``tick_to``, and the **batch** is
the messages visible in ``tick_to`` and not in ``tick_from``
(``pg_visible_in_snapshot(xid, tick_to) AND NOT pg_visible_in_snapshot(xid, tick_from)``).
Snapshots only ever see more, so successive batches partition every committed message: nothing
is skipped, nothing comes twice, and nobody waits for a transaction that has not committed: its
messages are simply not in the batch, and they are in the first batch whose tick sees its
commit. A batch is read in two index-bound parts, never a scan of what earlier batches took:

1. transactions listed as running in ``tick_from`` (``pg_snapshot_xip``) that ``tick_to`` sees
   committed: one probe of ``(channel, xid)`` each, in xid order (a long transaction's
   messages come here, once, in the tick after its commit);
2. transactions that began since ``tick_from`` (``xid >= xmax(tick_from)``, ``< xmax(tick_to)``)
   and committed by ``tick_to``: one range scan of ``(channel, xid, id)``.

A batch larger than the claim's limit is taken over several claims: ``(batch_xid, batch_id)``
marks the last message claimed, and the batch's order is ``(xid, id)``. A claim that moved the
group appends its position (``tick_from``, ``tick_to``, the marker) to ``pgbus.group_ticks``
rather than updating a row: while a transaction stays open, every version of an updated row
stays too, and a claim looking the row up would walk them all (measured on PostgreSQL 15 with
autovacuum off and a transaction open, 8,000 claims of one message each: 0.95 ms per claim at
first, 2.2 ms at the end with the row updated per claim, 1.6 ms appending; the rest of the
growth is dead delivery rows); the newest tick row is one backward index probe however many
there are. ``pgbus.group_positions`` is the
view of each group's current position; the janitor deletes older tick rows. So one member sees a
channel's messages in ``(xid, id)`` order within a tick, and tick after tick: a message whose
transaction commits late arrives in the tick after its commit, after messages with higher ids
that committed earlier. One publisher committing transactions one after another is seen in its
publishing order.

Compatibility. ``position_xid`` stays a watermark the previous release understands (every
message with a lower xid is claimed: ``pg_snapshot_xmin(tick_from)``, ``position_id = 0``,
refreshed once a minute), so its janitor never deletes an unclaimed message; a group last moved
by a version-2 member (no tick) continues from its ``(position_xid, position_id)``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._errors import DatabaseError, PgbusError

if TYPE_CHECKING:  # no driver at import: `pgbus check` and `pgbus grants` load this module
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

# Version 3: delivery by snapshot ticks (no foreign transaction stalls it), leases renewed while
# held, expired leases on their last attempt and dangling deliveries dead-lettered with a reason.
# Additive: new columns (NULL until a version-3 claim moves the group) and a new function; the
# version-2 function keeps its signature and becomes a wrapper, so members still running the
# previous release share the group's position with upgraded ones.
_V3 = r"""
-- The tick a group joined at (version 3's join sets it; NULL: joined by version 2).
ALTER TABLE pgbus.groups ADD COLUMN tick_from pg_snapshot;

-- Where each group is, one row per claim that moved it: appended, never updated, so that a
-- transaction held open (which keeps every row version alive) never makes a claim walk a
-- chain of versions of one row; the newest row (highest seq) is the position, found by one
-- backward index probe. The janitor deletes the older rows.
CREATE TABLE pgbus.group_ticks (
    channel text NOT NULL,
    group_name text NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    tick_from pg_snapshot NOT NULL,
    tick_to pg_snapshot,
    batch_xid xid8 NOT NULL,
    batch_id bigint NOT NULL,
    PRIMARY KEY (channel, group_name, seq)
);

-- Each group's position as claims see it: the newest tick row, else the join tick, else (a
-- group only version 2 has moved) position_xid/position_id alone.
CREATE VIEW pgbus.group_positions AS
SELECT g.channel, g.group_name, g.position_xid, g.position_id, g.created_at, g.seen_at,
       CASE WHEN t.seq IS NULL THEN g.tick_from ELSE t.tick_from END AS tick_from,
       t.tick_to, t.batch_xid, t.batch_id
  FROM pgbus.groups g
  LEFT JOIN LATERAL (
      SELECT k.seq, k.tick_from, k.tick_to, k.batch_xid, k.batch_id
        FROM pgbus.group_ticks k
       WHERE k.channel = g.channel AND k.group_name = g.group_name
       ORDER BY k.channel DESC, k.group_name DESC, k.seq DESC
       LIMIT 1
  ) t ON true;

-- One round trip per consumer cycle:
--   1. acknowledge p_ack_ids (with their attempts);
--   2. renew the lease of p_held (what this member holds: waiting in its channel or in
--      handle); each id it no longer holds comes back as a row (id, 0, NULL, false);
--   3. when p_reclaim: due retries and expired leases of other members, oldest first
--      (reclaimed = true); an expired lease on its last attempt and a delivery whose message
--      is gone become dead letters with a reason instead;
--   4. new messages, tick by tick: a batch is what is visible in the snapshot tick_to and
--      not in tick_from, in (xid, id) order; (batch_xid, batch_id) is the last one claimed;
--      the group's new position is appended to pgbus.group_ticks.
-- p_held NULL (the version-2 wrapper): no renewal, and a member may reclaim its own expired
-- leases, as version 2 did.
CREATE FUNCTION pgbus.claim_v3(
    p_channel text, p_group text, p_member text, p_limit integer, p_lease double precision,
    p_max_attempts integer, p_ack_ids bigint[], p_ack_attempts integer[], p_held bigint[],
    p_reclaim boolean
) RETURNS TABLE (id bigint, attempt integer, payload text, reclaimed boolean)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
DECLARE
    v_from pg_snapshot;
    v_to pg_snapshot;
    v_bxid xid8;
    v_bid bigint;
    v_pxid xid8;
    v_pid bigint;
    v_seen timestamptz;
    v_taken integer := 0;
    v_left integer;
    v_fresh boolean := false;
    v_done xid8[];
    v_xid xid8;
    v_ids bigint[] := '{}';
    v_payloads text[] := '{}';
    v_i bigint[];
    v_x xid8[];
    v_p text[];
    v_tick record;
BEGIN
    IF cardinality(p_ack_ids) > 0 THEN
        DELETE FROM pgbus.deliveries d
         USING unnest(p_ack_ids, p_ack_attempts) AS a(id, attempt)
         WHERE d.message_id = a.id AND d.group_name = p_group
           AND d.attempts = a.attempt AND d.member = p_member;
    END IF;

    IF cardinality(p_held) > 0 THEN
        -- A delivery being acknowledged in a caller's transaction (bus.transaction(ack=...))
        -- is locked by it: skipped, never waited for; it is still held.
        WITH mine AS (
            SELECT d.message_id FROM pgbus.deliveries d
             WHERE d.message_id = ANY(p_held) AND d.group_name = p_group
               AND d.member = p_member AND d.available_at < 'infinity'
               FOR UPDATE SKIP LOCKED
        )
        UPDATE pgbus.deliveries d
           SET available_at = now() + make_interval(secs => p_lease)
          FROM mine
         WHERE d.message_id = mine.message_id AND d.group_name = p_group;
        RETURN QUERY
        SELECT h.id, 0, NULL::text, false FROM unnest(p_held) AS h(id)
         WHERE NOT EXISTS (SELECT FROM pgbus.deliveries d
                            WHERE d.message_id = h.id AND d.group_name = p_group
                              AND d.member = p_member AND d.available_at < 'infinity');
    END IF;
    IF p_limit <= 0 THEN
        RETURN;
    END IF;

    IF p_reclaim THEN
        RETURN QUERY
        WITH due AS (
            SELECT d.message_id FROM pgbus.deliveries d
             WHERE d.channel = p_channel AND d.group_name = p_group AND d.available_at <= now()
               AND (p_held IS NULL OR d.member IS DISTINCT FROM p_member)
             ORDER BY d.channel, d.group_name, d.available_at
             LIMIT p_limit
               FOR UPDATE SKIP LOCKED
        ), taken AS (
            UPDATE pgbus.deliveries d
               SET member = CASE WHEN m.id IS NOT NULL AND d.attempts < p_max_attempts
                                 THEN p_member END,
                   attempts = CASE WHEN m.id IS NOT NULL AND d.attempts < p_max_attempts
                                   THEN d.attempts + 1 ELSE d.attempts END,
                   available_at = CASE WHEN m.id IS NOT NULL AND d.attempts < p_max_attempts
                                       THEN now() + make_interval(secs => p_lease)
                                       ELSE 'infinity' END,
                   last_error = CASE
                       WHEN m.id IS NULL THEN 'its message was deleted while a delivery was due'
                       WHEN d.attempts >= p_max_attempts THEN format(
                           'the lease of attempt %s expired (member %s); max_attempts is %s',
                           d.attempts, coalesce(d.member, '?'), p_max_attempts)
                       ELSE d.last_error END
              FROM due LEFT JOIN pgbus.messages m ON m.id = due.message_id
             WHERE d.message_id = due.message_id AND d.group_name = p_group
            RETURNING d.message_id, d.attempts, m.payload, d.member
        )
        SELECT t.message_id, t.attempts, t.payload, true FROM taken t WHERE t.member = p_member;
        GET DIAGNOSTICS v_taken = ROW_COUNT;
        IF v_taken >= p_limit THEN
            RETURN;
        END IF;
    END IF;

    -- Members of a group take turns here: the lock is held until this transaction commits.
    -- (A row lock writes no new version of the row.)
    SELECT g.tick_from, g.position_xid, g.position_id, g.seen_at
      INTO v_from, v_pxid, v_pid, v_seen
      FROM pgbus.groups g
     WHERE g.channel = p_channel AND g.group_name = p_group
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgbus: group % of channel % is not registered', p_group, p_channel
              USING ERRCODE = 'P0002';
    END IF;
    SELECT k.tick_from, k.tick_to, k.batch_xid, k.batch_id INTO v_tick
      FROM pgbus.group_ticks k
     WHERE k.channel = p_channel AND k.group_name = p_group
     ORDER BY k.channel DESC, k.group_name DESC, k.seq DESC
     LIMIT 1;
    IF FOUND THEN
        v_from := v_tick.tick_from;
        v_to := v_tick.tick_to;
        v_bxid := v_tick.batch_xid;
        v_bid := v_tick.batch_id;
    END IF;
    IF v_from IS NULL THEN
        -- Last moved by a version-2 member: everything up to (position_xid, position_id)
        -- is claimed, which is a tick seeing xids below position_xid plus a batch marker.
        v_from := format('%s:%s:', greatest(v_pxid, '1'::xid8), greatest(v_pxid, '1'::xid8))
                  ::pg_snapshot;
        v_to := NULL;
        v_bxid := v_pxid;
        v_bid := v_pid;
    END IF;
    v_bxid := coalesce(v_bxid, '0'::xid8);
    v_bid := coalesce(v_bid, 0);
    v_left := p_limit - v_taken;

    LOOP
        IF v_to IS NULL THEN  -- the next tick
            v_to := pg_current_snapshot();
            v_fresh := true;
            IF v_to::text = v_from::text THEN
                v_to := NULL;
                EXIT;
            END IF;
        END IF;
        -- Transactions in progress at tick_from that committed by tick_to, in xid order:
        -- one index probe each (a long transaction's messages come here, once it commits).
        SELECT array_agg(x ORDER BY x) INTO v_done
          FROM pg_snapshot_xip(v_from) AS x
         WHERE x >= v_bxid AND pg_visible_in_snapshot(x, v_to);
        IF v_done IS NOT NULL THEN
            FOREACH v_xid IN ARRAY v_done LOOP
                SELECT array_agg(b.id), array_agg(b.xid), array_agg(b.payload)
                  INTO v_i, v_x, v_p
                  FROM (SELECT m.id, m.xid, m.payload
                          FROM pgbus.messages m
                         WHERE m.channel = p_channel AND m.xid = v_xid
                           AND (m.xid, m.id) > (v_bxid, v_bid)
                         ORDER BY m.channel, m.xid, m.id
                         LIMIT v_left) b;
                IF v_i IS NOT NULL THEN
                    v_ids := v_ids || v_i;
                    v_payloads := v_payloads || v_p;
                    v_left := v_left - cardinality(v_i);
                    v_bxid := v_x[cardinality(v_x)];
                    v_bid := v_i[cardinality(v_i)];
                    EXIT WHEN v_left <= 0;
                END IF;
            END LOOP;
        END IF;
        -- Transactions that began since tick_from and committed by tick_to: one range scan.
        IF v_left > 0 THEN
            SELECT array_agg(b.id), array_agg(b.xid), array_agg(b.payload) INTO v_i, v_x, v_p
              FROM (SELECT m.id, m.xid, m.payload
                      FROM pgbus.messages m
                     WHERE m.channel = p_channel
                       AND m.xid >= pg_snapshot_xmax(v_from)
                       AND m.xid < pg_snapshot_xmax(v_to)
                       AND (m.xid, m.id) > (v_bxid, v_bid)
                       AND pg_visible_in_snapshot(m.xid, v_to)
                     ORDER BY m.channel, m.xid, m.id
                     LIMIT v_left) b;
            IF v_i IS NOT NULL THEN
                v_ids := v_ids || v_i;
                v_payloads := v_payloads || v_p;
                v_left := v_left - cardinality(v_i);
                v_bxid := v_x[cardinality(v_x)];
                v_bid := v_i[cardinality(v_i)];
            END IF;
        END IF;
        EXIT WHEN v_left <= 0;  -- the batch may hold more: the next claim goes on with it
        v_from := v_to;  -- the batch is done
        v_to := NULL;
        v_bxid := '0'::xid8;
        v_bid := 0;
        EXIT WHEN v_fresh;
    END LOOP;

    -- Once a minute: seen_at, and position_xid, the watermark version 2 understands (every
    -- message with a lower xid is visible in tick_from, so claimed): its janitor never
    -- deletes an unclaimed message, it only lags a minute. Not per claim: while a long
    -- transaction holds the vacuum horizon back, every version of this row would stay.
    IF v_seen < now() - interval '60 seconds' THEN
        UPDATE pgbus.groups
           SET seen_at = now(), position_xid = pg_snapshot_xmin(v_from), position_id = 0
         WHERE channel = p_channel AND group_name = p_group;
    END IF;
    -- Nothing claimed: nothing written (the ticks this claim moved past are taken again, at
    -- the cost of a few index probes, by the next claim).
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    INSERT INTO pgbus.deliveries (message_id, group_name, channel, member, attempts,
                                  available_at)
    SELECT u.id, p_group, p_channel, p_member, 1, now() + make_interval(secs => p_lease)
      FROM unnest(v_ids) AS u(id);
    INSERT INTO pgbus.group_ticks (channel, group_name, tick_from, tick_to, batch_xid, batch_id)
    VALUES (p_channel, p_group, v_from, v_to, v_bxid, v_bid);
    RETURN QUERY
    SELECT u.id, 1, u.payload, false FROM unnest(v_ids, v_payloads) AS u(id, payload);
END
$$;

-- The version-2 signature, for members still running the previous release during a rolling
-- upgrade: the same group position as version 3, without renewals.
CREATE OR REPLACE FUNCTION pgbus.claim(
    p_channel text, p_group text, p_member text, p_limit integer, p_lease double precision,
    p_ack_ids bigint[], p_ack_attempts integer[], p_reclaim boolean
) RETURNS TABLE (id bigint, attempt integer, payload text)
LANGUAGE sql
AS $$
    SELECT c.id, c.attempt, c.payload
      FROM pgbus.claim_v3(p_channel, p_group, p_member, p_limit, p_lease, 2147483647,
                          p_ack_ids, p_ack_attempts, NULL, p_reclaim) AS c
$$;
"""

# Version 4: the cluster's registry (see pgbus._cluster._membership). Until this migration,
# nodes created the table with CREATE TABLE IF NOT EXISTS on every join: a database may have it, so
# this is idempotent, and it only adds (a released node keeps reading and writing its columns).
# sender_pids: the backends a node sends requests and replies from; receivers accept replies
# only from those.
_V4 = r"""
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

# Version 5, tracing (pgbus._tracing): the W3C traceparent of the span that published a
# message, NULL when its publisher traced nothing. Additive only: a nullable column without
# default is a catalog change (no table rewrite), and the previous release never names it.
_V5 = r"""
ALTER TABLE pgbus.messages ADD COLUMN IF NOT EXISTS traceparent text;
"""

# Version 6, time and idempotency: deduplication keys, delayed messages, schedule slots.
# Additive: two nullable columns of pgbus.messages (without default: a catalog change, no
# rewrite; the previous release never names them), one partial index, two new tables.
# - pgbus.messages.dedup_key / dedup_until: a message published with a key holds it, until
#   dedup_until, in the unique index messages_dedup. The indexed value is the key qualified by
#   its channel (`pgbus._durable._publish` builds it: the channel's length in bytes, ':', the
#   channel, the key), so one single-column index of "C" strings holds every channel's keys
#   and a key can live on rows whose channel is not (yet) its own (below). The batched INSERT
#   that stores messages takes keys with ON CONFLICT DO NOTHING: no second table, no second
#   round trip while keys are free.
# - Key holders: a row of pgbus.messages with channel '' (never a channel's name: names have
#   1 to 63 bytes, so no group ever claims them, and the janitor leaves that "channel" to its
#   key purge), payload '', and xid set to its key's expiry in Unix seconds (so those rows are
#   ordered by expiry in messages_position, and purged by one range scan). Its created_at is
#   that expiry too: the previous release's janitor, which takes '' for a channel without
#   groups and deletes its rows created more than its retention ago, so never deletes a
#   holder before its window ends (during a rolling upgrade). Two kinds: a
#   delayed message's key, held until the mover turns the holder into the message itself
#   (same row, same id: the key is never free meanwhile); and the key of a message every group
#   has handled before its window ended, which the janitor turns into a holder instead of
#   deleting it (so keyed messages never pile up in their channel's range).
# - pgbus.delayed: messages not yet due; movers (every bus with durable support) move due
#   rows into pgbus.messages with DELETE ... FOR UPDATE SKIP LOCKED, each row exactly once.
#   Ids come from pgbus.messages' own sequence, so the id a publisher gets back is the
#   message's id for good (OVERRIDING SYSTEM VALUE when moved).
# - pgbus.schedule_slots: one row per slot of a schedule published; the row and the message
#   commit in one statement, so a slot is published exactly once whoever runs it.
# - pgbus.schedules: what ``pgbus status`` shows of each schedule: its rule, as the runner
#   that last ran it declared it, and the next slot that runner will publish (written once
#   per pass, in the round trip that reads the database's clock).
_V6 = r"""
ALTER TABLE pgbus.messages ADD COLUMN IF NOT EXISTS dedup_key text COLLATE "C";
ALTER TABLE pgbus.messages ADD COLUMN IF NOT EXISTS dedup_until timestamptz;
CREATE UNIQUE INDEX messages_dedup ON pgbus.messages (dedup_key) WHERE dedup_key IS NOT NULL;

CREATE TABLE pgbus.delayed (
    id bigint PRIMARY KEY,
    channel text NOT NULL,
    payload text NOT NULL,
    deliver_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delayed_due ON pgbus.delayed (deliver_at, id);

CREATE TABLE pgbus.schedule_slots (
    name text NOT NULL,
    slot timestamptz NOT NULL,
    message_id bigint NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, slot)
);

CREATE TABLE pgbus.schedules (
    name text PRIMARY KEY,
    channel text NOT NULL,
    cron text,
    every double precision,
    timezone text NOT NULL,
    missed text NOT NULL,
    next_slot timestamptz,
    runner text,
    seen_at timestamptz NOT NULL DEFAULT now()
);
"""

# Version 7, keyed actors (pgbus._entities). Additive: new tables and a function only.
# - pgbus.entity_mail: the mailboxes, one row per stored message, deleted when its effects
#   commit (in the same transaction as the key's state);
# - pgbus.entity_state: each key's JSON state and how many messages it has taken (version);
# - pgbus.entity_shards: 256 shards per kind; the node owning a shard (its channel in
#   pgbus.cluster_nodes) and an epoch, raised by every change of owner: the fence;
# - pgbus.entity_hosts: which node hosts which kind, its activations, and when it last placed
#   (a host that has not for 2 x keepalive, a paused process, counts as gone);
# - pgbus.entity_dead: messages whose handler failed max_attempts times;
# - pgbus.entity_commit: one batch's effects, all or nothing, fenced by the shards' epochs.
_V7 = r"""
CREATE TABLE pgbus.entity_mail (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    shard integer NOT NULL,
    message text NOT NULL,
    reply_to text,
    ask_id text,
    traceparent text,
    attempts integer NOT NULL DEFAULT 0,
    not_before timestamptz,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX entity_mail_shard ON pgbus.entity_mail (kind, shard, id);

CREATE TABLE pgbus.entity_state (
    kind text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    state jsonb NOT NULL,
    version bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);

CREATE TABLE pgbus.entity_shards (
    kind text COLLATE "C" NOT NULL,
    shard integer NOT NULL,
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, shard)
);

CREATE TABLE pgbus.entity_hosts (
    node text COLLATE "C" NOT NULL,
    kind text COLLATE "C" NOT NULL,
    activations integer NOT NULL DEFAULT 0,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node, kind)
);

CREATE TABLE pgbus.entity_dead (
    id bigint PRIMARY KEY,
    kind text NOT NULL,
    key text NOT NULL,
    message text NOT NULL,
    attempts integer NOT NULL,
    error text,
    created_at timestamptz NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION pgbus.entity_commit(
    p_kind text, p_owner text, p_shards integer[], p_epochs bigint[],
    p_keys text[], p_states text[], p_counts integer[], p_acked bigint[],
    p_failed bigint[], p_errors text[], p_delays double precision[], p_max_attempts integer,
    p_out_kinds text[], p_out_keys text[], p_out_shards integer[], p_out_messages text[],
    p_out_traces text[], p_reply_channels text[], p_replies text[]
) RETURNS integer[] LANGUAGE plpgsql AS $f$
DECLARE
    stale integer[];
BEGIN
    -- The fence: every shard still this owner's at the epoch it read, locked until COMMIT,
    -- so no takeover can move one meanwhile. A stale shard: nothing is written.
    PERFORM 1 FROM pgbus.entity_shards
      WHERE kind = p_kind AND shard = ANY(p_shards) ORDER BY shard FOR SHARE;
    SELECT coalesce(array_agg(u.shard), '{}') INTO stale
      FROM unnest(p_shards, p_epochs) AS u(shard, epoch)
     WHERE NOT EXISTS (SELECT 1 FROM pgbus.entity_shards s
                        WHERE s.kind = p_kind AND s.shard = u.shard
                          AND s.owner = p_owner AND s.epoch = u.epoch);
    IF cardinality(stale) > 0 THEN
        RETURN stale;
    END IF;
    INSERT INTO pgbus.entity_state AS e (kind, key, state, version)
    SELECT p_kind, u.key, u.state::jsonb, u.n
      FROM unnest(p_keys, p_states, p_counts) AS u(key, state, n)
    ON CONFLICT (kind, key) DO UPDATE
       SET state = EXCLUDED.state, version = e.version + EXCLUDED.version, updated_at = now();
    DELETE FROM pgbus.entity_mail WHERE id = ANY(p_acked);
    IF cardinality(p_failed) > 0 THEN
        UPDATE pgbus.entity_mail m
           SET attempts = m.attempts + 1, last_error = f.error,
               not_before = now() + make_interval(secs => f.delay)
          FROM unnest(p_failed, p_errors, p_delays) AS f(id, error, delay)
         WHERE m.id = f.id;
        WITH dead AS (
            DELETE FROM pgbus.entity_mail
             WHERE id = ANY(p_failed) AND attempts >= p_max_attempts
            RETURNING id, kind, key, message, attempts, last_error, created_at
        )
        INSERT INTO pgbus.entity_dead (id, kind, key, message, attempts, error, created_at)
        SELECT * FROM dead;
    END IF;
    IF cardinality(p_out_kinds) > 0 THEN
        INSERT INTO pgbus.entity_mail (kind, key, shard, message, traceparent)
        SELECT * FROM unnest(p_out_kinds, p_out_keys, p_out_shards, p_out_messages, p_out_traces);
        PERFORM pg_notify('pgbus.entities', w.wake)
           FROM (SELECT DISTINCT k || ':' || s AS wake
                   FROM unnest(p_out_kinds, p_out_shards) AS o(k, s)) AS w;
    END IF;
    PERFORM pg_notify(r.channel, r.reply)
       FROM unnest(p_reply_channels, p_replies) AS r(channel, reply);
    RETURN stale;
END
$f$;
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5, _V6, _V7)
"""Migration *n* (1-based) brings the schema from version n-1 to n; never edit a released one."""

SCHEMA_VERSION = len(MIGRATIONS)


MIGRATE_LOCK_TIMEOUT = 30.0
"""How long `migrate` waits for another session's migration lock before saying who holds it."""


class SchemaError(PgbusError):
    """pgbus's schema cannot be created or is newer than this pgbus."""


# A bigint advisory lock shows in pg_locks as classid (high half), objid (low half), objsubid 1.
_LOCK_HOLDERS = """
SELECT a.pid, a.usename, a.application_name, a.state
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = (($1::bigint >> 32) & 4294967295)::oid
   AND l.objid = ($1::bigint & 4294967295)::oid
   AND a.pid <> pg_backend_pid()
 ORDER BY a.pid
"""


async def lock_holders(connection: Connection, key: int) -> str:
    """Who holds the advisory lock *key*, for a message: "pid 12 (role r, application_name 'a',
    idle in transaction)"; "an unknown session" when the server does not say."""
    try:
        rows = await connection.fetch(_LOCK_HOLDERS, key)
    except PgbusError:
        rows = []
    if not rows:
        return "an unknown session"
    return ", ".join(
        f"pid {r[0]} (role {r[1]!r}, application_name {r[2]!r}, {r[3] or 'state unknown'})"
        for r in rows
    )


async def schema_version(connection: Connection) -> int:
    """The version of the ``pgbus`` schema in this database (0: none yet)."""
    exists = await connection.fetchval("SELECT to_regclass('pgbus.migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await connection.fetchval("SELECT coalesce(max(version), 0) FROM pgbus.migrations"))


async def migrate(
    connection: Connection, where: str, *, lock_timeout: float = MIGRATE_LOCK_TIMEOUT
) -> tuple[int, int]:
    """
    Bring the schema to `SCHEMA_VERSION`; returns (version before, version after).

    Safe when many processes do it at once: they queue on one advisory lock, and each applies
    only what is still missing once it holds it. Each migration commits with its version row.
    The wait for that lock is bounded by *lock_timeout* seconds.

    Raises:
        SchemaError: the role may not create the schema (one line, with what to do), the
            migration lock stayed held for *lock_timeout* (naming the holder), or the schema
            is newer than this pgbus.
    """
    version = await schema_version(connection)
    if version == SCHEMA_VERSION:
        return version, version
    before = version
    try:
        async with connection.transaction():
            await connection.execute(
                f"SET LOCAL lock_timeout = {max(1, round(lock_timeout * 1000))}"
            )
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await connection.execute("SET LOCAL lock_timeout = 0")
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
        if exc.sqlstate == "55P03":  # lock_not_available: lock_timeout
            holders = await lock_holders(connection, MIGRATION_LOCK)
            raise SchemaError(
                f"waited {lock_timeout:g}s for pgbus's migration lock at {where}; it is held by "
                f"{holders}: end that session or let it finish, then migrate again."
            ) from None
        if exc.sqlstate == "42501":  # insufficient_privilege
            role = await _current_role(connection)
            denied = exc.message.split("; the role lacks")[0]  # the grants hint comes below
            raise SchemaError(
                f"cannot create or migrate pgbus's schema at {where} (to version "
                f"{SCHEMA_VERSION}) as role {role!r} ({denied}); run 'python -m pgbus migrate "
                "--dsn ...' as the schema's owner (or the database owner), then the SQL of "
                f"'python -m pgbus grants {role}'."
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
