"""
The statements of the previous release (schema version 2), copied verbatim from its
``pgbus/_durable/_consumer.py``, ``_publish.py`` and ``_admin.py``: what members still running
that release send during a rolling upgrade. Never edit them to make a test pass.
"""

CLAIM = "SELECT id, attempt, payload FROM pgbus.claim($1, $2, $3, $4, $5, $6, $7, $8)"

JOIN = """
INSERT INTO pgbus.groups (channel, group_name, position_xid, position_id)
SELECT $1, $2,
       CASE WHEN $3 = 'earliest' THEN '0'::xid8 ELSE pg_snapshot_xmin(pg_current_snapshot()) END,
       0
ON CONFLICT (channel, group_name) DO UPDATE SET seen_at = now()
"""

STORE = """
WITH stored AS (
    INSERT INTO pgbus.messages (channel, payload) SELECT $1, p FROM unnest($2::text[]) AS p
)
SELECT pg_notify($3, $1)
"""

DELETE_HANDLED = """
WITH slowest AS (
    SELECT position_xid, position_id FROM pgbus.groups
     WHERE channel = $1 ORDER BY position_xid, position_id LIMIT 1
), doomed AS MATERIALIZED (
    SELECT m.id FROM pgbus.messages m, slowest s
     WHERE m.channel = $1 AND (m.xid, m.id) <= (s.position_xid, s.position_id)
       AND NOT EXISTS (SELECT 1 FROM pgbus.deliveries d WHERE d.message_id = m.id)
     ORDER BY m.channel, m.xid, m.id
     LIMIT $2
)
DELETE FROM pgbus.messages m USING doomed WHERE m.id = doomed.id
"""
