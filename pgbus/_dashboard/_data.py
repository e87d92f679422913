"""
What ``pgbus status --json`` prints and the dashboard shows: one function, `read_overview`.

The cluster's registry is read through `read_status` (this module's one import from the cluster
code); durable groups come with it. The most recent dead letters, with the reason each failed,
are added here, a bounded number of them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .._cluster import read_status

if TYPE_CHECKING:
    from .._bus import BusStatistics
    from .._pg import Connection

DEAD_LETTERS_SHOWN = 50
"""How many dead letters (the most recent) an overview lists; the groups count them all."""

_RECENT_DEAD_LETTERS = """
SELECT d.message_id, d.channel, d.group_name, d.attempts, d.last_error
  FROM pgbus.deliveries d
 WHERE d.available_at = 'infinity'
 ORDER BY d.message_id DESC
 LIMIT $1
"""


async def read_overview(connection: Connection) -> dict[str, Any]:
    """
    The cluster as the server sees it now, as JSON-ready data: ``nodes`` (each with its public
    actors, singletons and inbound channels), ``singletons`` (with their holder), ``durable``
    (each group's lag, in-flight and dead letters; None before durable channels were ever
    used) and ``dead_letters`` (the most recent `DEAD_LETTERS_SHOWN`, with ``error``, the
    reason the last attempt failed). A few short queries on *connection*.
    """
    overview = (await read_status(connection)).as_json()
    letters: list[dict[str, Any]] = []
    if overview["durable"] is not None and any(g["dead_letters"] for g in overview["durable"]):
        rows = await connection.fetch(_RECENT_DEAD_LETTERS, DEAD_LETTERS_SHOWN)
        letters = [
            {"id": r[0], "channel": r[1], "group": r[2], "attempts": r[3], "error": r[4]}
            for r in rows
        ]
    overview["dead_letters"] = letters
    return overview


def local_overview(
    stats: BusStatistics, rates: dict[tuple[str, str, str], float], node: str | None
) -> dict[str, Any]:
    """
    This bus's own channels, bridges (with *rates*, messages per second; None until a bridge
    has been counted twice), actors, and the keyed-actor kinds it hosts (`KindStatistics`).
    """
    return {
        "node": node,
        "channels": [
            {
                "name": c.name,
                "buffered": c.buffered,
                "capacity": "inf" if c.capacity == math.inf else c.capacity,
            }
            for c in stats.channels
        ],
        "bridges": [
            {
                "direction": b.direction,
                "postgres": b.postgres,
                "channel": b.channel,
                "messages": b.messages,
                "rate": _rounded(rates.get(bridge_key(b))),
                "connected": b.connected,
            }
            for b in stats.bridges
        ],
        "actors": [
            {"name": a.name, "state": a.state, "restarts": a.restarts} for a in stats.actors
        ],
        "entities": [
            {
                "kind": k.kind,
                "shards": k.shards,
                "activations": k.activations,
                "handled": k.handled,
                "failed": k.failed,
                "dead": k.dead,
                "stale_batches": k.stale_batches,
            }
            for k in stats.entities
        ],
    }


def _rounded(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 2)


def bridge_key(bridge: Any) -> tuple[str, str, str]:
    return (bridge.direction, bridge.postgres, bridge.channel)


def message_counts(stats: BusStatistics) -> dict[tuple[str, str, str], int]:
    return {bridge_key(b): b.messages for b in stats.bridges}


def rates_between(
    before: dict[tuple[str, str, str], int],
    after: dict[tuple[str, str, str], int],
    seconds: float,
) -> dict[tuple[str, str, str], float]:
    """Messages per second of each bridge over *seconds* (a new bridge counts from zero)."""
    if seconds <= 0:
        return {}
    return {key: max(0, count - before.get(key, 0)) / seconds for key, count in after.items()}
