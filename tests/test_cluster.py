"""
One bus across processes: nodes are real subprocesses (``tests/fixtures_actors/cluster.py``)
against the session's PostgreSQL; the test process is a node too, with a bus of its own.

Nothing sleeps for a fixed time: each wait is for a line a node prints or for an ask to end,
bounded by ``trio.fail_after``. Durations (how fast a failure or a takeover came) are printed
for the record, never asserted; what is asserted is which error arrives, and that it arrives
before the ask's own, much longer, timeout.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from processes import ROOT, Pgbus, pgbus_env, run_to_completion, running
from test_cli import one_error_line

import pgbus
from pgbus._cli import main

if TYPE_CHECKING:
    from conftest import PgHelper

NODE = str(ROOT / "tests" / "fixtures_actors" / "cluster.py")
KEEPALIVE = 1.0
WAIT = 30


@asynccontextmanager
async def node(dsn: str, name: str, *options: str) -> AsyncIterator[Pgbus]:
    """A node in a subprocess, ready (joined, its actors spawned); stopped on the way out."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            NODE,
            "--dsn",
            dsn,
            "--node",
            name,
            "--keepalive",
            str(KEEPALIVE),
            *options,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=pgbus_env(),
        cwd=ROOT,
    )
    running = Pgbus(process)
    async with trio.open_nursery() as nursery:
        assert process.stdout is not None
        assert process.stderr is not None
        nursery.start_soon(running._pump, "stdout", process.stdout)
        nursery.start_soon(running._pump, "stderr", process.stderr)
        try:
            await running.expect("stdout", '"event": "ready"')
            yield running
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                    with trio.move_on_after(10):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


