"""
Keyed actors when processes die or freeze: the nodes hosting the kind are real subprocesses
(``tests/fixtures_actors/entities.py``) against the session's PostgreSQL, SIGKILLed, SIGSTOPped
and restarted while messages flow; the test process stores the messages and asks.

Every message for a key carries the key's next sequence number, and the `Counter` entity checks
it against its state: a message lost, handled twice in effect, or out of order shows in the state
(``bad``), and a commit from an activation that lost its shard (a stale epoch) shows as a state
whose count disagrees with the number of messages acknowledged for the key (its ``version``).

On the loopback, a SIGSTOPped process keeps its sessions (its kernel still answers TCP
keepalives): it loses its shards because it stops placing (2 x keepalive), not because its
session ends. Some faults end the frozen node's session as well (``pg_terminate_backend``), as
the server does to a frozen host after ``tcp_user_timeout``: then it joins again on SIGCONT.

Durations are printed for the record, never asserted (speed belongs in ``bench/``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
from processes import ROOT, Pgbus, pgbus_env

import pgbus
from pgbus._entities._entity import shard_of

if TYPE_CHECKING:
    from conftest import PgHelper

NODE = str(ROOT / "tests" / "fixtures_actors" / "entities.py")
KEEPALIVE = 1.0
WAIT = 60

ALIVE_NODE = """
SELECT n.pid FROM pgbus.cluster_nodes n
  JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
   AND l.objid = n.pid::oid AND l.pid = n.pid
 WHERE n.name = $1
"""
STALE = "moved to another node while a batch ran"
"""What a node logs when the fence refuses a batch's commit."""
PLACED = "shard(s) (took"
"""What a node logs when it takes or gives up shards."""
CHANNEL_OF = "SELECT channel FROM pgbus.cluster_nodes WHERE name = $1 ORDER BY started DESC LIMIT 1"


def unique_kind(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Workers:
    """Node processes hosting one kind; started, signalled and restarted by the test."""

    def __init__(self, nursery: trio.Nursery, dsn: str, kind: str, *options: str) -> None:
        self.nursery = nursery
        self.dsn = dsn
        self.kind = kind
        self.options = options
        self.running: dict[str, Pgbus] = {}
        self.stopped: set[str] = set()
        self.everyone: list[Pgbus] = []

    async def start(self, name: str) -> Pgbus:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                NODE,
                "--dsn",
                self.dsn,
                "--node",
                name,
                "--kind",
                self.kind,
                "--keepalive",
                str(KEEPALIVE),
                *self.options,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=pgbus_env(),
            cwd=ROOT,
        )
        worker = Pgbus(process)
        assert process.stdout is not None
        assert process.stderr is not None
        self.nursery.start_soon(worker._pump, "stdout", process.stdout)
        self.nursery.start_soon(worker._pump, "stderr", process.stderr)
        self.running[name] = worker
        self.everyone.append(worker)
        await worker.expect("stdout", '"event": "ready"', timeout=WAIT)
        return worker

    def kill(self, name: str) -> Pgbus:
        worker = self.running.pop(name)
        worker.process.kill()
        return worker

    def stop(self, name: str) -> None:
        self.running[name].process.send_signal(signal.SIGSTOP)
        self.stopped.add(name)

    def resume(self, name: str) -> None:
        self.stopped.discard(name)
        self.running[name].process.send_signal(signal.SIGCONT)

    def stderr(self, needle: str) -> int:
        """Lines containing *needle* on the stderr of every process started."""
        return sum(needle in line for w in self.everyone for line in w.lines["stderr"])

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for name in list(self.stopped):
                self.resume(name)
            for worker in self.everyone:
                if worker.process.returncode is None:
                    worker.process.terminate()
            for worker in self.everyone:
                with trio.move_on_after(15):
                    await worker.process.wait()
                if worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()


@asynccontextmanager
async def workers(dsn: str, kind: str, *options: str) -> AsyncIterator[Workers]:
    async with trio.open_nursery() as nursery:
        group = Workers(nursery, dsn, kind, *options)
        try:
            yield group
        finally:
            await group.aclose()


@asynccontextmanager
async def client(dsn: str, keepalive: float = KEEPALIVE) -> AsyncIterator[pgbus.Bus]:
    """The test's own node, which stores messages and asks."""
    async with pgbus.open_bus(
        dsn, node=f"tester-{uuid.uuid4().hex[:6]}", keepalive=keepalive
    ) as bus:
        yield bus


