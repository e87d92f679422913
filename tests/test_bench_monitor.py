"""The bench harness cleans up after its own peers only, never another database's backends."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.server import Monitor


def in_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


def test_leftover_backends_ignores_other_databases(pg_dsn: str) -> None:
    """A "bench-..." backend in another database (a bench sharing the server) is left alone."""
    foreign = psycopg.connect(
        in_database(pg_dsn, "template1"), application_name="bench-elsewhere", autocommit=True
    )
    monitor = Monitor(pg_dsn)
    try:
        assert monitor.leftover_backends(within=0) == []
        assert foreign.execute("SELECT 1").fetchone() == (1,)
    finally:
        monitor.close()
        foreign.close()


def test_leftover_backends_ends_this_databases_peers(pg_dsn: str) -> None:
    """A peer's backend left in the bench's own database is reported and terminated."""
    left = psycopg.connect(pg_dsn, application_name="bench-leftover", autocommit=True)
    pid = left.info.backend_pid
    monitor = Monitor(pg_dsn)
    try:
        assert monitor.leftover_backends(within=0) == [f"bench-leftover (pid {pid})"]
    finally:
        monitor.close()
        left.close()