def event(line: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(line)
    return record


@asynccontextmanager
async def asker(dsn: str, node_name: str = "tester") -> AsyncIterator[pgbus.Bus]:
    async with pgbus.open_bus(dsn, node=node_name, keepalive=KEEPALIVE) as bus:
        yield bus


# -- remote ask and tell -------------------------------------------------------------------------


async def test_ask_and_tell_reach_an_actor_in_another_process(pg: PgHelper) -> None:
    """ask() gets the remote handle's return value as JSON; tell() delivers without a reply."""
    async with node(pg.dsn, "worker-1", "--public", "echo") as worker, asker(pg.dsn) as bus:
        with trio.fail_after(WAIT):
            reply = await bus.ask("echo", {"n": [1, "é"]}, timeout=WAIT)
            assert reply == {"node": "worker-1", "echo": {"n": [1, "é"]}}
            await bus.tell("echo", {"tell": 7})
            told = event(await worker.expect("stdout", '"event": "told"'))
        assert told == {"event": "told", "node": "worker-1", "message": {"tell": 7}}
        # The cluster is no channel of the bus's: it subscribes through the listener.
        assert bus.channels == {}
        statistics = bus.statistics()
        assert (statistics.channels, statistics.bridges) == ((), ())
    await pg.wait_for_no_backends()


async def test_a_remote_failure_names_the_remote_error(pg: PgHelper) -> None:
    """A remote handle that raises gives ActorFailedError with the remote type and message."""
    async with node(pg.dsn, "worker-1", "--public", "echo"), asker(pg.dsn) as bus:
        with trio.fail_after(WAIT), pytest.raises(pgbus.ActorFailedError) as failed:
            await bus.ask("echo", "boom", timeout=WAIT)
        assert str(failed.value) == (
            "actor 'echo' failed while handling the request: "
            "ValueError('remote trouble') on node 'worker-1'"
        )
        remote = failed.value.error
        assert isinstance(remote, pgbus.RemoteError)
        assert (remote.type_name, remote.message, remote.node) == (
            "ValueError",
            "remote trouble",
            "worker-1",
        )
        with trio.fail_after(WAIT):  # restarted by its supervisor, it answers again
            assert (await bus.ask("echo", 1, timeout=WAIT))["echo"] == 1
    await pg.wait_for_no_backends()


async def test_what_cannot_cross_is_refused_before_sending(pg: PgHelper) -> None:
    """Not JSON, or too large for a NOTIFY: one clear error, and nothing reaches the actor."""
    async with node(pg.dsn, "worker-1", "--public", "echo") as worker, asker(pg.dsn) as bus:
        with pytest.raises(
            pgbus.MessageNotJSONError,
            match=r"^the message for remote actor 'echo' is not JSON-encodable \(Object of type set"
            r" is not JSON serializable\); only JSON crosses between processes\.$",
        ):
            await bus.ask("echo", {1, 2}, timeout=WAIT)
        with pytest.raises(pgbus.MessageNotJSONError, match="Out of range float values"):
            await bus.tell("echo", float("nan"))
        with pytest.raises(
            pgbus.MessageTooLargeError,
            match=r"^the request for remote actor 'echo' is 8\d\d\d bytes once encoded; "
            r"a NOTIFY carries at most 7999\.",
        ):
            await bus.ask("echo", "x" * 8000, timeout=WAIT)
        with trio.fail_after(WAIT):
            assert (await bus.ask("echo", "x" * 7000, timeout=WAIT))["echo"] == "x" * 7000
            # The reply (the message and more) is too large to come back: said, not hung.
            with pytest.raises(pgbus.ActorFailedError, match="MessageTooLargeError"):
                await bus.ask("echo", {"double": "x" * 4000}, timeout=WAIT)
        assert not [line for line in worker.lines["stdout"] if "told" in line]
    await pg.wait_for_no_backends()


async def test_a_name_nobody_serves_fails_at_once(pg: PgHelper) -> None:
    """UnknownActorError without waiting for the timeout, for ask and tell."""
    async with asker(pg.dsn) as bus:
        with trio.fail_after(WAIT):
            with pytest.raises(
                pgbus.UnknownActorError,
                match=r"^no actor named 'nobody' on any node of the cluster\.$",
            ):
                await bus.ask("nobody", 1, timeout=3600)
            with pytest.raises(pgbus.UnknownActorError):
                await bus.tell("nobody", 1)
    await pg.wait_for_no_backends()


async def test_a_late_reply_is_dropped_and_blocks_nobody(pg: PgHelper) -> None:
    """An ask that timed out leaves its reply to be dropped; the next ask gets its own."""
    async with node(pg.dsn, "worker-1", "--public", "echo"), asker(pg.dsn) as bus:
        with trio.fail_after(WAIT):
            with pytest.raises(pgbus.AskTimeoutError):
                await bus.ask("echo", {"sleep": 0.5}, timeout=0.1)
            assert await bus.ask("echo", "next", timeout=WAIT) == {
                "node": "worker-1",
                "echo": "next",
            }
            statistics = bus.statistics().cluster
            assert statistics is not None
            assert (statistics.node, statistics.pending_asks) == ("tester", 0)
            # The late reply came before the next one (NOTIFY keeps order), and was dropped.
            assert statistics.late_replies == 1
    await pg.wait_for_no_backends()


async def test_nodes_serving_the_same_actor_share_its_requests(pg: PgHelper) -> None:
    """Two nodes with public 'echo': asks go to both, each ask answered once."""
    async with (
        node(pg.dsn, "worker-1", "--public", "echo"),
        node(pg.dsn, "worker-2", "--public", "echo"),
        asker(pg.dsn) as bus,
    ):
        replies: list[Any] = []

        async def ask(i: int) -> None:
            replies.append(await bus.ask("echo", i, timeout=WAIT))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(ask, i)
        assert sorted(r["echo"] for r in replies) == list(range(40))
        assert {r["node"] for r in replies} == {"worker-1", "worker-2"}
    await pg.wait_for_no_backends()


async def test_many_asks_in_flight_all_come_back(pg: PgHelper) -> None:
    """500 concurrent asks to one remote actor: every reply reaches its own ask."""
    async with node(pg.dsn, "worker-1", "--public", "echo"), asker(pg.dsn) as bus:
        replies: dict[int, Any] = {}

        async def ask(i: int) -> None:
            replies[i] = await bus.ask("echo", i, timeout=WAIT)

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(ask, i)
        assert all(reply["echo"] == i for i, reply in replies.items())
        assert len(replies) == 500
    await pg.wait_for_no_backends()


async def test_two_live_nodes_cannot_share_a_name(pg: PgHelper) -> None:
    """A second bus opened as node 'twin' while the first lives is refused, naming the rule."""
    async with asker(pg.dsn) as first:
        assert first.node == "tester"
        with pytest.raises(pgbus.NodeNameTakenError, match=r"^node name 'tester' is taken"):
            async with asker(pg.dsn):
                pass
    async with asker(pg.dsn) as again:  # once the first has left, the name is free
        assert again.node == "tester"
    await pg.wait_for_no_backends()


class LocalEcho(pgbus.Actor):
    async def handle(self, message: Any) -> Any:
        return message


async def test_bad_input_on_a_node_channel_is_counted_and_the_node_goes_on(pg: PgHelper) -> None:
    """Garbage or a request for an actor the node does not run: counted, refused, no harm."""
    async with asker(pg.dsn) as bus:
        await bus.spawn(LocalEcho, name="local_echo", inbox_capacity=10, public=True)
        status = await bus.cluster_status()
        [me] = [n for n in status.nodes if n.name == "tester"]
        async with pg.listen("pgbus.node.0123456789abcdef") as replies:
            for payload in (
                "not json",
                '{"k": "zz", "i": 1}',
                '{"k": "a", "i": 7, "a": "nobody", "r": "pgbus.node.0123456789abcdef", "m": 1}',
            ):
                await pg.execute("SELECT pg_notify($1, $2)", me.channel, payload)
            with trio.fail_after(WAIT):
                _, refusal, _ = await replies.receive()
        assert json.loads(refusal) == {
            "k": "e",
            "i": 7,
            "t": None,
            "e": "it is not running on node 'tester'",
        }
        statistics = bus.statistics().cluster
        assert statistics is not None
        assert (statistics.junk, statistics.refused) == (2, 1)
        with trio.fail_after(WAIT):  # and the node works on
            async with asker(pg.dsn, node_name="other") as other:
                assert await other.ask("local_echo", [1], timeout=WAIT) == [1]
    await pg.wait_for_no_backends()


# -- fast failure --------------------------------------------------------------------------------


async def test_kill_9_fails_pending_asks_fast_and_the_next_ask_goes_to_a_survivor(
    pg: PgHelper,
) -> None:
    """SIGKILL the node handling an ask: ActorUnavailableError within keepalive, not timeout."""
    async with asker(pg.dsn) as bus, node(pg.dsn, "doomed", "--public", "echo") as doomed:
        outcome: list[BaseException] = []
        failed = trio.Event()

        async def pending_ask() -> None:
            try:
                await bus.ask("echo", {"sleep": 600}, timeout=600)
            except pgbus.PgbusError as exc:
                outcome.append(exc)
            failed.set()

        async with trio.open_nursery() as nursery:
            # The first ask goes to 'doomed' only: 'survivor' joins after it is in flight.
            nursery.start_soon(pending_ask)
            await doomed.expect("stdout", '"event": "sleeping"')
            async with node(pg.dsn, "survivor", "--public", "echo"):
                start = trio.current_time()
                doomed.process.kill()
                with trio.fail_after(WAIT):  # far below the ask's own 600 s
                    await failed.wait()
                print(f"pending ask failed {trio.current_time() - start:.2f}s after SIGKILL")
                [error] = outcome
                assert isinstance(error, pgbus.ActorUnavailableError)
                assert str(error) == (
                    "actor 'echo' on node 'doomed' became unavailable (its session ended) "
                    "while handling the request"
                )
                with trio.fail_after(WAIT):
                    for i in range(5):
                        reply = await bus.ask("echo", i, timeout=WAIT)
                        assert reply == {"node": "survivor", "echo": i}
    await pg.wait_for_no_backends()


async def test_pending_asks_fail_at_once_when_the_askers_listening_connection_reconnects(
    pg: PgHelper,
) -> None:
    """Replies sent while the asker's listener was down are lost: its asks say so, at once."""
    async with node(pg.dsn, "worker-1", "--public", "echo") as worker, asker(pg.dsn) as bus:
        failed = trio.Event()
        outcome: list[BaseException] = []

        async def pending_ask() -> None:
            try:
                await bus.ask("echo", {"sleep": 600}, timeout=600)
            except pgbus.PgbusError as exc:
                outcome.append(exc)
            failed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pending_ask)
            await worker.expect("stdout", '"event": "sleeping"')
            [listener] = [
                row["pid"]
                for row in await pg.backends()
                if row["application_name"] == "pgbus:listen" and row["pid"] in bus.own_pids
            ]
            await pg.execute("SELECT pg_terminate_backend($1)", listener)
            with trio.fail_after(WAIT):
                await failed.wait()
        [error] = outcome
        assert isinstance(error, pgbus.ActorUnavailableError)
        assert "this node's listening connection reconnected; the reply may be lost" in str(error)
    await pg.wait_for_no_backends()


