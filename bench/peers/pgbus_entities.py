"""
pgbus keyed actors (entities) for W9, W9A and W9C, as the README shows them (public names only).

- W9: the publisher stores the tells with ``bus.tell_many(kind, [(key, seq), ...])``, 5000 per
  call (one statement each); each of the 4 worker processes is a node (``open_bus(node=...)``)
  hosting the kind with ``bus.host(Counter)`` (default concurrency and batch). ``Counter``'s
  state counts its key's messages; its handler checks each message's sequence number against
  that count (order, nothing lost or applied twice). The clock starts once the kind's 256
  shards are placed on the 4 nodes, and stops when the workers have handled every message and
  ``pgbus.entity_mail`` holds none of the kind's (a message is deleted in the transaction that
  commits its key's state). Then every key's committed count is checked.
- W9A: process B (``python -m bench.peers.pgbus_entities serve ...``) hosts the kind; process A
  asks ``bus.entity(kind, key).ask(seq)``, one at a time, cycling over the keys: the warm-up
  asks each key once (activating them all), then every ask is timed. The harness runs W8 (the
  named-actor ask) just before and gives the ratio.
- W9C: a first host process (S) handles one tell per key and exits; a fresh host (B) then owns
  every shard with no activation; A asks each key twice in a row: cold (B loads the key's state
  and activates it), then warm. The cold asks are the result; the warm ones, and the median of
  each key's cold-minus-warm difference (the activation's cost), are reported beside them.

Reading ``pgbus.entity_shards``, ``entity_mail`` and ``entity_state`` (the storage the README
documents) is only for placement, completion and checking, never on the measured path's side.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import trio

import pgbus

from ._durable_tools import DEFAULT_WORKERS, WorkerReport, Workers, parse_worker_args
from ._keyed_tools import check_counts, check_keyed_finals, keyed_messages, out_of_order
from ._protocol import PeerArgs, Result, WorkloadError, clock, latency, read_ready_line, throughput

MODULE = "bench.peers.pgbus_entities"
TELL_BATCH = 5000
APPLICATION_NAME = "pgbus-bench"

_MAIL_LEFT = "SELECT EXISTS (SELECT FROM pgbus.entity_mail WHERE kind = $1)"
_OWNERS = (
    "SELECT count(DISTINCT owner), count(*) FILTER (WHERE owner IS NULL),"
    " string_agg(coalesce(owner, '-'), ',' ORDER BY shard)"
    " FROM pgbus.entity_shards WHERE kind = $1"
)


def _bus(dsn: str, node: str | None = None) -> Any:
    return pgbus.open_bus(dsn=dsn, node=node, application_name=APPLICATION_NAME)


async def _sql(bus: pgbus.Bus, sql: str, *args: Any) -> Any:
    async with bus.transaction() as tx:
        return await tx.fetch(sql, *args)


def counter_class(kind: str, report: WorkerReport | None = None) -> type[pgbus.Entity]:
    """The entity of every keyed workload: its state counts its key's messages (``n``)."""

    class Counter(pgbus.Entity):
        async def handle(self, message: Any) -> Any:
            before = self.state.get("n", 0)
            if report is not None:
                problem = out_of_order(self.key, message, before)
                if problem:
                    report.problems.append(problem)
                report.handled(f"{self.key}:{message}")
            self.state["n"] = before + 1
            return message

    Counter.kind = kind
    return Counter


async def _placed(bus: pgbus.Bus, kind: str, nodes: int, timeout: float) -> None:
    """Wait until *nodes* nodes own every shard of *kind* and the owners stop changing."""
    last = None
    with trio.move_on_after(timeout) as scope:
        while True:
            (row,) = await _sql(bus, _OWNERS, kind)
            distinct, unowned, owners = row
            if distinct == nodes and unowned == 0 and owners == last:
                return
            last = owners
            await trio.sleep(0.25)
    if scope.cancelled_caught:
        raise WorkloadError(f"the shards of {kind!r} were not placed on {nodes} node(s)")


async def _drained(bus: pgbus.Bus, kind: str, timeout: float) -> None:
    # Polling: commits by other processes have no event to await.
    with trio.fail_after(timeout):
        while True:
            if not (await _sql(bus, _MAIL_LEFT, kind))[0][0]:
                break
            await trio.sleep(0.002)


async def _counts(bus: pgbus.Bus, kind: str) -> dict[str, int]:
    rows = await _sql(
        bus, "SELECT key, (state->>'n')::int FROM pgbus.entity_state WHERE kind = $1", kind
    )
    return {row[0]: row[1] for row in rows}


async def _forget(bus: pgbus.Bus, kind: str) -> None:
    """Delete the run's states, so runs do not pile up rows for the next ones."""
    async with bus.transaction() as tx:
        await tx.execute("DELETE FROM pgbus.entity_state WHERE kind = $1", kind)


