"""
Inbound bridges: PostgreSQL channels into Trio channels, against a real PostgreSQL.

Rules for these tests: every wait on the database is bounded by `trio.fail_after`; the real
clock is used (never autojump with a live database); a channel name is unique per test.
"""

from __future__ import annotations

import logging
import math
import random
import uuid

import pytest
import trio

import pgbus

WAIT = 10  # seconds: generous, only reached when a test is failing


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def receive(bus: pgbus.Bus, channel: str, count: int) -> list[object]:
    """The next *count* messages of a bus channel."""
    with trio.fail_after(WAIT):
        return [await bus.channel(channel).receive() for _ in range(count)]


async def wait_until_full(bus: pgbus.Bus, channel: str) -> None:
    """Wait until the bridge has filled *channel* (capacity 2), so it holds the socket."""
    with trio.fail_after(WAIT):
        # Polling: nothing signals "the bridge has filled the channel and paused".
        while bus.channel(channel).statistics().buffered < 2:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def payloads(bus: pgbus.Bus, channel: str, count: int) -> list[object]:
    messages = await receive(bus, channel, count)
    assert all(type(m) is pgbus.Notification for m in messages), messages
    return [m.payload for m in messages]  # type: ignore[attr-defined]


async def test_notification_arrives_with_channel_payload_and_sender_pid(pg, pg_dsn) -> None:
    """A pg_notify from another connection arrives as a Notification with the sender's pid."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in")
        sender_pid = await pg.fetchval("SELECT pg_backend_pid()")
        await pg.execute("SELECT pg_notify($1, 'hello')", name)
        [message] = await receive(bus, "in", 1)
    assert message == pgbus.Notification(channel=name, payload="hello", pid=sender_pid)


@pytest.mark.parametrize("name", ["Mixed Case", "with space", "Ünïcødé ✓", 'quo"te', "a" * 63])
async def test_exact_channel_names_are_listened_to_exactly(pg, pg_dsn, name: str) -> None:
    """Mixed-case, spaced, unicode, quoted and 63-byte names are used exactly as given."""
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in")
        assert await bus.listening_channels() == {name}
        if name.lower() != name:  # a folded name is another channel
            await pg.execute("SELECT pg_notify($1, 'folded')", name.lower())
        await pg.execute("SELECT pg_notify($1, 'exact')", name)
        assert await payloads(bus, "in", 1) == ["exact"]


async def test_channel_name_over_63_bytes_is_refused_before_any_io(pg_dsn) -> None:
    """A 64-byte name (here 32 two-byte characters) is refused; LISTEN would truncate it."""
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        with pytest.raises(
            pgbus.ChannelNameError,
            match=r"^PostgreSQL channel name 'é{32}' is 64 bytes; PostgreSQL allows at most 63",
        ):
            await bus.bridge_in("é" * 32, "in")
        assert await bus.listening_channels() == set()


async def test_unicode_payload_passes_byte_for_byte(pg, pg_dsn) -> None:
    """Text payloads arrive exactly as sent, whatever their characters."""
    name = unique()
    text = "héllo wörld ✓ 😀 \t\n' \" \\"
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in")
        await pg.execute("SELECT pg_notify($1, $2)", name, text)
        assert await payloads(bus, "in", 1) == [text]


async def test_identical_payloads_from_separate_transactions_are_all_delivered(pg, pg_dsn) -> None:
    """500 identical notifications, each in its own transaction, arrive 500 times."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", math.inf)
        await bus.bridge_in(name, "in")
        for _ in range(500):
            await pg.execute("SELECT pg_notify($1, 'same')", name)
        assert await payloads(bus, "in", 500) == ["same"] * 500


async def test_order_within_a_transaction_and_across_commits(pg, pg_dsn) -> None:
    """Notifications arrive in send order inside a transaction and in commit order across them."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", math.inf)
        await bus.bridge_in(name, "in")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 1000) AS i", name)
        await pg.execute(
            "SELECT pg_notify($1, i::text) FROM generate_series(1001, 2000) AS i", name
        )
        assert await payloads(bus, "in", 2000) == [str(i) for i in range(1, 2001)]


async def test_one_postgres_channel_feeds_several_trio_channels(pg, pg_dsn) -> None:
    """Each Trio channel bridged from the same Postgres channel gets every notification."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("a", 10)
        bus.add_channel("b", 10)
        await bus.bridge_in(name, "a")
        await bus.bridge_in(name, "b", codec="json")
        await pg.execute("SELECT pg_notify($1, '[1, 2]')", name)
        assert await payloads(bus, "a", 1) == ["[1, 2]"]
        assert await payloads(bus, "b", 1) == [[1, 2]]