# -- singletons ----------------------------------------------------------------------------------

HOLDS = """
CREATE TABLE IF NOT EXISTS cluster_holds (
    id serial PRIMARY KEY, node text NOT NULL, started timestamptz NOT NULL, ended timestamptz
);
TRUNCATE cluster_holds
"""


async def forward_events(source: Pgbus, needle: str, into: trio.MemorySendChannel[Any]) -> None:
    """Send every stdout line of *source* containing *needle*, decoded, to *into*."""
    seen = 0
    while True:
        lines = source.lines["stdout"]
        for line in lines[seen:]:
            if needle in line:
                await into.send(event(line))
        seen = len(lines)
        if not source._open["stdout"]:
            return
        await source._changed.wait()


def assert_no_overlap(holds: list[Any], killed_at: dict[int, Any]) -> None:
    """Each run of the singleton ended (or its process was killed) before the next began."""
    runs = sorted(holds, key=lambda h: h["started"])
    for before, after in itertools.pairwise(runs):
        end = before["ended"] or killed_at[before["id"]]
        assert end <= after["started"], f"{before} overlaps {after}"


async def test_a_singleton_runs_on_one_node_at_a_time_over_many_takeovers(pg: PgHelper) -> None:
    """Kill the holder again and again (SIGKILL and SIGTERM): never two at once, always one."""
    await pg.execute(HOLDS)
    killed_at: dict[int, Any] = {}
    send, starts = trio.open_memory_channel[Any](math.inf)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        nodes: dict[str, Pgbus] = {}

        async def start(name: str) -> None:
            nodes[name] = await stack.enter_async_context(
                node(pg.dsn, name, "--singleton", "marked")
            )
            nursery.start_soon(forward_events, nodes[name], '"event": "singleton"', send)

        for name in ("n0", "n1", "n2"):
            await start(name)
        with trio.fail_after(WAIT):
            holder = await starts.receive()
        for round in range(8):
            killed_at[holder["hold"]] = await pg.fetchval("SELECT clock_timestamp()")
            victim = nodes.pop(holder["node"])
            began = trio.current_time()
            if round % 2:
                victim.process.terminate()
            else:
                victim.process.kill()
            with trio.fail_after(WAIT):
                holder = await starts.receive()
            took = trio.current_time() - began
            print(f"round {round}: taken over by {holder['node']} in {took:.2f}s")
            assert holder["node"] in nodes
            with trio.fail_after(WAIT):
                await victim.process.wait()
            await start(f"n{3 + round}")
        nursery.cancel_scope.cancel()
    holds = [
        dict(r)
        for r in await pg.fetch("SELECT id, node, started, ended FROM cluster_holds ORDER BY id")
    ]
    assert len(holds) >= 9  # 1 + 8 takeovers, and maybe more while the nodes were stopped
    assert_no_overlap(holds, killed_at)
    await pg.wait_for_no_backends()


