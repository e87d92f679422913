"""
DBOS (``dbos`` on PyPI) for W9: a partitioned queue with concurrency 1 per partition key.

Written as DBOS's documentation shows it (queue tutorial, "Partitioning Queues"; datasources
reference), with the API of the installed release (3.x: queues are registered in the system
database):

- Each of the 4 worker processes is a DBOS application (``DBOS(config=...)``, its own
  ``executor_id``) that registers the queue with ``DBOS.register_queue(name,
  partition_concurrency=1, worker_concurrency=WORKER_CONCURRENCY,
  polling_interval_sec=POLLING_INTERVAL)`` and runs a workflow per message. The workflow runs one
  datasource transaction (``SQLAlchemyDatasource``, the application database: the bench's) that
  adds 1 to its key's count and returns the count before it; DBOS records the transaction's
  output in the same database transaction, so a message's effect commits exactly once.
- The publisher enqueues from outside the application with ``DBOSClient``: every message is one
  workflow with ``queue_partition_key`` = its key, enqueued in transactions of up to 1000 with
  ``enqueue_in_transaction`` (one INSERT per workflow; DBOS has no public bulk enqueue). A
  transaction never holds two messages of one key: DBOS orders a partition by ``created_at``,
  the enqueueing transaction's ``now()``, and breaks ties by the random workflow id.
- The system database is a database of its own per run (``<channel>_dbos``), created and
  migrated by the publisher before the workers start, dropped at the end.
- The clock stops when the workers have handled every message and DBOS lists no workflow of the
  queue as ENQUEUED or PENDING.

Tuning, as a competent user would after reading the docs: the default polling interval (1 s)
would leave the queue idle most of a run, so it is 0.05 s; an unbounded worker concurrency would
start one thread per claimed partition (the executor's pool is unbounded), so it is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._durable_tools import DEFAULT_WORKERS, WorkerReport, Workers, parse_worker_args
from ._keyed_tools import (
    KeyedMessage,
    check_counts,
    check_keyed_finals,
    keyed_messages,
    out_of_order,
)
from ._protocol import (
    PeerArgs,
    PeerUnavailableError,
    Result,
    WorkloadError,
    clock,
    run_peer,
    throughput,
)

MODULE = "bench.peers.dbos_peer"
APP_NAME = "bench-dbos"
APP_VERSION = "bench-w9"
WORKFLOW = "bench_w9_handle"
WORKER_CONCURRENCY = 8
SYSTEM_POOL = 6
APP_POOL = 4
"""Connections per worker process: the server's 100 are shared with the rest of the bench."""
POLLING_INTERVAL = 0.05
ENQUEUE_BATCH = 1000

_CREATE_STATE = """
CREATE TABLE IF NOT EXISTS bench_dbos_state (
    kind text NOT NULL, key text NOT NULL, count int NOT NULL, PRIMARY KEY (kind, key)
)
"""
_COUNT = """
INSERT INTO bench_dbos_state (kind, key, count) VALUES (:kind, :key, 1)
ON CONFLICT (kind, key) DO UPDATE SET count = bench_dbos_state.count + 1
RETURNING count
"""


def _with_database(dsn: str, database: str, application_name: str) -> str:
    parts = urlsplit(dsn)
    query = f"application_name={application_name}"
    query = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(path=f"/{database}", query=query))


def _database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/") or "postgres"


def _urls(dsn: str, channel: str, application_name: str) -> tuple[str, str]:
    """The system database's URL (a database per run) and the application database's."""
    system = _with_database(dsn, f"{channel}_dbos", application_name)
    return system, _with_database(dsn, _database_of(dsn), application_name)


def _admin(dsn: str, application_name: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, application_name=application_name)


def keyed_throughput(args: PeerArgs) -> Result:
    try:
        import dbos
    except ImportError as exc:
        raise PeerUnavailableError(f"dbos is not installed ({exc})") from None
    kind = args.channel
    queue = args.channel
    stream = keyed_messages(args.messages, args.keys)
    system_url, app_url = _urls(args.dsn, args.channel, args.application_name)
    system_db = f"{args.channel}_dbos"
    with contextlib.closing(_admin(args.dsn, args.application_name)) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{system_db}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{system_db}"')
        try:
            admin.execute("SELECT pg_advisory_lock(4244)")
            try:
                admin.execute(_CREATE_STATE)
            finally:
                admin.execute("SELECT pg_advisory_unlock(4244)")
            dbos.DBOS.migrate(system_url)
            dbos.SQLAlchemyDatasource.migrate(app_url)
            result = _run(args, kind, queue, stream, system_url)
            rows = admin.execute(
                "SELECT key, count FROM bench_dbos_state WHERE kind = %s", (kind,)
            ).fetchall()
            admin.execute("DELETE FROM bench_dbos_state WHERE kind = %s", (kind,))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{system_db}" WITH (FORCE)')
    check_counts(dict(rows), stream)
    return result


