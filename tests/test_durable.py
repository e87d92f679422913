"""
Durable channels against a real PostgreSQL: groups, sharing, acknowledgements, retries, dead
letters, leases, exactly-once effects, payload sizes, retention, migrations.

Each test uses channel names of its own (the schema is shared by the session's database).
"""

from __future__ import annotations

import math
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
from test_cli import with_database

import pgbus
from pgbus._durable._schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 20


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def receive_all(channel: pgbus.Channel, count: int) -> list[pgbus.DurableMessage]:
    got: list[pgbus.DurableMessage] = []
    with trio.fail_after(WAIT):
        while len(got) < count:
            message = await channel.receive()
            assert isinstance(message, pgbus.DurableMessage)
            got.append(message)
    return got


class Collect(pgbus.Actor):
    """Appends each payload to a shared list; signals when *until* payloads arrived."""

    def __init__(self, seen: list[Any], until: int, done: trio.Event) -> None:
        self.seen = seen
        self.until = until
        self.done = done

    async def handle(self, message: pgbus.DurableMessage) -> None:
        self.seen.append(message.payload)
        if len(self.seen) >= self.until:
            self.done.set()


async def wait_for(pg: PgHelper, sql: str, *args: Any, expect: Any) -> None:
    """Poll *sql* until it returns *expect* (PostgreSQL has no event for a committed ack)."""
    with trio.fail_after(WAIT):
        while True:
            if await pg.fetchval(sql, *args) == expect:
                return
            await trio.sleep(0.02)


async def test_each_group_gets_every_message_in_order(pg_dsn: str) -> None:
    """Two groups on one channel each receive all 300 messages, in publishing order."""
    name = fresh("orders")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("a", 50)
        bus.add_channel("b", 1000)
        bus.add_channel("out", math.inf)
        await bus.bridge_in(name, "a", durable=True, group="billing")
        await bus.bridge_in(name, "b", durable=True, group="shipping")
        await bus.bridge_out("out", name, durable=True)
        for i in range(300):
            await bus.send("out", f"m{i}")
        for inbox in ("a", "b"):
            got: list[pgbus.DurableMessage] = []
            while len(got) < 300:
                batch = await receive_all(bus.channel(inbox), 1)
                got += batch
                bus.ack(batch[0])
            assert [m.payload for m in got] == [f"m{i}" for i in range(300)]
            assert {m.attempt for m in got} == {1}
            assert {m.channel for m in got} == {name}
            assert [m.id for m in got] == sorted(m.id for m in got)


async def test_prefetch_is_the_channel_capacity(pg_dsn: str, pg: PgHelper) -> None:
    """A bridge never claims more than its channel holds: 3 in flight while nobody reads."""
    name = fresh("prefetch")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 3)
        await bus.bridge_in(name, "in", durable=True, group="g")
        for i in range(10):
            await bus.notify(name, f"p{i}", durable=True)
        await wait_for(
            pg,
            "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1",
            name,
            expect=3,
        )
        assert bus.channel("in").statistics().buffered == 3
        [status] = await bus.durable_groups(name)
        assert (status.lag, status.in_flight, status.dead_letters) == (7, 3, 0)


async def test_members_of_a_group_share_without_double_delivery(pg_dsn: str) -> None:
    """Two buses in one group: 1000 messages split between them, each handled exactly once."""
    name = fresh("shared")
    seen: list[Any] = []
    done = trio.Event()
    async with pgbus.open_bus(pg_dsn) as one, pgbus.open_bus(pg_dsn) as two:
        for bus in (one, two):
            bus.add_channel("in", 20)
            await bus.bridge_in(name, "in", durable=True, group="workers", codec="json")
            await bus.spawn(
                Collect,
                name="worker",
                inbox="in",
                options={"seen": seen, "until": 1000, "done": done},
            )
        one.add_channel("out", math.inf)
        await one.bridge_out("out", name, durable=True, codec="json")
        for i in range(1000):
            await one.send("out", {"n": i})
        with trio.fail_after(WAIT):
            await done.wait()
        stats = [
            b
            for bus in (one, two)
            for b in bus.statistics().bridges
            if b.postgres == name and b.direction == "in"
        ]
    assert sorted(p["n"] for p in seen) == list(range(1000))
    delivered = [s.messages for s in stats]
    assert sum(delivered) == 1000
    assert all(count > 0 for count in delivered), delivered