async def test_a_holder_whose_connection_goes_half_open_gives_up_before_anyone_takes_over(
    pg: PgHelper,
) -> None:
    """SIGSTOP the holder's node backend: it stops its singleton; another takes it only later."""
    await pg.execute(HOLDS)
    async with node(pg.dsn, "first", "--singleton", "marked") as first:
        with trio.fail_after(WAIT):
            held = event(await first.expect("stdout", '"event": "singleton"'))
        backend = event(first.lines["stdout"][0])["backend"]
        async with node(pg.dsn, "second", "--singleton", "marked") as second:
            os.kill(backend, signal.SIGSTOP)
            try:
                with trio.fail_after(WAIT):
                    stopped = event(await first.expect("stdout", '"event": "singleton stopped"'))
                assert stopped["hold"] == held["hold"]
                # The stopped backend's session still holds the lock: nobody can run it now.
                assert (
                    await pg.fetchval("SELECT count(*) FROM cluster_holds WHERE ended IS NULL") == 0
                )
            finally:
                await pg.execute("SELECT pg_terminate_backend($1)", backend)
                os.kill(backend, signal.SIGCONT)
            send, starts = trio.open_memory_channel[Any](math.inf)
            async with trio.open_nursery() as nursery:
                for source in (first, second):
                    nursery.start_soon(forward_events, source, '"event": "singleton"', send)
                with trio.fail_after(WAIT):
                    taken = await starts.receive()
                    while taken["hold"] == held["hold"]:
                        taken = await starts.receive()
                nursery.cancel_scope.cancel()
    holds = [
        dict(r)
        for r in await pg.fetch("SELECT id, node, started, ended FROM cluster_holds ORDER BY id")
    ]
    # The first hold, the takeover, and maybe one more while the nodes were being stopped.
    assert [h["id"] for h in holds[:2]] == [held["hold"], taken["hold"]]
    assert_no_overlap(holds, {})
    await pg.wait_for_no_backends()


