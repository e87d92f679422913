"""The durable commands: migrate, groups, dead-letters list|retry|purge, notify --durable."""

from __future__ import annotations

import json
import sys
import uuid
from typing import TYPE_CHECKING

import trio
from test_cli import pgbus_env, run_to_completion

import pgbus

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 20


async def make_dead_letter(dsn: str, channel: str, payload: str, failures: int = 1) -> None:
    """Publish *payload*; handle fails every message (*failures* in all): dead letters of 'g'."""
    failed = trio.Event()
    seen: list[int] = []

    class Fails(pgbus.Actor):
        async def handle(self, message: pgbus.DurableMessage) -> None:
            seen.append(message.id)
            if len(seen) >= failures:
                failed.set()
            raise ValueError("no good")

    async with pgbus.open_bus(dsn) as bus:
        bus.add_channel("in", 5)
        await bus.bridge_in(channel, "in", durable=True, group="g", max_attempts=1)
        await bus.spawn(Fails, name="fails", inbox="in")
        await bus.notify(channel, payload, durable=True)
        with trio.fail_after(WAIT):
            await failed.wait()
    # leaving the bus wrote the failure (a dead letter at once, with max_attempts = 1)


async def test_dead_letters_list_retry_and_purge(pg: PgHelper) -> None:
    """A dead letter is listed as JSON, given back by retry, and gone after purge."""
    channel = f"dead-{uuid.uuid4().hex[:8]}"
    env = pgbus_env(PGBUS_DSN=pg.dsn)
    await make_dead_letter(pg.dsn, channel, "poison")
    listed = await run_to_completion("dead-letters", "list", channel, "--group", "g", env=env)
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.decode().splitlines()
    letter = json.loads(line)
    assert (letter["payload"], letter["attempts"], letter["error"]) == (
        "poison",
        1,
        "ValueError: no good",
    )
    groups = await run_to_completion("groups", channel, env=env)
    [status] = [json.loads(line) for line in groups.stdout.decode().splitlines()]
    assert (status["group"], status["lag"], status["in_flight"], status["dead_letters"]) == (
        "g",
        0,
        0,
        1,
    )
    retried = await run_to_completion("dead-letters", "retry", channel, "--group", "g", env=env)
    assert retried.returncode == 0
    assert "gave back 1 dead letter(s)" in retried.stderr.decode()
    assert (
        await pg.fetchval(
            "SELECT attempts FROM pgbus.deliveries WHERE channel = $1 AND available_at <= now()",
            channel,
        )
        == 0
    )
    await make_dead_letter(pg.dsn, channel, "second", failures=2)  # the retried one fails again
    purged = await run_to_completion("dead-letters", "purge", channel, "--group", "g", env=env)
    assert "purged 2 dead letter(s)" in purged.stderr.decode()
    listed = await run_to_completion("dead-letters", "list", channel, "--group", "g", env=env)
    assert listed.stdout == b""


async def test_groups_of_a_channel_without_any_says_so(pg: PgHelper) -> None:
    """No group: stdout stays empty JSON lines, and stderr says there is none."""
    env = pgbus_env(PGBUS_DSN=pg.dsn)
    await run_to_completion("migrate", env=env)
    result = await run_to_completion("groups", "nobody-reads-this", env=env)
    assert result.returncode == 0
    assert result.stdout == b""
    assert "pgbus: no consumer group of durable channel 'nobody-reads-this' at " in (
        result.stderr.decode()
    )


async def test_migrate_says_what_it_did(pg: PgHelper) -> None:
    """On a database already at the current version, migrate says so and exits 0."""
    async with pgbus.open_bus(pg.dsn) as bus:
        await bus.notify("migrated", "x", durable=True)
    result = await run_to_completion("migrate", "--dsn", pg.dsn)
    assert result.returncode == 0
    assert "nothing to do" in result.stderr.decode()


async def test_notify_durable_stores_beyond_the_notify_limit(pg: PgHelper) -> None:
    """notify --durable takes 20,000 bytes (NOTIFY's limit is 7999) and says it stored them."""
    channel = f"big-{uuid.uuid4().hex[:8]}"
    result = await run_to_completion("notify", channel, "x" * 20_000, "--durable", "--dsn", pg.dsn)
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().startswith(f"pgbus: stored 20000 bytes to '{channel}' at ")
    stored = await pg.fetchval(
        "SELECT length(payload) FROM pgbus.messages WHERE channel = $1", channel
    )
    assert stored == 20_000


async def test_notify_durable_from_stdin_takes_the_durable_limit(pg: PgHelper) -> None:
    """``notify CHANNEL - --durable`` stores 20,000 bytes read from stdin, as the argument does."""
    channel = f"big-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "pgbus", "notify", channel, "-", "--durable", "--dsn", pg.dsn],
            stdin=b"y" * 20_000 + b"\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=pgbus_env(),
        )
    assert result.returncode == 0, result.stderr
    stored = await pg.fetchval(
        "SELECT length(payload) FROM pgbus.messages WHERE channel = $1", channel
    )
    assert stored == 20_000


async def test_status_shows_each_durable_group(pg: PgHelper) -> None:
    """pgbus status lists durable groups with lag, in-flight and dead letters (text and JSON)."""
    channel = f"status-{uuid.uuid4().hex[:8]}"
    env = pgbus_env(PGBUS_DSN=pg.dsn)
    await make_dead_letter(pg.dsn, channel, "poison")
    text = await run_to_completion("status", env=env)
    assert text.returncode == 0, text.stderr
    line = f"durable {channel!r} group 'g': lag 0, in flight 0, dead letters 1"
    assert line in text.stdout.decode().splitlines()
    as_json = await run_to_completion("status", "--json", env=env)
    groups = json.loads(as_json.stdout)["durable"]
    [group] = [g for g in groups if g["channel"] == channel]
    assert (group["group"], group["lag"], group["dead_letters"]) == ("g", 0, 1)


async def test_dead_letters_of_a_group_that_does_not_exist_is_one_line(pg: PgHelper) -> None:
    """list/retry/purge on an unknown group or channel: exit 2, naming the groups it has."""
    channel = f"dead-{uuid.uuid4().hex[:8]}"
    await make_dead_letter(pg.dsn, channel, "poison")
    env = pgbus_env(PGBUS_DSN=pg.dsn)
    wrong_group = await run_to_completion("dead-letters", "list", channel, "--group", "x", env=env)
    assert wrong_group.returncode == 2
    assert wrong_group.stderr.decode().strip().endswith("has no group 'x' (its groups: 'g').")
    nowhere = await run_to_completion("dead-letters", "purge", "nowhere", "--group", "g", env=env)
    assert nowhere.returncode == 2
    assert nowhere.stderr.decode().strip().endswith("(no group has joined it).")
