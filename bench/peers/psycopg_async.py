"""
psycopg 3 on asyncio: autocommit ``AsyncConnection`` and its ``notifies()`` async generator.

The consumer task iterates ``conn.notifies()`` itself, with no queue in between: that is how
psycopg's documentation receives notifications. ``notifies()`` holds the connection's lock
while it runs, so a peer that listens and publishes (W3) uses one connection for each.
psycopg_pool is not a dependency of the bench, so W4 shares 10 connections round-robin
between the publishers (an ``AsyncConnection`` serialises concurrent use with its own lock).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import psutil
import psycopg
from psycopg import sql

from ._asyncio_tools import background
from ._protocol import (
    PeerArgs,
    PeerUnavailableError,
    Result,
    WorkloadError,
    check_payloads,
    clock,
    latency,
    memory,
    run_peer,
    stalled,
    throughput,
)
from ._sql import PSYCOPG_BURST, PSYCOPG_NOTIFY, burst_payloads

CONNECT_TIMEOUT = 10
POOL_SIZE = 10


@contextlib.asynccontextmanager
async def connected(args: PeerArgs) -> AsyncIterator[psycopg.AsyncConnection[object]]:
    """An autocommit connection (a listener must never sit in a transaction), closed after."""
    async with await psycopg.AsyncConnection.connect(
        args.dsn,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT,
        application_name=args.application_name,
    ) as conn:
        yield conn


@contextlib.asynccontextmanager
async def listening(args: PeerArgs, channel: str) -> AsyncIterator[psycopg.AsyncConnection[object]]:
    """A connection that has run ``LISTEN`` on *channel* (quoted: the name is exact)."""
    async with connected(args) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        yield conn


async def collect(conn: psycopg.AsyncConnection[object], count: int, into: list[str]) -> None:
    """The consumer task: read *count* payloads from ``conn.notifies()``."""
    if count <= 0:
        return
    async with contextlib.aclosing(conn.notifies()) as notifications:
        async for notification in notifications:
            into.append(notification.payload)
            if len(into) == count:
                return


@contextlib.asynccontextmanager
async def deadline(args: PeerArgs, what: str, progress: Callable[[], int]) -> AsyncIterator[None]:
    """Fail the run, saying how far it got, if the block takes longer than ``args.timeout``."""
    try:
        async with asyncio.timeout(args.timeout):
            yield
    except TimeoutError:
        raise stalled(what, progress(), args.messages, args.timeout) from None


async def inbound_burst(args: PeerArgs) -> Result:
    """W1: one statement sends the burst; time until the consumer task has every payload."""
    received: list[str] = []
    async with connected(args) as sender, listening(args, args.channel) as listener:
        consumer = asyncio.create_task(collect(listener, args.messages, received))
        async with deadline(args, "consumer", lambda: len(received)):
            start = clock()
            await sender.execute(PSYCOPG_BURST, (args.channel, 1, args.messages))
            await consumer
            elapsed = clock() - start
    check_payloads(received, burst_payloads(1, args.messages), ordered=True)
    return throughput(args.messages, elapsed)


async def sequential_publish(args: PeerArgs) -> Result:
    """W2: await each ``pg_notify`` in turn; time until the listener has every payload."""
    received: list[str] = []
    payloads = [str(i) for i in range(args.messages)]
    async with connected(args) as publisher, listening(args, args.channel) as listener:
        consumer = asyncio.create_task(collect(listener, args.messages, received))
        async with deadline(args, "listener", lambda: len(received)):
            start = clock()
            for payload in payloads:
                await publisher.execute(PSYCOPG_NOTIFY, (args.channel, payload))
            await consumer
            elapsed = clock() - start
    check_payloads(received, payloads, ordered=True)
    return throughput(args.messages, elapsed)


async def ping_pong(args: PeerArgs) -> Result:
    """W3: A notifies 'ping', B answers on 'pong', A waits for it; one round trip each."""
    ping, pong = f"{args.channel}_ping", f"{args.channel}_pong"
    rounds = args.warmup + args.messages
    round_trips: list[float] = []
    async with (
        connected(args) as a_send,
        listening(args, pong) as a_listen,
        connected(args) as b_send,
        listening(args, ping) as b_listen,
    ):

        async def respond() -> None:
            async with contextlib.aclosing(b_listen.notifies()) as notifications:
                async for notification in notifications:
                    await b_send.execute(PSYCOPG_NOTIFY, (pong, notification.payload))

        async with (
            background(respond()),
            contextlib.aclosing(a_listen.notifies()) as pongs,
            deadline(args, "ping-pong", lambda: len(round_trips)),
        ):
            for i in range(rounds):
                payload = str(i)
                start = clock()
                await a_send.execute(PSYCOPG_NOTIFY, (ping, payload))
                reply = (await anext(pongs)).payload
                elapsed = clock() - start
                if reply != payload:
                    raise WorkloadError(f"round trip {i}: sent {payload!r}, got {reply!r} back")
                if i >= args.warmup:
                    round_trips.append(elapsed)
    return latency(round_trips)


async def concurrent_publish(args: PeerArgs) -> Result:
    """W4: many tasks publish over 10 shared connections; time until the listener has all."""
    received: list[str] = []
    per_publisher = args.messages // args.publishers
    expected = [f"{p}:{j}" for p in range(args.publishers) for j in range(per_publisher)]
    async with contextlib.AsyncExitStack() as stack:
        listener = await stack.enter_async_context(listening(args, args.channel))
        shared = [await stack.enter_async_context(connected(args)) for _ in range(POOL_SIZE)]

        async def publish(publisher: int) -> None:
            conn = shared[publisher % len(shared)]
            for j in range(per_publisher):
                await conn.execute(PSYCOPG_NOTIFY, (args.channel, f"{publisher}:{j}"))

        consumer = asyncio.create_task(collect(listener, len(expected), received))
        async with deadline(args, "listener", lambda: len(received)):
            start = clock()
            async with asyncio.TaskGroup() as publishers:
                for p in range(args.publishers):
                    publishers.create_task(publish(p))
            await consumer
            elapsed = clock() - start
    check_payloads(received, expected, ordered=False)
    return throughput(len(expected), elapsed)


async def bounded_memory(args: PeerArgs) -> Result:
    """
    W5: *messages* notifications pass through an ``asyncio.Queue(maxsize=capacity)``; RSS is
    sampled before the first and every *sample_every* messages.

    The reader task awaits ``queue.put``, so a full queue stops it reading the socket and
    PostgreSQL holds the backlog: real back-pressure. The sender still sends batches of half
    the capacity, paced like the asyncpg peers', so every peer sees the same traffic.
    """
    batch = max(1, args.capacity // 2)
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=args.capacity)
    batches_consumed: asyncio.Queue[None] = asyncio.Queue()
    process = psutil.Process()
    rss = [process.memory_info().rss]
    consumed = 0

    async def read(listener: psycopg.AsyncConnection[object]) -> None:
        async with contextlib.aclosing(listener.notifies()) as notifications:
            async for notification in notifications:
                await queue.put(notification.payload)

    async def consume() -> None:
        nonlocal consumed
        for consumed in range(1, args.messages + 1):
            await queue.get()
            if consumed % batch == 0:
                batches_consumed.put_nowait(None)
            if consumed % args.sample_every == 0:
                rss.append(process.memory_info().rss)

    async with connected(args) as sender, listening(args, args.channel) as listener:
        rss[0] = process.memory_info().rss
        consumer = asyncio.create_task(consume())
        async with background(read(listener)), deadline(args, "consumer", lambda: consumed):
            start = clock()
            for k, first in enumerate(range(1, args.messages + 1, batch)):
                if k >= 2:
                    await batches_consumed.get()
                last = min(first + batch - 1, args.messages)
                await sender.execute(PSYCOPG_BURST, (args.channel, first, last))
            await consumer
            elapsed = clock() - start
    return memory(rss, args.messages, elapsed)


WORKLOADS: dict[str, Callable[[PeerArgs], Coroutine[Any, Any, Result]]] = {
    "W1": inbound_burst,
    "W2": sequential_publish,
    "W3": ping_pong,
    "W4": concurrent_publish,
    "W5": bounded_memory,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one workload on a fresh asyncio event loop."""

    def run(args: PeerArgs) -> Result:
        if args.workload not in WORKLOADS:
            raise PeerUnavailableError(f"{args.workload} is written for asyncpg-asyncio and pgbus")
        return asyncio.run(WORKLOADS[args.workload](args))

    return run_peer("psycopg", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
