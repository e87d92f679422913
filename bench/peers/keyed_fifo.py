"""
The limit of W9: a per-key FIFO written by hand on asyncpg, nothing a library adds.

As a competent engineer writes it (no retries, no dead letters, no activation, no epochs):

- Tables ``bench_kfifo_mail (id bigserial, kind, shard, key, payload)`` and
  ``bench_kfifo_state (kind, key, count)``; keys are hashed into 64 shards (``crc32(key) % 64``).
- Publishing: one ``INSERT ... SELECT FROM unnest(...)`` plus one ``pg_notify`` per batch of 5000.
- Hashed partitions: each of the 4 worker processes takes a slot with a session advisory lock
  (``pg_try_advisory_lock(kind, slot)``, the first free of 4) and is the only consumer of the
  shards ``shard % 4 == slot``, so a key's messages go through one process, in id order.
- A worker loops on three autocommit statements: read up to 64 of each of its 16 shards' oldest
  messages, read their keys' states, handle them in id order in Python (each key's count + 1),
  then delete the messages and upsert the states in one statement (atomic on its own).
- An idle worker waits for the publisher's NOTIFY, polling every second as a safety net.
"""

from __future__ import annotations

import asyncio
import signal
import zlib

import asyncpg

from ._asyncio_tools import until_woken_or_stopped
from ._durable_tools import (
    DEFAULT_WORKERS,
    WorkerReport,
    Workers,
    asyncio_peer_main,
    parse_worker_args,
)
from ._keyed_tools import (
    check_counts,
    check_keyed_finals,
    keyed_messages,
    out_of_order,
    parse_payload,
)
from ._protocol import PeerArgs, Result, WorkloadError, clock, throughput

MODULE = "bench.peers.keyed_fifo"
SHARDS = 64
SLOTS = 4
"""Worker slots: the shards ``shard % SLOTS == slot`` belong to the worker holding *slot*."""
PER_SHARD = 64
"""Messages read from each of a worker's 16 shards per batch (so up to 1024 per batch)."""
BATCH = 5000

_CREATE = """
CREATE TABLE IF NOT EXISTS bench_kfifo_mail (
    id bigserial PRIMARY KEY, kind text NOT NULL, shard int NOT NULL, key text NOT NULL,
    payload text NOT NULL
);
CREATE INDEX IF NOT EXISTS bench_kfifo_mail_shard ON bench_kfifo_mail (kind, shard, id);
CREATE TABLE IF NOT EXISTS bench_kfifo_state (
    kind text NOT NULL, key text NOT NULL, count int NOT NULL, PRIMARY KEY (kind, key)
);
"""
_ENQUEUE = """
WITH stored AS (
    INSERT INTO bench_kfifo_mail (kind, shard, key, payload)
    SELECT $1, s, k, p FROM unnest($2::int[], $3::text[], $4::text[]) AS t(s, k, p)
)
SELECT pg_notify($1, '')
"""
_FETCH = """
SELECT m.id, m.key, m.payload
FROM unnest($2::int[]) AS mine(shard)
CROSS JOIN LATERAL (
    SELECT id, key, payload FROM bench_kfifo_mail
    WHERE kind = $1 AND shard = mine.shard ORDER BY id LIMIT $3
) AS m
ORDER BY m.id
"""
# The states in a statement of their own: joined to the batch, a planner going by statistics
# from before the run (a kind with no state yet) scans all the kind's states for every message.
_STATES = "SELECT key, count FROM bench_kfifo_state WHERE kind = $1 AND key = ANY($2::text[])"
_COMMIT = """
WITH gone AS (DELETE FROM bench_kfifo_mail WHERE id = ANY($2::bigint[]))
INSERT INTO bench_kfifo_state (kind, key, count)
SELECT $1, k, c FROM unnest($3::text[], $4::int[]) AS t(k, c)
ON CONFLICT (kind, key) DO UPDATE SET count = excluded.count
"""


def shard_of(key: str) -> int:
    return zlib.crc32(key.encode()) % SHARDS