async def test_a_group_joining_late_starts_at_latest_or_earliest(pg_dsn: str) -> None:
    """'latest' skips what was published before the group existed; 'earliest' gets it."""
    name = fresh("late")
    async with pgbus.open_bus(pg_dsn) as bus:
        await bus.notify(name, "before", durable=True)
        bus.add_channel("latest", 10)
        bus.add_channel("earliest", 10)
        await bus.bridge_in(name, "latest", durable=True, group="new")
        await bus.bridge_in(name, "earliest", durable=True, group="old", start="earliest")
        await bus.notify(name, "after", durable=True)
        assert [m.payload for m in await receive_all(bus.channel("latest"), 1)] == ["after"]
        got = await receive_all(bus.channel("earliest"), 2)
        assert [m.payload for m in got] == ["before", "after"]


async def test_a_consumer_that_was_down_gets_everything_when_back(pg_dsn: str) -> None:
    """Published while no member runs: all of it arrives once one joins again, nothing twice."""
    name = fresh("down")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 100)
        await bus.bridge_in(name, "in", durable=True, group="g")
        await bus.notify(name, "first", durable=True)
        [first] = await receive_all(bus.channel("in"), 1)
        bus.ack(first)
    async with pgbus.open_bus(pg_dsn) as bus:
        for i in range(50):
            await bus.notify(name, f"while down {i}", durable=True)
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 100)
        await bus.bridge_in(name, "in", durable=True, group="g")
        got = await receive_all(bus.channel("in"), 50)
        assert [m.payload for m in got] == [f"while down {i}" for i in range(50)]
        with trio.move_on_after(0.3):
            extra = await bus.channel("in").receive()
            pytest.fail(f"delivered again: {extra!r}")


async def test_large_payload_round_trips(pg_dsn: str) -> None:
    """200 KB (beyond NOTIFY's 8000 bytes) goes through a durable channel byte for byte."""
    name = fresh("large")
    payload = "é" * 100_000 + "x" * 3
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 2)
        await bus.bridge_in(name, "in", durable=True, group="g")
        await bus.notify(name, payload, durable=True)
        [message] = await receive_all(bus.channel("in"), 1)
        assert message.payload == payload


async def test_payload_over_the_durable_limit_is_refused_before_sending(pg_dsn: str) -> None:
    """The limit is configurable; over it, one clear error and nothing stored."""
    name = fresh("limit")
    async with pgbus.open_bus(pg_dsn, durable_max_payload=1000) as bus:
        with pytest.raises(
            pgbus.PayloadTooLargeError,
            match=rf"^payload for channel '{name}' is 1001 bytes once encoded; durable channels "
            r"accept at most 1000 \(open_bus durable_max_payload\)\.",
        ):
            await bus.notify(name, "x" * 1001, durable=True)


