"""
Outbound bridges, one-shot notify and transactional publish, against a real PostgreSQL.

What is published is checked with the test helper's own plain asyncpg listener (`pg.listen`),
independent of pgbus's inbound side.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from psycopg import sql

import pgbus

WAIT = 10


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def take(listener: trio.MemoryReceiveChannel[tuple[str, str, int]], count: int) -> list[str]:
    """The payloads of the next *count* notifications a plain listener receives."""
    with trio.fail_after(WAIT):
        return [(await listener.receive())[1] for _ in range(count)]


async def test_messages_sent_to_an_outbound_channel_reach_postgres_in_order(pg, pg_dsn) -> None:
    """Every message sent to the bridged channel is published, in order, by a pgbus connection."""
    name = unique("Out Bound")
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", 100)
        await bus.bridge_out("out", name)
        for i in range(1000):
            await bus.send("out", f"m{i} ✓")
        assert await take(listener, 1000) == [f"m{i} ✓" for i in range(1000)]
    [stats] = bus.statistics().bridges  # final once the bus is closed
    assert (stats.direction, stats.messages, stats.rejected) == ("out", 1000, 0)


async def test_identical_messages_are_never_merged(pg, pg_dsn) -> None:
    """500 identical messages in are 500 notifications out, although they are batched."""
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", math.inf)
        for _ in range(500):
            bus.send_nowait("out", "same")
        await bus.bridge_out("out", name)  # starts with all 500 queued: one would-be batch
        assert await take(listener, 500) == ["same"] * 500


async def test_json_codec_encodes_compactly_without_ascii_escapes(pg, pg_dsn) -> None:
    """The json codec sends compact JSON and keeps non-ASCII characters as they are."""
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", 10)
        await bus.bridge_out("out", name, codec="json")
        await bus.send("out", {"name": "Zoë", "n": [1, 2]})
        assert await take(listener, 1) == ['{"name":"Zoë","n":[1,2]}']


async def test_payload_byte_limit_is_checked_in_the_server_encoding(pg, pg_dsn, caplog) -> None:
    """7999 bytes of multi-byte text pass; 8000 are refused with a clear error; the rest flow on."""
    name = unique()
    fits = "é" * 3999 + "a"  # 7999 bytes
    too_big = "é" * 4000  # 8000 bytes
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", 10)
        await bus.bridge_out("out", name)
        for message in [fits, too_big, "after"]:
            await bus.send("out", message)
        assert await take(listener, 2) == [fits, "after"]
    [stats] = bus.statistics().bridges
    assert (stats.messages, stats.rejected) == (2, 1)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == (
        f"outbound bridge 'out' -> {name!r} refused a message: payload for channel {name!r} is "
        "8000 bytes once encoded; PostgreSQL accepts at most 7999. Send a reference (a row id) "
        "instead of the data."
    )


async def test_a_message_the_codec_cannot_encode_is_refused_and_the_rest_flow(pg, pg_dsn) -> None:
    """A non-str on a text bridge, or a NUL character, is refused; the messages around it pass."""
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", 10)
        await bus.bridge_out("out", name)
        for message in ["a", 42, "nul\x00here", "b"]:
            await bus.send("out", message)
        assert await take(listener, 2) == ["a", "b"]
    [stats] = bus.statistics().bridges
    assert (stats.messages, stats.rejected) == (2, 2)


def payloads(plain: psycopg.Connection[Any], count: int) -> list[str]:
    """The next *count* notifications a plain (blocking) psycopg connection receives."""
    return [n.payload for n in plain.notifies(timeout=WAIT, stop_after=count)]


async def test_a_send_to_an_idle_bridge_is_written_before_the_sender_yields(pg_dsn) -> None:
    """
    The fast path is on: to an idle outbound bridge, `send` writes the statement itself, so
    the server publishes it while this task holds the whole Trio loop (no bridge task runs).
    """
    name = unique()
    with psycopg.connect(pg_dsn, autocommit=True) as plain:
        plain.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
        async with pgbus.open_bus(pg_dsn) as bus:
            bus.add_channel("out", 10)
            await bus.bridge_out("out", name)
            # The first statement on a connection is prepared first: a round trip of its own.
            await bus.send("out", "prepares")
            received = await trio.to_thread.run_sync(lambda: payloads(plain, 1))
            assert received == ["prepares"]
            # The server notifies listeners at COMMIT, maybe before the bridge has read its
            # reply: until it has, it is busy (blocked on the socket), not waiting for work.
            with trio.fail_after(WAIT):
                while bus.statistics().bridges[0].messages < 1:
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            await trio.testing.wait_all_tasks_blocked()  # the bridge waits for work
            await bus.send("out", "direct")
            # Blocking on purpose: nothing else in this Trio loop runs until it returns.
            assert payloads(plain, 1) == ["direct"]
            await bus.send("out", "queued")  # in flight: this one waits in the channel
        assert payloads(plain, 1) == ["queued"]
    [stats] = bus.statistics().bridges
    assert (stats.messages, stats.rejected) == (3, 0)


async def test_a_message_handed_to_an_idle_bridge_keeps_its_place(pg, pg_dsn) -> None:
    """
    A message that reaches an idle bridge through the channel itself (a relay, a sender
    clone) is published before one sent right after it with `send`, which must not overtake.
    """
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", 10)
        await bus.bridge_out("out", name)
        for round_ in range(3):
            await trio.testing.wait_all_tasks_blocked()  # the bridge waits for work
            bus.channel("out").send_nowait(f"through the channel {round_}")
            await bus.send("out", f"sent {round_}")
            assert await take(listener, 2) == [f"through the channel {round_}", f"sent {round_}"]
    [stats] = bus.statistics().bridges
    assert (stats.messages, stats.rejected) == (6, 0)


async def test_a_message_refused_by_an_idle_bridge_leaves_it_idle(pg, pg_dsn, caplog) -> None:
    """The first message, sent to an idle bridge, is refused and logged; the next flows."""
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", 10)
        await bus.bridge_out("out", name)
        await trio.testing.wait_all_tasks_blocked()
        await bus.send("out", "x" * 8000)
        await trio.testing.wait_all_tasks_blocked()
        await bus.send("out", "after")
        assert await take(listener, 1) == ["after"]
    [stats] = bus.statistics().bridges
    assert (stats.messages, stats.rejected) == (1, 1)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "refused a message" in record.getMessage()


async def test_notify_refuses_oversized_payloads_before_sending(pg_dsn) -> None:
    """bus.notify raises PayloadTooLargeError naming channel, size and limit."""
    async with pgbus.open_bus(pg_dsn) as bus:
        with pytest.raises(
            pgbus.PayloadTooLargeError,
            match=r"^payload for channel 'c' is 8000 bytes once encoded; PostgreSQL accepts at mo",
        ):
            await bus.notify("c", "é" * 4000)
        with pytest.raises(pgbus.ChannelNameError, match="is 64 bytes"):
            await bus.notify("x" * 64, "hi")


async def test_notify_sends_one_notification(pg, pg_dsn) -> None:
    """bus.notify publishes at once with the exact channel name."""
    name = unique("Exact Name")
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        await bus.notify(name, {"a": 1}, codec="json")
        assert await take(listener, 1) == ['{"a":1}']


async def test_transactional_publish_is_delivered_at_commit(pg, pg_dsn) -> None:
    """A publish inside a transaction arrives only when it commits, after earlier commits."""
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        async with bus.transaction() as tx:
            await tx.publish(name, "inside")
            await tx.execute("SELECT 1")
            await pg.execute("SELECT pg_notify($1, 'committed meanwhile')", name)
            assert await take(listener, 1) == ["committed meanwhile"]
        assert await take(listener, 1) == ["inside"]


async def test_rollback_never_delivers(pg, pg_dsn) -> None:
    """Nothing published in a rolled-back transaction is ever delivered."""
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:

        async def publish_then_fail() -> None:
            async with bus.transaction() as tx:
                await tx.publish(name, "rolled back")
                raise RuntimeError("changed my mind")

        with pytest.raises(RuntimeError, match="changed my mind"):
            await publish_then_fail()
        with trio.move_on_after(0.001):  # cancelled mid-transaction: rolled back too
            async with bus.transaction() as tx:
                await tx.publish(name, "cancelled")
                await trio.sleep_forever()
        await pg.execute("SELECT pg_notify($1, 'marker')", name)
        assert await take(listener, 1) == ["marker"]
    await pg.wait_for_no_backends()


async def test_transaction_keeps_order_and_refuses_a_duplicate(pg, pg_dsn) -> None:
    """Publishes arrive in order; the same payload twice in one transaction is refused."""
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        async with bus.transaction() as tx:
            await tx.execute("CREATE TEMP TABLE t (n int)")
            for i in range(100):
                await tx.publish(name, str(i))
            with pytest.raises(
                pgbus.DuplicateNotificationError, match="would deliver it only once"
            ):
                await tx.publish(name, "7")
            await tx.execute("INSERT INTO t VALUES (1)")
            assert await tx.fetchval("SELECT count(*) FROM t") == 1
        assert await take(listener, 100) == [str(i) for i in range(100)]


async def test_outbound_republishes_after_its_connection_is_killed(pg, pg_dsn) -> None:
    """Messages sent while the publishing connection is dead all arrive after it reconnects."""
    name = unique()
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", math.inf)
        await bus.bridge_out("out", name)
        await bus.send("out", "before")
        assert await take(listener, 1) == ["before"]
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            f"pgbus:publish {name}",
        )
        for i in range(100):
            await bus.send("out", f"after {i}")
        received = await take(listener, 100)
        assert received == [f"after {i}" for i in range(100)]
    [stats] = bus.statistics().bridges
    assert stats.reconnects == 1


async def test_leaving_the_bus_publishes_what_is_still_queued(pg, pg_dsn) -> None:
    """Shutdown flushes the outbound channel before closing the connection."""
    name = unique()
    async with pg.listen(name) as listener:
        async with pgbus.open_bus(pg_dsn) as bus:
            bus.add_channel("out", math.inf)
            await bus.bridge_out("out", name)
            for i in range(2000):
                bus.send_nowait("out", str(i))
        assert await take(listener, 2000) == [str(i) for i in range(2000)]