# -- the command line ----------------------------------------------------------------------------


async def status_json(dsn: str) -> dict[str, Any]:
    result = await run_to_completion("status", "--dsn", dsn, "--json")
    assert result.returncode == 0, result.stderr
    record: dict[str, Any] = json.loads(result.stdout)
    return record


async def test_status_shows_what_runs_and_forgets_a_node_that_ended(pg: PgHelper) -> None:
    """status: nodes with public actors and singletons (holder named); a killed node is gone."""
    await pg.execute(HOLDS)
    options = ("--public", "echo", "--singleton", "marked", "--inbound", "Orders In")
    async with node(pg.dsn, "worker-1", *options) as worker:
        with trio.fail_after(WAIT):
            await worker.expect("stdout", '"event": "singleton"')
        async with node(pg.dsn, "worker-2", "--singleton", "marked") as standby:
            with trio.fail_after(WAIT):
                while True:  # the holder writes its registry row just after on_start
                    status = await status_json(pg.dsn)
                    if status["singletons"] and status["singletons"][0]["holder"]:
                        break
            names = {n["name"]: n for n in status["nodes"]}
            assert set(names) == {"worker-1", "worker-2"}
            assert set(names["worker-1"]["public"]) == {"echo", "marked"}
            assert names["worker-1"]["inbound"] == ["Orders In"]
            assert names["worker-2"]["public"] == []
            assert names["worker-2"]["singletons"] == ["marked"]
            assert status["singletons"] == [
                {
                    "name": "marked",
                    "holder": "worker-1",
                    "holder_pid": names["worker-1"]["pid"],
                    "candidates": ["worker-1", "worker-2"],
                    "foreign_holder": None,
                }
            ]
            text = await run_to_completion("status", "--dsn", pg.dsn)
            assert text.returncode == 0
            lines = text.stdout.decode().splitlines()
            assert lines[0].endswith(": 2 nodes")
            assert (
                "singleton 'marked': held by 'worker-1' (candidates: 'worker-1', 'worker-2')"
                in lines
            )

            # ask and tell from the command line reach the actors wherever they run.
            asked = await run_to_completion("ask", "echo", '{"x": 1}', "--dsn", pg.dsn)
            assert asked.returncode == 0, asked.stderr
            assert json.loads(asked.stdout) == {"node": "worker-1", "echo": {"x": 1}}
            told = await run_to_completion("tell", "echo", '{"tell": "cli"}', "--dsn", pg.dsn)
            assert told.returncode == 0, told.stderr
            await worker.expect("stdout", '"message": {"tell": "cli"}')
            # The singleton, asked from its stand-by node's side, answers from its holder.
            holder = await run_to_completion("ask", "marked", "null", "--dsn", pg.dsn)
            assert json.loads(holder.stdout) == "worker-1"
            missing = await run_to_completion("ask", "nobody", "1", "--dsn", pg.dsn)
            assert missing.returncode == 1
            assert one_error_line(missing.stderr.decode()) == (
                "pgbus: error: no actor named 'nobody' on any node of the cluster."
            )

            worker.process.kill()
            with trio.fail_after(WAIT):
                await worker.process.wait()
                await standby.expect("stdout", '"event": "singleton"')
            status = await status_json(pg.dsn)
            assert [n["name"] for n in status["nodes"]] == ["worker-2"]
            assert status["singletons"][0]["holder"] in ("worker-2", None)
    await pg.wait_for_no_backends()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nname = 3\n", "[node] name must be a node name (got 3)."),
        (
            '[node]\nname = ""\n',
            "[node] name must be a non-empty string of printable characters (got '').",
        ),
        ('[node]\nnmae = "x"\n', "[node] unknown key 'nmae'; did you mean 'name'?"),
        (
            '[actors.a]\nclass = "fixtures_actors.sample:Sink"\npublic = true\n',
            "[actors.a] public needs an inbox: a public actor is asked through it (got true).",
        ),
        (
            '[channels.c]\ncapacity = 1\n[actors.a]\nclass = "fixtures_actors.sample:Sink"\n'
            'inbox = "c"\nsingleton = true\npublic = false\n',
            "[actors.a] public cannot be false for a singleton with an inbox: the one node "
            "running it serves every node (got false).",
        ),
        (
            '[actors.a]\nclass = "fixtures_actors.sample:Sink"\nsingleton = "yes"\n',
            "[actors.a] singleton must be true or false (got 'yes').",
        ),
    ],
)
async def test_bad_cluster_keys_exit_2_with_one_line(
    tmp_path: Path, text: str, message: str
) -> None:
    """check refuses a bad [node] or public/singleton key: exit 2, one line naming it."""
    path = tmp_path / "bus.toml"
    path.write_text(text)
    result = await run_to_completion("check", str(path))
    assert result.returncode == 2
    assert one_error_line(result.stderr.decode()) == f"pgbus: error: {path}: {message}"


