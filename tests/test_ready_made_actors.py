"""
The ready-made actors in ``actors/``, driven the way a configuration file drives them.

Rules for these tests: Printer, Relay and Heartbeat run on a bus without PostgreSQL (Heartbeat on
the autojump clock); TableChanges runs against a real PostgreSQL with the real clock, every wait
bounded by `trio.fail_after`, and a table of its own per test, dropped afterwards. Absence is
checked with a marker: a change made after the one that must not arrive, which must come next.
"""

from __future__ import annotations

import io
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import pgbus
from pgbus.actors.heartbeat import Heartbeat
from pgbus.actors.printer import Printer
from pgbus.actors.relay import Relay
from pgbus.actors.table_changes import TableChanges

WAIT = 10  # seconds: generous, only reached when a test is failing


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- Printer -----------------------------------------------------------------------------------


async def test_printer_prints_one_json_line_per_message() -> None:
    """Notifications, gaps and plain messages each print as one compact JSON line."""
    stream = io.StringIO()
    async with pgbus.open_bus() as bus:
        bus.add_channel("orders", 10)
        await bus.spawn(Printer, name="printer", inbox="orders", options={"stream": stream})
        await bus.send("orders", pgbus.Notification("orders_pg", {"id": 1, "名": "é"}, 4242))
        await bus.send("orders", pgbus.Gap("orders_pg", "overflow", 3))
        await bus.send("orders", pgbus.Gap("orders_pg", "reconnect", None))
        await bus.send("orders", "plain text")
        await bus.ask("printer", [1, None, True], timeout=WAIT)  # handled in order, so last
    assert stream.getvalue().splitlines() == [
        '{"channel":"orders_pg","payload":{"id":1,"名":"é"},"pid":4242}',
        '{"channel":"orders_pg","gap":"overflow","dropped":3}',
        '{"channel":"orders_pg","gap":"reconnect","dropped":null}',
        '{"channel":"orders","payload":"plain text"}',
        '{"channel":"orders","payload":[1,null,true]}',
    ]


async def test_printer_prints_what_json_cannot_hold_as_its_repr() -> None:
    """An unserialisable payload prints as its repr instead of failing the actor."""
    loop: list[object] = []
    loop.append(loop)
    stream = io.StringIO()
    async with pgbus.open_bus() as bus:
        await bus.spawn(Printer, name="printer", inbox_capacity=10, options={"stream": stream})
        await bus.send("printer", {"when": b"\x00bytes"})
        await bus.send("printer", {(1, 2): "tuple key"})
        await bus.ask("printer", loop, timeout=WAIT)
        [stats] = bus.statistics().actors
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == [
        {"channel": "printer", "payload": {"when": "b'\\x00bytes'"}},
        {"channel": "printer", "payload": "{(1, 2): 'tuple key'}"},
        {"channel": "printer", "payload": "[[...]]"},
    ]
    assert stats.restarts == 0


async def test_printer_writes_to_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stream the lines go to stdout."""
    async with pgbus.open_bus() as bus:
        await bus.spawn(Printer, name="out", inbox_capacity=1)
        await bus.ask("out", "hello", timeout=WAIT)
        assert capsys.readouterr().out == '{"channel":"out","payload":"hello"}\n'


# -- Relay -------------------------------------------------------------------------------------


async def test_relay_forwards_payloads_and_logs_gaps(caplog: pytest.LogCaptureFixture) -> None:
    """A notification's payload and a plain message go on; a gap is logged, not forwarded."""
    async with pgbus.open_bus() as bus:
        bus.add_channel("in", 10)
        bus.add_channel("out", 10)
        await bus.spawn(Relay, name="relay", inbox="in", options={"to": "out"})
        with caplog.at_level(logging.WARNING, logger="pgbus.actors"):
            await bus.send("in", pgbus.Notification("orders_pg", {"id": 7}, 99))
            await bus.send("in", pgbus.Gap("orders_pg", "reconnect", None))
            await bus.send("in", "after the gap")
            with trio.fail_after(WAIT):
                received = [await bus.channel("out").receive() for _ in range(2)]
        [stats] = bus.statistics().actors
    assert received == [{"id": 7}, "after the gap"]
    assert stats.restarts == 0
    [record] = [r for r in caplog.records if r.name == "pgbus.actors"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "actor 'relay': notifications may be missing from Postgres channel 'orders_pg' "
        "(reconnect, dropped: unknown); nothing forwarded to 'out'"
    )


