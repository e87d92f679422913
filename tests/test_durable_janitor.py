"""
Looking after durable channels against a real PostgreSQL: retention of every channel of the
database, locks squatted by another session (named, never waited on forever), and the durable
metrics sampled from real groups.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING

import pytest
import trio
from test_cli import with_database
from test_durable import WAIT, fresh, receive_all, wait_for

import pgbus
from pgbus._durable._admin import JANITOR_WARN_AFTER, janitor_pass
from pgbus._durable._schema import MIGRATION_LOCK, SchemaError, migrate
from pgbus._pg import open_database

if TYPE_CHECKING:
    from conftest import PgHelper


async def test_the_janitor_cleans_channels_this_process_does_not_consume(
    pg_dsn: str, pg: PgHelper
) -> None:
    """Handled messages of a channel consumed elsewhere are deleted by any process's janitor."""
    other = fresh("elsewhere")
    # No consumer here, so no janitor either.
    async with pgbus.open_bus(pg_dsn) as bus, bus.transaction() as tx:
        for i in range(10):
            await tx.publish(other, f"m{i}", durable=True)
    # A group elsewhere that has claimed and acknowledged all ten.
    await pg.execute(
        "INSERT INTO pgbus.groups (channel, group_name, position_xid, position_id, tick_from)"
        " SELECT $1, 'g', pg_snapshot_xmin(s), 0, s FROM pg_current_snapshot() AS s",
        other,
    )
    assert await pg.fetchval("SELECT count(*) FROM pgbus.messages WHERE channel = $1", other) == 10
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("mine", 5)
        await bus.bridge_in(fresh("mine"), "mine", durable=True, group="g")
        await wait_for(
            pg, "SELECT count(*) FROM pgbus.messages WHERE channel = $1", other, expect=0
        )


async def test_a_squatted_janitor_lock_is_named_after_a_few_passes(
    pg_dsn: str, pg: PgHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """Another session holds a channel's janitor lock: a warning names its pid, role and app."""
    name = fresh("squatted")
    await pg.execute("SET application_name = 'squatter'")
    pid = await pg.fetchval("SELECT pg_backend_pid()")
    await pg.execute("SELECT pg_advisory_lock(hashtextextended('pgbus.janitor:' || $1, 0))", name)
    caplog.set_level(logging.WARNING, logger="pgbus.durable")
    try:
        async with pgbus.open_bus(pg_dsn) as bus:
            await bus.notify(name, "kept", durable=True)
            skipped: dict[str, int] = {}
            async with bus._database().borrow() as connection:
                for _ in range(JANITOR_WARN_AFTER - 1):
                    await janitor_pass(connection, lambda _channel: 3600.0, skipped)
                assert name not in caplog.text
                await janitor_pass(connection, lambda _channel: 3600.0, skipped)
    finally:
        await pg.execute(
            "SELECT pg_advisory_unlock(hashtextextended('pgbus.janitor:' || $1, 0))", name
        )
        await pg.execute("RESET application_name")
    assert re.search(
        rf"janitor: retention of durable channel '{name}' skipped {JANITOR_WARN_AFTER} passes "
        rf"in a row: its lock is held by pid {pid} \(role '\w+', application_name 'squatter', "
        r"idle\)",
        caplog.text,
    ), caplog.text


async def test_migrate_waits_bounded_and_names_the_lock_holder(pg: PgHelper) -> None:
    """A session squatting the migration lock: migrate gives up after lock_timeout, naming it."""
    database = "squat_" + uuid.uuid4().hex[:8]
    await pg.execute(f'CREATE DATABASE "{database}"')
    dsn = with_database(pg.dsn, database)
    try:
        async with (
            open_database(dsn, "pgbus-test") as db,
            db.connection("squatter") as squatter,
            db.connection("migrate") as mine,
        ):
            pid = await squatter.fetchval("SELECT pg_backend_pid()")
            await squatter.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            with trio.fail_after(WAIT), pytest.raises(SchemaError) as caught:
                await migrate(mine, "the test server", lock_timeout=0.5)
            assert re.match(
                r"^waited 0\.5s for pgbus's migration lock at the test server; it is held "
                rf"by pid {pid} \(role '\w+', application_name 'pgbus-test:squatter', "
                r"idle\): end that session or let it finish, then migrate again\.$",
                str(caught.value),
            ), str(caught.value)
            await squatter.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
            assert (await migrate(mine, "the test server"))[0] == 0
    finally:
        await pg.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


async def test_durable_metrics_come_from_real_groups(pg_dsn: str, pg: PgHelper) -> None:
    """/metrics has lag, in-flight and dead letters for each group of a consumed channel."""
    from test_metrics import get, samples, serving, value

    name = fresh("metered")
    async with pgbus.open_bus(pg_dsn) as bus, serving(bus) as url:
        bus.add_channel("a", 3)
        bus.add_channel("b", 10)
        await bus.bridge_in(name, "a", durable=True, group="slow")
        await bus.bridge_in(name, "b", durable=True, group="fast", max_attempts=1)
        for i in range(10):
            await bus.notify(name, f"m{i}", durable=True)
        got = await receive_all(bus.channel("b"), 10)
        bus.nack(got[0], "no")  # max_attempts 1: a dead letter
        for message in got[1:]:
            bus.ack(message)
        await wait_for(
            pg,
            "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1 AND group_name = 'fast'"
            " AND available_at = 'infinity'",
            name,
            expect=1,
        )
        await wait_for(
            pg, "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1", name, expect=4
        )
        status, text = await get(f"{url}/metrics")
    assert status == 200
    scraped = samples(text)
    slow = {"channel": name, "group": "slow"}
    fast = {"channel": name, "group": "fast"}
    assert value(scraped, "pgbus_durable_lag", **slow) == 7
    assert value(scraped, "pgbus_durable_in_flight", **slow) == 3
    assert value(scraped, "pgbus_dead_letters", **slow) == 0
    assert value(scraped, "pgbus_durable_lag", **fast) == 0
    assert value(scraped, "pgbus_durable_in_flight", **fast) == 0
    assert value(scraped, "pgbus_dead_letters", **fast) == 1
