"""
pgbus as a role that owns nothing: with only what ``pgbus grants ROLE`` prints, every feature
works (durable produce and consume, groups, dead letters, NOTIFY bridges, the cluster with a
public actor and a singleton, status); without the grants, the refusal says what to grant.

Roles are server-wide: each test makes its own, with a random name, and drops it after.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import trio
from fixtures_actors.bank import Account
from processes import pgbus_env, run_to_completion
from test_cli import one_error_line
from test_durable_cli import make_dead_letter

import pgbus
from pgbus._codec import quote_ident
from pgbus._grants import grants_sql

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30


def as_role(dsn: str, role: str) -> str:
    """*dsn* with its user replaced by *role* (the test servers trust local connections)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(role, safe='')}@{host}"))


@asynccontextmanager
async def role(pg: PgHelper, *, granted: bool) -> AsyncIterator[str]:
    """A new LOGIN role (with pgbus's grants if *granted*); yields a DSN for it."""
    name = f"pgbus_test_{uuid.uuid4().hex[:8]}"
    done = await run_to_completion("migrate", "--dsn", pg.dsn)
    assert done.returncode == 0, done.stderr.decode()
    await pg.execute(f"CREATE ROLE {quote_ident(name)} LOGIN")
    try:
        if granted:
            await pg.execute(grants_sql(name))
        yield as_role(pg.dsn, name)
    finally:
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
        )
        await pg.execute(f"DROP OWNED BY {quote_ident(name)}")
        await pg.execute(f"DROP ROLE {quote_ident(name)}")


class Echo(pgbus.Actor):
    async def handle(self, message: Any) -> Any:
        return {"echo": message, "node": self.bus.node}


async def test_the_grants_alone_run_every_feature(pg: PgHelper) -> None:
    """
    A role with only `pgbus grants` uses durable channels, the cluster, keyed actors, status
    and the CLI.
    """
    channel = f"restricted-{uuid.uuid4().hex[:8]}"
    async with role(pg, granted=True) as dsn:
        env = pgbus_env(PGBUS_DSN=dsn)
        async with (
            pgbus.open_bus(dsn, node="restricted-a", keepalive=1.0) as serving,
            pgbus.open_bus(dsn, node="restricted-b", keepalive=1.0) as asking,
        ):
            await serving.spawn(Echo, name="echo", inbox_capacity=10, public=True)
            await serving.spawn(Echo, name="only-one", inbox_capacity=10, singleton=True)
            for name in ("out", "in", "plain_out", "plain_in"):
                asking.add_channel(name, capacity=10)
            await asking.bridge_out("out", channel, durable=True)
            await asking.bridge_in(channel, "in", durable=True, group="g")
            await asking.bridge_out("plain_out", f"{channel}-plain")
            await asking.bridge_in(f"{channel}-plain", "plain_in")
            with trio.fail_after(WAIT):
                await asking.send("out", "stored")
                message = await asking.channel("in").receive()
                assert message.payload == "stored"
                asking.ack(message)
                await asking.send("plain_out", "notified")
                assert (await asking.channel("plain_in").receive()).payload == "notified"
                assert await asking.ask("echo", 1, timeout=WAIT) == {
                    "echo": 1,
                    "node": "restricted-a",
                }
                assert (await asking.ask("only-one", 2, timeout=WAIT))["node"] == "restricted-a"
                # Keyed actors: hosted, told, asked, all as the restricted role.
                await serving.host(Account)
                key = uuid.uuid4().hex
                await asking.entity("bank", key).tell({"amount": 3})
                assert await asking.entity("bank", key).ask({"amount": 4}, timeout=WAIT) == 7
            status = await run_to_completion("status", "--json", env=env)
            assert status.returncode == 0, status.stderr.decode()
            nodes = {node["name"] for node in json.loads(status.stdout)["nodes"]}
            assert {"restricted-a", "restricted-b"} <= nodes
        await make_dead_letter(dsn, f"{channel}-dead", "poison")
        listed = await run_to_completion(
            "dead-letters", "list", f"{channel}-dead", "--group", "g", env=env
        )
        assert listed.returncode == 0, listed.stderr.decode()
        assert json.loads(listed.stdout)["payload"] == "poison"
        retried = await run_to_completion(
            "dead-letters", "retry", f"{channel}-dead", "--group", "g", env=env
        )
        assert retried.returncode == 0, retried.stderr.decode()
        groups = await run_to_completion("groups", env=env)
        assert groups.returncode == 0, groups.stderr.decode()
        told = await run_to_completion("notify", channel, "from the cli", "--durable", env=env)
        assert told.returncode == 0, told.stderr.decode()


async def test_a_role_without_the_grants_is_told_what_to_grant(pg: PgHelper) -> None:
    """CONNECT only: every refusal is one line that points at `pgbus grants`."""
    async with role(pg, granted=False) as dsn:
        env = pgbus_env(PGBUS_DSN=dsn)
        for args in (
            ["groups"],
            ["notify", "restricted", "x", "--durable"],
            ["dead-letters", "list", "restricted", "--group", "g"],
        ):
            done = await run_to_completion(*args, env=env)
            assert done.returncode == 1, (args, done.stderr.decode())
            line = one_error_line(done.stderr.decode())
            assert "pgbus grants ROLE" in line, line
