"""
The naive Trio stack: asyncpg under ``trio_asyncio.open_loop()``, as triopg does it.

Every asyncpg call goes through ``trio_asyncio.aio_as_trio(...)``. The ``add_listener``
callback does ``send_nowait`` into a ``trio.open_memory_channel(math.inf)`` and a consumer Trio
task receives from it. W4 publishes through an ``asyncpg.create_pool(max_size=10)`` created and
used via ``aio_as_trio``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any

import asyncpg
import psutil
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

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
from ._sql import ASYNCPG_BURST, ASYNCPG_NOTIFY, burst_payloads

CONNECT_TIMEOUT = 10.0

Inbox = trio.MemoryReceiveChannel[str]


@contextlib.asynccontextmanager
async def connected(args: PeerArgs) -> AsyncIterator[asyncpg.Connection]:
    """A connection, closed on the way out."""
    conn = await aio_as_trio(asyncpg.connect)(
        args.dsn,
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": args.application_name},
    )
    try:
        yield conn
    finally:
        with trio.CancelScope(shield=True):
            await aio_as_trio(conn.close)(timeout=CONNECT_TIMEOUT)


@contextlib.asynccontextmanager
async def listening(
    args: PeerArgs, channel: str, capacity: float = math.inf
) -> AsyncIterator[tuple[asyncpg.Connection, Inbox]]:
    """A connection listening on *channel* and the receive end its callback feeds."""
    send, receive = trio.open_memory_channel[str](capacity)
    async with connected(args) as conn:

        def on_notification(_conn: object, _pid: int, _channel: str, payload: Any) -> None:
            send.send_nowait(payload)

        await aio_as_trio(conn.add_listener)(channel, on_notification)
        yield conn, receive


async def collect(inbox: Inbox, count: int, into: list[str]) -> None:
    """The consumer task: receive *count* payloads from *inbox*."""
    for _ in range(count):
        into.append(await inbox.receive())


@contextlib.contextmanager
def deadline(args: PeerArgs, what: str, progress: Callable[[], int]) -> Iterator[None]:
    """Fail the run, saying how far it got, if the block takes longer than ``args.timeout``."""
    try:
        with trio.fail_after(args.timeout):
            yield
    except trio.TooSlowError:
        raise stalled(what, progress(), args.messages, args.timeout) from None


async def inbound_burst(args: PeerArgs) -> Result:
    """W1: one statement sends the burst; time until the consumer task has every payload."""
    received: list[str] = []
    async with connected(args) as sender, listening(args, args.channel) as (_, inbox):
        with deadline(args, "consumer", lambda: len(received)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, inbox, args.messages, received)
                start = clock()
                await aio_as_trio(sender.execute)(ASYNCPG_BURST, args.channel, 1, args.messages)
            elapsed = clock() - start
    check_payloads(received, burst_payloads(1, args.messages), ordered=True)
    return throughput(args.messages, elapsed)


async def sequential_publish(args: PeerArgs) -> Result:
    """W2: await each ``pg_notify`` in turn; time until the listener has every payload."""
    received: list[str] = []
    payloads = [str(i) for i in range(args.messages)]
    async with connected(args) as publisher, listening(args, args.channel) as (_, inbox):
        execute = aio_as_trio(publisher.execute)
        with deadline(args, "listener", lambda: len(received)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, inbox, args.messages, received)
                start = clock()
                for payload in payloads:
                    await execute(ASYNCPG_NOTIFY, args.channel, payload)
            elapsed = clock() - start
    check_payloads(received, payloads, ordered=True)
    return throughput(args.messages, elapsed)


async def ping_pong(args: PeerArgs) -> Result:
    """W3: A notifies 'ping', B answers on 'pong', A waits for it; one round trip each."""
    ping, pong = f"{args.channel}_ping", f"{args.channel}_pong"
    round_trips: list[float] = []
    async with (
        listening(args, ping) as (b, pings),
        listening(args, pong) as (a, pongs),
        trio.open_nursery() as nursery,
    ):
        b_execute, a_execute = aio_as_trio(b.execute), aio_as_trio(a.execute)

        async def respond() -> None:
            async for payload in pings:
                await b_execute(ASYNCPG_NOTIFY, pong, payload)

        nursery.start_soon(respond)
        with deadline(args, "ping-pong", lambda: len(round_trips)):
            for i in range(args.warmup + args.messages):
                payload = str(i)
                start = clock()
                await a_execute(ASYNCPG_NOTIFY, ping, payload)
                reply = await pongs.receive()
                elapsed = clock() - start
                if reply != payload:
                    raise WorkloadError(f"round trip {i}: sent {payload!r}, got {reply!r} back")
                if i >= args.warmup:
                    round_trips.append(elapsed)
        nursery.cancel_scope.cancel()
    return latency(round_trips)


async def concurrent_publish(args: PeerArgs) -> Result:
    """W4: many tasks publish through one pool; time until the listener has every payload."""
    received: list[str] = []
    per_publisher = args.messages // args.publishers
    expected = [f"{p}:{j}" for p in range(args.publishers) for j in range(per_publisher)]
    # The default min_size (10) opens every connection up front, outside the timing.
    pool = await aio_as_trio(asyncpg.create_pool)(
        args.dsn,
        max_size=10,
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": args.application_name},
    )
    try:
        execute = aio_as_trio(pool.execute)

        async def publish(publisher: int) -> None:
            for j in range(per_publisher):
                await execute(ASYNCPG_NOTIFY, args.channel, f"{publisher}:{j}")

        async with listening(args, args.channel) as (_, inbox):
            with deadline(args, "listener", lambda: len(received)):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collect, inbox, len(expected), received)
                    start = clock()
                    for p in range(args.publishers):
                        nursery.start_soon(publish, p)
                elapsed = clock() - start
    finally:
        with trio.CancelScope(shield=True):
            await aio_as_trio(pool.close)()
    check_payloads(received, expected, ordered=False)
    return throughput(len(expected), elapsed)


async def bounded_memory(args: PeerArgs) -> Result:
    """
    W5: *messages* notifications pass through a memory channel of capacity *capacity*; RSS is
    sampled before the first and every *sample_every* messages.

    ``add_listener`` callbacks cannot wait (``send_nowait`` raises ``WouldBlock`` when full),
    so the sender keeps at most *capacity* notifications in flight: it sends batches of half
    the capacity and waits for the consumer to finish one before sending the one after next.
    """
    batch = max(1, args.capacity // 2)
    batches_done_send, batches_done = trio.open_memory_channel[None](math.inf)
    process = psutil.Process()
    rss = [process.memory_info().rss]
    consumed = 0

    async def consume(inbox: Inbox) -> None:
        nonlocal consumed
        for consumed in range(1, args.messages + 1):
            await inbox.receive()
            if consumed % batch == 0:
                batches_done_send.send_nowait(None)
            if consumed % args.sample_every == 0:
                rss.append(process.memory_info().rss)

    async with (
        connected(args) as sender,
        listening(args, args.channel, capacity=args.capacity) as (_, inbox),
    ):
        execute = aio_as_trio(sender.execute)
        rss[0] = process.memory_info().rss
        with deadline(args, "consumer", lambda: consumed):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, inbox)
                start = clock()
                for k, first in enumerate(range(1, args.messages + 1, batch)):
                    if k >= 2:
                        await batches_done.receive()
                    last = min(first + batch - 1, args.messages)
                    await execute(ASYNCPG_BURST, args.channel, first, last)
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
    """Run one workload under ``trio.run`` with a trio-asyncio loop open."""

    async def workload(args: PeerArgs) -> Result:
        if args.workload not in WORKLOADS:
            raise PeerUnavailableError(f"{args.workload} is written for asyncpg-asyncio and pgbus")
        async with trio_asyncio.open_loop():
            return await WORKLOADS[args.workload](args)

    return run_peer("naive_trio", lambda args: trio.run(workload, args), argv)


if __name__ == "__main__":
    raise SystemExit(main())