async def test_json_codec_decodes_and_survives_malformed_payloads(pg, pg_dsn, caplog) -> None:
    """Invalid JSON is logged in one line and counted; the notifications around it arrive."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in", codec="json")
        for payload in ['{"n": 1}', "not json {", '{"n": "ü"}']:
            await pg.execute("SELECT pg_notify($1, $2)", name, payload)
        assert await payloads(bus, "in", 2) == [{"n": 1}, {"n": "ü"}]
        [stats] = bus.statistics().bridges
    assert (stats.messages, stats.rejected) == (2, 1)
    [record] = [
        r for r in caplog.records if r.name == "pgbus.bridge" and r.levelno == logging.ERROR
    ]
    assert f"channel {name!r} (json codec): payload is not valid JSON" in record.getMessage()
    assert "\n" not in record.getMessage()


async def test_bridging_the_same_pair_twice_delivers_once(pg, pg_dsn) -> None:
    """bridge_in is idempotent for the same channels and options (actors may redo it on restart)."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in")
        await bus.bridge_in(name, "in")
        with pytest.raises(pgbus.ConfigError, match="already bridged into 'in' with other options"):
            await bus.bridge_in(name, "in", codec="json")
        await pg.execute("SELECT pg_notify($1, 'one'), pg_notify($1, 'two')", name)
        assert await payloads(bus, "in", 2) == ["one", "two"]
        assert bus.channel("in").statistics().buffered == 0


async def test_closing_the_last_bridge_of_a_channel_unlistens(pg_dsn) -> None:
    """The server's listening set follows the bridges: UNLISTEN once the last one closes."""
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("a", 10)
        bus.add_channel("b", 10)
        first = await bus.bridge_in("shared", "a")
        second = await bus.bridge_in("shared", "b")
        other = await bus.bridge_in("other", "a")
        await first.aclose()
        assert await bus.listening_channels() == {"shared", "other"}
        await second.aclose()
        await other.aclose()
        assert await bus.listening_channels() == set()


async def test_ignore_own_skips_what_this_bus_sent(pg, pg_dsn) -> None:
    """With ignore_own, the bus's own notifications are skipped and others' still arrive."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("mine", 10)
        bus.add_channel("all", 10)
        bus.add_channel("out", 10)
        await bus.bridge_in(name, "mine", ignore_own=True)
        await bus.bridge_in(name, "all")
        await bus.bridge_out("out", name)
        await bus.send("out", "from the bus")
        [echo] = await receive(bus, "all", 1)
        await pg.execute("SELECT pg_notify($1, 'from elsewhere')", name)
        assert await payloads(bus, "all", 1) == ["from elsewhere"]
        assert await payloads(bus, "mine", 1) == ["from elsewhere"]
        assert echo.payload == "from the bus"  # type: ignore[attr-defined]
        assert echo.pid in bus.own_pids  # type: ignore[attr-defined]


async def test_block_overflow_holds_the_backlog_in_postgres_and_loses_nothing(pg, pg_dsn) -> None:
    """With 'block', a full channel pauses reading; every notification arrives, in order."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 2)
        await bus.bridge_in(name, "in")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 3000) AS i", name)
        await wait_until_full(bus, "in")
        assert await payloads(bus, "in", 3000) == [str(i) for i in range(1, 3001)]
        [stats] = bus.statistics().bridges
    assert (stats.messages, stats.dropped) == (3000, 0)


async def wait_until_received(bus: pgbus.Bus, count: int) -> None:
    """Wait until the bridge has handled *count* notifications (delivered or dropped)."""
    with trio.fail_after(WAIT):
        while True:  # polling: nothing signals "the bridge has read this far"
            [stats] = bus.statistics().bridges
            if stats.messages + stats.dropped >= count:
                return
            await trio.sleep(0.01)


