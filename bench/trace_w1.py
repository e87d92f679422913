"""
Where a W1 burst goes: ``python -m bench.trace_w1 [--dsn DSN] [--messages N] [--repeat R]``.

One statement sends N notifications (``pg_notify`` over ``generate_series``, in a transaction,
as in W1); each stage below receives them on a listening connection of pgbus's own adapter and
adds one piece of what the bus does per notification, so the difference between two rows is
that piece's cost. PostgreSQL sends nothing before COMMIT, so the time from BEGIN to COMMIT's
reply (the server's part, which every peer pays) is printed apart, and each row is the median of
R bursts from COMMIT's reply until the last notification is taken. Without ``--dsn`` an
embedded PostgreSQL is started.

- ``adapter``: the socket is read and parsed, the sink counts (pgbus's floor).
- ``+ Notification``: the sink builds the `pgbus.Notification` each message is delivered as.
- ``+ channel``: and puts it in a Trio memory channel, which a consumer task drains as an
  actor's loop does (capacity unbounded here: the sink cannot wait).
- ``bus``: the whole bus, as W1 runs it: ``bridge_in`` into a channel of capacity 1000, an
  actor's ``handle`` appending each payload to a list. Its garbage collections (counted with
  ``gc.callbacks``) are printed too: each notification is an object that lives until the actor
  has it, so a burst makes the collector run.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

import pgbus
from pgbus import _pg
from pgbus._inbound import Notification

from .server import provide_postgres

BURST = "SELECT pg_notify($1, i::text) FROM generate_series(1, $2) i"


@asynccontextmanager
async def listening(
    db: _pg.Database, channel: str, sink: _pg.NotificationSink
) -> AsyncIterator[None]:
    connection = await db.connect("trace listen", sink=sink)
    try:
        await connection.listen([channel])  # quoted by pgbus
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                while True:
                    await connection.receive()

            nursery.start_soon(read)
            yield
            nursery.cancel_scope.cancel()
    finally:
        await connection.aclose()


async def burst(
    db: _pg.Database, channel: str, messages: int, done: trio.Event
) -> tuple[float, float]:
    """Send the burst in one transaction: seconds from BEGIN to COMMIT's reply, and from there
    until *done* is set (no notification leaves before the commit)."""
    async with db.connection("trace send") as sender:
        start = time.perf_counter()
        await sender.execute("BEGIN")
        await sender.execute(BURST, channel, messages)
        await sender.execute("COMMIT")
        committed = time.perf_counter()
        with trio.fail_after(60):
            await done.wait()
        return committed - start, time.perf_counter() - committed


async def adapter_stage(db: _pg.Database, messages: int, stage: str) -> tuple[float, float]:
    channel = f"trace_w1_{uuid.uuid4().hex[:8]}"
    done = trio.Event()
    count = 0
    send, receive = trio.open_memory_channel[Notification](math.inf)
    new = tuple.__new__

    def counting(pid: int, pg_channel: str, payload: str) -> None:
        nonlocal count
        count += 1
        if count == messages:
            done.set()

    def building(pid: int, pg_channel: str, payload: str) -> None:
        nonlocal count
        new(Notification, (pg_channel, payload, pid))
        count += 1
        if count == messages:
            done.set()

    def handing(pid: int, pg_channel: str, payload: str) -> None:
        send.send_nowait(new(Notification, (pg_channel, payload, pid)))

    async def consume() -> None:  # as an actor's loop does: no checkpoint per message
        taken = 0
        while True:
            try:
                receive.receive_nowait()
            except trio.WouldBlock:
                await receive.receive()
            taken += 1
            if taken == messages:
                done.set()

    sinks: dict[str, Callable[[int, str, str], None]] = {
        "adapter": counting,
        "+ Notification": building,
        "+ channel": handing,
    }
    async with trio.open_nursery() as nursery, listening(db, channel, sinks[stage]):
        nursery.start_soon(consume)
        seconds = await burst(db, channel, messages, done)
        nursery.cancel_scope.cancel()
    return seconds


class Collector(pgbus.Actor):
    def __init__(self, into: list[str], count: int, done: trio.Event) -> None:
        self.into, self.count, self.done = into, count, done

    async def handle(self, message: Any) -> None:
        self.into.append(message.payload)
        if len(self.into) >= self.count:
            self.done.set()


async def bus_stage(
    dsn: str, messages: int, collections: list[dict[int, int]]
) -> tuple[float, float]:
    channel = f"trace_w1_{uuid.uuid4().hex[:8]}"
    done = trio.Event()
    counts: dict[int, int] = {}

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            counts[info["generation"]] = counts.get(info["generation"], 0) + 1

    async with pgbus.open_bus(dsn) as bus:
        bus.add_channel("inbox", 1000)
        await bus.bridge_in(channel, "inbox")
        options = {"into": [], "count": messages, "done": done}
        await bus.spawn(Collector, name="collector", inbox="inbox", options=options)
        async with _pg.open_database(dsn, "pgbus-trace") as db:
            gc.callbacks.append(count)
            try:
                seconds = await burst(db, channel, messages, done)
            finally:
                gc.callbacks.remove(count)
    collections.append(counts)
    return seconds


async def trace(dsn: str, messages: int, repeat: int) -> None:
    statement: list[float] = []
    rows: dict[str, list[float]] = {}
    collections: list[dict[int, int]] = []
    async with _pg.open_database(dsn, "pgbus-trace") as db:
        for _ in range(repeat):
            for stage in ("adapter", "+ Notification", "+ channel"):
                sent, delivered = await adapter_stage(db, messages, stage)
                statement.append(sent)
                rows.setdefault(stage, []).append(delivered)
            sent, delivered = await bus_stage(dsn, messages, collections)
            statement.append(sent)
            rows.setdefault("bus", []).append(delivered)
    print(
        f"{messages} notifications, medians of {repeat}. BEGIN to COMMIT (the server, before"
        f" any notification leaves): {statistics.median(statement) * 1e3:.1f} ms; then, until"
        " the last is taken:"
    )
    previous = 0.0
    for stage, seconds in rows.items():
        median = statistics.median(seconds)
        extra = f"{(median - previous) / messages * 1e6:+6.2f} µs/msg" if previous else ""
        print(
            f"  {stage:16s} {median * 1e3:7.1f} ms  {median / messages * 1e6:5.2f} µs/msg  {extra}"
        )
        previous = median
    gens = {g: statistics.median(c.get(g, 0) for c in collections) for g in (0, 1, 2)}
    print(f"  garbage collections during a bus burst (median per generation): {gens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn", help="default: an embedded PostgreSQL for the run")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with provide_postgres(args.dsn) as server:
        trio.run(trace, server.dsn, args.messages, args.repeat)


if __name__ == "__main__":
    main()