async def test_handle_returning_acknowledges_and_raising_retries_then_dead_letters(
    pg_dsn: str, pg: PgHelper
) -> None:
    """A message whose handle always raises is tried max_attempts times, then dead-lettered."""
    name = fresh("poison")
    attempts: list[tuple[str, int]] = []
    done = trio.Event()

    class Picky(pgbus.Actor):
        async def handle(self, message: pgbus.DurableMessage) -> None:
            attempts.append((message.payload, message.attempt))
            if message.payload == "bad":
                if message.attempt == 3:
                    done.set()
                raise ValueError("cannot handle bad")

    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in", durable=True, group="g", max_attempts=3, retry_after=0.05)
        await bus.spawn(Picky, name="picky", inbox="in")
        await bus.notify(name, "good", durable=True)
        await bus.notify(name, "bad", durable=True)
        with trio.fail_after(WAIT):
            await done.wait()
        await wait_for(
            pg,
            "SELECT count(*) FROM pgbus.deliveries"
            " WHERE channel = $1 AND available_at = 'infinity'",
            name,
            expect=1,
        )
        [status] = await bus.durable_groups(name)
        assert (status.lag, status.in_flight, status.dead_letters) == (0, 0, 1)
        assert bus.statistics().actors[0].restarts == 0
    assert attempts == [("good", 1), ("bad", 1), ("bad", 2), ("bad", 3)]
    error = await pg.fetchval("SELECT last_error FROM pgbus.deliveries WHERE channel = $1", name)
    assert error == "ValueError: cannot handle bad"


async def test_an_unacknowledged_message_stays_with_its_live_member(
    pg_dsn: str, pg: PgHelper
) -> None:
    """Held past its lease (0.3 s) by a live member: renewed, not claimed again, then acked."""
    name = fresh("lease")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 5)
        await bus.bridge_in(name, "in", durable=True, group="g", lease=0.3)
        await bus.notify(name, "slow", durable=True)
        [first] = await receive_all(bus.channel("in"), 1)
        with trio.move_on_after(1.5):
            again = await bus.channel("in").receive()
            pytest.fail(f"claimed again while held: {again!r}")
        assert await pg.fetchval(
            "SELECT available_at > now() FROM pgbus.deliveries WHERE channel = $1", name
        )
        bus.ack(first)
        await wait_for(
            pg, "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1", name, expect=0
        )


async def test_bus_exit_gives_back_unhandled_claims_at_once(pg_dsn: str, pg: PgHelper) -> None:
    """Leaving the bus releases what it had claimed (attempt not counted), no lease wait."""
    name = fresh("release")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 5)
        await bus.bridge_in(name, "in", durable=True, group="g", lease=600)
        for i in range(3):
            await bus.notify(name, f"r{i}", durable=True)
        got = await receive_all(bus.channel("in"), 3)
        bus.ack(got[0])
    rows = await pg.fetch(
        "SELECT member, attempts, available_at <= now() AS due FROM pgbus.deliveries"
        " WHERE channel = $1",
        name,
    )
    assert [(r["member"], r["attempts"], r["due"]) for r in rows] == [(None, 0, True)] * 2
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 5)
        await bus.bridge_in(name, "in", durable=True, group="g")
        again = await receive_all(bus.channel("in"), 2)
        assert [(m.payload, m.attempt) for m in again] == [("r1", 1), ("r2", 1)]


async def test_transaction_ack_commits_with_the_effects(pg_dsn: str, pg: PgHelper) -> None:
    """bus.transaction(ack=m): a rolled-back handler leaves the message; a committed one not."""
    name = fresh("exactly")
    table = "effects_" + uuid.uuid4().hex[:8]
    await pg.execute(f"CREATE TABLE {table} (id bigint, payload text)")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 5)
        await bus.bridge_in(name, "in", durable=True, group="g", retry_after=0.05)
        await bus.notify(name, "once", durable=True)
        [message] = await receive_all(bus.channel("in"), 1)
        with pytest.raises(RuntimeError, match=r"^crash$"):  # noqa: PT012
            async with bus.transaction(ack=message) as tx:
                await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", message.id, "x")
                raise RuntimeError("crash")
        assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 0
        async with bus.transaction(ack=message) as tx:
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", message.id, message.payload)
        with pytest.raises(pgbus.LeaseLostError, match=r"no longer held by this member"):
            async with bus.transaction(ack=message) as tx:
                pass
    assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 1
    assert await pg.fetchval("SELECT count(*) FROM pgbus.deliveries WHERE channel = $1", name) == 0


