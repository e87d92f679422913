"""
Rolling upgrade from schema version 2 (the previous release) to this one, against a real
PostgreSQL: the previous release's own statements (tests/data/schema2_statements.py) keep
working after ``migrate``, in the same group as upgraded members, on messages either publishes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from data import schema2_statements as v2
from test_cli import with_database
from test_durable import receive_all

import pgbus
from pgbus._durable._rules import WAKE_CHANNEL
from pgbus._durable._schema import MIGRATIONS, SCHEMA_VERSION, migrate
from pgbus._pg import Connection, open_database

if TYPE_CHECKING:
    from conftest import PgHelper

OLD_MEMBER = "old-host:1:v2"


@asynccontextmanager
async def fresh_database(pg: PgHelper) -> AsyncIterator[str]:
    database = "upgrade_" + uuid.uuid4().hex[:8]
    await pg.execute(f'CREATE DATABASE "{database}"')
    try:
        yield with_database(pg.dsn, database)
    finally:
        await pg.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


async def migrate_to_version_2(connection: Connection) -> None:
    """What the previous release's ``migrate`` left: versions 1 and 2."""
    await connection.execute("CREATE SCHEMA pgbus")
    await connection.execute(
        "CREATE TABLE pgbus.migrations ("
        " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for number in (1, 2):
        await connection.execute(MIGRATIONS[number - 1])
        await connection.execute("INSERT INTO pgbus.migrations (version) VALUES ($1)", number)


async def old_claim(
    connection: Connection, channel: str, limit: int, acks: Sequence[tuple[int, int]] = ()
) -> list[tuple[int, int, str]]:
    rows = await connection.fetch(
        v2.CLAIM,
        channel,
        "g",
        OLD_MEMBER,
        limit,
        30.0,
        [a[0] for a in acks],
        [a[1] for a in acks],
        True,
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def old_publish(connection: Connection, channel: str, payloads: list[str]) -> None:
    await connection.execute(v2.STORE, channel, payloads, WAKE_CHANNEL)


async def test_a_schema_2_member_and_an_upgraded_one_share_a_group(pg: PgHelper) -> None:
    """
    Version 2 claims part of a backlog; after ``migrate`` an old and a new member share the
    group: each message claimed once, in order, acknowledged by whoever holds it, whichever
    release published it; the old janitor deletes only what was handled.
    """
    channel = "upgrade"
    async with (
        fresh_database(pg) as dsn,
        open_database(dsn, "pgbus-test") as db,
        db.connection("old member") as old,
    ):
        await migrate_to_version_2(old)
        await old.execute(v2.JOIN, channel, "g", "earliest")
        await old_publish(old, channel, [f"a{i}" for i in range(5)])
        first = await old_claim(old, channel, 3)
        assert [(r[1], r[2]) for r in first] == [(1, "a0"), (1, "a1"), (1, "a2")]
        await old_claim(old, channel, 0, [(r[0], r[1]) for r in first])

        assert await migrate(old, "the test server") == (2, SCHEMA_VERSION)

        async with pgbus.open_bus(dsn) as bus:
            for i in range(3):
                await bus.notify(channel, f"b{i}", durable=True)  # the new release
            # The old member goes on from its (xid, id) position: a3, a4, nothing twice.
            second = await old_claim(old, channel, 2)
            assert [(r[1], r[2]) for r in second] == [(1, "a3"), (1, "a4")]
            bus.add_channel("in", 10)
            await bus.bridge_in(channel, "in", durable=True, group="g")
            got = await receive_all(bus.channel("in"), 3)
            assert [m.payload for m in got] == ["b0", "b1", "b2"]
            for message in got:
                bus.ack(message)
            await old_claim(old, channel, 0, [(r[0], r[1]) for r in second])
            await old_publish(old, channel, ["c0"])  # the old release publishes
            [c0] = await receive_all(bus.channel("in"), 1)
            assert (c0.payload, c0.attempt) == ("c0", 1)
            bus.ack(c0)
        async with pgbus.open_bus(dsn) as bus:
            await bus.notify(channel, "d0", durable=True)
        assert [(r[1], r[2]) for r in await old_claim(old, channel, 10)] == [(1, "d0")]
        await old_publish(old, channel, ["e0"])  # not claimed by anyone yet
        await old.fetch(v2.DELETE_HANDLED, channel, 1000)  # the old release's janitor
        left = await old.fetch(
            "SELECT payload FROM pgbus.messages WHERE channel = $1 ORDER BY id", channel
        )
        assert "e0" in [r[0] for r in left]
        assert "d0" in [r[0] for r in left]  # still held by the old member


async def test_a_group_joined_by_schema_2_is_taken_over_by_an_upgraded_member(
    pg: PgHelper,
) -> None:
    """A group whose only members ran version 2: upgraded members resume after its position."""
    channel = "takeover"
    async with fresh_database(pg) as dsn, open_database(dsn, "pgbus-test") as db:
        async with db.connection("old member") as old:
            await migrate_to_version_2(old)
            await old.execute(v2.JOIN, channel, "g", "latest")
            await old_publish(old, channel, [f"a{i}" for i in range(4)])
            first = await old_claim(old, channel, 2)
            await old_claim(old, channel, 0, [(r[0], r[1]) for r in first])
        async with pgbus.open_bus(dsn) as bus:  # migrates to this version
            bus.add_channel("in", 10)
            await bus.bridge_in(channel, "in", durable=True, group="g")
            await bus.notify(channel, "b0", durable=True)
            got = await receive_all(bus.channel("in"), 3)
            assert [m.payload for m in got] == ["a2", "a3", "b0"]
