"""TableChanges with ``durable = true``: events stored with the row change, whole, never lost."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from test_ready_made_actors import scratch_table, unique

import pgbus
from pgbus._codec import quote_ident
from pgbus.actors.table_changes import TableChanges

WAIT = 20


async def durable_events(bus: pgbus.Bus, count: int) -> list[dict[str, Any]]:
    received = []
    with trio.fail_after(WAIT):
        for _ in range(count):
            message = await bus.channel("changes").receive()
            assert type(message) is pgbus.DurableMessage, message
            received.append(message.payload)
            bus.ack(message)
    return received


async def watch(bus: pgbus.Bus, table: str, channel: str) -> None:
    if "changes" not in bus.channels:
        bus.add_channel("changes", 100)
    options = {"table": table, "to": "changes", "channel": channel, "durable": True}
    await bus.spawn(TableChanges, name="watcher", options=options)


async def test_large_rows_arrive_whole_and_rollbacks_never(pg: Any, pg_dsn: str) -> None:
    """A 20 KB row arrives whole (no truncation); a rolled-back insert leaves no event."""
    channel = unique("durable_changes")
    async with (
        scratch_table(pg, "id int PRIMARY KEY, body text") as table,
        pgbus.open_bus(pg_dsn) as bus,
    ):
        await watch(bus, table, channel)
        ident = quote_ident(table)
        async with bus.transaction() as tx:
            await tx.execute(f"INSERT INTO {ident} VALUES (1, repeat('é', 10000))")
        with pytest.raises(RuntimeError):  # noqa: PT012
            async with bus.transaction() as tx:
                await tx.execute(f"INSERT INTO {ident} VALUES (2, 'rolled back')")
                raise RuntimeError
        await pg.execute(f"UPDATE {ident} SET body = 'short' WHERE id = 1")
        received = await durable_events(bus, 2)
    assert [(e["op"], e["new"]["id"]) for e in received] == [("INSERT", 1), ("UPDATE", 1)]
    assert received[0]["new"]["body"] == "é" * 10000
    assert "truncated" not in received[0]


async def test_changes_made_while_the_bus_is_down_arrive_later(pg: Any, pg_dsn: str) -> None:
    """The group keeps its place: rows changed while no bus runs are delivered on restart."""
    channel = unique("durable_changes")
    async with scratch_table(pg, "id int") as table:
        async with pgbus.open_bus(pg_dsn) as bus:
            await watch(bus, table, channel)
            await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES (0)")
            assert [e["new"]["id"] for e in await durable_events(bus, 1)] == [0]
        for i in range(1, 4):
            await pg.execute(f"INSERT INTO {quote_ident(table)} VALUES ({i})")
        async with pgbus.open_bus(pg_dsn) as bus:
            await watch(bus, table, channel)
            assert [e["new"]["id"] for e in await durable_events(bus, 3)] == [1, 2, 3]


def test_durable_options_are_checked() -> None:
    """group needs durable; durable must be a boolean."""
    with pytest.raises(ValueError, match=r"^'group' applies only with durable = true\.$"):
        TableChanges(table="t", to="c", group="g")
    with pytest.raises(ValueError, match=r"^'durable' must be true or false \(got 'yes'\)\.$"):
        TableChanges(table="t", to="c", durable="yes")  # type: ignore[arg-type]