def test_relay_refuses_an_empty_target() -> None:
    """The 'to' option must name a channel."""
    with pytest.raises(ValueError, match=r"^'to' must be a non-empty channel name \(got ''\)\.$"):
        Relay(to="")


# -- Heartbeat ---------------------------------------------------------------------------------


async def test_heartbeat_ticks_on_schedule(autojump_clock: trio.testing.MockClock) -> None:
    """Ticks are numbered from 1 and sent every *every* seconds after the start."""
    async with pgbus.open_bus() as bus:
        bus.add_channel("ticks", 10)
        start = trio.current_time()
        await bus.spawn(
            Heartbeat, name="beat", options={"to": "ticks", "every": 2.5, "message": "beat"}
        )
        received = []
        for _ in range(3):
            message = await bus.channel("ticks").receive()
            received.append((message, trio.current_time() - start))
    assert received == [("beat 1", 2.5), ("beat 2", 5.0), ("beat 3", 7.5)]


async def test_heartbeat_does_not_drift_behind_a_slow_consumer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A consumer that takes a while per tick does not push later ticks off the schedule."""
    async with pgbus.open_bus() as bus:
        bus.add_channel("ticks", 0)
        start = trio.current_time()
        await bus.spawn(Heartbeat, name="beat", options={"to": "ticks", "every": 1})
        times: list[float] = []
        for _ in range(4):
            assert await bus.channel("ticks").receive() == f"tick {len(times) + 1}"
            times.append(trio.current_time() - start)
            await trio.sleep(0.6)  # the consumer's work, shorter than a period
    assert times == [1.0, 2.0, 3.0, 4.0]


async def test_heartbeat_skips_ticks_it_could_not_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a send blocked for several periods, one tick goes at once, then the pace resumes."""
    async with pgbus.open_bus() as bus:
        bus.add_channel("ticks", 0)
        start = trio.current_time()
        await bus.spawn(Heartbeat, name="beat", options={"to": "ticks", "every": 1})
        times: list[tuple[object, float]] = []
        for pause in (3.5, 0, 0):
            await trio.sleep(pause)
            message = await bus.channel("ticks").receive()
            times.append((message, trio.current_time() - start))
    assert times == [("tick 1", 3.5), ("tick 2", 3.5), ("tick 3", 4.5)]


@pytest.mark.parametrize("every", [0, -1, math.inf, math.nan, True, "1"])
def test_heartbeat_refuses_a_period_that_is_not_positive(every: Any) -> None:
    """'every' must be a positive, finite number of seconds."""
    with pytest.raises(ValueError, match=r"^'every' must be a positive number of seconds \(got "):
        Heartbeat(to="ticks", every=every)


# -- TableChanges: pure checks ------------------------------------------------------------------


def test_table_changes_default_channel_fits_postgres_limit() -> None:
    """A long table name gives a 63-byte channel, still distinct from a similar table's."""
    first = TableChanges(table="é" * 31 + "a", to="changes")
    second = TableChanges(table="é" * 31 + "b", to="changes")
    assert TableChanges(table="orders", to="c").channel == "pgbus_changes_orders"
    assert TableChanges(table="orders", to="c", schema="shop").channel == (
        "pgbus_changes_shop.orders"
    )
    assert first.channel.startswith("pgbus_changes_éé")
    assert len(first.channel.encode()) <= 63
    assert len(first.function.encode()) <= 63
    assert first.channel != second.channel
    assert first.function != second.function


