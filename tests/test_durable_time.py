"""
Durable time and idempotency against a real PostgreSQL: deduplication keys (concurrent
publishers, rollback, window), delayed messages (never early, all arrive, several movers,
a mover's process killed), and the refusals of bad input.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import textwrap
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from proxy import open_proxy
from test_cli import pgbus_env, run_to_completion, running

import pgbus
import pgbus._durable._time
from pgbus._cli import main
from pgbus._durable._publish import store_keyed, store_timed
from pgbus._durable._schedule import make_schedule, publish_slot
from pgbus._durable._schema import SCHEMA_VERSION
from pgbus._durable._time import DelayedMover
from pgbus._pg import open_database

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def stored_count(pg: PgHelper, channel: str) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM pgbus.messages WHERE channel = $1", channel))


async def wait_until(pg: PgHelper, sql: str, *args: Any) -> None:
    """Poll *sql* (a boolean) until true: a lock wait or a commit elsewhere has no event."""
    with trio.fail_after(WAIT):
        while not await pg.fetchval(sql, *args):  # noqa: ASYNC110 (no event to await)
            await trio.sleep(0.01)


# -- deduplication keys ------------------------------------------------------------------------


async def test_1000_concurrent_publishers_of_one_key_store_one_message(
    pg_dsn: str, pg: PgHelper
) -> None:
    """50 connections x 20 publishes of one key at once: 1 message, every call gets its id."""
    channel = fresh("dedup")
    ids: list[int] = []
    errors: list[BaseException] = []
    async with pgbus.open_bus(pg_dsn, pool_size=50) as bus:
        await bus.notify("warm-up", "x", durable=True)  # schema and mover ready before the race
        go = trio.Event()

        async def publisher(n: int) -> None:
            await go.wait()
            for i in range(20):
                try:
                    got = await bus.notify(
                        channel, f"from {n}.{i}", durable=True, dedup_key="order-42"
                    )
                    assert isinstance(got, int)
                    ids.append(got)
                except Exception as exc:  # counted, not raised: the test says how many
                    errors.append(exc)

        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(publisher, n)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
    assert errors == []
    assert len(ids) == 1000
    assert await stored_count(pg, channel) == 1
    stored_id = await pg.fetchval("SELECT id FROM pgbus.messages WHERE channel = $1", channel)
    assert set(ids) == {stored_id}


async def test_a_rolled_back_first_publisher_leaves_the_key_free(pg_dsn: str, pg: PgHelper) -> None:
    """A second publisher waits on the first's uncommitted key; the first rolls back: it stores."""
    channel = fresh("dedup")
    async with pgbus.open_bus(pg_dsn) as bus:
        await bus.notify("warm-up", "x", durable=True)
        second: list[int | None] = []

        async def publish_second() -> None:
            second.append(await bus.notify(channel, "second", durable=True, dedup_key="k"))

        class Rollback(Exception):
            pass

        async def publish_first_then_roll_back(nursery: trio.Nursery) -> int | None:
            async with bus.transaction() as tx:
                first = await tx.publish(channel, "first", durable=True, dedup_key="k")
                nursery.start_soon(publish_second)
                # The second publisher waits for this transaction (a lock on the key's row).
                await wait_until(
                    pg,
                    "SELECT EXISTS (SELECT FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%dedup_key%')",
                )
                assert second == []
                raise Rollback(first)

        async with trio.open_nursery() as nursery:
            with pytest.raises(Rollback) as rolled_back:
                await publish_first_then_roll_back(nursery)
        first = rolled_back.value.args[0]
        assert len(second) == 1
        assert second[0] is not None
        assert second[0] != first
        rows = await pg.fetch("SELECT id, payload FROM pgbus.messages WHERE channel = $1", channel)
        assert [(r["id"], r["payload"]) for r in rows] == [(second[0], "second")]
        # And the key is now taken by the second one.
        assert await bus.notify(channel, "third", durable=True, dedup_key="k") == second[0]
    assert await stored_count(pg, channel) == 1


async def test_dedup_key_is_per_channel_and_free_again_after_its_window(
    pg_dsn: str, pg: PgHelper
) -> None:
    """One key on two channels is two messages; after dedup_window the key stores again."""
    a, b = fresh("dedup-a"), fresh("dedup-b")
    async with pgbus.open_bus(pg_dsn) as bus:
        first = await bus.notify(a, "1", durable=True, dedup_key="k", dedup_window=0.3)
        assert await bus.notify(a, "2", durable=True, dedup_key="k", dedup_window=0.3) == first
        other = await bus.notify(b, "1", durable=True, dedup_key="k")
        assert other != first
        await wait_until(pg, "SELECT dedup_until <= now() FROM pgbus.messages WHERE id = $1", first)
        again = await bus.notify(a, "3", durable=True, dedup_key="k")
        assert again is not None
        assert again > first
    rows = await pg.fetch("SELECT payload FROM pgbus.messages WHERE channel = $1 ORDER BY id", a)
    assert [r["payload"] for r in rows] == ["1", "3"]


async def test_durable_bridge_with_dedup_key_stores_each_key_once(
    pg_dsn: str, pg: PgHelper
) -> None:
    """An out-bridge with dedup_key: repeats in one batch and across batches are stored once."""
    channel = fresh("dedup-bridge")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", math.inf)
        bridge = await bus.bridge_out(
            "out", channel, durable=True, codec="json", dedup_key=lambda m: str(m["key"])
        )
        for i in range(300):
            await bus.send("out", {"key": i % 100, "n": i})
        await bridge.aclose()
        for i in range(50):
            await bus.send("out", {"key": i, "n": 1000 + i})
        await bus.bridge_out("out", channel, durable=True, codec="json", dedup_key=lambda m: None)
    rows = await pg.fetch(
        "SELECT payload FROM pgbus.messages WHERE channel = $1 ORDER BY id", channel
    )
    # The first 100 keys once each, in order; then the 50 keyless messages of the second bridge.
    assert [r["payload"] for r in rows][:100] == [f'{{"key":{i},"n":{i}}}' for i in range(100)]
    assert len(rows) == 150