def test_check_summary_shows_the_node_and_public_actors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check lists the node name and which actors are public or singletons."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    path = tmp_path / "bus.toml"
    path.write_text(
        '[node]\nname = "worker-1"\n[channels.c]\ncapacity = 1\n[channels.d]\ncapacity = 1\n'
        '[actors.a]\nclass = "fixtures_actors.sample:Sink"\ninbox = "c"\npublic = true\n'
        '[actors.b]\nclass = "fixtures_actors.sample:Sink"\ninbox = "d"\nsingleton = true\n'
    )
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "node: 'worker-1'" in out
    assert "actor 'a': fixtures_actors.sample:Sink, inbox 'c', restart permanent, public" in out
    assert "actor 'b': fixtures_actors.sample:Sink, inbox 'd', restart permanent, singleton" in out


# -- the example ---------------------------------------------------------------------------------


async def test_the_cluster_example_asks_across_processes_and_moves_its_singleton(
    pg: PgHelper,
) -> None:
    """examples/cluster.toml in two processes: one asks the other; the clock moves on kill -9."""
    config = str(ROOT / "examples" / "cluster.toml")
    async with running("run", config, "--dsn", pg.dsn) as first:
        with trio.fail_after(WAIT):
            tick = json.loads(await first.expect("stdout", '"clock"'))
        async with running("run", config, "--dsn", pg.dsn) as second:
            await second.expect("stderr", "running; stop with Ctrl-C")
            with trio.fail_after(WAIT):
                result = await trio.run_process(
                    [sys.executable, str(ROOT / "examples" / "cluster_ask.py"), "Ada"],
                    capture_stdout=True,
                    capture_stderr=True,
                    env=pgbus_env(PGBUS_DSN=pg.dsn),
                )
            [line] = result.stdout.decode().splitlines()
            assert line.startswith("hello, Ada, from node ")
            assert not [x for x in second.lines["stdout"] if '"clock"' in x]  # one clock only
            first.process.kill()
            with trio.fail_after(WAIT):
                await first.process.wait()
                moved = json.loads(await second.expect("stdout", '"clock"'))
            assert moved["node"] != tick["node"]
            assert await second.stop(signal.SIGTERM, timeout=15) == 0
            # Leaving cleanly is not losing the lock: no warning says so.
            assert not [x for x in second.lines["stderr"] if "stops singleton" in x]
    await pg.wait_for_no_backends()