async def mail_left(pg: PgHelper, kind: str) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM pgbus.entity_mail WHERE kind = $1", kind))


async def wait_until_handled(pg: PgHelper, kind: str, timeout: float = WAIT) -> None:
    """Poll until the kind's mailboxes are empty (committed rows have no event to await)."""
    with trio.move_on_after(timeout):
        while True:
            if not await mail_left(pg, kind):
                return
            await trio.sleep(0.1)
    raise AssertionError(f"{await mail_left(pg, kind)} message(s) left after {timeout:g}s")


async def keys_owned_by(pg: PgHelper, kind: str, node: str, keys: list[str]) -> list[str]:
    """Those of *keys* whose shard *node* owns now."""
    channel = await pg.fetchval(CHANNEL_OF, node)
    shards = {
        row["shard"]
        for row in await pg.fetch(
            "SELECT shard FROM pgbus.entity_shards WHERE kind = $1 AND owner = $2", kind, channel
        )
    }
    return [key for key in keys if shard_of(key) in shards]


async def shards_of(pg: PgHelper, kind: str, node: str) -> int:
    channel = await pg.fetchval(CHANNEL_OF, node)
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM pgbus.entity_shards WHERE kind = $1 AND owner = $2",
            kind,
            channel,
        )
    )


async def wait_for_placement(pg: PgHelper, kind: str, nodes: list[str]) -> None:
    """Poll until every shard of *kind* is owned, each by one of *nodes*, and each has some."""
    with trio.fail_after(WAIT):
        while True:
            counts = [await shards_of(pg, kind, node) for node in nodes]
            if sum(counts) == 256 and all(counts):
                return
            await trio.sleep(0.05)


async def end_session_of(pg: PgHelper, node: str) -> None:
    """End *node*'s session (its node connection's backend): the node is dead to the cluster."""
    [row] = await pg.fetch(ALIVE_NODE, node)
    await pg.execute("SELECT pg_terminate_backend($1)", row["pid"])


async def check_states(pg: PgHelper, kind: str, expected: dict[str, int]) -> None:
    """Every key's state counted exactly its messages, in order, and agrees with its version."""
    rows = await pg.fetch(
        "SELECT key, state, version FROM pgbus.entity_state WHERE kind = $1", kind
    )
    found = {row["key"]: (json.loads(row["state"]), row["version"]) for row in rows}
    lost = {k: n for k, n in expected.items() if found.get(k, ({}, 0))[0].get("n", 0) < n}
    extra = {k: n for k, n in expected.items() if found.get(k, ({}, 0))[0].get("n", 0) > n}
    bad = {k: s for k, (s, _) in found.items() if s.get("bad")}
    disagree = {k: (s.get("n"), v) for k, (s, v) in found.items() if s.get("n") != v}
    dead = int(await pg.fetchval("SELECT count(*) FROM pgbus.entity_dead WHERE kind = $1", kind))
    print(
        f"keys {len(expected)}: lost {len(lost)}, counted twice {len(extra)}, out of order "
        f"{len(bad)}, state/version disagree {len(disagree)}, dead letters {dead}"
    )
    assert not bad, f"out of order (first 5): {list(bad.items())[:5]}"
    assert not disagree, f"state n != version (first 5): {list(disagree.items())[:5]}"
    assert not lost, f"lost (first 5): {list(lost.items())[:5]}"
    assert not extra, f"counted twice (first 5): {list(extra.items())[:5]}"
    assert {k: s["last"] for k, (s, _) in found.items()} == expected
    assert dead == 0


# -- chaos -----------------------------------------------------------------------------------------