async def keyed_throughput(args: PeerArgs) -> Result:
    """W9: tells published by this process, handled by 4 worker nodes hosting the kind."""
    kind = args.channel
    stream = keyed_messages(args.messages, args.keys)
    async with _bus(args.dsn) as bus:
        workers = Workers(MODULE, "W9", DEFAULT_WORKERS, args)
        try:
            await trio.to_thread.run_sync(workers.wait_ready, args.timeout)
            await _placed(bus, kind, DEFAULT_WORKERS, args.timeout)
            workers.expect(args.messages)
            start = clock()
            for first in range(0, args.messages, TELL_BATCH):
                chunk = stream[first : first + TELL_BATCH]
                await bus.tell_many(kind, [(m.key, m.seq) for m in chunk])
            published = clock() - start
            await trio.to_thread.run_sync(workers.wait_handled, args.timeout)
            await _drained(bus, kind, args.timeout)
            elapsed = clock() - start
            counts = await _counts(bus, kind)
        finally:
            finals = await trio.to_thread.run_sync(workers.stop)
        await _forget(bus, kind)
    result = throughput(args.messages, elapsed)
    result.update(check_keyed_finals(finals, stream, DEFAULT_WORKERS))
    check_counts(counts, stream)
    result["keys"] = args.keys
    result["publish_seconds"] = published
    return result


@contextlib.asynccontextmanager
async def entity_host(args: PeerArgs, role: str) -> AsyncIterator[str]:
    """A host process of W9A / W9C hosting the run's kind; yields its node name."""
    node = f"{args.channel}-{role}"
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            MODULE,
            "serve",
            f"--dsn={args.dsn}",
            f"--channel={args.channel}",
            f"--node={node}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        await read_ready_line(process, args.timeout, f"the entity host {node!r}")
        yield node
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
            with trio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _ask(bus: pgbus.Bus, kind: str, key: str, message: int, timeout: float) -> float:
    start = clock()
    reply = await bus.entity(kind, key).ask(message, timeout=timeout)
    elapsed = clock() - start
    if reply != message:
        raise WorkloadError(f"ask {kind}/{key} {message}: got {reply!r} back")
    return elapsed


async def warm_ask(args: PeerArgs) -> Result:
    """W9A: ask entities hosted by process B, one at a time, all of them already active."""
    kind = args.channel
    keys = [f"k{i}" for i in range(max(1, args.keys))]
    times: list[float] = []
    async with entity_host(args, "b"), _bus(args.dsn, node=f"{args.channel}-a") as bus:
        with trio.fail_after(args.timeout):
            for i in range(max(args.warmup, len(keys))):  # every key activated
                await _ask(bus, kind, keys[i % len(keys)], i, args.timeout)
            for i in range(args.messages):
                times.append(await _ask(bus, kind, keys[i % len(keys)], i, args.timeout))
        await _forget(bus, kind)
    return latency(times)


async def cold_activation(args: PeerArgs) -> Result:
    """W9C: ask keys that have committed state but no activation, on a freshly started host."""
    kind = args.channel
    keys = [f"k{i}" for i in range(max(1, args.keys))]
    async with _bus(args.dsn, node=f"{args.channel}-a") as bus:
        async with entity_host(args, "s"):  # gives every key a state, then exits
            await _placed(bus, kind, 1, args.timeout)
            for first in range(0, len(keys), TELL_BATCH):
                await bus.tell_many(kind, [(key, -1) for key in keys[first : first + TELL_BATCH]])
            await _drained(bus, kind, args.timeout)
        cold: list[float] = []
        warm: list[float] = []
        async with entity_host(args, "b"):
            await _placed(bus, kind, 1, args.timeout)
            with trio.fail_after(args.timeout):
                for key in keys[: args.messages]:
                    cold.append(await _ask(bus, kind, key, 0, args.timeout))
                    warm.append(await _ask(bus, kind, key, 1, args.timeout))
        counts = await _counts(bus, kind)
        await _forget(bus, kind)
    wrong = [k for k in keys if counts.get(k) != (3 if keys.index(k) < args.messages else 1)]
    if wrong:
        raise WorkloadError(f"{len(wrong)} key(s) with a wrong committed count, e.g. {wrong[0]}")
    result = latency(cold)
    warm_result = latency(warm)
    result["warm_p50_us"] = warm_result["p50_us"]
    result["warm_p99_us"] = warm_result["p99_us"]
    # Each key's cold ask minus its warm ask right after: what activating it added, with the
    # machine's drift (and the commits both asks wait for) cancelled out pair by pair.
    extra = [(c - w) * 1e6 for c, w in zip(cold, warm, strict=True)]
    result["activation_p50_us"] = statistics.median(extra)
    return result


async def _worker(argv: list[str]) -> None:
    args = parse_worker_args(argv)
    report = WorkerReport(args.mode)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with _bus(args.dsn, node=f"{args.channel}-w{os.getpid()}") as bus:
            await bus.host(counter_class(args.channel, report))
            report.ready()
            async for _ in signals:
                break
    report.final()


async def _serve(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="serve")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--node", required=True)
    ns = parser.parse_args(argv)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with _bus(ns.dsn, node=ns.node) as bus:
            await bus.host(counter_class(ns.channel))
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            async for _ in signals:
                break


WORKLOADS = {"W9": keyed_throughput, "W9A": warm_ask, "W9C": cold_activation}

if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        trio.run(_worker, sys.argv[2:])
    elif sys.argv[1:2] == ["serve"]:
        trio.run(_serve, sys.argv[2:])
    else:
        raise SystemExit("run through bench.peers.pgbus_peer")
