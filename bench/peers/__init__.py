"""
The implementations under test, one module each, all with the same command line.

``python -m bench.peers.<module> W1 --dsn DSN [--messages N ...]`` runs one workload once and
prints one JSON line (see `bench.peers._protocol`). Each peer is written the way a competent
user of that stack would write it; the module docstrings say what that means for each.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Peer:
    """A column of the results table: its CLI name, its label and the module that runs it."""

    name: str
    label: str
    module: str


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("asyncpg_asyncio", "asyncpg asyncio", "bench.peers.asyncpg_asyncio"),
        Peer("asyncpg_uvloop", "asyncpg uvloop", "bench.peers.asyncpg_uvloop"),
        Peer("psycopg", "psycopg 3", "bench.peers.psycopg_async"),
        Peer("naive_trio", "naive Trio", "bench.peers.naive_trio"),
        Peer("pgqueuer", "pgqueuer", "bench.peers.pgqueuer_peer"),
        Peer("procrastinate", "procrastinate", "bench.peers.procrastinate_peer"),
        Peer("bare_queue", "bare SKIP LOCKED queue", "bench.peers.bare_queue"),
        Peer("dbos", "DBOS", "bench.peers.dbos_peer"),
        Peer("keyed_fifo", "hand-written per-key FIFO", "bench.peers.keyed_fifo"),
        Peer("pgbus", "pgbus", "bench.peers.pgbus_peer"),
    )
}
