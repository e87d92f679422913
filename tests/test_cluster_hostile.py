"""
The cluster against other clients of its database: a role with nothing but CONNECT (created per
test, dropped after) can LISTEN, NOTIFY and take advisory locks. It must not be able to block
joins, squat a singleton silently, answer another node's asks, lose other messages, starve other
actors, or flood the log. A few cases need a role with rights on pgbus's tables (inside the trust
boundary, as the README says): the test's own superuser plays it.

No sleeps: each wait is for a log record (`Records`), a line a node prints, or an ask to end.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import trio
import trio_asyncio
from processes import run_to_completion
from test_cluster import KEEPALIVE, asker, node

import pgbus
from pgbus._cli import main

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 20
NODE_LOCK_CLASS = 0x70676273


class Records(logging.Handler):
    """The records of logger ``pgbus``, and a way to wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def matching(self, *needles: str) -> list[logging.LogRecord]:
        return [r for r in self.records if all(n in r.getMessage() for n in needles)]

    async def wait_for(self, *needles: str) -> logging.LogRecord:
        while True:
            found = self.matching(*needles)
            if found:
                return found[0]
            self._changed = trio.Event()
            await self._changed.wait()


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("pgbus")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Session:
    """One asyncpg session of its own (a role, an application_name), for the test to drive."""

    def __init__(self, connection: asyncpg.Connection, loop: Any) -> None:
        self.connection = connection
        self.loop = loop
        self.pid: int = connection.get_server_pid()

    async def execute(self, sql: str, *args: Any) -> Any:
        return await trio_asyncio.aio_as_trio(self.connection.execute, loop=self.loop)(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await trio_asyncio.aio_as_trio(self.connection.fetchval, loop=self.loop)(sql, *args)

    async def notify(self, channel: str, payload: str) -> None:
        await self.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def listen(self, channel: str) -> trio.MemoryReceiveChannel[tuple[str, int]]:
        """Notifications on *channel* as (payload, sender pid), from now on."""
        send, receive = trio.open_memory_channel[tuple[str, int]](math.inf)

        def on_notification(_c: Any, pid: int, _channel: str, payload: str) -> None:
            send.send_nowait((payload, pid))

        add = trio_asyncio.aio_as_trio(self.connection.add_listener, loop=self.loop)
        await add(channel, on_notification)
        return receive


@asynccontextmanager
async def session(
    pg: PgHelper, *, user: str | None = None, application_name: str = "hostile-client"
) -> AsyncIterator[Session]:
    connect = trio_asyncio.aio_as_trio(asyncpg.connect, loop=pg._loop)
    kwargs = {"user": user} if user else {}
    connection = await connect(
        pg.dsn, timeout=10, server_settings={"application_name": application_name}, **kwargs
    )
    try:
        yield Session(connection, pg._loop)
    finally:
        connection.terminate()


@pytest.fixture
async def hostile_role(pg: PgHelper) -> AsyncIterator[str]:
    """A role with LOGIN and CONNECT on the test database, nothing else (dropped after)."""
    role = f"pgbus_hostile_{secrets.token_hex(4)}"
    database = await pg.fetchval("SELECT current_database()")
    await pg.execute(f'CREATE ROLE "{role}" LOGIN')
    await pg.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"')
    try:
        yield role
    finally:
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await pg.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM "{role}"')
        with trio.move_on_after(WAIT):
            while await pg.fetchval(  # noqa: ASYNC110  (a backend's exit has no event)
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role
            ):
                await trio.sleep(0.02)
        await pg.execute(f'DROP ROLE "{role}"')


@asynccontextmanager
async def hostile(pg: PgHelper, role: str) -> AsyncIterator[Session]:
    async with session(pg, user=role) as client:
        yield client


async def node_channel(pg: PgHelper, name: str) -> str:
    query = "SELECT channel FROM pgbus.cluster_nodes WHERE name = $1"
    channel: str = await pg.fetchval(query, name)
    return channel


class Recorder(pgbus.Actor):
    """Answers with the message; remembers each (in a list shared by the test)."""

    seen: list[Any] = []  # noqa: RUF012

    async def handle(self, message: Any) -> Any:
        Recorder.seen.append(message)
        return message


# -- joins ---------------------------------------------------------------------------------------


async def test_a_foreign_advisory_lock_cannot_block_joins(pg: PgHelper, hostile_role: str) -> None:
    """A CONNECT-only client holding the advisory key joins once used: nodes join anyway."""
    async with hostile(pg, hostile_role) as client:
        await client.execute("SELECT pg_advisory_lock($1, 0)", NODE_LOCK_CLASS)
        with trio.fail_after(WAIT):
            async with asker(pg.dsn, "joiner") as bus:
                assert bus.node == "joiner"
    await pg.wait_for_no_backends()


async def test_a_join_that_waits_names_the_backend_it_waits_for(
    pg: PgHelper, records: Records
) -> None:
    """A join held up (by a table lock: only a role inside the cluster can) says who holds it."""
    async with asker(pg.dsn, "first"):  # the schema and table exist
        pass
    async with session(pg, application_name="migration-tool") as blocker:
        await blocker.execute("BEGIN")
        await blocker.execute("LOCK TABLE pgbus.cluster_nodes IN ACCESS EXCLUSIVE MODE")
        async with trio.open_nursery() as nursery:
            joined = trio.Event()

            async def join() -> None:
                async with asker(pg.dsn, "waiting"):
                    joined.set()

            nursery.start_soon(join)
            with trio.fail_after(WAIT):
                record = await records.wait_for("could not join")
            assert f"waiting for backend {blocker.pid} (role " in record.getMessage()
            assert "application 'migration-tool'" in record.getMessage()
            # An ask from the command line meanwhile says why it could not go, in one line.
            asked = await run_to_completion("ask", "echo", "1", "--dsn", pg.dsn, "--timeout", "12")
            assert asked.returncode == 1
            error = asked.stderr.decode().splitlines()[-1]  # after the node's own warnings
            assert "could not join the cluster within 12s: registering did not finish" in error
            await blocker.execute("ROLLBACK")
            with trio.fail_after(WAIT):
                await joined.wait()
    await pg.wait_for_no_backends()


# -- singletons ----------------------------------------------------------------------------------


class Solo(pgbus.Actor):
    started = trio.Event()

    async def on_start(self) -> None:
        Solo.started.set()

    async def handle(self, message: Any) -> Any:
        return "solo"


async def test_a_squatted_singleton_is_named_in_status_and_warned_about(
    pg: PgHelper, hostile_role: str, records: Records
) -> None:
    """A non-node session holding a singleton's lock: named by status, warned about by nodes."""
    from pgbus._cluster import singleton_key

    Solo.started = trio.Event()
    async with hostile(pg, hostile_role) as client, asker(pg.dsn) as bus:
        await client.execute("SELECT pg_advisory_lock($1)", singleton_key("solo"))
        await bus.spawn(Solo, name="solo", inbox_capacity=10, singleton=True)
        with trio.fail_after(WAIT):
            record = await records.wait_for("singleton 'solo' cannot run anywhere")
        holder = f"backend {client.pid} (role '{hostile_role}', application 'hostile-client')"
        assert holder in record.getMessage()
        [solo] = (await bus.cluster_status()).singletons
        assert (solo.holder, solo.foreign_holder) == (None, holder)
        status = await run_to_completion("status", "--dsn", pg.dsn)
        line = f"singleton 'solo': held by {holder}, which is not a node of the cluster"
        assert f"{line} (candidates: 'tester')" in status.stdout.decode().splitlines()
        assert not Solo.started.is_set()
        await client.execute("SELECT pg_advisory_unlock($1)", singleton_key("solo"))
        with trio.fail_after(WAIT):
            await Solo.started.wait()
    await pg.wait_for_no_backends()


# -- replies -------------------------------------------------------------------------------------


async def test_a_reply_from_a_backend_that_is_not_the_serving_node_is_ignored(
    pg: PgHelper, hostile_role: str
) -> None:
    """A client that sees a request (and its random id) cannot answer it in the node's place."""
    async with (
        node(pg.dsn, "worker-1", "--public", "echo"),
        asker(pg.dsn) as bus,
        hostile(pg, hostile_role) as client,
    ):
        requests = await client.listen(await node_channel(pg, "worker-1"))
        result: list[Any] = []

        async def ask() -> None:
            result.append(await bus.ask("echo", {"sleep": 1}, timeout=WAIT))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            with trio.fail_after(WAIT):
                payload, _ = await requests.receive()
            request = json.loads(payload)
            assert request["i"] > 2**40  # 63 random bits, not a counter from 1
            forged = {"k": "r", "i": request["i"], "v": "forged"}
            await client.notify(request["r"], json.dumps(forged))
        assert result == [{"node": "worker-1", "echo": {"sleep": 1}}]
        statistics = bus.statistics().cluster
        assert statistics is not None
        assert statistics.junk == 1
    await pg.wait_for_no_backends()


async def test_replies_still_arrive_after_the_serving_nodes_sender_reconnects(
    pg: PgHelper,
) -> None:
    """The node's sending backend changes: its next replies are taken once it is registered."""
    async with node(pg.dsn, "worker-1", "--public", "echo"), asker(pg.dsn) as bus:
        with trio.fail_after(WAIT):
            assert (await bus.ask("echo", 1, timeout=WAIT))["echo"] == 1
            senders = await pg.fetchval(
                "SELECT sender_pids FROM pgbus.cluster_nodes WHERE name = 'worker-1'"
            )
            terminate = "SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) pid"
            await pg.execute(terminate, senders)
            for i in range(5):
                assert (await bus.ask("echo", i, timeout=WAIT))["echo"] == i
    await pg.wait_for_no_backends()


async def test_a_registry_row_no_node_wrote_is_skipped_with_one_warning(
    pg: PgHelper, hostile_role: str, records: Records
) -> None:
    """A hand-made row (live lock, bad channel) never gets requests and never breaks routing."""
    async with node(pg.dsn, "worker-1", "--public", "echo"), hostile(pg, hostile_role) as client:
        await client.execute("SELECT pg_advisory_lock($1, pg_backend_pid())", NODE_LOCK_CLASS)
        await pg.execute(  # a role with write access to pgbus's tables did this
            "INSERT INTO pgbus.cluster_nodes (pid, name, channel, host, os_pid, public)"
            " VALUES ($1, 'aaa', $2, 'h', 1, '{echo}')",
            client.pid,
            "x" * 70,
        )
        async with asker(pg.dsn) as bus:
            with trio.fail_after(WAIT):
                for i in range(20):
                    assert await bus.ask("echo", i, timeout=WAIT) == {"node": "worker-1", "echo": i}
            assert {n.name for n in (await bus.cluster_status()).nodes} == {"worker-1", "tester"}
        assert len(records.matching("skipped the registry row of backend")) == 1
    await pg.wait_for_no_backends()


# -- requests ------------------------------------------------------------------------------------

JUNK = [
    "not json",
    "[" * 3000 + "]" * 3000,
    '{"k": "r", "i": [1], "v": 1}',
    '{"k": "a", "i": "abc!", "a": "rec", "r": "REPLY", "m": 1}',
    '{"k": "a", "i": 8, "a": "rec", "m": 1}',
    '{"k": "a", "i": 9, "a": "rec", "r": "", "m": 1}',
    '{"k": "a", "i": 9, "a": "rec", "r": "REPLY", "m": NaN}',
    '{"k": "a", "i": 9, "a": "rec", "r": "REPLY", "m": 1e400}',
    '{"k": "a", "i": 9, "a": "rec", "r": "REPLY", "m": "\\ud800"}',
    '{"k": "t", "i": 9, "a": "rec", "m": [[[["\\udfff"]]]]}',
]


async def test_malformed_requests_are_refused_on_receipt_counted_and_logged_once(
    pg: PgHelper, hostile_role: str, records: Records
) -> None:
    """Bad ids, reply channels or JSON never reach an actor; counted; one log line; no trace."""
    Recorder.seen = []
    reply_channel = "pgbus.node." + "0" * 16
    async with asker(pg.dsn) as bus, hostile(pg, hostile_role) as client:
        await bus.spawn(Recorder, name="rec", inbox_capacity=10, public=True)
        target = await node_channel(pg, "tester")
        replies = await client.listen(reply_channel)
        nothing = await client.listen("None")
        for payload in JUNK:
            await client.notify(target, payload.replace("REPLY", reply_channel))
        good = {"k": "a", "i": 10, "a": "rec", "r": reply_channel, "m": "fine"}
        await client.notify(target, json.dumps(good))
        with trio.fail_after(WAIT):
            payload, _ = await replies.receive()
        assert json.loads(payload) == {"k": "r", "i": 10, "v": "fine"}
        assert Recorder.seen == ["fine"]
        statistics = bus.statistics().cluster
        assert statistics is not None
        assert statistics.junk == len(JUNK)
        with pytest.raises(trio.WouldBlock):
            nothing.receive_nowait()
        from pgbus._metrics import gather, metric_families

        families = {f.name: f for f in metric_families(await gather(bus))}
        [sample] = families["pgbus_cluster_junk"].samples
        assert (sample.name, sample.labels, sample.value) == (
            "pgbus_cluster_junk_total",
            {"node": "tester"},
            len(JUNK),
        )
    cluster_records = [r for r in records.records if r.name == "pgbus.cluster"]
    assert not [r for r in cluster_records if r.exc_info]
    assert len([r for r in cluster_records if "ignored" in r.getMessage()]) == 1
    await pg.wait_for_no_backends()


# -- sending -------------------------------------------------------------------------------------


async def test_a_batch_postgresql_refuses_is_sent_again_item_by_item(pg: PgHelper) -> None:
    """One item PostgreSQL refuses (a 70-byte channel) costs only itself, not its batch."""
    from pgbus._cluster._sender import Sender
    from pgbus._pg import Connection, open_database

    lost: list[Any] = []

    async def connected(_connection: Connection) -> None:
        pass

    async with open_database(pg.dsn, "pgbus") as database, pg.listen("ok") as received:
        sender = Sender(database, lambda items, _reason: lost.extend(items), connected)
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.serve)
            for i in range(20):  # the first goes out at once, the other 19 in one batch
                sender.send("x" * 70 if i == 10 else "ok", f"m{i}", reply=True)
            with trio.fail_after(WAIT):
                arrived = [(await received.receive())[1] for _ in range(19)]
            nursery.cancel_scope.cancel()
    assert arrived == [f"m{i}" for i in range(20) if i != 10]
    assert [(channel, payload) for channel, payload, _, _ in lost] == [("x" * 70, "m10")]
    await pg.wait_for_no_backends()


