"""
Keyed actors in one process: the bus hosts a kind and addresses its keys itself, against the
session's real PostgreSQL. (Processes dying and freezing: ``test_entities_chaos.py``.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio

import pgbus

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30


def new_kind(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def entity_class(kind: str, base: type[pgbus.Entity]) -> type[pgbus.Entity]:
    """*base* under a kind of this test's own (the session's database is shared)."""
    return type(base.__name__, (base,), {"kind": kind})


class Log(pgbus.Entity):
    """Appends each message to ``state["seen"]``; replies with the list so far."""

    async def handle(self, message: Any) -> Any:
        self.state.setdefault("seen", []).append(message)
        return self.state["seen"]


class Failing(pgbus.Entity):
    """Raises on ``"boom"`` (after changing its state, which must not commit)."""

    async def handle(self, message: Any) -> Any:
        self.state["touched"] = True
        if message == "boom":
            raise ValueError("no boom here")
        self.state["n"] = self.state.get("n", 0) + 1
        return self.state["n"]


class NotJson(pgbus.Entity):
    """Puts a set (not JSON) in its state."""

    async def handle(self, message: Any) -> Any:
        self.state["items"] = {message}
        return "stored"


class Forwarder(pgbus.Entity):
    """``{"to": key, "then": "boom"|None}``: tells the key, then raises if asked to."""

    async def handle(self, message: Any) -> Any:
        self.tell(message["kind"], message["to"], {"from": self.key})
        if message.get("then") == "boom":
            raise RuntimeError("after telling")
        return "forwarded"


class Lifecycle(pgbus.Entity):
    """Counts its activations and passivations (class-wide, this process)."""

    activated: list[str] = []  # noqa: RUF012 (shared on purpose)
    passivated: list[str] = []  # noqa: RUF012

    async def on_activate(self) -> None:
        self.activated.append(self.key)

    async def handle(self, message: Any) -> Any:
        return message

    async def on_passivate(self) -> None:
        self.passivated.append(self.key)


@asynccontextmanager
async def hosting(
    pg: PgHelper, *classes: type[pgbus.Entity], **options: Any
) -> AsyncIterator[pgbus.Bus]:
    async with pgbus.open_bus(pg.dsn, node=f"entities-{uuid.uuid4().hex[:6]}") as bus:
        for cls in classes:
            await bus.host(cls, **options)
        yield bus


async def state_of(pg: PgHelper, kind: str, key: str) -> tuple[Any, int] | None:
    row = await pg.fetchrow(
        "SELECT state, version FROM pgbus.entity_state WHERE kind = $1 AND key = $2", kind, key
    )
    return None if row is None else (json.loads(row["state"]), row["version"])


async def test_each_keys_messages_are_handled_one_at_a_time_in_stored_order(pg: PgHelper) -> None:
    """Interleaved messages for 20 keys: each key sees its own in the order they were stored."""
    kind = new_kind("log")
    async with hosting(pg, entity_class(kind, Log)) as bus:
        items = [(f"k{i % 20}", i) for i in range(400)]
        assert await bus.tell_many(kind, items[:200]) == 200
        for key, message in items[200:300]:
            await bus.entity(kind, key).tell(message)
        await bus.tell_many(kind, items[300:])
        with trio.fail_after(WAIT):
            for k in range(20):
                seen = await bus.entity(kind, f"k{k}").ask("last", timeout=WAIT)
                assert seen == [*range(k, 400, 20), "last"]
    assert await state_of(pg, kind, "k3") == ({"seen": [*range(3, 400, 20), "last"]}, 21)


async def test_a_handler_that_keeps_raising_is_retried_then_dead_lettered(pg: PgHelper) -> None:
    """3 attempts, nothing committed by any; the ask gets ActorFailedError; later ones go on."""
    kind = new_kind("failing")
    async with hosting(pg, entity_class(kind, Failing), max_attempts=3, retry_after=0) as bus:
        ref = bus.entity(kind, "a")
        with trio.fail_after(WAIT):
            with pytest.raises(pgbus.ActorFailedError) as caught:
                await ref.ask("boom", timeout=WAIT)
            assert "ValueError" in str(caught.value)
            assert "no boom here" in str(caught.value)
            assert await ref.ask("fine", timeout=WAIT) == 1
    dead = await pg.fetch(
        "SELECT key, attempts, error FROM pgbus.entity_dead WHERE kind = $1", kind
    )
    assert [dict(r) for r in dead] == [
        {"key": "a", "attempts": 3, "error": "ValueError: no boom here"}
    ]
    # The failed attempts' change of state ("touched" alone) never committed.
    assert await state_of(pg, kind, "a") == ({"touched": True, "n": 1}, 1)


async def test_a_state_that_is_not_json_fails_the_message_with_one_clear_error(
    pg: PgHelper,
) -> None:
    """A set in the state: the message fails saying so; nothing of it is stored."""
    kind = new_kind("notjson")
    async with hosting(pg, entity_class(kind, NotJson), max_attempts=1) as bus:
        with trio.fail_after(WAIT), pytest.raises(pgbus.ActorFailedError) as caught:
            await bus.entity(kind, "a").ask("x", timeout=WAIT)
    [error] = await pg.fetch("SELECT error FROM pgbus.entity_dead WHERE kind = $1", kind)
    print(f"\n{caught.value}\n{error['error']}")
    assert f"entity {kind}/a: its state" in error["error"]
    assert "Object of type set is not JSON serializable" in error["error"]
    assert "\n" not in error["error"]
    assert await state_of(pg, kind, "a") is None


async def test_an_unknown_kind_fails_at_once(pg: PgHelper) -> None:
    """No node ever hosted it: tell, ask and tell_many raise at once, and nothing is stored."""
    kind = new_kind("nobody")
    async with pgbus.open_bus(pg.dsn) as bus:
        with trio.fail_after(WAIT):
            with pytest.raises(pgbus.UnknownEntityKindError, match=f"entity kind '{kind}'"):
                await bus.entity(kind, "a").tell(1)
            with pytest.raises(pgbus.UnknownEntityKindError):
                await bus.entity(kind, "a").ask(1, timeout=WAIT)
            with pytest.raises(pgbus.UnknownEntityKindError):
                await bus.tell_many(kind, [("a", 1)])
    assert await pg.fetchval("SELECT count(*) FROM pgbus.entity_mail WHERE kind = $1", kind) == 0


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        (42, "a key must be a string (got int 42)"),
        ("", "a key must be 1-256 characters without NUL (got 0 characters"),
        ("x" * 257, "a key must be 1-256 characters without NUL (got 257 characters"),
        ("a\x00b", "a key must be 1-256 characters without NUL (got 3 characters"),
    ],
    ids=["int", "empty", "too-long", "nul"],
)
async def test_a_bad_key_is_refused_before_anything_is_stored(
    pg: PgHelper, key: Any, rule: str
) -> None:
    """EntityKeyError naming the kind and the rule; the good items of a batch are not stored."""
    kind = new_kind("keys")
    async with hosting(pg, entity_class(kind, Log)) as bus:
        with pytest.raises(pgbus.EntityKeyError) as caught:
            await bus.entity(kind, key).tell(1)
        assert str(caught.value).startswith(f"entity {kind!r}: {rule}")
        with pytest.raises(pgbus.EntityKeyError):
            await bus.tell_many(kind, [("good", 1), (key, 2)])
    assert await pg.fetchval("SELECT count(*) FROM pgbus.entity_mail WHERE kind = $1", kind) == 0


async def test_a_tell_in_a_rolled_back_transaction_is_never_stored(pg: PgHelper) -> None:
    """Transaction.tell is the outbox: rolled back, nothing; committed, handled."""
    kind = new_kind("outbox")
    async with hosting(pg, entity_class(kind, Log)) as bus:

        async def change_mind() -> None:
            async with bus.transaction() as tx:
                await tx.tell(kind, "a", "rolled back")
                raise RuntimeError("changed my mind")

        with pytest.raises(RuntimeError, match=r"^changed my mind$"):
            await change_mind()
        assert (
            await pg.fetchval("SELECT count(*) FROM pgbus.entity_mail WHERE kind = $1", kind) == 0
        )
        async with bus.transaction() as tx:
            await tx.tell(kind, "a", "committed")
        with trio.fail_after(WAIT):
            assert await bus.entity(kind, "a").ask("then", timeout=WAIT) == ["committed", "then"]


async def test_idle_activations_are_passivated(pg: PgHelper) -> None:
    """After passivate_after idle, on_passivate runs and the activations are gone."""
    kind = new_kind("life")
    cls = entity_class(kind, Lifecycle)
    Lifecycle.activated.clear()
    Lifecycle.passivated.clear()
    async with hosting(pg, cls, passivate_after=0.5) as bus:
        with trio.fail_after(WAIT):
            for key in ("a", "b", "c"):
                assert await bus.entity(kind, key).ask(key, timeout=WAIT) == key
            [stats] = bus.statistics().entities
            assert stats.activations == 3
            while True:  # the sweep runs every passivate_after / 4: no event to await
                if not bus.statistics().entities[0].activations:
                    break
                await trio.sleep(0.05)
            assert sorted(Lifecycle.passivated) == ["a", "b", "c"]
            assert await bus.entity(kind, "a").ask("again", timeout=WAIT) == "again"
    assert sorted(Lifecycle.activated) == ["a", "a", "b", "c"]


async def test_a_tell_from_a_handler_commits_with_its_acknowledgement(pg: PgHelper) -> None:
    """A handler's tell is stored only if it returns; raising, its tells are dropped too."""
    forwarder, log = new_kind("fwd"), new_kind("log")
    classes = (entity_class(forwarder, Forwarder), entity_class(log, Log))
    async with hosting(pg, *classes, max_attempts=2, retry_after=0) as bus:
        with trio.fail_after(WAIT):
            ref = bus.entity(forwarder, "f")
            with pytest.raises(pgbus.ActorFailedError, match="after telling"):
                await ref.ask({"kind": log, "to": "dropped", "then": "boom"}, timeout=WAIT)
            assert await ref.ask({"kind": log, "to": "kept"}, timeout=WAIT) == "forwarded"
            assert await bus.entity(log, "kept").ask("end", timeout=WAIT) == [
                {"from": "f"},
                "end",
            ]
    assert await state_of(pg, log, "dropped") is None
    assert await pg.fetchval("SELECT count(*) FROM pgbus.entity_mail WHERE key = 'dropped'") == 0


