"""
pgqueuer, tuned as a competent user would for throughput.

- Enqueue in batches (``queries.enqueue([entrypoint] * n, payloads, [0] * n)``, 5000 a call).
- Workers: ``QueueManager.run(batch_size=500)`` (the default of 10 collapses on a deep
  backlog), one entrypoint per run (named after the run's channel), asyncpg driver.
- W6: 4 worker processes; the clock stops when they have handled every job and pgqueuer's
  queue table holds none of this run's jobs (pgqueuer deletes a job once it is done).
- W7: one job at a time (``queries.enqueue(entrypoint, payload)``), one worker process.
- W10: deferred jobs, ``queries.enqueue(..., execute_after=[timedelta, ...])`` with 500 jobs a
  call (one statement, so one transaction, as pgbus's transactions of 500); pgqueuer stores
  ``NOW() + execute_after`` (the database's clock at the statement's start) and dequeues a job
  once ``execute_after < NOW()``. One worker process, configured as for W7: pgqueuer LISTENs for
  its inserts always, and before waiting it asks the database for the next deferred job's ETA
  and sleeps that long (floored at its ``min_dequeue_poll_interval``, 0.1 s, a field it does
  not take as a parameter), so ``dequeue_timeout`` only bounds an idle wait and a smaller one
  would not make it prompter (0.1 s instead of 5: the same p50 / p99, 39 / 105 ms, here).
  Assigning ``qm.min_dequeue_poll_interval = timedelta(seconds=0.01)`` after construction, not a
  documented knob and not done here, gave p50 5.8 ms, p99 19.6 ms in one run.
  Lateness as ``_durable_tools`` defines it.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from typing import Any

import asyncpg

from ._durable_tools import (
    DEFAULT_WORKERS,
    DELAY_BATCH,
    MAX_DELAY,
    WorkerReport,
    Workers,
    asyncio_peer_main,
    check_finals,
    collect_lateness,
    parse_worker_args,
    w10_delays,
)
from ._protocol import PeerArgs, Result, WorkloadError, clock, latency, throughput

BATCH = 500
ENQUEUE_BATCH = 5000
MODULE = "bench.peers.pgqueuer_peer"


def _entrypoint(channel: str) -> str:
    return channel[:60]


async def _connect(dsn: str, application_name: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"application_name": application_name})


async def _install(connection: asyncpg.Connection) -> Any:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    queries = Queries(AsyncpgDriver(connection))
    if not await queries.has_table("pgqueuer"):
        await queries.install()
    return queries


async def durable_throughput(args: PeerArgs) -> Result:
    entrypoint = _entrypoint(args.channel)
    expected = [str(i) for i in range(args.messages)]
    connection = await _connect(args.dsn, args.application_name)
    try:
        queries = await _install(connection)
        workers = Workers(MODULE, "W6", DEFAULT_WORKERS, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            workers.expect(args.messages)
            start = clock()
            for first in range(0, args.messages, ENQUEUE_BATCH):
                chunk = expected[first : first + ENQUEUE_BATCH]
                await queries.enqueue(
                    [entrypoint] * len(chunk), [p.encode() for p in chunk], [0] * len(chunk)
                )
            await asyncio.to_thread(workers.wait_handled, args.timeout)
            async with asyncio.timeout(args.timeout):
                while True:  # polling: done jobs leave the table, no event says so
                    if not await connection.fetchval(
                        "SELECT EXISTS (SELECT FROM pgqueuer WHERE entrypoint = $1)", entrypoint
                    ):
                        break
                    await asyncio.sleep(0.002)
            elapsed = clock() - start
            rows = await connection.fetchval(
                "SELECT count(*) FROM pgqueuer_log WHERE entrypoint = $1", entrypoint
            )
            sizes = await connection.fetchrow(
                "SELECT pg_total_relation_size('pgqueuer'), pg_total_relation_size('pgqueuer_log')"
            )
        finally:
            finals = await asyncio.to_thread(workers.stop)
    finally:
        await connection.close()
    result = throughput(args.messages, elapsed)
    result.update(check_finals(finals, expected, DEFAULT_WORKERS))
    result["storage_at_end"] = {
        "log_rows": rows,
        "queue_mb": sizes[0] / 2**20,
        "log_mb": sizes[1] / 2**20,
    }
    return result


async def durable_latency(args: PeerArgs) -> Result:
    entrypoint = _entrypoint(args.channel)
    connection = await _connect(args.dsn, args.application_name)
    try:
        queries = await _install(connection)
        workers = Workers(MODULE, "W7", 1, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            times: list[float] = []
            for i in range(args.warmup + args.messages):
                payload = str(i)
                sent = clock()
                await queries.enqueue(entrypoint, payload.encode())
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


async def delayed_lateness(args: PeerArgs) -> Result:
    entrypoint = _entrypoint(args.channel)
    delays = w10_delays(args.messages)
    due: dict[str, float] = {}
    connection = await _connect(args.dsn, args.application_name)
    try:
        queries = await _install(connection)
        workers = Workers(MODULE, "W10", 1, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            start = clock()
            for first in range(0, args.messages, DELAY_BATCH):
                batch = range(first, min(first + DELAY_BATCH, args.messages))
                sent = clock()
                await queries.enqueue(
                    [entrypoint] * len(batch),
                    [str(i).encode() for i in batch],
                    [0] * len(batch),
                    execute_after=[timedelta(seconds=delays[i]) for i in batch],
                )
                committed = clock()
                for i in batch:
                    due[str(i)] = max(sent + delays[i], committed)
            return await asyncio.to_thread(
                collect_lateness, workers, due, args.timeout + MAX_DELAY, clock() - start
            )
        finally:
            await asyncio.to_thread(workers.stop)
    finally:
        await connection.close()


async def _worker(argv: list[str]) -> None:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    args = parse_worker_args(argv)
    report = WorkerReport(args.mode)
    connection = await _connect(args.dsn, args.application_name)
    qm = QueueManager(Queries(AsyncpgDriver(connection)))

    @qm.entrypoint(_entrypoint(args.channel))
    async def handle(job: Job) -> None:
        report.handled((job.payload or b"").decode())

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    asyncio.get_running_loop().call_soon(report.ready)
    try:
        await qm.run(batch_size=BATCH, dequeue_timeout=timedelta(seconds=5))
    finally:
        await connection.close()
    report.final()


WORKLOADS = {"W6": durable_throughput, "W7": durable_latency, "W10": delayed_lateness}


if __name__ == "__main__":
    asyncio_peer_main("pgqueuer", "pgqueuer", WORKLOADS, _worker)
