"""
Durable leases against a real PostgreSQL: renewed while a message waits in the channel or runs
in ``handle``, never held by two live members, never beyond ``max_attempts``; a dead holder's
claims come back together; undecodable messages and deliveries without a message become dead
letters with a reason; fruitless wake-ups cost a bounded recheck.

Processes that die are in test_durable_crash.py; these use members in this process, and play a
dead member by rewriting its delivery rows.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
from test_durable import WAIT, fresh, receive_all, wait_for

import pgbus
from pgbus._durable._consumer import POLL_EVERY, DurableConsumer

if TYPE_CHECKING:
    from conftest import PgHelper


async def test_handlers_running_10x_their_lease_are_never_redelivered(pg_dsn: str) -> None:
    """Two members, lease 0.2 s, 50 handlers of 2 s each: every message delivered once."""
    name = fresh("slow")
    lease = 0.2
    deliveries: Counter[int] = Counter()
    attempts: set[int] = set()
    acked = 0
    done = trio.Event()

    async def handle(bus: pgbus.Bus, message: pgbus.DurableMessage) -> None:
        nonlocal acked
        await trio.sleep(10 * lease)  # the work: ten leases long
        bus.ack(message)
        acked += 1
        if acked == 50:
            done.set()

    async def member(bus: pgbus.Bus, nursery: trio.Nursery) -> None:
        while True:
            message = await bus.channel("in").receive()
            assert isinstance(message, pgbus.DurableMessage)
            deliveries[message.id] += 1
            attempts.add(message.attempt)
            nursery.start_soon(handle, bus, message)

    async with pgbus.open_bus(pg_dsn) as one, pgbus.open_bus(pg_dsn) as two:
        for bus in (one, two):
            bus.add_channel("in", 30)
            await bus.bridge_in(name, "in", durable=True, group="g", lease=lease)
        async with one.transaction() as tx:
            for i in range(50):
                await tx.publish(name, f"m{i}", durable=True)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(member, one, nursery)
                nursery.start_soon(member, two, nursery)
                await done.wait()
                nursery.cancel_scope.cancel()
        consumers = [c for bus in (one, two) for c, _ in bus._durable_in]
    assert len(deliveries) == 50
    assert set(deliveries.values()) == {1}
    assert attempts == {1}
    assert sum(c.leases_lost for c in consumers) == 0


async def test_prefetch_longer_than_the_lease_is_handled_once_each(
    pg_dsn: str, pg: PgHelper
) -> None:
    """Lease 0.3 s, 40 messages waiting up to 2 s in the channel: each handled once, all acked."""
    name = fresh("prefetch")
    handled: list[tuple[str, int]] = []
    done = trio.Event()

    class Slowish(pgbus.Actor):
        async def handle(self, message: pgbus.DurableMessage) -> None:
            handled.append((message.payload, message.attempt))
            await trio.sleep(0.05)
            if len(handled) == 40:
                done.set()

    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 40)
        await bus.bridge_in(name, "in", durable=True, group="g", lease=0.3, max_attempts=3)
        await bus.spawn(Slowish, name="slowish", inbox="in")
        async with bus.transaction() as tx:
            for i in range(40):
                await tx.publish(name, f"m{i}", durable=True)
        with trio.fail_after(WAIT):
            await done.wait()
        await wait_for(
            pg, "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1", name, expect=0
        )
        [(consumer, _)] = bus._durable_in
        assert consumer._inflight == {}
    assert handled == [(f"m{i}", 1) for i in range(40)]


async def _play_dead(pg: PgHelper, name: str, attempts: int) -> None:
    """Hand every delivery of *name* to a member that is gone, its lease over."""
    await pg.execute(
        "UPDATE pgbus.deliveries SET member = 'gone:1:dead', attempts = $2,"
        " available_at = now() - interval '1 second' WHERE channel = $1",
        name,
        attempts,
    )


async def _held_by_a_dead_member(pg_dsn: str, pg: PgHelper, name: str, attempts: int) -> set[int]:
    """30 messages claimed by a member that then died (its lease over); their ids."""
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 30)
        await bus.bridge_in(name, "in", durable=True, group="g", lease=600)
        async with bus.transaction() as tx:
            for i in range(30):
                await tx.publish(name, f"old{i}", durable=True)
        got = await receive_all(bus.channel("in"), 30)
        await _play_dead(pg, name, attempts)
    return {m.id for m in got}


async def test_a_dead_members_claims_all_come_back_in_the_next_claims(
    pg_dsn: str, pg: PgHelper
) -> None:
    """30 expired claims and a backlog: the survivor (prefetch 2) takes those 30 first."""
    name = fresh("dead")
    expired = await _held_by_a_dead_member(pg_dsn, pg, name, attempts=1)
    order: list[pgbus.DurableMessage] = []
    async with pgbus.open_bus(pg_dsn) as bus:
        async with bus.transaction() as tx:
            for i in range(200):
                await tx.publish(name, f"new{i}", durable=True)
        bus.add_channel("in", 2)
        await bus.bridge_in(name, "in", durable=True, group="g")
        with trio.fail_after(WAIT):
            while len(order) < 60:
                message = await bus.channel("in").receive()
                assert isinstance(message, pgbus.DurableMessage)
                order.append(message)
                bus.ack(message)
    assert {m.id for m in order[:30]} == expired
    assert {m.attempt for m in order[:30]} == {2}


async def test_an_expired_lease_on_its_last_attempt_is_a_dead_letter(
    pg_dsn: str, pg: PgHelper
) -> None:
    """A holder died on attempt max_attempts: dead letter with the reason, never attempt 4."""
    name = fresh("last")
    await _held_by_a_dead_member(pg_dsn, pg, name, attempts=3)
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 5)
        await bus.bridge_in(name, "in", durable=True, group="g", max_attempts=3)
        await wait_for(
            pg,
            "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1"
            " AND available_at = 'infinity' AND member IS NULL AND attempts = 3"
            " AND last_error = 'the lease of attempt 3 expired (member gone:1:dead);"
            " max_attempts is 3'",
            name,
            expect=30,
        )
        assert bus.channel("in").statistics().buffered == 0
        [status] = await bus.durable_groups(name)
        assert (status.lag, status.in_flight, status.dead_letters) == (0, 0, 30)


async def test_a_delivery_whose_message_is_gone_is_dead_lettered(pg_dsn: str, pg: PgHelper) -> None:
    """A due delivery row without its message: a dead letter saying so, not leased forever."""
    name = fresh("dangling")
    await _held_by_a_dead_member(pg_dsn, pg, name, attempts=1)
    await pg.execute("DELETE FROM pgbus.messages WHERE channel = $1 AND payload <> 'old0'", name)
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 50)
        await bus.bridge_in(name, "in", durable=True, group="g")
        [old0] = await receive_all(bus.channel("in"), 1)
        assert (old0.payload, old0.attempt) == ("old0", 2)
        await wait_for(
            pg,
            "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1"
            " AND available_at = 'infinity' AND attempts = 1"
            " AND last_error = 'its message was deleted while a delivery was due'",
            name,
            expect=29,
        )


async def test_undecodable_messages_are_dead_letters_and_not_held(
    pg_dsn: str, pg: PgHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """Invalid JSON: a dead letter with the codec's reason; nothing held, nothing given back."""
    name = fresh("undecodable")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in", durable=True, group="g", codec="json")
        for _ in range(20):
            await bus.notify(name, "{not json", durable=True)
        await bus.notify(name, '{"ok": 1}', durable=True)
        [good] = await receive_all(bus.channel("in"), 1)
        assert good.payload == {"ok": 1}
        bus.ack(good)
        await wait_for(
            pg,
            "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1"
            " AND available_at = 'infinity' AND last_error LIKE '%JSON%'",
            name,
            expect=20,
        )
        [(consumer, _)] = bus._durable_in
        await wait_for(
            pg, "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1", name, expect=20
        )
        assert consumer._inflight == {}
        caplog.set_level(logging.INFO, logger="pgbus.durable")
    assert "gave back" not in caplog.text