class Mending(pgbus.Entity):
    """Raises on ``"boom"`` while ``broken``; counts what it handled."""

    broken = True

    async def handle(self, message: Any) -> Any:
        if message == "boom" and Mending.broken:
            raise ValueError("still broken")
        self.state["n"] = self.state.get("n", 0) + 1
        return self.state["n"]


async def test_entity_dead_letters_are_listed_retried_and_purged_from_the_command_line(
    pg: PgHelper,
) -> None:
    """list shows the message as JSON; retry puts it back (handled, woken); purge forgets."""
    from test_cli import pgbus_env, run_to_completion

    kind = new_kind("mending")
    env = pgbus_env(PGBUS_DSN=pg.dsn)
    Mending.broken = True
    async with hosting(pg, entity_class(kind, Mending), max_attempts=1) as bus:
        ref = bus.entity(kind, "a")
        with trio.fail_after(WAIT), pytest.raises(pgbus.ActorFailedError):
            await ref.ask("boom", timeout=WAIT)
        await bus.entity(kind, "b").tell("boom")
        with trio.fail_after(WAIT):
            while await pg.fetchval(  # noqa: ASYNC110 (another process's commit: no event)
                "SELECT count(*) < 2 FROM pgbus.entity_dead WHERE kind = $1", kind
            ):
                await trio.sleep(0.01)
        listed = await run_to_completion("entity-dead-letters", "list", kind, env=env)
        letters = [json.loads(line) for line in listed.stdout.decode().splitlines()]
        assert [(x["key"], x["message"], x["attempts"], x["error"]) for x in letters] == [
            ("a", "boom", 1, "ValueError: still broken"),
            ("b", "boom", 1, "ValueError: still broken"),
        ]
        Mending.broken = False
        retried = await run_to_completion(
            "entity-dead-letters", "retry", kind, "--key", "a", env=env
        )
        assert retried.returncode == 0, retried.stderr
        assert f"gave back 1 dead letter(s) of kind {kind!r}, key 'a' at " in (
            retried.stderr.decode()
        )
        with trio.fail_after(WAIT):
            assert await ref.ask("after", timeout=WAIT) == 2  # the retried one, then this
        purged = await run_to_completion("entity-dead-letters", "purge", kind, env=env)
        assert f"purged 1 dead letter(s) of kind {kind!r} at " in purged.stderr.decode()
        empty = await run_to_completion("entity-dead-letters", "list", kind, env=env)
    assert empty.stdout == b""
    assert f"no dead letter of kind {kind!r} at " in empty.stderr.decode()
    assert await state_of(pg, kind, "a") == ({"n": 2}, 2)
    assert await state_of(pg, kind, "b") is None