async def test_a_bridge_batch_meeting_a_taken_key_stores_the_others_once(
    pg_dsn: str, pg: PgHelper
) -> None:
    """A batch of distinct keys, one of them already taken: the rest stored once, in order."""
    channel = fresh("dedup-taken")
    async with pgbus.open_bus(pg_dsn) as bus:
        taken = await bus.notify(channel, "first", durable=True, dedup_key="b")
        bus.add_channel("out", math.inf)
        for key in ("a", "b", "c"):  # queued before the bridge starts: one batch
            await bus.send("out", key)
        bridge = await bus.bridge_out("out", channel, durable=True, dedup_key=str)
        await bridge.aclose()
        for key in ("d", "e"):  # the next batch
            await bus.send("out", key)
        await bus.bridge_out("out", channel, durable=True, dedup_key=str)
    rows = await pg.fetch(
        "SELECT id, payload FROM pgbus.messages WHERE channel = $1 ORDER BY id", channel
    )
    assert [r["payload"] for r in rows] == ["first", "a", "c", "d", "e"]
    assert rows[0]["id"] == taken


async def test_a_keyed_batch_that_deadlocks_with_another_publisher_falls_back_cleanly(
    pg_dsn: str, pg: PgHelper
) -> None:
    """
    An out-bridge's plain keyed INSERT (batch order, not key order) and another publisher's
    transaction take two keys in opposite orders: PostgreSQL aborts the bridge's statement
    (40P01), which stores nothing and says so (False); the ON CONFLICT path then finds both
    keys taken and returns their holder's ids, nothing stored twice.
    """
    channel = fresh("dedup-deadlock")
    async with (
        pgbus.open_bus(pg_dsn) as bus,
        bus._database().borrow() as bridge,
        bus._database().borrow() as other,
    ):
        await bus.notify("warm-up", "x", durable=True)  # the schema
        # Who is the deadlock's victim: the session whose deadlock check runs after the
        # cycle formed. The bridge's runs 3 s into its wait; the other's, never in this test.
        await bridge.execute("SET deadlock_timeout = '3s'")
        await other.execute("SET deadlock_timeout = '1min'")
        bridge_pid = await bridge.fetchval("SELECT pg_backend_pid()")
        results: list[bool] = []

        async def bridge_batch() -> None:
            results.append(await store_keyed(bridge, channel, ["a2", "a1"], ["k2", "k1"], 60.0))

        async with other.transaction():
            assert await store_keyed(other, channel, ["b1"], ["k1"], 60.0)  # holds k1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge_batch)  # takes k2, then waits for k1
                await wait_until(
                    pg,
                    "SELECT EXISTS (SELECT FROM pg_stat_activity"
                    " WHERE pid = $1 AND wait_event_type = 'Lock')",
                    bridge_pid,
                )
                # k2 now: the other waits for the bridge, which waits for the other.
                assert await store_keyed(other, channel, ["b2"], ["k2"], 60.0)
        assert results == [False]
        stored = await store_timed(bridge, channel, ["a2", "a1"], ["k2", "k1"], window=60.0)
    rows = await pg.fetch(
        "SELECT id, payload FROM pgbus.messages WHERE channel = $1 ORDER BY id", channel
    )
    assert [r["payload"] for r in rows] == ["b1", "b2"]
    assert stored.ids == [rows[1]["id"], rows[0]["id"]]


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": -1}, r"^delay must be a number of seconds >= 0 \(got -1\)\.$"),
        ({"delay": math.inf}, r"^delay must be a number of seconds >= 0 \(got inf\)\.$"),
        ({"delay": "5"}, r"^delay must be a number of seconds >= 0 \(got '5'\)\.$"),
        (
            {"delay": 1, "at": datetime.datetime.now(datetime.UTC)},
            r"^delay and at cannot both be given; pass one of them$",
        ),
        ({"at": datetime.datetime(2030, 1, 1)}, r"^at must be an aware datetime"),
        ({"dedup_key": ""}, r"^dedup_key must be a non-empty string without NUL \(got ''\)\.$"),
        ({"dedup_key": 5}, r"^dedup_key must be a non-empty string without NUL \(got 5\)\.$"),
        ({"dedup_key": "k", "dedup_window": 0}, r"^dedup_window must be a number of seconds > 0"),
    ],
)
async def test_bad_time_and_key_options_are_refused_in_one_line(
    pg_dsn: str, pg: PgHelper, options: dict[str, Any], message: str
) -> None:
    """notify and Transaction.publish refuse each bad option before storing anything."""
    channel = fresh("bad")
    async with pgbus.open_bus(pg_dsn) as bus:
        with pytest.raises(pgbus.ConfigError, match=message):
            await bus.notify(channel, "x", durable=True, **options)
        with pytest.raises(pgbus.ConfigError, match=message):
            async with bus.transaction() as tx:
                await tx.publish(channel, "x", durable=True, **options)
        with pytest.raises(pgbus.ConfigError, match="only to durable messages"):
            await bus.notify(channel, "x", delay=1)
    assert await stored_count(pg, channel) == 0


# -- delayed messages ---------------------------------------------------------------------------


async def db_clock(pg: PgHelper) -> tuple[datetime.datetime, float]:
    """
    The database's clock, and a lower bound of its offset from this process's time.time():
    the server read its clock before `after`, so its clock at local time t is at least
    t + offset. The sample with the shortest round trip of ten (the tightest bound) is kept.
    """
    samples = []
    for _ in range(10):
        before = time.time()
        now: datetime.datetime = await pg.fetchval("SELECT clock_timestamp()")
        after = time.time()
        samples.append((after - before, now, now.timestamp() - after))
    _, now, offset = min(samples, key=lambda sample: sample[0])
    return now, offset


