"""
Every example in ``examples/`` runs as the README tells a user to run it, against a real
PostgreSQL (``PGBUS_DSN`` set to the session's server); the quickstart once more on embedded.

The ``.toml`` examples run with ``python -m pgbus run`` until their output shows up, then get
SIGINT; the ``.py`` examples run to completion. The subprocess helpers live in ``test_cli``.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import TYPE_CHECKING

import trio
from test_cli import ROOT, pgbus_env, run_to_completion, running

if TYPE_CHECKING:
    from conftest import PgHelper


async def run_example_script(name: str, pg_dsn: str) -> list[str]:
    """Run ``python examples/<name>`` to completion; its stdout lines (it must exit 0)."""
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / name)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=pgbus_env(PGBUS_DSN=pg_dsn),
            cwd=ROOT,
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    return result.stdout.decode().splitlines()


async def test_quickstart(pg_dsn: str, pg: PgHelper) -> None:
    """Ticks cross the database once a second; a notification sent by hand shows up too."""
    env = pgbus_env(PGBUS_DSN=pg_dsn)
    async with running("run", "examples/quickstart.toml", env=env) as bus:
        await bus.expect("stderr", "pgbus: running;")
        tick = json.loads(await bus.expect("stdout", '"payload":"tick 1"'))
        assert tick["channel"] == "pgbus_quickstart"
        await pg.execute("SELECT pg_notify('pgbus_quickstart', 'hello')")
        hello = json.loads(await bus.expect("stdout", '"payload":"hello"'))
        assert hello["pid"] != tick["pid"]  # sent by the test's own backend, not the bus
        assert await bus.stop(signal.SIGINT) == 0
    await pg.wait_for_no_backends()


async def test_quickstart_on_embedded_postgres() -> None:
    """No DSN anywhere: the quickstart starts its own server, and notify reaches it."""
    async with running("run", "examples/quickstart.toml") as bus:
        line = await bus.expect("stderr", "; connect with: psql '", timeout=120)
        dsn = line.split("psql ", 1)[1].strip("'")
        await bus.expect("stdout", '"payload":"tick 1"')
        sent = await run_to_completion("notify", "pgbus_quickstart", "hello", "--dsn", dsn)
        assert sent.returncode == 0, sent.stderr
        await bus.expect("stdout", '"payload":"hello"')
        assert await bus.stop(signal.SIGINT, timeout=10) == 0


async def test_shout(pg_dsn: str, pg: PgHelper) -> None:
    """The custom actor upper-cases what arrives on shout_in and publishes it to shout_out."""
    async with pg.listen("shout_out") as shouted:
        env = pgbus_env(PGBUS_DSN=pg_dsn)
        async with running("run", "examples/shout.toml", env=env) as bus:
            await bus.expect("stderr", "pgbus: running;")
            await pg.execute("SELECT pg_notify('shout_in', 'hello there')")
            printed = json.loads(await bus.expect("stdout", "HELLO THERE"))
            assert (printed["channel"], printed["payload"]) == ("shout_out", "HELLO THERE")
            with trio.fail_after(10):
                channel, payload, _pid = await shouted.receive()
            assert (channel, payload) == ("shout_out", "HELLO THERE")
            assert await bus.stop(signal.SIGINT) == 0


async def test_table_feed(pg_dsn: str, pg: PgHelper) -> None:
    """Committed row changes of "orders" print as JSON events; a rolled-back insert does not."""
    await pg.execute("DROP TABLE IF EXISTS orders CASCADE")
    try:
        env = pgbus_env(PGBUS_DSN=pg_dsn)
        async with running("run", "examples/table_feed.toml", env=env) as bus:
            await bus.expect("stderr", "pgbus: running;")
            await pg.execute("INSERT INTO orders (item) VALUES ('tea')")
            insert = json.loads(await bus.expect("stdout", '"op":"INSERT"'))
            assert insert["channel"] == "pgbus_changes_orders"
            assert insert["payload"]["new"] == {"id": 1, "item": "tea", "quantity": 1}
            await pg.execute("BEGIN; INSERT INTO orders (item) VALUES ('lost'); ROLLBACK")
            await pg.execute("UPDATE orders SET quantity = 2")
            update = await bus.expect("stdout", '"channel"')  # the very next line
            assert json.loads(update)["payload"]["op"] == "UPDATE"
            assert await bus.stop(signal.SIGINT) == 0
        assert "lost" not in "\n".join(bus.lines["stdout"])
    finally:
        await pg.execute("DROP TABLE IF EXISTS orders CASCADE")
        await pg.execute("DROP FUNCTION IF EXISTS pgbus_notify_orders()")


async def test_embed(pg_dsn: str, pg: PgHelper) -> None:
    """embed.py: three names go out through Postgres and come back as greetings, in order."""
    lines = await run_example_script("embed.py", pg_dsn)
    assert [line.split(" (from backend ")[0] for line in lines] == [
        "hello, Ada",
        "hello, Grace",
        "hello, Barbara",
    ]
    await pg.wait_for_no_backends()


async def test_transactional(pg_dsn: str, pg: PgHelper) -> None:
    """transactional.py: committed orders are delivered, the rolled-back one never is."""
    lines = await run_example_script("transactional.py", pg_dsn)
    assert lines == [
        "order 1: committed",
        "  received: order 1 placed",
        "order 2: rolled back",
        "order 3: committed",
        "  received: order 3 placed",
        "rows in the table: [1, 3]",
    ]
    await pg.wait_for_no_backends()