async def run_chaos(
    pg: PgHelper, *, keys: int, rounds: int, seconds: float, every: float = 2.0
) -> None:
    """
    *keys* x *rounds* messages (round r carries seq r for every key) stored over *seconds*
    while a fault hits one of 3 nodes every *every* seconds: SIGKILL (then a new process), a
    SIGSTOP/SIGCONT, or a SIGSTOP whose session the server ends before SIGCONT.
    """
    kind = unique_kind("chaos")
    names = [f"{kind}-n{i}" for i in range(3)]
    rng = random.Random(os.environ.get("PGBUS_CHAOS_SEED", "20"))
    key_names = [f"k{i}" for i in range(keys)]
    faults: list[str] = []
    # Storing 10,000 messages a statement can take longer than keepalive / 2 on a busy machine,
    # which the client's connection guard would take for a half-open connection.
    keepalive = KEEPALIVE if keys <= 1000 else 10
    async with client(pg.dsn, keepalive) as bus, workers(pg.dsn, kind) as group:
        for name in names:
            await group.start(name)
        generation = 0
        sent = trio.Event()

        async def send() -> None:
            pause = seconds / rounds
            for seq in range(1, rounds + 1):
                await bus.tell_many(kind, [(key, {"seq": seq}) for key in key_names])
                await trio.sleep(pause)  # pacing the traffic over the faults, not a wait
            sent.set()

        async def fault() -> None:
            nonlocal generation
            action = rng.choice(["kill", "stop", "stop and lose the session"])
            victim = rng.choice(sorted(group.running))
            faults.append(f"{action} {victim}")
            if action == "kill":
                group.kill(victim)
                generation += 1
                await group.start(f"{victim.rsplit('.', 1)[0]}.{generation}")
                return
            group.stop(victim)
            if action == "stop and lose the session":
                await end_session_of(pg, victim)
            # Frozen for a while, either side of 2 x keepalive (when others take its shards).
            await trio.sleep(rng.uniform(0.5, 4 * KEEPALIVE))
            group.resume(victim)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while not sent.is_set() or trio.current_time() - started < seconds:
                await trio.sleep(every)
                await fault()
        await wait_until_handled(pg, kind, timeout=max(WAIT, keys * rounds / 1000))
        took = trio.current_time() - started
        stale = group.stderr(STALE)
        print(
            f"\nchaos: {keys * rounds} messages to {keys} keys in {took:.1f}s, "
            f"{len(faults)} faults ({', '.join(faults)}); stale batches discarded: {stale}, "
            f"changes of placement: {group.stderr(PLACED)}"
        )
        await check_states(pg, kind, dict.fromkeys(key_names, rounds))


async def test_chaos_loses_nothing_and_keeps_order(pg: PgHelper) -> None:
    """1,000 keys, 20,000 messages, 3 nodes, a fault every 2 s for 30 s: every key exact."""
    await run_chaos(pg, keys=1000, rounds=20, seconds=30)


@pytest.mark.soak
async def test_soak_chaos_a_million_messages(pg: PgHelper) -> None:
    """10,000 keys, 1,000,000 messages under the same faults (``-m soak``)."""
    seconds = float(os.environ.get("PGBUS_SOAK_SECONDS", "300"))
    await run_chaos(pg, keys=10_000, rounds=100, seconds=seconds)


# -- failover ------------------------------------------------------------------------------------


async def timed_ask(
    entity: pgbus.EntityRef, since: float, replies: dict[str, Any], took: list[float]
) -> None:
    """Ask *entity* for its next count (seq 2), noting the reply and the time since *since*."""
    replies[entity.key] = await entity.ask({"seq": 2}, timeout=20)
    took.append(trio.current_time() - since)


async def test_after_a_sigkill_the_dead_nodes_keys_answer_from_another_node(pg: PgHelper) -> None:
    """
    Three rounds: SIGKILL the node holding 10 warm keys; asks to them, sent at once, get real
    replies from the others, long before their timeout. (10 at a time: each ask borrows a
    connection of its own.)
    """
    kind = unique_kind("failover")
    names = [f"{kind}-n{i}" for i in range(3)]
    took: list[float] = []
    sent: dict[str, int] = {}
    async with client(pg.dsn) as bus, workers(pg.dsn, kind) as group:
        for name in names:
            await group.start(name)
        for round in range(3):
            await wait_for_placement(pg, kind, names)
            victim = names[0]
            candidates = [f"r{round}-k{i}" for i in range(300)]
            keys = (await keys_owned_by(pg, kind, victim, candidates))[:10]
            with trio.fail_after(WAIT):
                for key in keys:
                    reply = await bus.entity(kind, key).ask({"seq": 1}, timeout=WAIT)
                    assert reply == {"node": victim, "n": 1}
            replies: dict[str, Any] = {}
            group.kill(victim)
            killed = trio.current_time()
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(timed_ask, bus.entity(kind, key), killed, replies, took)
            assert {reply["node"] for reply in replies.values()} <= set(names[1:])
            assert {reply["n"] for reply in replies.values()} == {2}
            sent.update(dict.fromkeys(keys, 2))
            names = [*names[1:], f"{victim}.{round}"]
            await group.start(names[-1])
        took.sort()
        print(
            f"\nfailover after SIGKILL (keepalive {KEEPALIVE:g}s), {len(took)} asks: "
            f"p50 {statistics.median(took):.2f}s, p99 {took[int(len(took) * 0.99) - 1]:.2f}s, "
            f"max {took[-1]:.2f}s"
        )
        await check_states(pg, kind, sent)


