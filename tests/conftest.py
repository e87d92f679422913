"""
Shared fixtures: one real PostgreSQL for the whole session, and a small SQL helper per test.

The server comes from ``PGBUS_TEST_DSN``, else ``PGBUS_TEST_BACKEND=docker``, else an embedded
PostgreSQL 18 (see `pgbus.testing`). The database is never mocked and no test is skipped for want
of one. The helper talks to PostgreSQL on its own asyncpg connection, independent of the code under
test, named ``testhelper`` so that it never counts among pgbus's connections.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
import trio
import trio_asyncio

from pgbus.testing import HELPER_APPLICATION_NAME, postgres_dsn_fixture

pg_dsn = postgres_dsn_fixture(name="pg_dsn", scope="session")


def pytest_configure(config: pytest.Config) -> None:
    """
    The processes the tests start get the stop signals' default dispositions, however the suite
    was launched: a process started ignoring SIGINT (a background job of a non-interactive
    shell) or SIGHUP (nohup) passes that on, and pgbus rightly keeps ignoring them, so the
    tests that stop it with them would wait in vain. (test_cli_stop starts one under nohup on
    purpose.)
    """
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_IGN:
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, default)


class PgHelper:
    """
    SQL against the test database, for arranging and checking what a test does.

    Calls are serialised on one connection; `listen` opens a second one.
    """

    def __init__(self, connection: asyncpg.Connection, loop: Any, dsn: str) -> None:
        self.dsn = dsn
        self._connection = connection
        self._loop = loop
        self._lock = trio.Lock()

    async def _call(self, method: Any, *args: Any) -> Any:
        async with self._lock:
            return await trio_asyncio.aio_as_trio(method, loop=self._loop)(*args)

    async def execute(self, sql: str, *args: Any) -> str:
        """Run *sql*; returns the command tag (``"SELECT 1"``)."""
        return await self._call(self._connection.execute, sql, *args)  # type: ignore[no-any-return]

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._call(self._connection.fetch, sql, *args)  # type: ignore[no-any-return]

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._call(self._connection.fetchrow, sql, *args)  # type: ignore[no-any-return]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._call(self._connection.fetchval, sql, *args)

    async def server_version_num(self) -> int:
        """``150004`` for PostgreSQL 15.4, ``180006`` for 18.6."""
        return int(await self.fetchval("SELECT current_setting('server_version_num')::int"))

    async def backends(self) -> list[asyncpg.Record]:
        """
        pgbus's connections to the test database: ``pg_stat_activity`` rows whose
        ``application_name`` starts with ``pgbus`` (pid, application_name, state, query).
        """
        return await self.fetch(
            "SELECT pid, application_name, state, backend_type, query"
            " FROM pg_stat_activity"
            " WHERE starts_with(application_name, 'pgbus')"
            " AND datname = current_database() AND pid <> pg_backend_pid()"
            " ORDER BY pid"
        )

    async def wait_for_no_backends(self, timeout: float = 5.0) -> None:
        """
        Wait until `backends` is empty; a closed connection's backend takes a moment to exit.

        Raises:
            AssertionError: naming the connections still there after *timeout* seconds.
        """
        left: list[asyncpg.Record] = []
        with trio.move_on_after(timeout):
            while True:  # polling: PostgreSQL has no event for "that backend has exited"
                left = await self.backends()
                if not left:
                    return
                await trio.sleep(0.05)
        described = ", ".join(f"{row['application_name']} (pid {row['pid']})" for row in left)
        raise AssertionError(f"connections left behind after {timeout:g}s: {described}")

    @asynccontextmanager
    async def listen(
        self, *channels: str
    ) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, str, int]]]:
        """
        LISTEN on *channels* (exact names) on a connection of its own, independent of pgbus.

        Yields a receive channel of ``(channel, payload, pid)``; LISTEN is active on entry.
        """
        send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)

        def on_notification(_connection: Any, pid: int, channel: str, payload: str) -> None:
            # One may still come in after the test left the block (a republished duplicate).
            with contextlib.suppress(trio.BrokenResourceError):
                send.send_nowait((channel, payload, pid))

        async with _connect(self.dsn, self._loop) as connection:
            for channel in channels:
                await trio_asyncio.aio_as_trio(connection.add_listener, loop=self._loop)(
                    channel, on_notification
                )
            with receive:
                yield receive


@asynccontextmanager
async def _connect(dsn: str, loop: Any) -> AsyncIterator[asyncpg.Connection]:
    connection = await trio_asyncio.aio_as_trio(asyncpg.connect, loop=loop)(
        dsn, timeout=10, server_settings={"application_name": HELPER_APPLICATION_NAME}
    )
    try:
        yield connection
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await trio_asyncio.aio_as_trio(connection.close, loop=loop)(timeout=5)
            except Exception:  # the server went away under the test: drop the socket
                connection.terminate()
        if not connection.is_closed():
            connection.terminate()


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[PgHelper]:
    """A `PgHelper` on the session's test database."""
    async with trio_asyncio.open_loop() as loop, _connect(pg_dsn, loop) as connection:
        yield PgHelper(connection, loop, pg_dsn)


def require_system_tool(path: str, package: str) -> None:
    """
    Tests of a real external component (PgBouncer, Chromium) need its Debian package. CI
    installs it (.ci/run) and there its absence fails the test; on a machine that has only
    Python (the README's test command) the test is skipped, naming the package to install.
    """
    import os

    if os.path.exists(path):
        return
    message = f"{path} is missing: apt-get install -y {package}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