# -- overflow ------------------------------------------------------------------------------------


class Gated(pgbus.Actor):
    """Handles nothing until the gate opens (which no test does)."""

    gate = trio.Event()
    handling = trio.Event()

    async def handle(self, message: Any) -> Any:
        Gated.handling.set()
        await Gated.gate.wait()
        return message


async def test_a_slow_actor_holds_back_only_its_own_requests(
    pg: PgHelper, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other actors answer; beyond its overflow a request is refused with an answer; counted."""
    import pgbus._cluster

    monkeypatch.setattr(pgbus._cluster, "MAX_OVERFLOW_PER_ACTOR", 5, raising=False)
    Gated.gate, Gated.handling = trio.Event(), trio.Event()
    async with pgbus.open_bus(pg.dsn, node="tester", keepalive=KEEPALIVE, stop_timeout=0.5) as bus:
        await bus.spawn(Gated, name="slow", inbox_capacity=1, public=True)
        await bus.spawn(Recorder, name="rec", inbox_capacity=10, public=True)
        async with asker(pg.dsn, "other") as other:
            await other.tell("slow", 0)
            with trio.fail_after(WAIT):
                await Gated.handling.wait()
            for i in range(1, 8):  # one in the inbox, 5 in its overflow, 1 refused
                await other.tell("slow", i)
            with trio.fail_after(WAIT):
                assert await other.ask("rec", "through", timeout=WAIT) == "through"
                with pytest.raises(pgbus.ActorUnavailableError, match=r"is full and 5 more"):
                    await other.ask("slow", "too many", timeout=WAIT)
        statistics = bus.statistics().cluster
        assert statistics is not None
        assert (statistics.refused, statistics.overflowing) == (2, 5)
    [left] = records.matching("shutdown after")
    assert "5 request(s) from other nodes waiting for room in 'slow'" in left.getMessage()
    await pg.wait_for_no_backends()


# -- the registry row ----------------------------------------------------------------------------


async def test_a_node_whose_row_was_deleted_registers_again(pg: PgHelper, records: Records) -> None:
    """Its row deleted by hand, a node writes it again (one warning) and is reachable."""
    async with asker(pg.dsn) as bus:
        await bus.spawn(Recorder, name="rec", inbox_capacity=10, public=True)
        await pg.execute("DELETE FROM pgbus.cluster_nodes WHERE name = 'tester'")
        with trio.fail_after(WAIT):
            await records.wait_for("found no registry row of its own")
        async with asker(pg.dsn, "other") as other:
            with trio.fail_after(WAIT):
                assert await other.ask("rec", 1, timeout=WAIT) == 1
    await pg.wait_for_no_backends()


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("[" * 100_000 + "]" * 100_000, "MESSAGE is nested too deeply"),
        ('"\\ud800"', "MESSAGE string holds a lone surrogate"),
        ("NaN", "MESSAGE holds NaN"),
    ],
)
@pytest.mark.parametrize("verb", ["ask", "tell"])
def test_ask_and_tell_answer_any_message_in_one_line(
    capsys: pytest.CaptureFixture[str], verb: str, message: str, error: str
) -> None:
    """Whatever MESSAGE holds, the command says what is wrong in one line: exit 2."""
    status = main([verb, "echo", message, "--dsn", "postgresql://nobody@127.0.0.1:1/none"])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"pgbus: error: {error}")
