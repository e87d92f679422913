"""
The reference: asyncpg on asyncio, as its documentation suggests using it.

A listening connection's ``add_listener`` callback puts each payload into an ``asyncio.Queue``
and a consumer task takes them from it. Publishing is ``await conn.execute("SELECT
pg_notify($1, $2)", ...)`` (W4: on an ``asyncpg.create_pool(max_size=10)``). `main` takes a
loop factory so `bench.peers.asyncpg_uvloop` runs this same code on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import asyncpg
import psutil

from ._asyncio_tools import background
from ._protocol import (
    PeerArgs,
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


@contextlib.asynccontextmanager
async def connected(args: PeerArgs) -> AsyncIterator[asyncpg.Connection]:
    """A connection, closed on the way out."""
    conn = await asyncpg.connect(
        args.dsn,
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": args.application_name},
    )
    try:
        yield conn
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT)


@contextlib.asynccontextmanager
async def listening(
    args: PeerArgs, channel: str, queue: asyncio.Queue[str]
) -> AsyncIterator[asyncpg.Connection]:
    """A connection listening on *channel*, putting each payload into *queue*."""
    async with connected(args) as conn:

        def on_notification(_conn: object, _pid: int, _channel: str, payload: Any) -> None:
            queue.put_nowait(payload)

        await conn.add_listener(channel, on_notification)
        yield conn


async def collect(queue: asyncio.Queue[str], count: int, into: list[str]) -> None:
    """The consumer task: take *count* payloads from *queue*."""
    for _ in range(count):
        into.append(await queue.get())


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
    queue: asyncio.Queue[str] = asyncio.Queue()
    received: list[str] = []
    async with connected(args) as sender, listening(args, args.channel, queue):
        consumer = asyncio.create_task(collect(queue, args.messages, received))
        async with deadline(args, "consumer", lambda: len(received)):
            start = clock()
            await sender.execute(ASYNCPG_BURST, args.channel, 1, args.messages)
            await consumer
            elapsed = clock() - start
    check_payloads(received, burst_payloads(1, args.messages), ordered=True)
    return throughput(args.messages, elapsed)


async def sequential_publish(args: PeerArgs) -> Result:
    """W2: await each ``pg_notify`` in turn; time until the listener has every payload."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    received: list[str] = []
    payloads = [str(i) for i in range(args.messages)]
    async with connected(args) as publisher, listening(args, args.channel, queue):
        consumer = asyncio.create_task(collect(queue, args.messages, received))
        async with deadline(args, "listener", lambda: len(received)):
            start = clock()
            for payload in payloads:
                await publisher.execute(ASYNCPG_NOTIFY, args.channel, payload)
            await consumer
            elapsed = clock() - start
    check_payloads(received, payloads, ordered=True)
    return throughput(args.messages, elapsed)


async def ping_pong(args: PeerArgs) -> Result:
    """W3: A notifies 'ping', B answers on 'pong', A waits for it; one round trip each."""
    ping, pong = f"{args.channel}_ping", f"{args.channel}_pong"
    pings: asyncio.Queue[str] = asyncio.Queue()
    pongs: asyncio.Queue[str] = asyncio.Queue()
    round_trips: list[float] = []
    async with listening(args, ping, pings) as b, listening(args, pong, pongs) as a:

        async def respond() -> None:
            while True:
                await b.execute(ASYNCPG_NOTIFY, pong, await pings.get())

        async with background(respond()), deadline(args, "ping-pong", lambda: len(round_trips)):
            for i in range(args.warmup + args.messages):
                payload = str(i)
                start = clock()
                await a.execute(ASYNCPG_NOTIFY, ping, payload)
                reply = await pongs.get()
                elapsed = clock() - start
                if reply != payload:
                    raise WorkloadError(f"round trip {i}: sent {payload!r}, got {reply!r} back")
                if i >= args.warmup:
                    round_trips.append(elapsed)
    return latency(round_trips)


async def concurrent_publish(args: PeerArgs) -> Result:
    """W4: many tasks publish through one pool; time until the listener has every payload."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    received: list[str] = []
    per_publisher = args.messages // args.publishers
    expected = [f"{p}:{j}" for p in range(args.publishers) for j in range(per_publisher)]
    async with (
        listening(args, args.channel, queue),
        # The default min_size (10) opens every connection up front, outside the timing.
        asyncpg.create_pool(
            args.dsn,
            max_size=10,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": args.application_name},
        ) as pool,
    ):

        async def publish(publisher: int) -> None:
            for j in range(per_publisher):
                await pool.execute(ASYNCPG_NOTIFY, args.channel, f"{publisher}:{j}")

        consumer = asyncio.create_task(collect(queue, len(expected), received))
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

    ``add_listener`` callbacks cannot wait, so the queue can only stay bounded if the sender
    keeps at most *capacity* notifications in flight: it sends batches of half the capacity and
    waits for the consumer to finish one before sending the one after next.
    """
    batch = max(1, args.capacity // 2)
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=args.capacity)
    batches_consumed: asyncio.Queue[None] = asyncio.Queue()
    process = psutil.Process()
    rss = [process.memory_info().rss]
    consumed = 0

    async def consume() -> None:
        nonlocal consumed
        for consumed in range(1, args.messages + 1):
            await queue.get()
            if consumed % batch == 0:
                batches_consumed.put_nowait(None)
            if consumed % args.sample_every == 0:
                rss.append(process.memory_info().rss)

    async with connected(args) as sender, listening(args, args.channel, queue):
        rss[0] = process.memory_info().rss
        consumer = asyncio.create_task(consume())
        async with deadline(args, "consumer", lambda: consumed):
            start = clock()
            for k, first in enumerate(range(1, args.messages + 1, batch)):
                if k >= 2:
                    await batches_consumed.get()
                last = min(first + batch - 1, args.messages)
                await sender.execute(ASYNCPG_BURST, args.channel, first, last)
            await consumer
            elapsed = clock() - start
    return memory(rss, args.messages, elapsed)