async def _connect(dsn: str, application_name: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"application_name": application_name})


async def _prepare(connection: asyncpg.Connection, kind: str) -> None:
    await connection.execute("SELECT pg_advisory_lock(4243)")
    try:
        await connection.execute(_CREATE)
    finally:
        await connection.execute("SELECT pg_advisory_unlock(4243)")


async def keyed_throughput(args: PeerArgs) -> Result:
    stream = keyed_messages(args.messages, args.keys)
    kind = args.channel
    connection = await _connect(args.dsn, args.application_name)
    try:
        await _prepare(connection, kind)
        workers = Workers(MODULE, "W9", DEFAULT_WORKERS, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            workers.expect(args.messages)
            start = clock()
            for first in range(0, args.messages, BATCH):
                chunk = stream[first : first + BATCH]
                await connection.execute(
                    _ENQUEUE,
                    kind,
                    [shard_of(m.key) for m in chunk],
                    [m.key for m in chunk],
                    [m.payload for m in chunk],
                )
            published = clock() - start
            await asyncio.to_thread(workers.wait_handled, args.timeout)
            # Each message is deleted in the transaction that commits its key's state.
            elapsed = clock() - start
            rows = await connection.fetch(
                "SELECT key, count FROM bench_kfifo_state WHERE kind = $1", kind
            )
            left = await connection.fetchval(
                "SELECT count(*) FROM bench_kfifo_mail WHERE kind = $1", kind
            )
        finally:
            finals = await asyncio.to_thread(workers.stop)
        await connection.execute("DELETE FROM bench_kfifo_state WHERE kind = $1", kind)
    finally:
        await connection.close()
    result = throughput(args.messages, elapsed)
    result.update(check_keyed_finals(finals, stream, DEFAULT_WORKERS))
    if left:
        raise WorkloadError(f"{left} message(s) still in the mailbox table after the run")
    check_counts({r["key"]: r["count"] for r in rows}, stream)
    result["keys"] = args.keys
    result["publish_seconds"] = published
    return result


async def _take_slot(connection: asyncpg.Connection, kind: str) -> int:
    """The first free worker slot of *kind*, held by this session until it ends."""
    for slot in range(SLOTS):
        if await connection.fetchval("SELECT pg_try_advisory_lock(hashtext($1), $2)", kind, slot):
            return slot
    raise WorkloadError(f"all {SLOTS} worker slots of {kind!r} are taken")


async def _worker(argv: list[str]) -> None:
    args = parse_worker_args(argv)
    kind = args.channel
    report = WorkerReport(args.mode)
    connection = await _connect(args.dsn, args.application_name)
    listener = await _connect(args.dsn, args.application_name)
    wake = asyncio.Event()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await listener.add_listener(kind, lambda *_: wake.set())
    slot = await _take_slot(connection, kind)
    mine = [shard for shard in range(SHARDS) if shard % SLOTS == slot]
    fetch = await connection.prepare(_FETCH)
    report.ready()
    try:
        while not stop.is_set():
            wake.clear()
            rows = await fetch.fetch(kind, mine, PER_SHARD)
            if rows:
                states = await connection.fetch(_STATES, kind, list({row["key"] for row in rows}))
                counts: dict[str, int] = {row["key"]: row["count"] for row in states}
                for row in rows:
                    key, seq = parse_payload(row["payload"])
                    before = counts.get(key, 0)
                    problem = out_of_order(key, seq, before)
                    if problem:
                        report.problems.append(problem)
                    counts[key] = before + 1
                await connection.execute(
                    _COMMIT, kind, [row["id"] for row in rows], list(counts), list(counts.values())
                )
                for row in rows:  # committed: the states and the deletions
                    report.handled(row["payload"])
            else:
                await until_woken_or_stopped(stop, wake, 1.0)
    finally:
        await listener.close()
        await connection.close()
    report.final()


WORKLOADS = {"W9": keyed_throughput}


if __name__ == "__main__":
    asyncio_peer_main("keyed_fifo", "the hand-written per-key FIFO", WORKLOADS, _worker)
