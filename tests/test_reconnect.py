"""Reconnection: the listening connection dies, the bus comes back and says what may be lost."""

from __future__ import annotations

import logging
import math
import uuid

import trio
import trio.testing

import pgbus

WAIT = 10


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def kill_listener(pg) -> int:
    pid = await pg.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbus:listen'"
        " AND datname = current_database()"
    )
    assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid)
    return int(pid)


async def test_killed_listener_reconnects_and_marks_the_gap_in_place(pg, pg_dsn, caplog) -> None:
    """After pg_terminate_backend: what came before, then a Gap per channel, then new traffic."""
    a, b = unique("a"), unique("b")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", math.inf)
        bus.add_channel("other", math.inf)
        await bus.bridge_in(a, "in")
        await bus.bridge_in(b, "other", codec="json")
        await pg.execute("SELECT pg_notify($1, 'before')", a)
        with trio.fail_after(WAIT):
            assert (await bus.channel("in").receive()).payload == "before"  # type: ignore[attr-defined]
        old_pid = await kill_listener(pg)
        with trio.fail_after(WAIT):
            gap = await bus.channel("in").receive()
            other_gap = await bus.channel("other").receive()
        # The gap comes only once LISTEN is active again, so this cannot be lost:
        await pg.execute("SELECT pg_notify($1, 'after')", a)
        with trio.fail_after(WAIT):
            after = await bus.channel("in").receive()
        assert gap == pgbus.Gap(channel=a, reason="reconnect", dropped=None)
        assert other_gap == pgbus.Gap(channel=b, reason="reconnect", dropped=None)
        assert after.payload == "after"  # type: ignore[attr-defined]
        assert after.pid != old_pid  # type: ignore[attr-defined]
        assert await bus.listening_channels() == {a, b}
        assert {s.reconnects for s in bus.statistics().bridges} == {1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("listening connection to" in w and "pgbus.Gap" in w for w in warnings), warnings
    await pg.wait_for_no_backends()


async def test_actor_downstream_keeps_running_through_a_reconnect(pg, pg_dsn) -> None:
    """An actor consuming a bridged channel sees the Gap in-band and goes on handling messages."""
    name = unique()
    seen: list[object] = []
    first, gap, last = trio.Event(), trio.Event(), trio.Event()

    class Recorder(pgbus.Actor):
        async def handle(self, message: object) -> None:
            seen.append(message)
            if type(message) is pgbus.Gap:
                gap.set()
            elif getattr(message, "payload", None) == "first":
                first.set()
            elif getattr(message, "payload", None) == "last":
                last.set()

    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.spawn(Recorder, name="recorder", inbox="in")
        await bus.bridge_in(name, "in")
        await pg.execute("SELECT pg_notify($1, 'first')", name)
        with trio.fail_after(WAIT):
            await first.wait()  # killed earlier, 'first' could be lost before it is read
        await kill_listener(pg)
        with trio.fail_after(WAIT):
            await gap.wait()
        await pg.execute("SELECT pg_notify($1, 'last')", name)
        with trio.fail_after(WAIT):
            await last.wait()
    kinds = [type(m).__name__ for m in seen]
    assert kinds == ["Notification", "Gap", "Notification"]
    assert bus.statistics().actors[0].restarts == 0


async def test_repeated_kills_never_lose_a_listen(pg, pg_dsn) -> None:
    """Killing the listener five times in a row still ends with every channel listened to."""
    names = {unique() for _ in range(5)}
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", math.inf)
        for name in names:
            await bus.bridge_in(name, "in")
        for _ in range(5):
            await kill_listener(pg)
            with trio.fail_after(WAIT):
                for _ in names:  # one Gap per route, after which LISTEN is active again
                    assert type(await bus.channel("in").receive()) is pgbus.Gap
        assert await bus.listening_channels() == names


async def test_bus_connected_says_whether_the_server_is_reached(pg_dsn: str) -> None:
    """A library user sees the bus waiting for a server: connected is False, then True."""
    from test_cli import closed_port

    down = f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere"
    async with pgbus.open_bus(down, keepalive=1.0) as bus:
        bus.add_channel("a", 1)
        assert bus.connected  # nothing to connect yet
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus.bridge_in, "nobody_listens", "a")
            await trio.testing.wait_all_tasks_blocked(0.2)
            assert not bus.connected
            assert not bus.statistics().connected
            nursery.cancel_scope.cancel()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("a", 1)
        await bus.bridge_in("connected_check", "a")
        assert bus.connected
