"""What ``pgbus status`` (and the dashboard) show of keyed actors: each kind, per node."""

from __future__ import annotations

from typing import Any

from .._cluster._membership import _ALIVE
from .._pg import Connection

_KINDS = f"""
WITH kinds AS (SELECT DISTINCT kind FROM pgbus.entity_shards),
hosts AS (
    SELECT h.kind, n.name, h.activations,
           (SELECT count(*) FROM pgbus.entity_shards s
             WHERE s.kind = h.kind AND s.owner = h.node)::int AS shards
      FROM pgbus.entity_hosts h JOIN pgbus.cluster_nodes n ON n.channel = h.node
     WHERE {_ALIVE}
)
SELECT k.kind,
       (SELECT count(*) FROM pgbus.entity_mail m WHERE m.kind = k.kind)::int8,
       (SELECT count(*) FROM pgbus.entity_dead d WHERE d.kind = k.kind)::int8,
       (SELECT count(*) FROM pgbus.entity_state e WHERE e.kind = k.kind)::int8,
       coalesce((SELECT json_agg(json_build_object(
                    'node', h.name, 'activations', h.activations, 'shards', h.shards)
                    ORDER BY h.name)
                   FROM hosts h WHERE h.kind = k.kind)::text, '[]')
  FROM kinds k ORDER BY k.kind
"""


async def entity_status(connection: Connection) -> tuple[dict[str, Any], ...] | None:
    """Each kind: messages waiting, dead letters, keys with state, its hosts (None: no tables)."""
    if not await connection.fetchval("SELECT to_regclass('pgbus.entity_shards') IS NOT NULL"):
        return None
    import json

    return tuple(
        {
            "kind": row[0],
            "waiting": row[1],
            "dead": row[2],
            "keys": row[3],
            "hosts": json.loads(row[4]),
        }
        for row in await connection.fetch(_KINDS)
    )
