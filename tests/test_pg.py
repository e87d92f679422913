"""
The PostgreSQL adapter and its driver seam, against a real PostgreSQL.

pgbus drives asyncpg below its public API (design, section 8). These tests prove the fast path
is really on for plain sockets, that each hook behaves (the sink is called by the parser, loss is
reported), and that a missing hook falls back to asyncpg's public path with one warning, the bus
still working.
"""

from __future__ import annotations

import itertools
import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import pgbus
from pgbus import _pg

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 10


@asynccontextmanager
async def database(dsn: str, keepalive: float = 10.0) -> AsyncIterator[_pg.Database]:
    async with _pg.open_database(dsn, "pgbus", keepalive=keepalive) as db:
        yield db


async def test_the_fast_path_is_on_for_a_plain_socket(pg_dsn: str) -> None:
    """On a plain TCP or unix socket every fast path is on, and a statement works through it."""
    async with database(pg_dsn) as db, db.connection("test") as connection:
        assert db.fast is True
        assert connection.driven is True
        assert connection.driven_statements is True
        assert connection.fast_notifications is True
        assert await connection.fetchval("SELECT 40 + 2") == 42


async def test_the_parser_calls_the_sink_directly(pg: PgHelper, pg_dsn: str) -> None:
    """A notification reaches the sink inside the socket read that parsed it."""
    name = f"seam_{uuid.uuid4().hex[:8]}"
    seen: list[tuple[int, str, str]] = []
    async with database(pg_dsn) as db:
        connection = await db.connect("listen", sink=lambda *n: seen.append(n))
        try:
            await connection.listen([name])
            sender = await pg.fetchval("SELECT pg_backend_pid()")
            await pg.execute("SELECT pg_notify($1, 'hi')", name)
            with trio.fail_after(WAIT):
                while not seen:
                    await connection.receive()
        finally:
            await connection.aclose()
    assert seen == [(sender, name, "hi")]


async def test_a_lost_connection_is_reported_at_once(pg: PgHelper, pg_dsn: str) -> None:
    """The backend terminated: on_lost is called, without any statement or keepalive."""
    lost = trio.Event()
    async with database(pg_dsn) as db:
        connection = await db.connect("listen", sink=lambda *n: None, on_lost=lambda c: lost.set())
        assert connection.pid in db.own_pids
        await pg.execute("SELECT pg_terminate_backend($1)", connection.pid)
        with trio.fail_after(WAIT):
            while not connection.closed:
                await connection.receive()  # the listener's read, which sees the EOF
            await lost.wait()
        connection.abort()
        assert connection.pid not in db.own_pids


async def test_closing_a_connection_forgets_its_pid(pg_dsn: str) -> None:
    """The connection, not its callers, keeps own_pids right."""
    async with database(pg_dsn) as db:
        async with db.borrow() as connection:
            pid = connection.pid
            assert pid in db.own_pids
        assert pid in db.own_pids  # idle in the pool, still ours
        await db.close_idle()
        assert db.own_pids == set()


async def test_a_missing_hook_falls_back_to_the_public_path_with_one_warning(
    pg: PgHelper, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Were a hook gone in some asyncpg release, the bus would still work, slower, and say so."""
    monkeypatch.setattr(_pg, "_fast_path_problem", lambda raw: "a hook was removed (test)")
    caplog.set_level(logging.WARNING, logger="pgbus")
    name = f"seam_{uuid.uuid4().hex[:8]}"
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", math.inf)
        bus.add_channel("out", math.inf)
        await bus.bridge_in(name, "in")
        await bus.bridge_out("out", name)
        for i in range(3):
            await bus.send("out", f"m{i}")
        with trio.fail_after(WAIT):
            payloads = [(await bus.channel("in").receive()).payload for _ in range(3)]
        async with bus.transaction() as tx:
            assert await tx.fetchval("SELECT 1") == 1
        assert await bus.listening_channels() == {name}
    assert payloads == ["m0", "m1", "m2"]
    warnings = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "a hook was removed (test)" in warnings[0]
    await pg.wait_for_no_backends()


async def test_a_statement_the_driver_cannot_drive_falls_back(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The behaviour check at connect: a statement that fails on the fast path switches it off."""

    def refuse(awaited: object) -> object:
        raise _pg._SeamError(f"asyncpg awaited {awaited!r}")

    monkeypatch.setattr(_pg, "_as_future", refuse)
    caplog.set_level(logging.WARNING, logger="pgbus")
    async with database(pg_dsn) as db, db.connection("test") as connection:
        assert db.fast is False
        assert connection.driven_statements is False
        assert await connection.fetchval("SELECT 7") == 7
    assert any("driving a statement failed" in r.getMessage() for r in caplog.records)


async def test_an_unreachable_server_names_the_connection_and_the_server(pg_dsn: str) -> None:
    """A connection error says which connection and which server, never the password."""
    async with database("postgresql://someone:secret@127.0.0.1:1/nowhere", keepalive=2) as db:
        with pytest.raises(pgbus.DatabaseUnavailableError) as caught:
            await db.connect("publish orders")
    message = str(caught.value)
    assert "127.0.0.1:1/nowhere" in message
    assert "secret" not in message
    assert caught.value.fatal is False


async def test_a_refused_setting_is_fatal_at_connect(pg_dsn: str) -> None:
    """An error retrying cannot fix (an unknown server setting in the DSN) is not retried."""
    separator = "&" if "?" in pg_dsn else "?"
    async with database(f"{pg_dsn}{separator}no_such_setting=1") as db:
        with pytest.raises(pgbus.DatabaseUnavailableError) as caught:
            await db.connect("test")
    assert caught.value.fatal is True


async def test_backoff_warns_at_each_step_up_to_its_cap_then_once_per_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While the server stays down: a warning per doubling step, then one per 5 s; never 0.0s."""
    from pgbus._pg import Backoff, retrying_in

    backoff = Backoff(initial=0.05, maximum=5.0)
    warned_at: list[float] = []
    said: list[str] = []
    start = trio.current_time()
    while trio.current_time() - start < 60:
        delay = backoff.next_delay()
        if backoff.should_warn():
            warned_at.append(trio.current_time() - start)
            said.append(retrying_in(delay, backoff.failures))
        await trio.sleep(delay)
    steps = [at for at in warned_at if at < 6.4]  # the ceiling grows for 8 steps
    assert len(steps) >= 8
    late = [at for at in warned_at if at >= 20]
    # At the cap: one warning per 5 s, said at the first retry after that (up to 5 s later).
    assert all(5.0 <= b - a <= 10.0 for a, b in itertools.pairwise(late))
    assert len(late) >= 4
    assert said[0] == "retrying now (1 failed attempt)"
    assert not any("in 0.00s" in line for line in said)