# -- a frozen node -------------------------------------------------------------------------------


@pytest.mark.parametrize("session", ["kept", "ended"])
async def test_an_ask_pending_on_a_frozen_node_is_answered_and_the_node_cannot_commit(
    pg: PgHelper, session: str
) -> None:
    """
    SIGSTOP the node inside a handler for an ask (its session kept, or ended by the server):
    the new activation answers; resumed, the frozen node's batch is refused by the fence, it
    takes its shards back, and every key's state stays exact.
    """
    kind = unique_kind("frozen")
    frozen, other = f"{kind}-a", f"{kind}-b"
    keys = [f"k{i}" for i in range(200)]
    async with client(pg.dsn) as bus, workers(pg.dsn, kind) as group:
        node = await group.start(frozen)
        await group.start(other)
        await wait_for_placement(pg, kind, [frozen, other])
        held = await shards_of(pg, kind, frozen)
        await bus.tell_many(kind, [(key, {"seq": 1}) for key in keys])
        await wait_until_handled(pg, kind)  # every key active on one of the two nodes
        mine = await keys_owned_by(pg, kind, frozen, keys)
        key = mine[0]
        replied = trio.Event()
        reply: Any = None

        async def pending_ask() -> None:
            nonlocal reply
            reply = await bus.entity(kind, key).ask({"seq": 2, "sleep": 2}, timeout=20)
            replied.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pending_ask)
            await node.expect("stdout", '"event": "handling"')
            group.stop(frozen)
            stopped = trio.current_time()
            if session == "ended":
                await end_session_of(pg, frozen)
            with trio.fail_after(WAIT):
                await replied.wait()
        took = trio.current_time() - stopped
        print(f"\nask pending on a frozen node (session {session}) answered {took:.2f}s after")
        assert reply == {"node": other, "n": 2}
        # The frozen node's other keys take messages on the other node meanwhile.
        await bus.tell_many(kind, [(k, {"seq": 2}) for k in keys if k != key])
        await wait_until_handled(pg, kind)
        group.resume(frozen)
        await node.expect("stderr", STALE)
        with trio.fail_after(WAIT):  # it (joins again and) takes its shards back
            while True:
                if await shards_of(pg, kind, frozen) == held:
                    break
                await trio.sleep(0.05)
        await bus.tell_many(kind, [(k, {"seq": 3}) for k in keys])
        await wait_until_handled(pg, kind)
        await check_states(pg, kind, dict.fromkeys(keys, 3))
        assert len(await keys_owned_by(pg, kind, frozen, keys)) == len(mine)


# -- many activations ------------------------------------------------------------------------------

LOCK_ERRORS = ("out of shared memory", "max_locks_per_transaction")


