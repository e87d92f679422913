"""
Durable channels when things break: a consumer process killed with SIGKILL mid-stream, the
server restarted mid-stream. Consumers are real ``python -m pgbus run`` subprocesses.
"""

from __future__ import annotations

import math
import signal
import socket
import textwrap
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from test_cli import ROOT, pgbus_env, running

import pgbus
from pgbus._embedded import open_embedded_postgres

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 60
MESSAGES = 2000
PAUSE = 0.002


def worker_config(path: Path, channel: str, table: str, *, exactly_once: bool) -> Path:
    config = path / f"worker-{uuid.uuid4().hex[:6]}.toml"
    once = "true" if exactly_once else "false"
    config.write_text(
        textwrap.dedent(
            f"""
            [channels.work]
            capacity = 50

            [[bridge]]
            postgres = "{channel}"
            channel = "work"
            direction = "in"
            durable = true
            group = "workers"
            start = "earliest"
            lease = 2

            [actors.recorder]
            class = "fixtures_actors.durable:RecordEffect"
            inbox = "work"
            options = {{ table = "{table}", exactly_once = {once}, pause = {PAUSE} }}
            """
        )
    )
    return config


async def poll_until(pg: PgHelper, sql: str, at_least: int) -> int:
    """Poll *sql* (a count) until it reaches *at_least*; rows committed have no event to await."""
    with trio.fail_after(WAIT):
        while True:
            value = int(await pg.fetchval(sql))
            if value >= at_least:
                return value
            await trio.sleep(0.05)


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at_least_once", "exactly_once"])
async def test_kill_9_of_a_consumer_loses_nothing(
    pg: PgHelper, tmp_path: Path, exactly_once: bool
) -> None:
    """
    Two worker processes share a group; one is SIGKILLed mid-stream. Every message is handled;
    duplicates stay within what the killed process had claimed; with bus.transaction(ack=...)
    there are none at all.
    """
    channel = f"crash-{uuid.uuid4().hex[:8]}"
    table = f"effects_{uuid.uuid4().hex[:8]}"
    await pg.execute(f'CREATE TABLE "{table}" (message_id bigint, payload text, pid int)')
    async with pgbus.open_bus(pg.dsn) as bus, bus.transaction() as tx:
        for i in range(MESSAGES):
            await tx.publish(channel, str(i), durable=True)
    config = worker_config(tmp_path, channel, table, exactly_once=exactly_once)
    env = pgbus_env(PGBUS_DSN=pg.dsn, PYTHONPATH=str(ROOT / "tests"))
    async with running("run", str(config), env=env) as one, running("run", str(config), env=env):
        await one.expect("stderr", "pgbus: running;")
        await poll_until(pg, f'SELECT count(*) FROM "{table}"', MESSAGES // 4)
        one.process.kill()
        await one.process.wait()
        member = f"{socket.gethostname()}:{one.process.pid}:%"
        claimed = int(
            await pg.fetchval(
                "SELECT count(*) FROM pgbus.deliveries WHERE channel = $1 AND member LIKE $2",
                channel,
                member,
            )
        )
        await poll_until(pg, f'SELECT count(DISTINCT payload) FROM "{table}"', MESSAGES)
        # The survivor acknowledges the last ones in its next cycle.
        await poll_until(
            pg,
            "SELECT CASE WHEN count(*) = 0 THEN 1 ELSE 0 END FROM pgbus.deliveries"
            f" WHERE channel = '{channel}'",
            1,
        )
    total = int(await pg.fetchval(f'SELECT count(*) FROM "{table}"'))
    killed = int(
        await pg.fetchval(f'SELECT count(*) FROM "{table}" WHERE pid = $1', one.process.pid)
    )
    duplicates = total - MESSAGES
    print(
        f"\nkill -9 ({'exactly once' if exactly_once else 'at least once'}): killed process had "
        f"handled {killed} and held {claimed} claim(s); duplicates {duplicates}"
    )
    assert 0 < killed < MESSAGES
    if exactly_once:
        assert duplicates == 0
        assert (
            await pg.fetchval(
                f'SELECT count(*) FROM (SELECT message_id FROM "{table}"'
                " GROUP BY 1 HAVING count(*) > 1) d"
            )
            == 0
        )
    else:
        assert 0 <= duplicates <= claimed


async def test_server_restart_mid_stream_loses_nothing() -> None:
    """Stop PostgreSQL while messages flow both ways, start it again: every message arrives."""
    async with open_embedded_postgres() as server, pgbus.open_bus(server.dsn) as bus:
        bus.add_channel("out", math.inf)
        bus.add_channel("in", 100)
        await bus.bridge_out("out", "restart", durable=True)
        await bus.bridge_in("restart", "in", durable=True, group="g", lease=2)
        received: set[str] = set()
        deliveries = 0
        hundred = trio.Event()

        async def consume() -> None:
            nonlocal deliveries
            while len(received) < 1000:
                message = await bus.channel("in").receive()
                assert isinstance(message, pgbus.DurableMessage)
                received.add(message.payload)
                deliveries += 1
                if len(received) >= 100:
                    hundred.set()
                bus.ack(message)

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                for i in range(500):
                    await bus.send("out", str(i))
                await hundred.wait()
                await server.stop_server(mode="immediate")
                for i in range(500, 1000):
                    await bus.send("out", str(i))  # queued while the server is down
                await server.start_server()
    assert received == {str(i) for i in range(1000)}
    print(f"\nserver restart: {deliveries - 1000} duplicate deliveries")


async def test_sigterm_gives_back_what_was_claimed_at_once(pg: PgHelper, tmp_path: Path) -> None:
    """`pgbus run` stopped by SIGTERM exits 0 and leaves every unhandled claim free for others."""
    channel = f"sigterm-{uuid.uuid4().hex[:8]}"
    table = f"effects_{uuid.uuid4().hex[:8]}"
    await pg.execute(f'CREATE TABLE "{table}" (message_id bigint, payload text, pid int)')
    async with pgbus.open_bus(pg.dsn) as bus, bus.transaction() as tx:
        for i in range(20):
            await tx.publish(channel, str(i), durable=True)
    config = tmp_path / "slow.toml"
    config.write_text(
        worker_config(tmp_path, channel, table, exactly_once=False)
        .read_text()
        .replace(f"pause = {PAUSE}", "pause = 60")
        .replace("lease = 2", "lease = 600")
        + "\n[supervisor]\nstop_timeout = 1\n"
    )
    env = pgbus_env(PGBUS_DSN=pg.dsn, PYTHONPATH=str(ROOT / "tests"))
    async with running("run", str(config), env=env) as worker:
        await poll_until(pg, f'SELECT count(*) FROM "{table}"', 1)  # handling the first, slowly
        assert await worker.stop(signal.SIGTERM, timeout=10) == 0
    rows = await pg.fetch(
        "SELECT member, available_at <= now() AS free FROM pgbus.deliveries WHERE channel = $1",
        channel,
    )
    assert len(rows) == 20  # nothing acknowledged: the first was cut off mid-handle
    assert {(r["member"], r["free"]) for r in rows} == {(None, True)}


@pytest.mark.parametrize("signum", [signal.SIGSTOP, signal.SIGKILL], ids=["sigstop", "sigkill"])
async def test_a_frozen_or_killed_holders_claims_move_to_a_live_member(
    pg: PgHelper, tmp_path: Path, signum: int
) -> None:
    """
    A worker holds 5 messages (one in a 60 s handle, lease 1 s, renewed meanwhile); frozen or
    killed, its claims go to a live member (attempt 2); a frozen one that wakes up says it lost
    them.
    """
    channel = f"frozen-{uuid.uuid4().hex[:8]}"
    table = f"effects_{uuid.uuid4().hex[:8]}"
    await pg.execute(f'CREATE TABLE "{table}" (message_id bigint, payload text, pid int)')
    config = tmp_path / "frozen.toml"
    config.write_text(
        worker_config(tmp_path, channel, table, exactly_once=False)
        .read_text()
        .replace(f"pause = {PAUSE}", "pause = 60")
        .replace("lease = 2", "lease = 1")
    )
    env = pgbus_env(PGBUS_DSN=pg.dsn, PYTHONPATH=str(ROOT / "tests"))
    async with pgbus.open_bus(pg.dsn) as bus:
        async with bus.transaction() as tx:
            for i in range(5):
                await tx.publish(channel, str(i), durable=True)
        async with running("run", str(config), env=env) as worker:
            await poll_until(pg, f'SELECT count(*) FROM "{table}"', 1)  # in its long handle
            bus.add_channel("in", 10)
            await bus.bridge_in(channel, "in", durable=True, group="workers", lease=1)
            with trio.move_on_after(2.5):  # 2.5 leases: renewed, so nothing moves
                moved = await bus.channel("in").receive()
                pytest.fail(f"taken from a live holder: {moved!r}")
            worker.process.send_signal(signum)
            signalled = trio.current_time()
            got: list[pgbus.DurableMessage] = []
            with trio.fail_after(WAIT):
                while len(got) < 5:
                    message = await bus.channel("in").receive()
                    assert isinstance(message, pgbus.DurableMessage)
                    got.append(message)
            print(f"\n{signum!r}: 5 claims moved after {trio.current_time() - signalled:.2f}s")
            assert sorted(m.payload for m in got) == [str(i) for i in range(5)]
            assert {m.attempt for m in got} == {2}
            if signum == signal.SIGSTOP:
                worker.process.send_signal(signal.SIGCONT)
                await worker.expect("stderr", "lease(s) expired before they could be renewed")
            for message in got:
                bus.ack(message)
            await poll_until(
                pg,
                "SELECT CASE WHEN count(*) = 0 THEN 1 ELSE 0 END FROM pgbus.deliveries"
                f" WHERE channel = '{channel}'",
                1,
            )
    assert await pg.fetchval(f'SELECT count(*) FROM "{table}"') == 1