async def test_drop_newest_keeps_the_oldest_and_marks_the_gap(pg, pg_dsn) -> None:
    """'drop_newest' keeps what was queued, drops the rest, and puts a Gap before what follows."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 4)
        await bus.bridge_in(name, "in", overflow="drop_newest")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 20) AS i", name)
        await wait_until_received(bus, 20)
        first = await receive(bus, "in", 4)
        await pg.execute("SELECT pg_notify($1, 'after')", name)
        rest = await receive(bus, "in", 2)
        [stats] = bus.statistics().bridges
    assert [m.payload for m in first] == ["1", "2", "3", "4"]  # type: ignore[attr-defined]
    assert rest[0] == pgbus.Gap(channel=name, reason="overflow", dropped=16)
    assert rest[1].payload == "after"  # type: ignore[attr-defined]
    assert (stats.messages, stats.dropped) == (5, 16)


async def test_drop_oldest_keeps_the_newest_and_counts_every_drop(pg, pg_dsn) -> None:
    """'drop_oldest' keeps the newest notifications; the gaps add up to what was dropped."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 4)
        await bus.bridge_in(name, "in", overflow="drop_oldest")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 20) AS i", name)
        await wait_until_received(bus, 20)
        queued = await receive(bus, "in", 4)
    gaps = [m for m in queued if type(m) is pgbus.Gap]
    kept = [m.payload for m in queued if type(m) is pgbus.Notification]
    assert kept == ["19", "20"]
    assert sum(g.dropped for g in gaps) == 18
    assert type(queued[-1]) is pgbus.Notification


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
async def test_drop_policies_need_room_for_the_gap_marker(pg_dsn, overflow: str) -> None:
    """A dropping bridge into a channel of capacity < 2 is refused: the Gap needs a slot."""
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("tiny", 1)
        with pytest.raises(pgbus.ConfigError, match=r"needs channel 'tiny' to hold at least 2"):
            await bus.bridge_in("x", "tiny", overflow=overflow)


async def test_leaving_the_bus_closes_every_connection(pg, pg_dsn) -> None:
    """After the block, no backend with a pgbus application_name is left."""
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        bus.add_channel("out", 10)
        await bus.bridge_in(unique(), "in")
        await bus.bridge_out("out", unique())
        await bus.notify(unique(), "x")
        names = {row["application_name"] for row in await pg.backends()}
        assert {"pgbus:listen", "pgbus:pool"} <= names
        assert any(n.startswith("pgbus:publish") for n in names)
    await pg.wait_for_no_backends()


async def test_random_cancellation_leaves_listening_set_equal_to_registry(pg, pg_dsn) -> None:
    """Cancelling bridge setup and teardown at random points never desynchronises LISTENs."""
    rng = random.Random(1234)
    names = [f"c{i}" for i in range(8)]
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", math.inf)
        bridges: dict[str, pgbus.Bridge] = {}
        for _ in range(1000):
            name = rng.choice(names)
            with trio.move_on_after(rng.uniform(0, 0.02)):
                if name in bridges:
                    await bridges[name].aclose()
                    del bridges[name]
                else:
                    bridges[name] = await bus.bridge_in(name, "in")
        registry = {b.postgres for b in bus.statistics().bridges if b.direction == "in"}
        assert registry == set(bridges)
        assert await bus.listening_channels() == registry
    await pg.wait_for_no_backends()


async def test_bridging_while_a_full_channel_holds_the_socket_waits_without_reconnecting(
    pg, pg_dsn
) -> None:
    """A new bridge_in during back-pressure waits for the backlog: no reconnect, no Gap."""
    held, other = unique("held"), unique("other")
    async with pgbus.open_bus(pg_dsn, keepalive=0.5) as bus:
        bus.add_channel("held", 2)
        bus.add_channel("other", 10)
        await bus.bridge_in(held, "held")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 3000) AS i", held)
        await wait_until_full(bus, "held")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus.bridge_in, other, "other")
            with trio.fail_after(WAIT):
                # Slower than the keepalive on purpose: the LISTEN must wait, not time out.
                for i in range(1, 3001):
                    message = await bus.channel("held").receive()
                    assert getattr(message, "payload", None) == str(i)
                    if i % 1000 == 0:
                        await trio.sleep(0.3)
        assert await bus.listening_channels() == {held, other}
        assert {s.reconnects for s in bus.statistics().bridges} == {0}


async def test_cancelling_a_bridge_held_behind_back_pressure_reconciles(pg, pg_dsn) -> None:
    """Giving up on a bridge_in stuck behind a full channel reconnects and stays consistent."""
    held, other = unique("held"), unique("other")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("held", 2)
        bus.add_channel("other", 10)
        await bus.bridge_in(held, "held")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 3000) AS i", held)
        await wait_until_full(bus, "held")
        with trio.move_on_after(0.5) as gave_up:
            await bus.bridge_in(other, "other")  # nobody consumes "held": this cannot finish
        assert gave_up.cancelled_caught
        with trio.fail_after(WAIT):
            while True:  # the stream goes on; the reconnect shows as a Gap in it
                message = await bus.channel("held").receive()
                if type(message) is pgbus.Gap:
                    break
        assert await bus.listening_channels() == {held, other}