def _consumer() -> DurableConsumer:
    return DurableConsumer(
        None,  # type: ignore[arg-type]  # no round trip here
        pgbus.Channel("in", 2),
        "wakes",
        group="g",
        start="latest",
        max_attempts=5,
        retry_after=1.0,
        lease=30.0,
        codec="text",
        retention=3600.0,
    )


async def test_fruitless_wakeups_never_overflow_the_recheck() -> None:
    """5,000 wake-ups in a row that find nothing: the recheck stays at most the poll interval."""
    consumer = _consumer()
    for _ in range(5000):
        consumer._after_claim(0, True)
    assert consumer._recheck_at - trio.current_time() <= POLL_EVERY


async def test_2000_wakeups_from_another_role_cost_nothing_but_rechecks(
    pg_dsn: str, pg: PgHelper
) -> None:
    """A role with only CONNECT sends 2,000 wake-ups: the member lives and still delivers."""
    name = fresh("wakes")
    role = "pgbus_connect_only"
    await pg.execute(
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        f"CREATE ROLE {role} LOGIN; END IF; END$$"
    )
    parts = urlsplit(pg_dsn)
    outsider = urlunsplit(parts._replace(netloc=role + "@" + parts.netloc.rsplit("@", 1)[-1]))
    async with pgbus.open_bus(pg_dsn) as bus, pgbus.open_bus(outsider) as noise:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in", durable=True, group="g")
        for _ in range(2000):
            await noise.notify("pgbus_durable", name)
        await bus.notify(name, "still here", durable=True)
        [message] = await receive_all(bus.channel("in"), 1)
        assert message.payload == "still here"
        [(consumer, _)] = bus._durable_in
        assert consumer._rechecks <= 10


async def test_a_long_ack_transaction_never_blocks_the_bridge(
    pg_dsn: str, pg: PgHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """
    bus.transaction(ack=m) open for 5 leases: renewals skip m's locked row instead of waiting
    for it, so the next message still arrives meanwhile; no lease is called lost.
    """
    name = fresh("ack-tx")
    caplog.set_level(logging.WARNING, logger="pgbus.durable")
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 2)
        await bus.bridge_in(name, "in", durable=True, group="g", lease=0.3)
        await bus.notify(name, "first", durable=True)
        [first] = await receive_all(bus.channel("in"), 1)
        async with bus.transaction(ack=first) as tx:
            await tx.fetchval("SELECT 1")
            await trio.sleep(1.5)  # the handler's work, inside its transaction
            await bus.notify(name, "second", durable=True)
            [second] = await receive_all(bus.channel("in"), 1)
            assert second.payload == "second"
        bus.ack(second)
        await wait_for(
            pg, "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1", name, expect=0
        )
        [(consumer, _)] = bus._durable_in
        assert consumer.leases_lost == 0
        assert consumer._inflight == {}
    assert "lease(s) expired" not in caplog.text