async def test_outbox_publish_is_visible_only_after_commit(pg_dsn: str) -> None:
    """Transaction.publish(durable=True): stored with the caller's writes; rollback: nothing."""
    name = fresh("outbox")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in", durable=True, group="g")
        with pytest.raises(RuntimeError):  # noqa: PT012
            async with bus.transaction() as tx:
                await tx.publish(name, "rolled back", durable=True)
                raise RuntimeError
        async with bus.transaction() as tx:
            await tx.publish(name, "same", durable=True)
            await tx.publish(name, "same", durable=True)  # rows, not notifications: both kept
        got = await receive_all(bus.channel("in"), 2)
        assert [m.payload for m in got] == ["same", "same"]


async def test_an_open_older_transaction_neither_stalls_nor_is_skipped(pg_dsn: str) -> None:
    """A newer commit arrives while an older publishing transaction is open; the older after."""
    name = fresh("order")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in", durable=True, group="g")
        async with bus.transaction() as slow:
            await slow.publish(name, "older id", durable=True)
            await bus.notify(name, "newer id", durable=True)  # commits first
            [newer] = await receive_all(bus.channel("in"), 1)
            assert newer.payload == "newer id"
            bus.ack(newer)
        [older] = await receive_all(bus.channel("in"), 1)
        assert older.payload == "older id"
        assert older.id < newer.id


async def test_claims_stay_on_the_index_on_a_deep_unanalyzed_backlog(pg: PgHelper) -> None:
    """200k rows never analyzed: the claim's scan of pgbus.messages is an index scan."""
    name = fresh("deep")
    async with pgbus.open_bus(pg.dsn) as bus:
        await bus.notify(name, "schema", durable=True)
    await pg.execute(
        "INSERT INTO pgbus.messages (channel, payload)"
        " SELECT $1, 'x' FROM generate_series(1, 200000)",
        name,
    )
    await pg.execute(
        "INSERT INTO pgbus.groups (channel, group_name, position_xid, position_id)"
        " VALUES ($1, 'g', '0', 0)",
        name,
    )
    await pg.execute("LOAD 'auto_explain'")
    await pg.execute("SET auto_explain.log_min_duration = 0")
    await pg.execute("SET auto_explain.log_nested_statements = on")
    await pg.execute("SET client_min_messages = log")
    plans: list[str] = []
    connection: Any = pg._connection

    def on_log(_connection: Any, message: Any) -> None:
        plans.append(str(message))

    connection.add_log_listener(on_log)
    try:
        rows = await pg.fetch(
            "SELECT * FROM pgbus.claim($1, 'g', 'm', 500, 30, '{}', '{}', true)", name
        )
    finally:
        connection.remove_log_listener(on_log)
        await pg.execute("SET client_min_messages = notice")
    assert len(rows) == 500
    scans = [p for p in plans if "FROM pgbus.messages m" in p and "array_agg" in p]
    assert scans, plans
    assert "Index Scan using messages_position" in scans[0]
    assert "Seq Scan" not in scans[0]
    assert "Sort" not in scans[0]


async def test_retention_deletes_what_every_group_handled(pg_dsn: str, pg: PgHelper) -> None:
    """Acknowledged by both groups: deleted; a retired group stops holding messages back."""
    from pgbus._durable._admin import retain

    name = fresh("retain")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("a", 100)
        bus.add_channel("b", 100)
        await bus.bridge_in(name, "a", durable=True, group="a")
        await bus.bridge_in(name, "b", durable=True, group="b")
        for i in range(20):
            await bus.notify(name, f"m{i}", durable=True)
        for m in await receive_all(bus.channel("a"), 20):
            bus.ack(m)
        await wait_for(
            pg,
            "SELECT count(*) FROM pgbus.deliveries WHERE group_name='a' AND channel=$1",
            name,
            expect=0,
        )
        async with bus._database().borrow() as connection:
            assert await retain(connection, name, 3600) == 0  # group b still holds them all
            for m in await receive_all(bus.channel("b"), 10):
                bus.ack(m)
            await wait_for(
                pg,
                "SELECT count(*) FROM pgbus.deliveries WHERE group_name='b' AND channel=$1",
                name,
                expect=10,
            )
            assert await retain(connection, name, 3600) == 10
            await pg.execute(
                "UPDATE pgbus.groups SET seen_at = now() - interval '2 hours'"
                " WHERE channel = $1 AND group_name = 'b'",
                name,
            )
            assert await retain(connection, name, 3600) == 10
    assert await pg.fetchval("SELECT count(*) FROM pgbus.messages WHERE channel = $1", name) == 0


