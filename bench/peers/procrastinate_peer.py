"""
procrastinate with its own throughput knobs: batch defer, worker concurrency, LISTEN/NOTIFY.

- One task, ``bench_job(payload)``; each run defers to a queue of its own (the run's channel)
  with ``task.configure(queue=...).batch_defer_async(...)``, 5000 jobs a call.
- Workers: ``app.run_worker_async(queues=[queue], concurrency=16, listen_notify=True,
  fetch_job_polling_interval=0.5, delete_jobs="successful")``.
- W6: 4 worker processes; the clock stops when they have handled every job and none of this
  run's jobs is still ``todo`` or ``doing``. W7: one job at a time, one worker process.
- W10: scheduled jobs, 500 per call as pgbus and pgqueuer store them: each job made with
  ``task.configure(queue=..., schedule_in={"seconds": delay}).make_new_job(payload=...)`` and
  the 500 stored by ``app.job_manager.batch_defer_jobs_async(jobs)`` (what
  ``batch_defer_async`` calls; that one gives every job of a call the same schedule, and
  ``defer_async`` one job at a time takes the publisher about 15 s for 10,000 here). procrastinate
  turns ``schedule_in`` into ``scheduled_at`` with the client's wall clock when ``configure`` is
  called, and a worker fetches a job once ``scheduled_at <= now()`` on the server. One worker
  process. A scheduled job has no wake-up of its own: LISTEN/NOTIFY fires when it is inserted
  (not yet due), so it is found by the worker's polling, every ``fetch_job_polling_interval``
  (the docs: "the frequency of database queries for new jobs to start"). Tuned for W10 to
  0.1 s, pgqueuer's own floor between two polls, instead of the 0.5 s W6/W7 use (where the
  NOTIFY on insert makes the interval a fallback) and procrastinate's default of 5 s. The worker
  fetches one job per round trip, one fetch at a time whatever its ``concurrency``: a few
  hundred jobs a second here, fewer than the 1,000 that fall due each second in W10, so its
  lateness there is mostly its backlog. Lateness as ``_durable_tools`` defines it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import psycopg
from procrastinate import App, PsycopgConnector

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

BATCH = 5000
CONCURRENCY = 16
POLLING_INTERVAL = 0.5
"""Seconds between two fetches when no NOTIFY came (W6, W7: a fallback; procrastinate's
default is 5)."""
W10_POLLING_INTERVAL = 0.1
"""W10: scheduled jobs are found only by polling (see the module's docstring)."""
MODULE = "bench.peers.procrastinate_peer"

REPORT: WorkerReport | None = None


def _app(dsn: str, application_name: str) -> App:
    return App(
        connector=PsycopgConnector(conninfo=dsn, kwargs={"application_name": application_name})
    )


def _task(app: App) -> Any:
    @app.task(name="bench_job")
    async def bench_job(payload: str) -> None:
        assert REPORT is not None
        REPORT.handled(payload)

    return bench_job


async def _prepare(dsn: str, app: App) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        await connection.execute("SELECT pg_advisory_lock(4243)")
        exists = await (
            await connection.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        ).fetchone()
        if exists is not None and not exists[0]:
            await app.schema_manager.apply_schema_async()
        await connection.execute("SELECT pg_advisory_unlock(4243)")


async def _pending(dsn: str, queue: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        row = await (
            await connection.execute(
                "SELECT EXISTS (SELECT FROM procrastinate_jobs WHERE queue_name = %s"
                " AND status IN ('todo', 'doing'))",
                (queue,),
            )
        ).fetchone()
        return bool(row and row[0])


async def durable_throughput(args: PeerArgs) -> Result:
    expected = [str(i) for i in range(args.messages)]
    app = _app(args.dsn, args.application_name)
    task = _task(app)
    async with app.open_async():
        await _prepare(args.dsn, app)
        workers = Workers(MODULE, "W6", DEFAULT_WORKERS, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            workers.expect(args.messages)
            start = clock()
            deferrer = task.configure(queue=args.channel)
            for first in range(0, args.messages, BATCH):
                await deferrer.batch_defer_async(
                    *({"payload": p} for p in expected[first : first + BATCH])
                )
            await asyncio.to_thread(workers.wait_handled, args.timeout)
            async with asyncio.timeout(args.timeout):
                while True:  # polling: no event says the last job is done
                    if not await _pending(args.dsn, args.channel):
                        break
                    await asyncio.sleep(0.002)
            elapsed = clock() - start
        finally:
            finals = await asyncio.to_thread(workers.stop)
    result = throughput(args.messages, elapsed)
    result.update(check_finals(finals, expected, DEFAULT_WORKERS))
    return result


async def durable_latency(args: PeerArgs) -> Result:
    app = _app(args.dsn, args.application_name)
    task = _task(app)
    async with app.open_async():
        await _prepare(args.dsn, app)
        workers = Workers(MODULE, "W7", 1, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            deferrer = task.configure(queue=args.channel)
            times: list[float] = []
            for i in range(args.warmup + args.messages):
                payload = str(i)
                sent = clock()
                await deferrer.defer_async(payload=payload)
                got, at = await asyncio.to_thread(workers.events.get, True, args.timeout)
                if got != payload:
                    raise WorkloadError(f"worker handled {got!r}, expected {payload!r}")
                if i >= args.warmup:
                    times.append(at - sent)
        finally:
            await asyncio.to_thread(workers.stop)
    return latency(times)


async def delayed_lateness(args: PeerArgs) -> Result:
    delays = w10_delays(args.messages)
    due: dict[str, float] = {}
    app = _app(args.dsn, args.application_name)
    task = _task(app)
    async with app.open_async():
        await _prepare(args.dsn, app)
        workers = Workers(MODULE, "W10", 1, args)
        try:
            await asyncio.to_thread(workers.wait_ready, args.timeout)
            start = clock()
            for first in range(0, args.messages, DELAY_BATCH):
                batch = range(first, min(first + DELAY_BATCH, args.messages))
                jobs = []
                for i in batch:
                    due[str(i)] = clock() + delays[i]
                    schedule = {"seconds": delays[i]}
                    deferrer = task.configure(queue=args.channel, schedule_in=schedule)
                    jobs.append(deferrer.make_new_job(payload=str(i)))
                await app.job_manager.batch_defer_jobs_async(jobs)
                committed = clock()
                for i in batch:
                    due[str(i)] = max(due[str(i)], committed)
            return await asyncio.to_thread(
                collect_lateness, workers, due, args.timeout + MAX_DELAY, clock() - start
            )
        finally:
            await asyncio.to_thread(workers.stop)


async def _worker(argv: list[str]) -> None:
    global REPORT
    args = parse_worker_args(argv)
    REPORT = WorkerReport(args.mode)
    app = _app(args.dsn, args.application_name)
    _task(app)
    async with app.open_async():
        worker = asyncio.ensure_future(
            app.run_worker_async(
                queues=[args.channel],
                concurrency=CONCURRENCY,
                listen_notify=True,
                fetch_job_polling_interval=(
                    W10_POLLING_INTERVAL if args.mode == "W10" else POLLING_INTERVAL
                ),
                delete_jobs="successful",
                install_signal_handlers=False,
            )
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        REPORT.ready()
        await stop.wait()
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    REPORT.final()


WORKLOADS = {"W6": durable_throughput, "W7": durable_latency, "W10": delayed_lateness}


if __name__ == "__main__":
    asyncio_peer_main("procrastinate", "procrastinate", WORKLOADS, _worker)
