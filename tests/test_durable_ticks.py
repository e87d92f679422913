"""
Delivery by snapshot ticks against a real PostgreSQL: a writing transaction held open (in
another database, in this one, publishing or not) delays nothing committed meanwhile; its own
messages come once it commits, never skipped; every group sees every message, also when many
transactions commit out of order and batches span many claims.
"""

from __future__ import annotations

import random
import uuid
from typing import TYPE_CHECKING

import trio
from test_cli import with_database
from test_durable import fresh, receive_all

import pgbus
from pgbus._pg import open_database

if TYPE_CHECKING:
    from conftest import PgHelper


async def _deliver_meanwhile(pg_dsn: str, name: str) -> None:
    """Publish 20 messages one commit each; both groups get them all, in publishing order."""
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("a", 5)
        bus.add_channel("b", 50)
        await bus.bridge_in(name, "a", durable=True, group="a")
        await bus.bridge_in(name, "b", durable=True, group="b")
        for i in range(20):
            await bus.notify(name, f"m{i}", durable=True)
        for inbox in ("a", "b"):
            got = []
            while len(got) < 20:
                [message] = await receive_all(bus.channel(inbox), 1)
                got.append(message.payload)
                bus.ack(message)
            assert got == [f"m{i}" for i in range(20)]


async def test_a_writing_transaction_in_another_database_stalls_nothing(
    pg_dsn: str, pg: PgHelper
) -> None:
    """An xid held open in another database (xids are cluster-wide): messages flow meanwhile."""
    database = "long_" + uuid.uuid4().hex[:8]
    await pg.execute(f'CREATE DATABASE "{database}"')
    try:
        async with (
            open_database(with_database(pg_dsn, database), "pgbus-test") as db,
            db.connection("long transaction") as long,
            long.transaction(),
        ):
            await long.fetchval("SELECT pg_current_xact_id()")  # a writing transaction
            await _deliver_meanwhile(pg_dsn, fresh("other-db"))
    finally:
        await pg.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


async def test_a_writing_transaction_in_this_database_stalls_nothing(
    pg_dsn: str, pg: PgHelper
) -> None:
    """A transaction that wrote a row here and stays open: messages flow meanwhile."""
    table = "long_" + uuid.uuid4().hex[:8]
    await pg.execute(f"CREATE TABLE {table} (n int)")
    await pg.execute("BEGIN")
    try:
        await pg.execute(f"INSERT INTO {table} VALUES (1)")
        await _deliver_meanwhile(pg_dsn, fresh("same-db"))
    finally:
        await pg.execute("ROLLBACK")


async def test_a_long_transactions_own_messages_come_after_it_commits(pg_dsn: str) -> None:
    """Published early in a long transaction: delivered once it commits, after later ones."""
    name = fresh("late")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("a", 3)
        bus.add_channel("b", 100)
        await bus.bridge_in(name, "a", durable=True, group="a")
        await bus.bridge_in(name, "b", durable=True, group="b")
        seen: dict[str, list[str]] = {"a": [], "b": []}

        async def take(inbox: str, count: int) -> None:
            for message in await receive_all(bus.channel(inbox), count):
                seen[inbox].append(message.payload)
                bus.ack(message)

        async with bus.transaction() as long:
            for i in range(5):
                await long.publish(name, f"long{i}", durable=True)
            for i in range(10):
                await bus.notify(name, f"meanwhile{i}", durable=True)
            for inbox in ("a", "b"):
                while len(seen[inbox]) < 10:
                    await take(inbox, 1)
        for inbox in ("a", "b"):
            while len(seen[inbox]) < 15:
                await take(inbox, 1)
    expected = [f"meanwhile{i}" for i in range(10)] + [f"long{i}" for i in range(5)]
    assert seen == {"a": expected, "b": expected}


async def test_out_of_order_commits_reach_every_group_exactly_once(pg_dsn: str) -> None:
    """
    Six publishers commit 1,200 messages in transactions that overlap at random; two groups
    with a prefetch of 3 and 7 (batches span many claims) each get every message once.
    """
    name = fresh("overlap")
    rng = random.Random(18)
    plan = [[rng.randint(1, 12) for _ in range(20)] for _ in range(6)]
    total = sum(map(sum, plan))
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("a", 3)
        bus.add_channel("b", 7)
        await bus.bridge_in(name, "a", durable=True, group="a")
        await bus.bridge_in(name, "b", durable=True, group="b")
        got: dict[str, list[str]] = {"a": [], "b": []}

        async def publisher(number: int, sizes: list[int]) -> None:
            delays = random.Random(number)
            for t, size in enumerate(sizes):
                async with bus.transaction() as tx:
                    for i in range(size):
                        await tx.publish(name, f"{number}.{t}.{i}", durable=True)
                        await trio.sleep(delays.random() * 0.002)

        async def consume(inbox: str) -> None:
            while len(got[inbox]) < total:
                [message] = await receive_all(bus.channel(inbox), 1)
                got[inbox].append(message.payload)
                bus.ack(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, "a")
            nursery.start_soon(consume, "b")
            for number, sizes in enumerate(plan):
                nursery.start_soon(publisher, number, sizes)
    everything = sorted(
        f"{n}.{t}.{i}"
        for n, sizes in enumerate(plan)
        for t, size in enumerate(sizes)
        for i in range(size)
    )
    assert sorted(got["a"]) == everything
    assert sorted(got["b"]) == everything
    for inbox in ("a", "b"):  # one publisher's messages arrive in its publishing order
        for n in range(6):
            mine = [p for p in got[inbox] if p.startswith(f"{n}.")]
            assert mine == sorted(mine, key=lambda p: tuple(map(int, p.split("."))))


async def test_claims_append_positions_instead_of_rewriting_the_groups_row(
    pg_dsn: str, pg: PgHelper
) -> None:
    """
    30 claims that each move the group leave its pgbus.groups row as it was (an open
    transaction would keep every version of it), and only the newest tick row is the position.
    """
    name = fresh("append")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 1)
        await bus.bridge_in(name, "in", durable=True, group="g")
        before = await pg.fetchval(
            "SELECT xmin::text FROM pgbus.groups WHERE channel = $1 AND group_name = 'g'", name
        )
        for i in range(30):
            await bus.notify(name, f"m{i}", durable=True)
            [message] = await receive_all(bus.channel("in"), 1)
            assert message.payload == f"m{i}"
            bus.ack(message)
        after = await pg.fetchval(
            "SELECT xmin::text FROM pgbus.groups WHERE channel = $1 AND group_name = 'g'", name
        )
        assert after == before
        ticks = await pg.fetchval(
            "SELECT count(*) FROM pgbus.group_ticks WHERE channel = $1 AND group_name = 'g'", name
        )
        assert ticks >= 30
        [status] = await bus.durable_groups(name)
        assert status.lag == 0