def test_table_changes_refuses_bad_names() -> None:
    """A channel over 63 bytes, or a table name PostgreSQL would truncate, is refused."""
    with pytest.raises(pgbus.ChannelNameError, match=r"is 64 bytes; PostgreSQL allows at most 63"):
        TableChanges(table="orders", to="changes", channel="c" * 64)
    with pytest.raises(ValueError, match=r"^'table' must be at most 63 bytes"):
        TableChanges(table="t" * 64, to="changes")
    with pytest.raises(ValueError, match=r"^'schema' must be a non-empty string \(got ''\)\.$"):
        TableChanges(table="orders", to="changes", schema="")


# -- TableChanges against PostgreSQL ------------------------------------------------------------


@asynccontextmanager
async def scratch_table(pg: Any, columns: str, name: str | None = None) -> AsyncIterator[str]:
    """A table of this test's own, with its trigger function dropped afterwards."""
    name = name or unique("changes")
    await pg.execute(f"CREATE TABLE {quote_ident(name)} ({columns})")
    try:
        yield name
    finally:
        function = TableChanges(table=name, to="unused").function
        await pg.execute(f"DROP TABLE IF EXISTS {quote_ident(name)}")
        await pg.execute(f"DROP FUNCTION IF EXISTS public.{quote_ident(function)}()")


async def events(bus: pgbus.Bus, count: int, channel: str = "changes") -> list[dict[str, Any]]:
    """The payloads of the next *count* notifications in *channel*."""
    received = []
    with trio.fail_after(WAIT):
        for _ in range(count):
            message = await bus.channel(channel).receive()
            assert type(message) is pgbus.Notification, message
            received.append(message.payload)
    return received


async def watch(bus: pgbus.Bus, table: str, name: str = "changes", **options: Any) -> None:
    """Spawn a TableChanges actor on *table* delivering into the channel "changes"."""
    if "changes" not in bus.channels:
        bus.add_channel("changes", math.inf)
    await bus.spawn(TableChanges, name=name, options={"table": table, "to": "changes", **options})


async def test_inserts_updates_and_deletes_arrive_in_commit_order(pg: Any, pg_dsn: str) -> None:
    """Each change arrives once, in commit order, with op, table, schema, xid, seq, new, old."""
    async with (
        scratch_table(pg, "id int PRIMARY KEY, body text") as table,
        pgbus.open_bus(pg_dsn) as bus,
    ):
        await watch(bus, table)
        ident = quote_ident(table)
        xids = [
            await pg.fetchval(
                f"WITH w AS (INSERT INTO {ident} VALUES (1, 'one'), (2, 'two') RETURNING 1)"
                " SELECT txid_current()"
            ),
            await pg.fetchval(
                f"WITH w AS (UPDATE {ident} SET body = 'uno' WHERE id = 1 RETURNING 1)"
                " SELECT txid_current()"
            ),
            await pg.fetchval(
                f"WITH w AS (DELETE FROM {ident} WHERE id = 2 RETURNING 1) SELECT txid_current()"
            ),
        ]
        received = await events(bus, 4)

    def change(op: str, xid: int, seq: int, new: object, old: object) -> dict[str, Any]:
        return {"op": op, "table": table, "schema": "public", "xid": xid, "seq": seq,
                "new": new, "old": old}  # fmt: skip

    assert received == [
        change("INSERT", xids[0], 1, {"id": 1, "body": "one"}, None),
        change("INSERT", xids[0], 2, {"id": 2, "body": "two"}, None),
        change("UPDATE", xids[1], 1, {"id": 1, "body": "uno"}, {"id": 1, "body": "one"}),
        change("DELETE", xids[2], 1, None, {"id": 2, "body": "two"}),
    ]
    assert list(received[0]) == ["op", "table", "schema", "xid", "seq", "new", "old"]


