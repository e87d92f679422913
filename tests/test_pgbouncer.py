"""
pgbus behind a real PgBouncer (Debian's ``pgbouncer``, default settings), in both pool modes.

Session mode: every feature works as on a direct connection. Transaction mode: publishing,
transactions and durable channels work; what needs a session of its own (LISTEN bridges, the
cluster) is refused at once, in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
from pgbouncer import run_pgbouncer
from processes import run_to_completion
from test_cluster import KEEPALIVE, WAIT, event, node

import pgbus

if TYPE_CHECKING:
    from conftest import PgHelper


async def test_session_mode_runs_every_feature(pg: PgHelper) -> None:
    """Through session pooling: NOTIFY both ways, a durable channel, a cluster ask, a singleton."""
    await pg.execute(
        "CREATE TABLE IF NOT EXISTS cluster_holds"
        " (id serial PRIMARY KEY, node text, started timestamptz, ended timestamptz)"
    )
    with run_pgbouncer(pg.dsn, "session") as dsn:
        async with (
            node(dsn, "behind-pgbouncer", "--public", "echo", "--singleton", "marked") as worker,
            pgbus.open_bus(dsn, node="asker", keepalive=KEEPALIVE) as bus,
        ):
            with trio.fail_after(WAIT):
                singleton = event(await worker.expect("stdout", '"event": "singleton"'))
                assert singleton["node"] == "behind-pgbouncer"
                for name in ("out", "back", "durable_out", "durable_back"):
                    bus.add_channel(name, capacity=10)
                await bus.bridge_in("pgb_plain", "back")
                await bus.bridge_out("out", "pgb_plain")
                await bus.bridge_in("pgb_durable", "durable_back", durable=True, group="g")
                await bus.bridge_out("durable_out", "pgb_durable", durable=True)
                await bus.send("out", "plain")
                await bus.send("durable_out", "stored")
                assert (await bus.channel("back").receive()).payload == "plain"
                message = await bus.channel("durable_back").receive()
                assert message.payload == "stored"
                bus.ack(message)
                reply = await bus.ask("echo", {"n": 1}, timeout=WAIT)
                assert reply == {"node": "behind-pgbouncer", "echo": {"n": 1}}
                assert await bus.ask("marked", "who", timeout=WAIT) == "behind-pgbouncer"


async def test_transaction_mode_publishes_and_runs_transactions(pg: PgHelper) -> None:
    """Through transaction pooling, 8 concurrent publishers of NOTIFY and durable messages."""
    with run_pgbouncer(pg.dsn, "transaction") as dsn:
        async with pgbus.open_bus(dsn, pool_mode="transaction") as bus:
            bus.add_channel("out", capacity=10)
            await bus.bridge_out("out", "pgb_tx_durable", durable=True)

            async def publish(worker: int) -> None:
                for n in range(50):
                    await bus.send("out", f"{worker}-{n}")
                    async with bus.transaction() as tx:
                        await tx.publish("pgb_tx_durable", f"tx {worker}-{n}", durable=True)
                    await bus.notify("pgb_tx_plain", f"{worker}-{n}")

            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    for worker in range(8):
                        nursery.start_soon(publish, worker)
        stored = await pg.fetchval(
            "SELECT count(*) FROM pgbus.messages WHERE channel = 'pgb_tx_durable'"
        )
        assert stored == 800


async def test_transaction_mode_consumes_durable_channels_by_polling(pg: PgHelper) -> None:
    """Two poll-only members behind transaction pooling share a group: every message, once."""
    with run_pgbouncer(pg.dsn, "transaction") as dsn:
        async with (
            pgbus.open_bus(dsn, pool_mode="transaction") as one,
            pgbus.open_bus(dsn, pool_mode="transaction") as two,
        ):
            seen: list[str] = []
            for bus in (one, two):
                bus.add_channel("in", capacity=20)
                await bus.bridge_in("pgb_tx_poll", "in", durable=True, group="g", poll=0.05)
            async with bus.transaction() as tx:
                for n in range(300):
                    await tx.publish("pgb_tx_poll", str(n), durable=True)

            async def consume(bus: pgbus.Bus) -> None:
                while True:
                    message = await bus.channel("in").receive()
                    seen.append(message.payload)
                    bus.ack(message)

            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume, one)
                    nursery.start_soon(consume, two)
                    while len(seen) < 300:  # noqa: ASYNC110 (counted by the consumers above)
                        await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            assert await one.listening_channels() == set()
        assert sorted(map(int, seen)) == list(range(300))


async def test_transaction_mode_refuses_what_needs_a_session_in_one_line(pg: PgHelper) -> None:
    """A LISTEN bridge and the cluster are refused at once, naming what to do instead."""
    with run_pgbouncer(pg.dsn, "transaction") as dsn:
        async with pgbus.open_bus(dsn, pool_mode="transaction") as bus:
            bus.add_channel("in", capacity=1)
            with pytest.raises(pgbus.SessionNeededError) as listen:
                await bus.bridge_in("pgb_listen", "in")
            with pytest.raises(pgbus.SessionNeededError) as ask:
                await bus.ask("anyone", 1, timeout=1)
        assert str(listen.value).startswith("the inbound bridge 'pgb_listen' (LISTEN) needs")
        assert "PgBouncer pool_mode = session" in str(ask.value)
        with pytest.raises(pgbus.SessionNeededError):
            async with pgbus.open_bus(dsn, pool_mode="transaction", node="n"):
                pass


async def test_the_command_line_reaches_postgresql_through_pgbouncer(pg: PgHelper) -> None:
    """``pgbus notify`` through PgBouncer (a refused startup parameter was fatal before)."""
    with run_pgbouncer(pg.dsn, "session") as dsn:
        done = await run_to_completion("notify", "pgb_cli", "hello", "--dsn", dsn)
    assert done.returncode == 0, done.stderr.decode()


async def test_behind_pgbouncer_pids_are_the_real_backends(pg: PgHelper) -> None:
    """own_pids are the server's backends (not PgBouncer's made-up ones): a statement longer
    than the silence check is asked about on the right backend and runs to its end."""
    with run_pgbouncer(pg.dsn, "session") as dsn:
        async with pgbus.open_bus(dsn, keepalive=1.0) as bus:
            async with bus.transaction() as tx:
                await tx.execute("SELECT pg_sleep(1.2)")  # past keepalive/2 without a reply
                backend = await tx.fetchval("SELECT pg_backend_pid()")
            assert backend in bus.own_pids