async def test_delay_counts_from_the_publish_by_the_database_clock(
    pg_dsn: str, pg: PgHelper
) -> None:
    """delay=2 stores deliver_at = the statement's time + 2 s; the id returned is kept."""
    channel = fresh("delay")
    async with pgbus.open_bus(pg_dsn) as bus:
        before, _ = await db_clock(pg)
        message_id = await bus.notify(channel, "later", durable=True, delay=2)
        after, _ = await db_clock(pg)
        deliver_at = await pg.fetchval(
            "SELECT deliver_at FROM pgbus.delayed WHERE id = $1", message_id
        )
        step = datetime.timedelta(seconds=2)
        assert before + step <= deliver_at <= after + step
        assert await stored_count(pg, channel) == 0


async def test_delayed_messages_are_never_early_and_all_arrive_with_two_movers(
    pg_dsn: str, pg: PgHelper
) -> None:
    """
    2,000 messages due at random times within 3 s, two buses moving: each arrives once, none
    before its time by the database's clock, and the movers' counts add up to 2,000.
    """
    channel = fresh("later")
    count = 2000
    received: dict[int, float] = {}
    done = trio.Event()
    async with pgbus.open_bus(pg_dsn) as bus, pgbus.open_bus(pg_dsn) as other:
        bus.add_channel("in", 500)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        await other.notify("warm-up", "x", durable=True)  # the second bus's mover runs
        db_now, offset = await db_clock(pg)  # measured while idle: a tight bound
        due: dict[int, datetime.datetime] = {}
        committed: dict[int, float] = {}  # local time of each message's commit

        async def consume() -> None:
            while len(received) < count:
                message = await bus.channel("in").receive()
                assert message.id not in received, f"message {message.id} came twice"
                received[message.id] = time.time()
                bus.ack(message)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            for chunk in range(20):
                ids = []
                async with bus.transaction() as tx:
                    for i in range(100):
                        at = db_now + datetime.timedelta(seconds=0.5 + random.uniform(0, 3))
                        message_id = await tx.publish(channel, f"{chunk}.{i}", durable=True, at=at)
                        assert message_id is not None
                        due[message_id] = at
                        ids.append(message_id)
                committed.update(dict.fromkeys(ids, time.time()))
            with trio.fail_after(WAIT):
                await done.wait()
        assert bus.mover is not None
        assert other.mover is not None
        moved = bus.mover.moved + other.mover.moved
    assert set(received) == set(due)
    early = [i for i in due if received[i] + offset < due[i].timestamp()]
    assert early == []
    assert moved >= count  # (and earlier tests' leftovers)
    # Lateness from when it could be moved: due, and committed (the first chunks' earliest
    # times pass while the last chunks are still being published).
    late = sorted(received[i] - max(due[i].timestamp() - offset, committed[i]) for i in due)
    p50, p99 = late[count // 2] * 1000, late[count * 99 // 100] * 1000
    print(f"\nlateness p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert await pg.fetchval("SELECT count(*) FROM pgbus.delayed WHERE channel = $1", channel) == 0


async def test_delay_on_a_durable_out_bridge(pg_dsn: str, pg: PgHelper) -> None:
    """bridge_out(delay=...) holds each message back that long (by the database's clock)."""
    channel = fresh("bridge-delay")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", math.inf)
        bus.add_channel("in", 10)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        await bus.bridge_out("out", channel, durable=True, delay=1.0)
        sent_at, offset = await db_clock(pg)
        await bus.send("out", "hello")
        with trio.fail_after(WAIT):
            message = await bus.channel("in").receive()
        got = time.time() + offset
        assert message.payload == "hello"
        assert got >= sent_at.timestamp() + 1.0


def mover_config(path: Path) -> Path:
    """A bus with durable support (a durable out-bridge), so it runs a mover."""
    config = path / f"mover-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [channels.out]
            capacity = 10

            [[bridge]]
            postgres = "{fresh("unused")}"
            channel = "out"
            direction = "out"
            durable = true
            """
        )
    )
    return config


async def test_a_mover_asleep_for_a_long_poll_is_woken_by_notify(
    pg_dsn: str, pg: PgHelper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mover polling once an hour moves a 0.3 s message another process stored, when due."""
    monkeypatch.setattr(pgbus._durable._time, "MOVER_MAX_SLEEP", 3600.0)
    channel = fresh("woken")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        assert bus.mover is not None
        # The mover has looked and found nothing due: it sleeps for the hour now.
        await wait_until(
            pg, "SELECT NOT EXISTS (SELECT FROM pgbus.delayed WHERE channel = $1)", channel
        )
        # Stored by another process (which runs no mover): only its NOTIFY can wake this one.
        stored = await run_to_completion(
            "notify", channel, "soon", "--durable", "--delay", "0.3", "--dsn", pg_dsn
        )
        assert stored.returncode == 0, stored.stderr
        with trio.fail_after(WAIT):  # WAIT: far shorter than the mover's hour
            message = await bus.channel("in").receive()
        assert message.payload == "soon"
        assert bus.mover.moved == 1


async def test_a_mover_refused_by_the_server_retries_and_says_so(
    pg_dsn: str, pg: PgHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """A mover whose connection is refused warns in one line, retries with backoff, then moves."""
    channel = fresh("refused")
    async with pgbus.open_bus(pg_dsn) as bus:
        await bus.notify("warm-up", "x", durable=True)  # the schema
    async with open_proxy(pg_dsn) as proxy, open_database(proxy.dsn, "pgbus-test") as database:
        proxy.refuse_new = True
        mover = DelayedMover(database)
        async with trio.open_nursery() as nursery:
            await nursery.start(mover.serve)
            with trio.fail_after(WAIT):
                while mover.failures < 3:  # noqa: ASYNC110 (attempts against a closed door)
                    await trio.sleep(0.01)
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert warnings, "a refused mover must say so"
            assert all("\n" not in w for w in warnings)
            first = r"^delayed mover: cannot move: .*; retrying now \(1 failed attempt\)$"
            assert re.match(first, warnings[0]), warnings[0]
            stored = await run_to_completion(
                "notify", channel, "late", "--durable", "--delay", "0.1", "--dsn", pg_dsn
            )
            assert stored.returncode == 0, stored.stderr
            proxy.refuse_new = False
            with trio.fail_after(WAIT):
                while mover.moved < 1:  # noqa: ASYNC110 (the next attempt, after its backoff)
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert "delayed mover: working again" in [r.getMessage() for r in caplog.records]
    assert await stored_count(pg, channel) == 1


async def test_kill_9_of_a_movers_process_loses_nothing(
    pg_dsn: str, pg: PgHelper, tmp_path: Path
) -> None:
    """The only mover is SIGKILLed while moving: a bus started after moves the rest, once each."""
    channel = fresh("killed-mover")
    count = 1000
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(channel, "in", durable=True, group="g")  # the group exists from now
    async with running(
        "run", str(mover_config(tmp_path)), "--dsn", pg_dsn, env=pgbus_env()
    ) as mover:
        await mover.expect("stderr", "running", timeout=30)
        db_now, _ = await db_clock(pg)
        # Publish, then leave (its mover stops): the process is the only mover.
        async with pgbus.open_bus(pg_dsn) as bus, bus.transaction() as tx:
            for i in range(count):
                at = db_now + datetime.timedelta(seconds=1 + 2 * i / count)
                await tx.publish(channel, str(i), durable=True, at=at)
        await wait_until(
            pg, "SELECT count(*) > $2 FROM pgbus.messages WHERE channel = $1", channel, count // 3
        )
        mover.process.send_signal(signal.SIGKILL)
        await mover.wait(timeout=10)
    moved_by_killed = await stored_count(pg, channel)
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 100)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        seen: list[str] = []
        with trio.fail_after(WAIT):
            while len(seen) < count:
                message = await bus.channel("in").receive()
                seen.append(message.payload)
                bus.ack(message)
    print(f"\nkilled mover had moved {moved_by_killed} of {count}")
    assert 0 < moved_by_killed < count
    assert sorted(seen, key=int) == [str(i) for i in range(count)]
    assert await stored_count(pg, channel) <= count


async def test_schema_has_the_time_tables(pg_dsn: str, pg: PgHelper) -> None:
    """The migration adds the key columns, their unique index and pgbus.delayed."""
    async with pgbus.open_bus(pg_dsn) as bus:
        await bus.notify("warm-up", "x", durable=True)
    assert await pg.fetchval("SELECT max(version) FROM pgbus.migrations") == SCHEMA_VERSION
    assert await pg.fetchval("SELECT to_regclass('pgbus.messages_dedup') IS NOT NULL")
    assert await pg.fetchval("SELECT to_regclass('pgbus.delayed') IS NOT NULL")
    assert await pg.fetchval("SELECT to_regclass('pgbus.dedup') IS NULL")


def qualified(channel: str, key: str) -> str:
    """A key as pgbus.messages.dedup_key holds it (qualified by its channel)."""
    return f"{len(channel.encode())}:{channel}{key}"


async def test_a_handled_message_keeps_its_key_for_the_window_then_the_janitor_frees_it(
    pg_dsn: str, pg: PgHelper
) -> None:
    """Once handled, a keyed message's row becomes its key's holder until the window ends."""
    channel = fresh("purge")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        gone = await bus.notify(channel, "1", durable=True, dedup_key="gone", dedup_window=1.0)
        kept = await bus.notify(channel, "2", durable=True, dedup_key="kept")
        with trio.fail_after(WAIT):
            for _ in range(2):
                bus.ack(await bus.channel("in").receive())
        # The janitor is done with both: 'kept' holds its key (no payload, off the channel).
        await wait_until(
            pg,
            "SELECT NOT EXISTS (SELECT FROM pgbus.messages WHERE channel = $1)"
            " AND EXISTS (SELECT FROM pgbus.messages WHERE id = $2 AND channel = '')",
            channel,
            kept,
        )
        assert await bus.notify(channel, "again", durable=True, dedup_key="kept") == kept
        # 'gone' is purged once its window has passed; the key stores again.
        await wait_until(pg, "SELECT NOT EXISTS (SELECT FROM pgbus.messages WHERE id = $1)", gone)
        again = await bus.notify(channel, "3", durable=True, dedup_key="gone")
        assert again not in (None, gone)
    rows = await pg.fetch(
        "SELECT id, channel, payload, dedup_key FROM pgbus.messages WHERE id = ANY($1::bigint[])",
        [gone, kept, again],
    )
    assert sorted(tuple(r) for r in rows) == [
        (kept, "", "", qualified(channel, "kept")),
        (again, channel, "3", qualified(channel, "gone")),
    ]


# The janitor of the releases before keys, verbatim: every channel it found in pgbus.messages
# (so '' too) with no group had its rows created more than its retention ago deleted.
_PREVIOUS_DELETE_AGED = """
WITH doomed AS MATERIALIZED (
    SELECT m.id FROM pgbus.messages m
     WHERE m.channel = $1 AND m.created_at < now() - make_interval(secs => $2)
     ORDER BY m.channel, m.xid, m.id
     LIMIT $3
)
DELETE FROM pgbus.messages m USING doomed WHERE m.id = doomed.id
"""


async def test_key_holders_outlive_a_previous_releases_janitor_during_an_upgrade(
    pg_dsn: str, pg: PgHelper
) -> None:
    """
    A previous release's janitor (still running during a rolling upgrade) takes the holders'
    '' for a channel without groups and deletes what was created more than its retention ago:
    a holder's created_at is its key's expiry, so it deletes none while the key is held.
    """
    channel = fresh("upgrade-keys")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        handled = await bus.notify(channel, "1", durable=True, dedup_key="handled")
        waiting = await bus.notify(channel, "2", durable=True, dedup_key="waiting", delay=3600)
        with trio.fail_after(WAIT):
            bus.ack(await bus.channel("in").receive())
        await wait_until(
            pg, "SELECT EXISTS (SELECT FROM pgbus.messages WHERE id = $1 AND channel = '')", handled
        )
        # Its retention as short as can be: anything created before this statement.
        await pg.execute(_PREVIOUS_DELETE_AGED, "", 0.0, 1000)
        assert await bus.notify(channel, "again", durable=True, dedup_key="handled") == handled
        assert await bus.notify(channel, "again", durable=True, dedup_key="waiting") == waiting


async def test_a_delayed_message_holds_its_key_while_it_waits_and_after_it_moves(
    pg_dsn: str, pg: PgHelper
) -> None:
    """A delayed keyed message: the same key (delayed or not) gets its id, before and after."""
    channel = fresh("delayed-key")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        first = await bus.notify(channel, "later", durable=True, dedup_key="k", delay=0.5)
        assert await bus.notify(channel, "now", durable=True, dedup_key="k") == first
        assert await bus.notify(channel, "x", durable=True, dedup_key="k", delay=9) == first
        with trio.fail_after(WAIT):
            message = await bus.channel("in").receive()
        assert (message.id, message.payload) == (first, "later")
        assert await bus.notify(channel, "now", durable=True, dedup_key="k") == first
        bus.ack(message)
    assert await stored_count(pg, channel) <= 1
    assert await pg.fetchval("SELECT count(*) FROM pgbus.delayed WHERE channel = $1", channel) == 0


# -- configuration and command line -------------------------------------------------------------

OUT_BRIDGE = """
[channels.out]
capacity = 10
[channels.in]
capacity = 10

[[bridge]]
postgres = "orders"
channel = "out"
direction = "out"
durable = true
"""


def check_config(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "bus.toml"
    path.write_text(textwrap.dedent(text))
    status = main(["check", str(path)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_check_shows_an_out_bridges_delay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """delay on a durable out-bridge is accepted and summarised."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    status, out = check_config(tmp_path, OUT_BRIDGE + "delay = 2.5\n", capsys)
    assert status == 0, out
    assert "bridge #1: channel 'out' -> durable 'orders' (out, text, delay 2.5s)" in out


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("delay = -1\n", "[[bridge]] #1: delay must be a number of seconds >= 0 (got -1)."),
        ('delay = "5"\n', "[[bridge]] #1: delay must be a number of seconds >= 0 (got '5')."),
        (
            'postgres = "x"\nchannel = "in"\ndirection = "in"\ndurable = true\ngroup = "g"\n'
            "delay = 1\n",
            '[[bridge]] #2: delay applies only to durable "out" bridges',
        ),
    ],
)
def test_check_refuses_a_bad_delay_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: str,
    error: str,
) -> None:
    """A bad delay key: exit 2 and one line naming the bridge and the key."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    text = OUT_BRIDGE + ("\n[[bridge]]\n" if extra.startswith("postgres") else "") + extra
    status, out = check_config(tmp_path, text, capsys)
    assert status == 2
    assert error in out
    assert len(out.strip().splitlines()) == 1


async def test_cli_notify_durable_delay_and_dedup_key(pg: PgHelper) -> None:
    """notify --durable --delay stores a delayed message and prints its id; a key is kept."""
    channel = fresh("cli-delay")
    result = await run_to_completion(
        "notify", channel, "later", "--durable", "--delay", "30", "--dsn", pg.dsn
    )
    assert result.returncode == 0, result.stderr
    line = result.stderr.decode().strip()
    assert line.startswith(f"pgbus: stored 5 bytes to '{channel}' at "), line
    message_id = int(line.split(" as message ")[1].split(",")[0])
    assert line.endswith(f"as message {message_id}, due in 30s")
    sql = "SELECT deliver_at - created_at FROM pgbus.delayed WHERE id = $1 AND channel = $2"
    held_back = await pg.fetchval(sql, message_id, channel)
    assert datetime.timedelta(seconds=30) <= held_back < datetime.timedelta(seconds=31)
    for _ in range(2):
        result = await run_to_completion(
            "notify", channel, "once", "--durable", "--dedup-key", "k", "--dsn", pg.dsn
        )
        assert result.returncode == 0, result.stderr
    assert await stored_count(pg, channel) == 1


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--durable", "--delay", "-1"], "--delay must be a number of seconds >= 0 (got -1.0)."),
        (["--delay", "1"], "--delay and --dedup-key apply only to durable messages"),
        (["--durable", "--dedup-key", ""], "--dedup-key must be a non-empty string"),
        (["--durable", "--dedup-key", "k", "--dedup-window", "0"], "--dedup-window must be"),
    ],
)
async def test_cli_notify_refuses_bad_time_options(
    pg: PgHelper, args: list[str], error: str
) -> None:
    """Each bad option: exit 2 and one line naming it, before connecting."""
    result = await run_to_completion("notify", "c", "x", *args, "--dsn", pg.dsn)
    assert result.returncode == 2
    err = result.stderr.decode().strip()
    assert error in err
    assert len(err.splitlines()) == 1


# -- schedules ------------------------------------------------------------------------------------


def schedule_config(path: Path, name: str, channel: str, missed: str) -> Path:
    config = path / f"schedule-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [[schedule]]
            name = "{name}"
            every = 1.0
            postgres = "{channel}"
            missed = "{missed}"
            """
        )
    )
    return config


async def slots_and_messages(pg: PgHelper, name: str, channel: str) -> list[Any]:
    return await pg.fetch(
        "SELECT s.slot, s.message_id, m.payload FROM pgbus.schedule_slots s"
        " LEFT JOIN pgbus.messages m ON m.id = s.message_id AND m.channel = $2"
        " WHERE s.name = $1 ORDER BY s.slot",
        name,
        channel,
    )


async def test_a_schedule_on_three_processes_publishes_each_slot_once_under_kill_9(
    pg: PgHelper, tmp_path: Path
) -> None:
    """
    A per-second schedule run by 3 processes, one SIGKILLed, then all: one message per slot,
    no duplicates; restarted with catch_up, the slots missed while none ran are published.
    """
    name, channel = fresh("every-second"), fresh("ticks")
    config = str(schedule_config(tmp_path, name, channel, "catch_up"))
    args = ("run", config, "--dsn", pg.dsn)
    async with running(*args) as one, running(*args) as two, running(*args) as three:
        for process in (one, two, three):
            await process.expect("stderr", "pgbus: running;")
        await wait_until(pg, "SELECT count(*) >= 3 FROM pgbus.schedule_slots WHERE name = $1", name)
        one.process.send_signal(signal.SIGKILL)
        await wait_until(pg, "SELECT count(*) >= 6 FROM pgbus.schedule_slots WHERE name = $1", name)
        for process in (two, three):
            process.process.send_signal(signal.SIGKILL)
        await one.wait(timeout=10)
    stopped = await pg.fetchval("SELECT clock_timestamp()")
    await wait_until(
        pg, "SELECT clock_timestamp() > $1::timestamptz + interval '2.5 seconds'", stopped
    )
    async with running(*args) as again:
        await again.expect("stderr", "pgbus: running;")
        await wait_until(
            pg,
            "SELECT max(slot) > $2::timestamptz + interval '1 second'"
            " FROM pgbus.schedule_slots WHERE name = $1",
            name,
            stopped,
        )
    rows = await slots_and_messages(pg, name, channel)
    slots = [r["slot"] for r in rows]
    steps = {(b - a).total_seconds() for a, b in itertools.pairwise(slots)}
    assert steps == {1.0}, f"slots missed or repeated: {slots}"
    assert all(r["payload"] is not None for r in rows)  # each slot's message is stored
    assert len({r["message_id"] for r in rows}) == len(rows)
    count = await stored_count(pg, channel)
    assert count == len(rows)
    print(f"\n{len(rows)} slots, {count} messages, 0 duplicates, 0 missed")


def two_schedules_config(path: Path, names: dict[str, str], channel: str) -> Path:
    config = path / f"schedules-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(
        "".join(
            f"""
[[schedule]]
name = "{name}"
every = 1.0
postgres = "{channel}"
missed = "{missed}"
"""
            for missed, name in names.items()
        )
    )
    return config


async def holders_killed_every_10s(pg: PgHelper, tmp_path: Path, seconds: float) -> None:
    """
    Two per-second schedules, ``catch_up`` and ``skip``, declared by 3 processes for *seconds*;
    every 10 s (of slots) the process running each is SIGKILLed and replaced. ``catch_up``:
    one message per slot, none missed, none twice. ``skip``: none twice, and every gap in its
    slots spans a moment its runner was killed (missed only while no process ran it).
    """
    names = {"catch_up": fresh("kill-catch-up"), "skip": fresh("kill-skip")}
    channel = fresh("ticks")
    args = ("run", str(two_schedules_config(tmp_path, names, channel)), "--dsn", pg.dsn)
    kills: dict[str, list[datetime.datetime]] = {missed: [] for missed in names}
    async with contextlib.AsyncExitStack() as stack:
        live: dict[int, Any] = {}

        async def start_one() -> None:
            process = await stack.enter_async_context(running(*args))
            await process.expect("stderr", "pgbus: running;")
            live[process.process.pid] = process

        for _ in range(3):
            await start_one()
        started = await pg.fetchval("SELECT clock_timestamp()")
        end = started + datetime.timedelta(seconds=seconds)
        last_kill = started
        while True:
            # 10 s of slots since the last kill (both schedules), or the end.
            await wait_until(
                pg,
                "SELECT bool_and(s.slot >= $2::timestamptz + interval '10 seconds')"
                "   AND count(*) = 2"
                "  FROM (SELECT max(slot) AS slot FROM pgbus.schedule_slots"
                "         WHERE name = ANY($1::text[]) GROUP BY name) s",
                list(names.values()),
                last_kill,
            )
            if await pg.fetchval("SELECT clock_timestamp() > $1::timestamptz", end):
                break
            runners = {
                missed: await pg.fetchval(
                    "SELECT runner FROM pgbus.schedules WHERE name = $1", name
                )
                for missed, name in names.items()
            }
            pids = {missed: int(runner.rsplit(":", 1)[1]) for missed, runner in runners.items()}
            assert set(pids.values()) <= set(live), f"a runner outside the test: {runners}"
            last_kill = await pg.fetchval("SELECT clock_timestamp()")
            for pid in set(pids.values()):
                live.pop(pid).process.send_signal(signal.SIGKILL)
            for missed in names:
                kills[missed].append(last_kill)
            while len(live) < 3:
                await start_one()
    report, total = [], 0
    for missed, name in names.items():
        rows = await slots_and_messages(pg, name, channel)
        total += len(rows)
        assert all(r["payload"] is not None for r in rows)  # each slot's message is stored
        assert len({r["message_id"] for r in rows}) == len(rows)
        slots = [r["slot"] for r in rows]
        assert len(set(slots)) == len(slots)
        gaps = [(a, b) for a, b in itertools.pairwise(slots) if (b - a).total_seconds() != 1.0]
        if missed == "catch_up":
            assert gaps == [], f"slots missed: {gaps}"
        else:
            for a, b in gaps:
                assert any(a <= k < b for k in kills[missed]), f"missed with a runner: {a} {b}"
        report.append(f"{missed}: {len(slots)} slots, {len(gaps)} gaps")
    assert await stored_count(pg, channel) == total
    print(f"\n{len(kills['skip'])} kills; " + "; ".join(report) + "; 0 duplicates")


async def test_two_schedules_on_three_processes_with_the_runner_killed_every_10s(
    pg: PgHelper, tmp_path: Path
) -> None:
    """60 s of it (the soak run below: an hour)."""
    await holders_killed_every_10s(pg, tmp_path, 60.0)


@pytest.mark.soak
async def test_soak_two_schedules_with_the_runner_killed_every_10s(
    pg: PgHelper, tmp_path: Path
) -> None:
    """An hour of it (``-m soak``; PGBUS_SOAK_SECONDS)."""
    await holders_killed_every_10s(pg, tmp_path, float(os.environ.get("PGBUS_SOAK_SECONDS", 3600)))


async def test_skip_and_latest_publish_none_or_one_missed_slot(pg_dsn: str, pg: PgHelper) -> None:
    """With slots missed: skip publishes none of them, latest only the newest."""
    for missed in ("skip", "latest"):
        name, channel = fresh(f"missed-{missed}"), fresh("ticks")
        # Slots of an hour ago and the 10 minutes since count as missed: the schedule's last
        # published slot is an hour old.
        await pg.execute(
            "INSERT INTO pgbus.schedule_slots (name, slot, message_id)"
            " VALUES ($1, date_trunc('minute', now()) - interval '1 hour', 0)",
            name,
        )
        async with pgbus.open_bus(pg_dsn) as bus:
            runner = await bus.schedule(name, channel, every=60.0, missed=missed)
            with trio.fail_after(WAIT):
                while runner.passes == 0:  # noqa: ASYNC110 (the runner's first pass)
                    await trio.sleep(0.01)
        rows = await slots_and_messages(pg, name, channel)
        newest = await pg.fetchval("SELECT date_trunc('minute', now())")
        published = [r["slot"] for r in rows[1:]]
        if missed == "skip":
            assert published == []
        else:
            assert published == [newest]


async def test_status_shows_each_schedules_last_and_next_slot(pg_dsn: str, pg: PgHelper) -> None:
    """status (text and --json) names each schedule's rule, last slot, next slot and runner."""
    name, channel = fresh("status"), fresh("ticks")
    async with pgbus.open_bus(pg_dsn, node="sched-node") as bus:
        await bus.notify("warm-up", "x", durable=True)  # the schema
        await pg.execute(
            "INSERT INTO pgbus.schedule_slots (name, slot, message_id)"
            " VALUES ($1, date_trunc('hour', now()) - interval '1 hour', 0)",
            name,
        )
        await bus.schedule(name, channel, every=3600.0, missed="catch_up")
        # The runner publishes the current hour's slot, then writes the next one it will.
        await wait_until(pg, "SELECT EXISTS (SELECT FROM pgbus.schedules WHERE name = $1)", name)
        result = await run_to_completion("status", "--dsn", pg_dsn, "--json")
        text = await run_to_completion("status", "--dsn", pg_dsn)
    assert result.returncode == 0, result.stderr
    (shown,) = [s for s in json.loads(result.stdout)["schedules"] if s["name"] == name]
    last = await pg.fetchval("SELECT max(slot) FROM pgbus.schedule_slots WHERE name = $1", name)
    assert last is not None
    following = last + datetime.timedelta(hours=1)
    assert shown == {
        "name": name,
        "postgres": channel,
        "cron": None,
        "every": 3600.0,
        "timezone": "UTC",
        "missed": "catch_up",
        "last_slot": last.astimezone(datetime.UTC).isoformat(),
        "next_slot": following.astimezone(datetime.UTC).isoformat(),
        "runner": "sched-node",
        "seen_at": shown["seen_at"],
        "running": True,
    }
    assert (
        f"schedule {name!r} -> {channel!r} (every 3600s, missed catch_up): last slot "
        f"{shown['last_slot']}, next slot {shown['next_slot']}, run by sched-node"
    ) in text.stdout.decode().splitlines()


async def test_a_slot_older_than_a_published_one_is_never_published(
    pg_dsn: str, pg: PgHelper
) -> None:
    """A runner that looked before another published a newer slot stores nothing for it."""
    name, channel = fresh("late-runner"), fresh("ticks")
    schedule = make_schedule(name, channel, every=60.0)
    newest = await pg.fetchval("SELECT date_trunc('minute', now())")
    async with pgbus.open_bus(pg_dsn) as bus, bus._database().borrow() as connection:
        await bus.notify("warm-up", "x", durable=True)  # the schema
        assert await publish_slot(connection, schedule, newest, 1000) is not None
        older = newest - datetime.timedelta(minutes=1)
        assert await publish_slot(connection, schedule, older, 1000) is None
    rows = await slots_and_messages(pg, name, channel)
    assert [r["slot"] for r in rows] == [newest]
    assert await stored_count(pg, channel) == 1


async def test_the_janitor_forgets_old_slots_and_schedules_no_runner_declares(
    pg_dsn: str, pg: PgHelper
) -> None:
    """
    Slots more than a day older than their schedule's newest are forgotten (the newest never);
    a schedule no runner wrote for a while shows as not running, and after a week is gone.
    """
    from pgbus._durable._admin import janitor_pass

    gone, idle = fresh("removed"), fresh("idle")
    async with pgbus.open_bus(pg_dsn) as bus:
        await bus.notify("warm-up", "x", durable=True)  # the schema
        for name in (gone, idle):
            await pg.execute(
                "INSERT INTO pgbus.schedule_slots (name, slot, message_id)"
                " SELECT $1, date_trunc('minute', now()) - a, 0"
                "   FROM unnest(ARRAY[interval '3 days', '25 hours', '23 hours', '0']) AS a",
                name,
            )
            await pg.execute(
                "INSERT INTO pgbus.schedules (name, channel, every, timezone, missed, runner,"
                " seen_at)"
                " VALUES ($1, 'ticks', 60, 'UTC', 'skip', 'old-node', now() - $2::text::interval)",
                name,
                "8 days" if name == gone else "5 minutes",
            )
        async with bus._database().borrow() as connection:
            await janitor_pass(connection, lambda channel: 3600.0, {})
        text = await run_to_completion("status", "--dsn", pg_dsn)
    for name in (gone, idle):
        ages = await pg.fetch(
            "SELECT date_trunc('minute', now()) - slot AS age FROM pgbus.schedule_slots"
            " WHERE name = $1 ORDER BY slot",
            name,
        )
        assert [r["age"] for r in ages] == [datetime.timedelta(hours=23), datetime.timedelta(0)]
    names = await pg.fetch(
        "SELECT name FROM pgbus.schedules WHERE name = ANY($1::text[])", [gone, idle]
    )
    assert [r["name"] for r in names] == [idle]
    (line,) = [x for x in text.stdout.decode().splitlines() if idle in x]
    assert "not running (last run by old-node at " in line
    assert gone not in text.stdout.decode()


async def test_a_schedule_runs_on_one_node_at_a_time_and_moves_when_it_leaves(
    pg_dsn: str, pg: PgHelper
) -> None:
    """Two nodes declare one schedule: one runs it (the other never looks) until it leaves."""
    name, channel = fresh("single"), fresh("ticks")
    async with pgbus.open_bus(pg_dsn, node="standby") as standby:
        async with pgbus.open_bus(pg_dsn, node="holder") as holder:
            first = await holder.schedule(name, channel, every=0.2)
            with trio.fail_after(WAIT):
                while first.passes < 3:  # noqa: ASYNC110 (the holder's passes)
                    await trio.sleep(0.01)
            second = await standby.schedule(name, channel, every=0.2)
            published = first.published
            with trio.fail_after(WAIT):
                while first.published < published + 5:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            status = await standby.cluster_status()
            (singleton,) = [s for s in status.singletons if s.name == f"schedule:{name}"]
            assert singleton.holder == "holder"
            assert sorted(singleton.candidates) == ["holder", "standby"]
            assert second.passes == 0
        # The holder left: the standby takes the schedule over.
        with trio.fail_after(WAIT):
            while second.published < 3:  # noqa: ASYNC110 (the new holder's slots)
                await trio.sleep(0.01)
    rows = await pg.fetch(
        "SELECT s.slot, m.payload FROM pgbus.schedule_slots s"
        " JOIN pgbus.messages m ON m.id = s.message_id WHERE s.name = $1",
        name,
    )
    assert len(rows) == first.published + second.published
    assert len({r["slot"] for r in rows}) == len(rows)


def test_slots_follow_cron_in_its_time_zone() -> None:
    """'0 3 * * *' in Europe/Paris is 01:00 UTC in summer, 02:00 in winter (DST)."""
    schedule = make_schedule("nightly", "reports", cron="0 3 * * *", timezone="Europe/Paris")
    start = datetime.datetime(2026, 3, 28, 12, tzinfo=datetime.UTC)
    slots = schedule.slots_after(start)
    assert [next(slots).isoformat() for _ in range(2)] == [
        "2026-03-29T01:00:00+00:00",
        "2026-03-30T01:00:00+00:00",
    ]
    winter = datetime.datetime(2026, 1, 10, 2, 30, tzinfo=datetime.UTC)
    assert schedule.latest_at_or_before(winter).isoformat() == "2026-01-10T02:00:00+00:00"
    every = make_schedule("tick", "ticks", every=2.5)
    after = datetime.datetime(2026, 1, 1, 0, 0, 1, tzinfo=datetime.UTC)
    assert next(every.slots_after(after)).isoformat() == "2026-01-01T00:00:02.500000+00:00"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"cron": "61 * * * *"}, "cron must be a cron expression of five fields"),
        ({"cron": "* * * * * *"}, "cron must be a cron expression of five fields"),
        ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "timezone must be an IANA time zone"),
        ({"cron": "0 3 * * *", "every": 5}, "cron or every is required (one of them, not both)"),
        ({}, "cron or every is required (one of them, not both)"),
        ({"every": 0}, "every must be a number of seconds > 0 (got 0)"),
        ({"every": 1, "missed": "later"}, "missed must be one of 'skip', 'catch_up', 'latest'"),
    ],
)
async def test_bad_schedules_are_refused_by_the_api_and_check(
    pg_dsn: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    error: str,
) -> None:
    """Bus.schedule and check refuse each bad schedule in one line naming the key."""
    async with pgbus.open_bus(pg_dsn) as bus:
        with pytest.raises(pgbus.ConfigError, match=re.escape(error)):
            await bus.schedule("s", "ticks", **options)
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    toml = '[[schedule]]\nname = "s"\npostgres = "ticks"\n' + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in options.items()
    )
    status, out = check_config(tmp_path, toml, capsys)
    assert status == 2
    assert f"[[schedule]] #1: {error}" in out
    assert len(out.strip().splitlines()) == 1