def _run(
    args: PeerArgs, kind: str, queue: str, stream: list[KeyedMessage], system_url: str
) -> Result:
    import sqlalchemy as sa
    from dbos import DBOSClient, EnqueueOptions

    client = DBOSClient(system_database_url=system_url, application_name=APP_NAME)
    engine = sa.create_engine(system_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        workers = Workers(MODULE, "W9", DEFAULT_WORKERS, args)
        try:
            workers.wait_ready(args.timeout)
            workers.expect(args.messages)
            start = clock()
            for batch in _transactions(stream):
                with engine.begin() as connection:
                    for message in batch:
                        options: EnqueueOptions = {
                            "queue_name": queue,
                            "workflow_name": WORKFLOW,
                            "queue_partition_key": message.key,
                            "app_version": APP_VERSION,
                        }
                        client.enqueue_in_transaction(
                            connection, options, kind, message.key, message.seq
                        )
            published = clock() - start
            workers.wait_handled(args.timeout)
            deadline = time.monotonic() + args.timeout
            while client.list_queued_workflows(
                queue_name=queue,
                status=["ENQUEUED", "PENDING"],
                limit=1,
                load_input=False,
                load_output=False,
            ):
                if time.monotonic() > deadline:
                    raise WorkloadError("DBOS still lists workflows as queued or pending")
                time.sleep(0.002)
            elapsed = clock() - start
        finally:
            finals = workers.stop()
    finally:
        engine.dispose()
        client.destroy()
    result = throughput(args.messages, elapsed)
    result.update(check_keyed_finals(finals, stream, DEFAULT_WORKERS))
    result["keys"] = args.keys
    result["publish_seconds"] = published
    return result


def _transactions(stream: list[KeyedMessage]) -> list[list[KeyedMessage]]:
    """
    The stream cut into enqueueing transactions of at most ENQUEUE_BATCH, none holding two
    messages of one key: DBOS orders a partition by ``created_at``, the enqueueing transaction's
    ``now()`` (same for all its rows, ties broken by the random workflow id).
    """
    batches: list[list[KeyedMessage]] = [[]]
    keys: set[str] = set()
    for message in stream:
        if len(batches[-1]) >= ENQUEUE_BATCH or message.key in keys:
            batches.append([])
            keys.clear()
        batches[-1].append(message)
        keys.add(message.key)
    return batches


def _worker(argv: list[str]) -> None:
    from dbos import DBOS, DBOSConfig, SQLAlchemyDatasource
    from sqlalchemy import text

    args = parse_worker_args(argv)
    report = WorkerReport(args.mode)
    system_url, app_url = _urls(args.dsn, args.channel, args.application_name)
    config: DBOSConfig = {
        "name": APP_NAME,
        "system_database_url": system_url,
        "executor_id": f"worker-{os.getpid()}",
        "application_version": APP_VERSION,
        "log_level": "WARNING",
        "run_migrations": False,
        "sys_db_pool_size": SYSTEM_POOL,
    }
    DBOS(config=config)
    app_db = SQLAlchemyDatasource.create(
        app_url, engine_kwargs={"pool_size": APP_POOL, "max_overflow": 0}, run_migrations=False
    )

    # Partition concurrency 1 already makes a key's messages run one at a time.
    @app_db.transaction(isolation_level="READ COMMITTED")
    def count_message(kind: str, key: str) -> int:
        row = app_db.sql_session().execute(text(_COUNT), {"kind": kind, "key": key}).one()
        return int(row[0]) - 1

    @DBOS.workflow(name=WORKFLOW)
    def handle(kind: str, key: str, seq: int) -> None:
        before = count_message(kind, key)
        problem = out_of_order(key, seq, before)
        if problem:
            report.problems.append(problem)
        report.handled(f"{key}:{seq}")

    stop = threading.Event()
    DBOS.launch()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    DBOS.register_queue(
        args.channel,
        partition_concurrency=1,
        worker_concurrency=WORKER_CONCURRENCY,
        polling_interval_sec=POLLING_INTERVAL,
    )
    report.ready()
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=5)
    report.final()


def main() -> None:
    logging.getLogger("dbos").setLevel(logging.WARNING)
    if sys.argv[1:2] == ["worker"]:
        _worker(sys.argv[2:])
        return

    def run(args: PeerArgs) -> Result:
        if args.workload != "W9":
            raise PeerUnavailableError("DBOS runs only W9")
        return keyed_throughput(args)

    raise SystemExit(run_peer("dbos", run, sys.argv[1:]))


if __name__ == "__main__":
    main()