async def test_identical_changes_in_one_transaction_are_not_merged(pg: Any, pg_dsn: str) -> None:
    """Two identical rows inserted together arrive as two events (PostgreSQL merges equal ones)."""
    async with scratch_table(pg, "word text") as table, pgbus.open_bus(pg_dsn) as bus:
        await watch(bus, table)
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES ('same'), ('same')")
        received = await events(bus, 2)
    assert [(e["seq"], e["new"]) for e in received] == [
        (1, {"word": "same"}),
        (2, {"word": "same"}),
    ]


async def test_a_row_too_large_for_notify_arrives_as_its_key(pg: Any, pg_dsn: str) -> None:
    """A change whose JSON reaches 8000 bytes arrives truncated, with its primary key."""
    async with (
        scratch_table(pg, "region text, id int, body text, PRIMARY KEY (region, id)") as table,
        pgbus.open_bus(pg_dsn) as bus,
    ):
        await watch(bus, table)
        ident = quote_ident(table)
        await pg.execute(f"INSERT INTO {ident} VALUES ('eu', 1, repeat('é', 3000))")
        await pg.execute(f"INSERT INTO {ident} VALUES ('eu', 2, repeat('x', 8000))")
        await pg.execute(f"UPDATE {ident} SET body = 'small' WHERE id = 2")
        await pg.execute(f"DELETE FROM {ident} WHERE id = 1")
        received = await events(bus, 4)
    key_2 = {"region": "eu", "id": 2}
    assert received[0]["new"] == {"region": "eu", "id": 1, "body": "é" * 3000}  # 6000 bytes: fits
    assert {k: v for k, v in received[1].items() if k != "xid"} == {
        "op": "INSERT", "table": table, "schema": "public", "seq": 1, "truncated": True,
        "key": key_2,
    }  # fmt: skip
    assert (received[2]["op"], received[2]["truncated"], received[2]["key"]) == (
        "UPDATE",
        True,
        key_2,
    )
    assert received[3]["op"] == "DELETE"
    assert received[3]["old"] == {"region": "eu", "id": 1, "body": "é" * 3000}


async def test_a_large_row_without_primary_key_arrives_as_its_ctid(pg: Any, pg_dsn: str) -> None:
    """Without a primary key, a truncated event carries the row's ctid, which finds the row."""
    async with scratch_table(pg, "body text") as table, pgbus.open_bus(pg_dsn) as bus:
        await watch(bus, table)
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (repeat('x', 9000))")
        [event] = await events(bus, 1)
        assert event["truncated"] is True
        length = await pg.fetchval(
            f"SELECT length(body) FROM {quote_ident(table)} WHERE ctid = $1::text::tid",
            event["key"]["ctid"],
        )
    assert length == 9000


async def test_a_rolled_back_change_delivers_nothing(pg: Any, pg_dsn: str) -> None:
    """Only committed changes arrive: the marker committed after a rollback comes first."""
    async with scratch_table(pg, "id int PRIMARY KEY") as table, pgbus.open_bus(pg_dsn) as bus:
        await watch(bus, table)
        ident = quote_ident(table)
        await pg.execute(f"BEGIN; INSERT INTO {ident} VALUES (1); ROLLBACK")
        await pg.execute(f"INSERT INTO {ident} VALUES (2)")
        [event] = await events(bus, 1)
    assert (event["op"], event["new"]) == ("INSERT", {"id": 2})


async def test_truncate_arrives_as_one_event(pg: Any, pg_dsn: str) -> None:
    """TRUNCATE, which fires no row trigger, still arrives: one event, new and old null."""
    async with scratch_table(pg, "id int") as table, pgbus.open_bus(pg_dsn) as bus:
        await watch(bus, table)
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (1), (2)")
        await pg.execute(f"TRUNCATE {quote_ident(table)}")
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (3)")
        received = await events(bus, 4)
    assert [(e["op"], e["new"], e["old"]) for e in received] == [
        ("INSERT", {"id": 1}, None),
        ("INSERT", {"id": 2}, None),
        ("TRUNCATE", None, None),
        ("INSERT", {"id": 3}, None),
    ]