def test_check_summarises_a_schedule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A [[schedule]] shows in check's summary with its rule, channel and missed policy."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    toml = (
        '[[schedule]]\nname = "nightly-report"\ncron = "0 3 * * *"\ntimezone = "Europe/Paris"\n'
        'postgres = "reports"\npayload = { kind = "nightly" }\n'
    )
    status, out = check_config(tmp_path, toml, capsys)
    assert status == 0, out
    assert (
        "schedule 'nightly-report': cron '0 3 * * *' (Europe/Paris) -> durable 'reports', "
        "missed skip"
    ) in out


async def test_the_schedule_example_prints_a_heartbeat(pg: PgHelper) -> None:
    """`pgbus run examples/schedule.toml` publishes its heartbeat and its worker prints it."""
    async with running("run", "examples/schedule.toml", "--dsn", pg.dsn) as bus:
        await bus.expect("stderr", "pgbus: running;")
        line = await bus.expect("stdout", "heartbeat", timeout=20)
    assert json.loads(line)["channel"] == "reports"


async def test_the_grants_alone_run_delays_keys_and_schedules(pg: PgHelper) -> None:
    """A role with only `pgbus grants` publishes delayed and keyed messages and runs a schedule."""
    from test_restricted_role import role

    channel = fresh("restricted-time")
    async with role(pg, granted=True) as dsn, pgbus.open_bus(dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        first = await bus.notify(channel, "keyed", durable=True, dedup_key="k")
        assert await bus.notify(channel, "again", durable=True, dedup_key="k") == first
        await bus.notify(channel, "later", durable=True, delay=0.2)
        await bus.schedule(fresh("restricted"), channel, every=0.5, payload="tick")
        got: set[str] = set()
        with trio.fail_after(WAIT):  # a schedule's payload is JSON: "tick" with its quotes
            while got != {"keyed", "later", '"tick"'}:
                message = await bus.channel("in").receive()
                got.add(message.payload)
                bus.ack(message)
