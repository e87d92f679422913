"""
The limit: a bare table queue on asyncpg, nothing a library adds (no retries, no groups).

- Table ``bench_bare_queue (id bigserial, channel text, payload text)``; publishing is one
  ``INSERT ... SELECT unnest($2::text[])`` plus one ``pg_notify`` per batch of 5000.
- Workers: ``DELETE ... WHERE id IN (SELECT id ... ORDER BY id FOR UPDATE SKIP LOCKED
  LIMIT 100) RETURNING payload`` (claim and acknowledge at once: at-most-once if a worker dies
  mid-batch), a wake-up NOTIFY when the queue is empty, a 1 s poll as safety net.
"""

from __future__ import annotations

import asyncio
import signal

import asyncpg

from ._asyncio_tools import until_woken_or_stopped
from ._durable_tools import (
    DEFAULT_WORKERS,
    WorkerReport,
    Workers,
    asyncio_peer_main,
    check_finals,
    parse_worker_args,
)
from ._protocol import PeerArgs, Result, WorkloadError, clock, latency, throughput

BATCH = 5000
DEQUEUE = 100
MODULE = "bench.peers.bare_queue"

_CREATE = """
CREATE TABLE IF NOT EXISTS bench_bare_queue (
    id bigserial PRIMARY KEY, channel text NOT NULL, payload text NOT NULL
);
CREATE INDEX IF NOT EXISTS bench_bare_queue_channel ON bench_bare_queue (channel, id);
"""
_ENQUEUE = """
WITH stored AS (
    INSERT INTO bench_bare_queue (channel, payload) SELECT $1, p FROM unnest($2::text[]) AS p
)
SELECT pg_notify($1, '')
"""
_DEQUEUE = """
DELETE FROM bench_bare_queue WHERE id IN (
    SELECT id FROM bench_bare_queue WHERE channel = $1 ORDER BY id FOR UPDATE SKIP LOCKED LIMIT $2
) RETURNING payload
"""


async def _connect(dsn: str, application_name: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"application_name": application_name})


async def _prepare(connection: asyncpg.Connection) -> None:
    await connection.execute("SELECT pg_advisory_lock(4242)")
    try:
        await connection.execute(_CREATE)
    finally:
        await connection.execute("SELECT pg_advisory_unlock(4242)")


async def durable_throughput(args: PeerArgs) -> Result:
    expected = [str(i) for i in range(args.messages)]
    connection = await _connect(args.dsn, args.application_name)
    try:
        await _prepare(connection)
        workers = Workers(MODULE, "W6", DEFAULT_WORKERS, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            workers.expect(args.messages)
            start = clock()
            for first in range(0, args.messages, BATCH):
                await connection.execute(_ENQUEUE, args.channel, expected[first : first + BATCH])
            await asyncio.to_thread(workers.wait_handled, args.timeout)
            elapsed = clock() - start  # deleted when claimed: handled is acknowledged
            size = await connection.fetchval("SELECT pg_total_relation_size('bench_bare_queue')")
        finally:
            finals = await asyncio.to_thread(workers.stop)
    finally:
        await connection.close()
    result = throughput(args.messages, elapsed)
    result.update(check_finals(finals, expected, DEFAULT_WORKERS))
    result["storage_at_end"] = {"rows": 0, "queue_mb": size / 2**20}
    return result


async def durable_latency(args: PeerArgs) -> Result:
    connection = await _connect(args.dsn, args.application_name)
    try:
        await _prepare(connection)
        workers = Workers(MODULE, "W7", 1, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            times: list[float] = []
            for i in range(args.warmup + args.messages):
                payload = str(i)
                sent = clock()
                await connection.execute(_ENQUEUE, args.channel, [payload])
                got, at = await asyncio.to_thread(workers.events.get, True, args.timeout)
                if got != payload:
                    raise WorkloadError(f"worker handled {got!r}, expected {payload!r}")
                if i >= args.warmup:
                    times.append(at - sent)
        finally:
            await asyncio.to_thread(workers.stop)
    finally:
        await connection.close()
    return latency(times)


async def _worker(argv: list[str]) -> None:
    args = parse_worker_args(argv)
    report = WorkerReport(args.mode)
    connection = await _connect(args.dsn, args.application_name)
    listener = await _connect(args.dsn, args.application_name)
    wake = asyncio.Event()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await listener.add_listener(args.channel, lambda *_: wake.set())
    report.ready()
    try:
        while not stop.is_set():
            wake.clear()
            rows = await connection.fetch(_DEQUEUE, args.channel, DEQUEUE)
            for row in rows:
                report.handled(row[0])
            if not rows:
                await until_woken_or_stopped(stop, wake, 1.0)
    finally:
        await listener.close()
        await connection.close()
    report.final()


WORKLOADS = {"W6": durable_throughput, "W7": durable_latency}


if __name__ == "__main__":
    asyncio_peer_main("bare_queue", "the bare queue", WORKLOADS, _worker)