async def test_two_actors_on_one_table_deliver_each_change_once(pg: Any, pg_dsn: str) -> None:
    """Installing twice leaves one trigger and one bridge: each change arrives once."""
    async with scratch_table(pg, "id int PRIMARY KEY") as table, pgbus.open_bus(pg_dsn) as bus:
        await watch(bus, table, name="first")
        await watch(bus, table, name="second")
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (1)")
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (2)")
        received = await events(bus, 2)
        triggers = await pg.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass ORDER BY tgname",
            quote_ident(table),
        )
    assert [e["new"] for e in received] == [{"id": 1}, {"id": 2}]
    assert [row["tgname"] for row in triggers] == ["pgbus_changes", "pgbus_changes_truncate"]


class CrashesOnce(TableChanges):
    """A TableChanges whose first incarnation fails right after starting."""

    started = 0
    restarted: trio.Event

    async def on_start(self) -> None:
        await super().on_start()
        CrashesOnce.started += 1
        if CrashesOnce.started == 2:
            CrashesOnce.restarted.set()

    async def run(self) -> None:
        if CrashesOnce.started == 1:
            raise RuntimeError("crash on purpose")
        await super().run()


async def test_a_restarted_actor_delivers_each_change_once(pg: Any, pg_dsn: str) -> None:
    """After a restart reinstalls the trigger and the bridge, each change still arrives once."""
    CrashesOnce.started = 0
    CrashesOnce.restarted = trio.Event()
    async with (
        scratch_table(pg, "id int PRIMARY KEY") as table,
        pgbus.open_bus(pg_dsn, backoff_initial=0.01) as bus,
    ):
        bus.add_channel("changes", math.inf)
        await bus.spawn(CrashesOnce, name="changes", options={"table": table, "to": "changes"})
        with trio.fail_after(WAIT):
            await CrashesOnce.restarted.wait()
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (1)")
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (2)")
        received = await events(bus, 2)
        [stats] = bus.statistics().actors
    assert [e["new"] for e in received] == [{"id": 1}, {"id": 2}]
    assert stats.restarts == 1


async def test_a_second_bus_reinstalls_in_place(pg: Any, pg_dsn: str) -> None:
    """A bus started again on the same table (a process restart) gets each change once."""
    async with scratch_table(pg, "id int PRIMARY KEY") as table:
        async with pgbus.open_bus(pg_dsn) as bus:
            await watch(bus, table)
        async with pgbus.open_bus(pg_dsn) as bus:
            await watch(bus, table)
            await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (1)")
            await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (2)")
            received = await events(bus, 2)
    assert [e["new"] for e in received] == [{"id": 1}, {"id": 2}]


@pytest.mark.parametrize(
    "table", ["Mixed Case Orders", 'it\'s "quoted"; DROP TABLE x; --', "Ünïcødé ✓ $$ %I"]
)
async def test_names_are_used_exactly_as_given(pg: Any, pg_dsn: str, table: str) -> None:
    """Mixed case, spaces, quotes, dollar signs and percent signs are quoted, never pasted."""
    async with scratch_table(pg, '"Id" int PRIMARY KEY', name=table), pgbus.open_bus(pg_dsn) as bus:
        await watch(bus, table)
        await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (1)")
        [event] = await events(bus, 1)
        listening = await pg.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass", quote_ident(table)
        )
    assert (event["table"], event["new"]) == (table, {"Id": 1})
    assert listening == 2


async def test_a_chosen_channel_and_schema_are_used(pg: Any, pg_dsn: str) -> None:
    """The events go to the given Postgres channel, exactly, from a table in another schema."""
    schema = unique("Schema ")
    channel = "Odd 'channel' $body$ %L"
    await pg.execute(f"CREATE SCHEMA {quote_ident(schema)}")
    try:
        await pg.execute(f"CREATE TABLE {quote_ident(schema)}.items (id int)")
        async with pg.listen(channel) as raw, pgbus.open_bus(pg_dsn) as bus:
            await watch(bus, "items", schema=schema, channel=channel)
            await pg.execute(f"INSERT INTO {quote_ident(schema)}.items VALUES (1)")
            [event] = await events(bus, 1)
            with trio.fail_after(WAIT):
                raw_channel, raw_payload, _ = await raw.receive()
    finally:
        await pg.execute(f"DROP SCHEMA {quote_ident(schema)} CASCADE")
    assert (event["schema"], event["table"], event["new"]) == (schema, "items", {"id": 1})
    assert (raw_channel, json.loads(raw_payload)) == (channel, event)