@contextlib.asynccontextmanager
async def ask_server(args: PeerArgs) -> AsyncIterator[None]:
    """Process B of W8 (`bench.peers.ask_server`), on this process's kind of event loop."""
    uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.peers.ask_server",
        "asyncpg-uvloop" if uvloop else "asyncpg",
        f"--dsn={args.dsn}",
        f"--channel={args.channel}",
        f"--application-name={args.application_name}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), args.timeout)
        if line != b"ready\n":
            raise WorkloadError(f"the ask server did not start (said {line!r})")
        yield
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()


class Asker:
    """Request/reply over NOTIFY: requests carry an id and this caller's reply channel."""

    def __init__(self, args: PeerArgs) -> None:
        self.requests = f"{args.channel}_req"
        self.reply_to = f"{args.channel}_reply_{os.getpid()}"
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count()

    def on_reply(self, _conn: object, _pid: int, _channel: str, payload: Any) -> None:
        reply = json.loads(payload)
        future = self.waiting.pop(reply["id"], None)
        if future is not None and not future.done():
            future.set_result(reply["result"])

    async def ask(self, executor: Any, message: Any) -> Any:
        id = next(self.ids)
        future = self.waiting[id] = asyncio.get_running_loop().create_future()
        request = json.dumps({"id": id, "reply_to": self.reply_to, "msg": message})
        await executor.execute(ASYNCPG_NOTIFY, self.requests, request)
        return await future


async def cross_process_ask(args: PeerArgs) -> Result:
    """W8: ask process B one request at a time; each round trip timed."""
    asker = Asker(args)
    round_trips: list[float] = []
    async with ask_server(args), connected(args) as listener, connected(args) as sender:
        await listener.add_listener(asker.reply_to, asker.on_reply)
        async with deadline(args, "asks", lambda: len(round_trips)):
            for i in range(args.warmup + args.messages):
                start = clock()
                reply = await asker.ask(sender, i)
                elapsed = clock() - start
                if reply != i:
                    raise WorkloadError(f"ask {i}: got {reply!r} back")
                if i >= args.warmup:
                    round_trips.append(elapsed)
    return latency(round_trips)


async def concurrent_asks(args: PeerArgs) -> Result:
    """W8C: *publishers* tasks each ask process B in turn; until every ask has its reply."""
    asker = Asker(args)
    per_task = args.messages // args.publishers
    replies: list[Any] = []
    async with (
        ask_server(args),
        connected(args) as listener,
        asyncpg.create_pool(
            args.dsn,
            max_size=10,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": args.application_name},
        ) as pool,
    ):
        await listener.add_listener(asker.reply_to, asker.on_reply)

        async def ask_in_turn(task: int) -> None:
            for j in range(per_task):
                replies.append(await asker.ask(pool, task * per_task + j))

        async with deadline(args, "asks", lambda: len(replies)):
            start = clock()
            async with asyncio.TaskGroup() as tasks:
                for task in range(args.publishers):
                    tasks.create_task(ask_in_turn(task))
            elapsed = clock() - start
    if sorted(replies) != list(range(per_task * args.publishers)):
        raise WorkloadError("the replies differ from the requests")
    return throughput(len(replies), elapsed)


WORKLOADS: dict[str, Callable[[PeerArgs], Coroutine[Any, Any, Result]]] = {
    "W1": inbound_burst,
    "W2": sequential_publish,
    "W3": ping_pong,
    "W4": concurrent_publish,
    "W5": bounded_memory,
    "W8": cross_process_ask,
    "W8C": concurrent_asks,
}


def main(
    argv: Sequence[str] | None = None,
    *,
    peer: str = "asyncpg_asyncio",
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """Run one workload on a fresh event loop made by *loop_factory* (asyncio's by default)."""

    async def workload(args: PeerArgs) -> Result:
        result = await WORKLOADS[args.workload](args)
        loop = type(asyncio.get_running_loop())
        return {**result, "event_loop": f"{loop.__module__}.{loop.__qualname__}"}

    def run(args: PeerArgs) -> Result:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(workload(args))

    return run_peer(peer, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