async def test_retention_deletes_a_batch_that_filled_its_claim_exactly(
    pg_dsn: str, pg: PgHelper
) -> None:
    """
    A claim that takes exactly its limit leaves the group mid-tick (its position holds
    ``tick_to`` and the batch marker), and the claims after it find nothing new, so they write
    no new position. What the group claimed and acknowledged is still deleted.
    """
    from pgbus._durable._admin import retain
    from pgbus._durable._consumer import _CLAIM, _JOIN

    name = fresh("retain_exact")
    async with pgbus.open_bus(pg_dsn) as bus, bus._database().borrow() as connection:
        await connection.execute(_JOIN, name, "g", "earliest")
        for i in range(5):
            await bus.notify(name, f"m{i}", durable=True)
        claimed = await connection.fetch(_CLAIM, name, "g", "member", 5, 60.0, 5, [], [], [], True)
        ids = [row["id"] for row in claimed]
        assert len(ids) == 5
        # What the bridge does next: acknowledge them all and claim again; nothing is new.
        again = await connection.fetch(
            _CLAIM, name, "g", "member", 5, 60.0, 5, ids, [1] * 5, [], True
        )
        assert again == []
        assert await retain(connection, name, 3600) == 5
    assert await pg.fetchval("SELECT count(*) FROM pgbus.messages WHERE channel = $1", name) == 0


async def test_two_processes_migrating_at_once_end_with_one_schema(pg: PgHelper) -> None:
    """Fresh database, two `pgbus migrate` at once: both succeed, each version applied once."""
    import sys

    from test_cli import pgbus_env

    database = "migrate_" + uuid.uuid4().hex[:8]
    await pg.execute(f'CREATE DATABASE "{database}"')
    dsn = with_database(pg.dsn, database)
    results: list[Any] = []

    async def migrate() -> None:
        results.append(
            await trio.run_process(
                [sys.executable, "-m", "pgbus", "migrate", "--dsn", dsn],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=pgbus_env(),
            )
        )

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(migrate)
            nursery.start_soon(migrate)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    async with pgbus.open_bus(dsn) as bus, bus.transaction() as tx:
        versions = await tx.fetch("SELECT version FROM pgbus.migrations ORDER BY version")
    assert [v[0] for v in versions] == list(range(1, SCHEMA_VERSION + 1))
    await pg.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


async def test_a_role_without_rights_gets_one_line(pg: PgHelper) -> None:
    """No CREATE on the database: one SchemaError line naming the role and what to do."""
    database = "norights_" + uuid.uuid4().hex[:8]
    role = "pgbus_norights"
    await pg.execute(f'CREATE DATABASE "{database}"')
    await pg.execute(
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        f"CREATE ROLE {role} LOGIN; END IF; END$$"
    )
    await pg.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC')
    parts = urlsplit(with_database(pg.dsn, database))
    dsn = urlunsplit(parts._replace(netloc=role + "@" + parts.netloc.rsplit("@", 1)[-1]))
    try:
        async with pgbus.open_bus(dsn) as bus:
            with pytest.raises(
                pgbus.SchemaError,
                match=rf"^cannot create or migrate pgbus's schema at .* as role '{role}' "
                r"\(permission denied for database [^;]*\); run 'python -m pgbus migrate --dsn "
                rf"\.\.\.' as the schema's owner .*'python -m pgbus grants {role}'\.$",
            ):
                await bus.notify("x", "y", durable=True)
    finally:
        await pg.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