def test_ask_refuses_a_message_that_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    """ask with invalid JSON: exit 2 and one line, before connecting to anything."""
    assert main(["ask", "echo", "{nope", "--dsn", "postgresql://nobody@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err).startswith("pgbus: error: MESSAGE is not valid JSON (")


# -- the server goes away ------------------------------------------------------------------------


class Watched(pgbus.Actor):
    """Says when it starts and stops (a singleton, in the test's own process)."""

    def __init__(self, events: trio.MemorySendChannel[str]) -> None:
        self.events = events

    async def on_start(self) -> None:
        self.events.send_nowait("start")

    async def handle(self, message: Any) -> Any:
        return message

    async def on_stop(self) -> None:
        self.events.send_nowait("stop")


async def test_a_server_restart_stops_the_singleton_and_the_node_joins_again() -> None:
    """Restart PostgreSQL: the holder stops its singleton, rejoins, runs it again; asks resume."""
    from pgbus._embedded import open_embedded_postgres

    send, events = trio.open_memory_channel[str](math.inf)
    async with (
        open_embedded_postgres() as server,
        pgbus.open_bus(server.dsn, node="holder", keepalive=KEEPALIVE) as holder,
        pgbus.open_bus(server.dsn, node="other", keepalive=KEEPALIVE) as other,
    ):
        options = {"events": send}
        await holder.spawn(
            Watched, name="watched", inbox_capacity=10, singleton=True, options=options
        )
        with trio.fail_after(WAIT):
            assert await events.receive() == "start"
            assert await other.ask("watched", 1, timeout=WAIT) == 1  # advertised before on_start
        await server.stop_server(mode="immediate")
        with trio.fail_after(WAIT):
            assert await events.receive() == "stop"
        await server.start_server()
        with trio.fail_after(WAIT):
            assert await events.receive() == "start"
            # The holder is a new session now: an ask routed by what 'other' knew of the old
            # one may be failed as its session ended; the next one finds the new session.
            while True:
                try:
                    assert await other.ask("watched", 2, timeout=WAIT) == 2
                    break
                except pgbus.ActorUnavailableError:
                    await trio.lowlevel.checkpoint()