async def test_a_missing_table_fails_the_actor_with_a_clear_error(pg_dsn: str) -> None:
    """A table that does not exist fails the actor, and the error says which and what to do."""

    async def run_until_the_supervisor_gives_up() -> None:
        async with pgbus.open_bus(pg_dsn, max_restarts=0) as bus:
            await watch(bus, "no such table", name="watcher")
            await trio.sleep_forever()

    with trio.fail_after(WAIT), pytest.raises(pgbus.RestartIntensityError) as caught:
        await run_until_the_supervisor_gives_up()
    failure = caught.value.last_failure
    assert isinstance(failure, pgbus.ConfigError)
    assert str(failure) == (
        "actor 'watcher': table 'public'.'no such table' does not exist; create it before the "
        "actor starts (or fix the 'table' and 'schema' options)."
    )


async def test_a_partitioned_table_reports_changes_in_every_partition(pg: Any, pg_dsn: str) -> None:
    """Rows of a partitioned table arrive from any partition, named by the partition."""
    table = unique("parted")
    ident = quote_ident(table)
    await pg.execute(
        f"CREATE TABLE {ident} (id int PRIMARY KEY, body text) PARTITION BY RANGE (id)"
    )
    try:
        await pg.execute(
            f"CREATE TABLE {quote_ident(table + '_low')} PARTITION OF {ident}"
            " FOR VALUES FROM (0) TO (100);"
            f" CREATE TABLE {quote_ident(table + '_high')} PARTITION OF {ident}"
            " FOR VALUES FROM (100) TO (200)"
        )
        async with pgbus.open_bus(pg_dsn) as bus:
            await watch(bus, table)
            await pg.execute(f"INSERT INTO {ident} VALUES (1, 'low'), (150, repeat('x', 9000))")
            await pg.execute(f"TRUNCATE {ident}")
            received = await events(bus, 3)
    finally:
        function = TableChanges(table=table, to="unused").function
        await pg.execute(f"DROP TABLE {ident}")
        await pg.execute(f"DROP FUNCTION public.{quote_ident(function)}()")
    assert [(e["op"], e["table"], e.get("new"), e.get("key")) for e in received] == [
        ("INSERT", f"{table}_low", {"id": 1, "body": "low"}, None),
        ("INSERT", f"{table}_high", None, {"id": 150}),
        ("TRUNCATE", table, None, None),
    ]


async def test_relay_forwards_a_durable_messages_payload_to_an_outbound_bridge(
    pg: Any, pg_dsn: str
) -> None:
    """durable in -> Relay -> NOTIFY out: the payload arrives, the message is acknowledged."""
    async with pgbus.open_bus(pg_dsn) as bus:
        for name in ("jobs", "out", "seen"):
            bus.add_channel(name, capacity=10)
        await bus.bridge_in("relay_jobs", "jobs", durable=True, group="relay", codec="json")
        await bus.bridge_out("out", "relay_out", codec="json")
        await bus.bridge_in("relay_out", "seen", codec="json")
        await bus.spawn(Relay, name="relay", inbox="jobs", options={"to": "out"})
        await bus.notify("relay_jobs", {"job": 1}, codec="json", durable=True)
        with trio.fail_after(30):
            seen = await bus.channel("seen").receive()
        assert seen.payload == {"job": 1}
        with trio.fail_after(30):
            # Acknowledgements are written in the bridge's next round trip: no event to await.
            while (await bus.durable_groups("relay_jobs"))[0].in_flight:  # noqa: ASYNC110
                await trio.sleep(0.05)