async def test_retention_picks_its_batch_once_on_an_unanalyzed_table(pg: PgHelper) -> None:
    """The janitor's delete scans its batch once (a CTE), not once per row of the table."""
    from pgbus._durable._admin import _DELETE_HANDLED

    async with pgbus.open_bus(pg.dsn) as bus:
        await bus.notify(fresh("schema"), "x", durable=True)
    plan = "\n".join(
        row[0] for row in await pg.fetch("EXPLAIN " + _DELETE_HANDLED.replace("$2", "20000"), "c")
    )
    assert "CTE doomed" in plan
    assert "CTE Scan on doomed" in plan


async def test_retention_probes_deliveries_by_index_whatever_their_statistics(
    pg: PgHelper,
) -> None:
    """
    pgbus.deliveries analyzed while empty, then filled by a burst: the retention pass still
    probes it by index, once per message, and walks the channel in index order (no plan that
    scans the whole table per message, which made a pass take 36 s in bench W6D).
    """
    from pgbus._durable._admin import _DELETE_HANDLED, PLAN_BY_INDEX

    database = f"stats_{uuid.uuid4().hex[:8]}"
    await pg.execute(f'CREATE DATABASE "{database}"')
    try:
        dsn = with_database(pg.dsn, database)
        async with pgbus.open_bus(dsn) as bus, bus._database().borrow() as connection:
            await bus.notify("schema", "x", durable=True)
            await connection.execute(
                "INSERT INTO pgbus.messages (channel, payload)"
                " SELECT 'c', 'm' || g FROM generate_series(1, 3000) g"
            )
            await connection.execute(  # a group that has claimed them all
                "INSERT INTO pgbus.groups (channel, group_name, position_xid, position_id,"
                " tick_from) SELECT 'c', 'g', pg_snapshot_xmin(s), 0, s"
                " FROM pg_current_snapshot() s"
            )
            await connection.execute("ANALYZE pgbus.deliveries")  # empty
            await connection.execute(
                "INSERT INTO pgbus.deliveries (message_id, group_name, channel, member,"
                " attempts, available_at)"
                " SELECT g, 'other', 'busy', 'm', 1, now() FROM generate_series(1, 30000) g"
            )
            async with connection.transaction():
                await connection.execute(PLAN_BY_INDEX)
                rows = await connection.fetch("EXPLAIN " + _DELETE_HANDLED, "c", 20000)
        plan = "\n".join(row[0] for row in rows)
    finally:
        await pg.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    assert "Index Only Scan using deliveries_pkey on deliveries" in plan, plan
    assert "Index Cond: (message_id = m" in plan, plan
    assert "Seq Scan on deliveries" not in plan, plan
    assert "Materialize" not in plan, plan
    assert "Index Scan using messages_position on messages" in plan, plan
    assert "Sort" not in plan, plan


def test_a_claim_finding_its_room_taken_keeps_the_messages() -> None:
    """Room counted before a claim may be taken by another sender: the claim waits, not fails."""
    from pgbus._durable._consumer import DurableConsumer

    inbox = pgbus.Channel("in", 2)
    consumer = DurableConsumer(
        None,  # type: ignore[arg-type]  # delivering needs no database
        inbox,
        "shared",
        group="g",
        start="latest",
        max_attempts=5,
        retry_after=1.0,
        lease=30.0,
        codec="text",
        retention=3600.0,
    )
    inbox.send_nowait("other 0")
    inbox.send_nowait("other 1")  # full, while a claim counted two free places
    consumer._deliver([(1, 1, "durable 1", False), (2, 1, "durable 2", False)])
    assert [m.payload for m in consumer._overflow] == ["durable 1", "durable 2"]
    assert consumer.holds(consumer._overflow[0])