def rss_kib(pid: int) -> int:
    """The resident set of process *pid*, in KiB (``VmRSS`` in ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


async def allocated_blocks(node: Pgbus) -> int:
    """The node's live Python objects' blocks (``sys.getallocatedblocks()``, after a GC)."""
    node.process.send_signal(signal.SIGUSR1)
    return int(json.loads(await node.expect("stdout", '"event": "memory"'))["blocks"])


async def live_activations(pg: PgHelper, kind: str) -> int:
    """Activations as the nodes report them (each every keepalive/4)."""
    return int(
        await pg.fetchval(
            "SELECT coalesce(sum(activations), 0) FROM pgbus.entity_hosts WHERE kind = $1", kind
        )
    )


async def wait_for_activations(group: Workers, pg: PgHelper, count: int, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while True:
            if await live_activations(pg, group.kind) == count:
                return
            await trio.sleep(0.1)
    found = await pg.fetch(
        "SELECT node, activations FROM pgbus.entity_hosts WHERE kind = $1 ORDER BY node",
        group.kind,
    )
    raise AssertionError(
        f"not {count} activations after {timeout:g}s: {[tuple(r) for r in found]}; "
        f"{group.stderr(PLACED)} changes of placement, {group.stderr(STALE)} stale batches"
    )


async def run_activations(pg: PgHelper, count: int, passivate_after: float, waves: int) -> None:
    """
    *count* keys activated at once across 4 nodes, then left idle until all passivate, *waves*
    times. *passivate_after* must well exceed the time the nodes take to handle *count*
    messages, or the first keys leave before the last arrive.
    """
    kind = unique_kind("many")
    names = [f"{kind}-n{i}" for i in range(4)]
    keys = [f"k{i}" for i in range(count)]
    passivate = ("--passivate-after", str(passivate_after))
    # The test's node stores 10,000 messages a statement, on 2 cores shared with 4 busy nodes:
    # more than keepalive / 2 = 0.5 s at times.
    async with client(pg.dsn, 10) as bus, workers(pg.dsn, kind, *passivate) as group:
        for name in names:
            await group.start(name)
        await wait_for_placement(pg, kind, names)
        nodes = [group.running[name] for name in names]
        pids = [node.process.pid for node in nodes]
        rss = {"ready": [rss_kib(pid) for pid in pids]}
        blocks = {"ready": [await allocated_blocks(node) for node in nodes]}
        for wave in range(1, waves + 1):
            started = trio.current_time()
            for i in range(0, len(keys), 10_000):
                await bus.tell_many(kind, [(k, {"seq": wave}) for k in keys[i : i + 10_000]])
            await wait_until_handled(pg, kind, timeout=passivate_after)
            handled = trio.current_time() - started
            await wait_for_activations(group, pg, count, passivate_after)
            rss[f"active {wave}"] = [rss_kib(pid) for pid in pids]
            blocks[f"active {wave}"] = [await allocated_blocks(node) for node in nodes]
            locks = await pg.fetchval("SELECT count(*) FROM pg_locks")
            print(
                f"\nwave {wave}: {count} activations on {len(names)} nodes, handled in "
                f"{handled:.1f}s; pg_locks rows {locks}; so far {group.stderr(PLACED)} changes "
                f"of placement, {group.stderr(STALE)} stale batches"
            )
            await wait_for_activations(group, pg, 0, WAIT + passivate_after)
            rss[f"passivated {wave}"] = [rss_kib(pid) for pid in pids]
            blocks[f"passivated {wave}"] = [await allocated_blocks(node) for node in nodes]
        for stage, values in rss.items():
            print(
                f"{stage}: RSS {', '.join(f'{v / 1024:.1f}' for v in values)} MiB; "
                f"allocated blocks {', '.join(str(b) for b in blocks[stage])}"
            )
        for needle in LOCK_ERRORS:
            assert group.stderr(needle) == 0
        await check_states(pg, kind, dict.fromkeys(keys, waves))
        # Memory comes back to its level: what the activations held is freed (the interpreter's
        # live blocks within 10% of their level before any), and a second wave leaves no more
        # resident than the first. Resident memory itself does not shrink back: CPython's
        # allocator keeps freed arenas that are not entirely empty (printed above).
        for ready, passivated in zip(blocks["ready"], blocks[f"passivated {waves}"], strict=True):
            assert passivated <= ready * 1.1
        if waves > 1:
            for first, last in zip(rss["passivated 1"], rss[f"passivated {waves}"], strict=True):
                assert last <= first * 1.1


async def test_twenty_thousand_activations_leave_memory_when_idle(pg: PgHelper) -> None:
    """
    20,000 keys active at once across 4 nodes, then all passivated: no lock-table error,
    memory back to its level. (CI size: 100,000 activations take 15-50 s to handle on two
    shared cores, and must all stay active meanwhile; that is the soak run below.)
    """
    await run_activations(pg, 20_000, passivate_after=30, waves=1)


@pytest.mark.soak
async def test_soak_a_hundred_thousand_activations(pg: PgHelper) -> None:
    """
    100,000 keys active at once across 4 nodes on default server settings, twice over
    (``-m soak``): the second wave leaves no more resident memory than the first.
    """
    await run_activations(pg, 100_000, passivate_after=120, waves=2)
