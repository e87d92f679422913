"""
The bus's pool: at most ``pool_size`` connections for its calls at once, a bounded wait for one,
and no deadlock when a call holding one makes another.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
import trio

import pgbus
import pgbus._pg

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def waiting_for_a_slot(bus: pgbus.Bus, count: int) -> None:
    """Until *count* calls wait for one of the pool's connections (in-process state)."""
    with trio.fail_after(WAIT):
        while bus._database()._slots.statistics().tasks_waiting < count:  # noqa: ASYNC110
            await trio.sleep(0.001)


async def test_a_full_pool_makes_the_next_call_wait_for_a_connection(
    pg_dsn: str, pg: PgHelper
) -> None:
    """pool_size = 2, two transactions open: a durable notify waits, then goes through."""
    name = f"pgbus-pool-{uuid.uuid4().hex[:6]}"
    channel = fresh("pool")
    release = trio.Event()
    async with pgbus.open_bus(pg_dsn, application_name=name, pool_size=2) as bus:
        await bus.notify(channel, "warm-up", durable=True)  # the schema

        async def hold(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with bus.transaction() as tx:
                await tx.fetchval("SELECT 1")
                task_status.started()
                await release.wait()

        stored: list[int] = []

        async def publish() -> None:
            stored.append(await bus.notify(channel, "waited", durable=True))

        async with trio.open_nursery() as nursery:
            await nursery.start(hold)
            await nursery.start(hold)
            nursery.start_soon(publish)
            await waiting_for_a_slot(bus, 1)
            assert stored == []
            pooled = await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                f"{name}:pool",
            )
            assert pooled == 2
            release.set()
        assert len(stored) == 1
    assert (
        await pg.fetchval("SELECT payload FROM pgbus.messages WHERE id = $1", stored[0]) == "waited"
    )


async def test_a_call_inside_a_transaction_does_not_wait_for_a_second_connection(
    pg_dsn: str, pg: PgHelper
) -> None:
    """pool_size = 1: a durable notify inside the task's own transaction still goes through."""
    channel = fresh("pool-nested")
    async with pgbus.open_bus(pg_dsn, pool_size=1) as bus:
        with trio.fail_after(WAIT):
            async with bus.transaction() as tx:
                await tx.fetchval("SELECT 1")
                first = await bus.notify(channel, "inside", durable=True)
    assert await pg.fetchval("SELECT count(*) FROM pgbus.messages WHERE id = $1", first) == 1


async def test_a_call_waiting_too_long_for_a_connection_says_so_in_one_line(
    pg_dsn: str, pg: PgHelper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait is bounded: PoolExhaustedError names the pool's size and what to do."""
    monkeypatch.setattr(pgbus._pg, "POOL_WAIT", 0.2)
    release = trio.Event()
    async with pgbus.open_bus(pg_dsn, pool_size=1) as bus:
        await bus.notify("warm-up", "x", durable=True)  # the schema

        async def hold(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with bus.transaction() as tx:
                await tx.fetchval("SELECT 1")
                task_status.started()
                await release.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold)
            with pytest.raises(pgbus.PoolExhaustedError) as raised:
                await bus.notify(fresh("pool-full"), "x", durable=True)
            release.set()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("the bus's 1 pooled connection(s) to PostgreSQL at ")
    assert message.endswith(
        "stayed busy for 0.2 s: raise pool_size ([postgres] pool_size, "
        "open_bus(pool_size=...)) or hold transactions for less time."
    )
