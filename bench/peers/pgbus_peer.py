"""
pgbus, as its README shows it: actors, bounded channels and bridges, public names only.

- W1: an inbound bridge feeds a channel an actor consumes; the burst is sent in one statement
  from a ``bus.transaction()`` (the bus's own pool), the clock starting just before it.
- W2: an actor sends one message at a time to a channel with an outbound bridge; an inbound
  bridge on the same bus feeds a collecting actor.
- W3: one bus; the main task sends to an outbound 'ping' bridge and waits on the channel the
  'pong' inbound bridge feeds; a responder actor answers each ping through a 'pong' bridge.
- W4: 50 publisher actors send to one outbound bridged channel; a collecting actor receives.
- W5: an inbound bridge (``overflow="block"``) feeds a channel of the given capacity that an
  actor consumes; the sender does not pace itself: when the channel is full the bridge stops
  reading the socket and PostgreSQL holds the backlog.

Every channel is bounded (``CAPACITY``), as a user who chose capacities explicitly would have it.
If ``pgbus.open_bus`` is missing (an older pgbus), the peer reports itself unavailable.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any

import psutil
import trio

import pgbus

from ._protocol import (
    PeerArgs,
    PeerUnavailableError,
    Result,
    WorkloadError,
    check_payloads,
    clock,
    latency,
    memory,
    read_ready_line,
    run_peer,
    stalled,
    throughput,
)
from ._sql import ASYNCPG_BURST, burst_payloads
from .pgbus_durable import WORKLOADS as DURABLE_WORKLOADS
from .pgbus_entities import WORKLOADS as KEYED_WORKLOADS

CAPACITY = 1000
"""Capacity of every channel in W1-W4: bounded, big enough for a burst to batch well."""
W5_BATCH = 10_000
"""W5 sends this many notifications per statement."""


class Collector(pgbus.Actor):
    """Keeps each notification's payload; sets *done* once it has *count* of them."""

    def __init__(self, *, into: list[str], count: int, done: trio.Event) -> None:
        self.into = into
        self.count = count
        self.done = done

    async def handle(self, message: Any) -> None:
        if type(message) is not pgbus.Notification:
            raise WorkloadError(f"collector received {message!r}, not a notification")
        self.into.append(message.payload)
        if len(self.into) >= self.count:
            self.done.set()


class Publisher(pgbus.Actor):
    """Once *go* is set, sends each of *payloads* to channel *to*, one at a time."""

    def __init__(self, *, payloads: Sequence[str], to: str, go: trio.Event) -> None:
        self.payloads = payloads
        self.to = to
        self.go = go

    async def run(self) -> None:
        await self.go.wait()
        for payload in self.payloads:
            await self.send(self.to, payload)


class Responder(pgbus.Actor):
    """Answers each notification by sending its payload to channel *to*."""

    def __init__(self, *, to: str) -> None:
        self.to = to

    async def handle(self, message: Any) -> None:
        await self.send(self.to, message.payload)


class Counter(pgbus.Actor):
    """Counts messages, sampling RSS every *sample_every*; sets *done* at *count*."""

    def __init__(self, *, count: int, sample_every: int, rss: list[int], done: trio.Event) -> None:
        self.count = count
        self.sample_every = sample_every
        self.rss = rss
        self.done = done
        self.seen = 0
        self.process = psutil.Process()

    async def handle(self, message: Any) -> None:
        self.seen += 1
        if self.seen % self.sample_every == 0:
            self.rss.append(self.process.memory_info().rss)
        if self.seen >= self.count:
            self.done.set()


def open_bus(args: PeerArgs) -> Any:
    """The bus every workload runs on; connections are named ``pgbus-bench:<purpose>``."""
    return pgbus.open_bus(dsn=args.dsn, application_name="pgbus-bench")


@contextlib.contextmanager
def deadline(args: PeerArgs, what: str, progress: Callable[[], int]) -> Iterator[None]:
    """Fail the run, saying how far it got, if the block takes longer than ``args.timeout``."""
    try:
        with trio.fail_after(args.timeout):
            yield
    except trio.TooSlowError:
        raise stalled(what, progress(), args.messages, args.timeout) from None


async def inbound_burst(args: PeerArgs) -> Result:
    """W1: one statement sends the burst; time until the actor has handled every payload."""
    received: list[str] = []
    done = trio.Event()
    async with open_bus(args) as bus:
        bus.add_channel("inbox", CAPACITY)
        await bus.bridge_in(args.channel, "inbox")
        options = {"into": received, "count": args.messages, "done": done}
        await bus.spawn(Collector, name="collector", inbox="inbox", options=options)
        with deadline(args, "collector", lambda: len(received)):
            async with bus.transaction() as tx:
                start = clock()
                await tx.execute(ASYNCPG_BURST, args.channel, 1, args.messages)
            await done.wait()
            elapsed = clock() - start
    check_payloads(received, burst_payloads(1, args.messages), ordered=True)
    return throughput(args.messages, elapsed)


async def sequential_publish(args: PeerArgs) -> Result:
    """W2: an actor sends one message at a time to an outbound bridge; until all come back."""
    received: list[str] = []
    payloads = [str(i) for i in range(args.messages)]
    done, go = trio.Event(), trio.Event()
    async with open_bus(args) as bus:
        bus.add_channel("inbox", CAPACITY)
        bus.add_channel("outbox", CAPACITY)
        await bus.bridge_in(args.channel, "inbox")
        await bus.bridge_out("outbox", args.channel)
        options = {"into": received, "count": args.messages, "done": done}
        await bus.spawn(Collector, name="collector", inbox="inbox", options=options)
        options = {"payloads": payloads, "to": "outbox", "go": go}
        await bus.spawn(Publisher, name="publisher", restart="temporary", options=options)
        with deadline(args, "collector", lambda: len(received)):
            start = clock()
            go.set()
            await done.wait()
            elapsed = clock() - start
    check_payloads(received, payloads, ordered=True)
    return throughput(args.messages, elapsed)


async def ping_pong(args: PeerArgs) -> Result:
    """W3: send on 'ping', a responder actor answers on 'pong'; one round trip each."""
    ping, pong = f"{args.channel}_ping", f"{args.channel}_pong"
    round_trips: list[float] = []
    async with open_bus(args) as bus:
        for name in ("pings", "pings_out", "pongs", "pongs_out"):
            bus.add_channel(name, CAPACITY)
        await bus.bridge_in(ping, "pings")
        await bus.bridge_in(pong, "pongs")
        await bus.bridge_out("pings_out", ping)
        await bus.bridge_out("pongs_out", pong)
        await bus.spawn(Responder, name="responder", inbox="pings", options={"to": "pongs_out"})
        pongs = bus.channel("pongs")
        with deadline(args, "ping-pong", lambda: len(round_trips)):
            for i in range(args.warmup + args.messages):
                payload = str(i)
                start = clock()
                await bus.send("pings_out", payload)
                reply: Any = await pongs.receive()
                elapsed = clock() - start
                if getattr(reply, "payload", None) != payload:
                    raise WorkloadError(f"round trip {i}: sent {payload!r}, got {reply!r}")
                if i >= args.warmup:
                    round_trips.append(elapsed)
    return latency(round_trips)


async def concurrent_publish(args: PeerArgs) -> Result:
    """W4: publisher actors send to one outbound bridged channel; until all come back."""
    received: list[str] = []
    per_publisher = args.messages // args.publishers
    expected = [f"{p}:{j}" for p in range(args.publishers) for j in range(per_publisher)]
    done, go = trio.Event(), trio.Event()
    async with open_bus(args) as bus:
        bus.add_channel("inbox", CAPACITY)
        bus.add_channel("outbox", CAPACITY)
        await bus.bridge_in(args.channel, "inbox")
        await bus.bridge_out("outbox", args.channel)
        options = {"into": received, "count": len(expected), "done": done}
        await bus.spawn(Collector, name="collector", inbox="inbox", options=options)
        for p in range(args.publishers):
            payloads = [f"{p}:{j}" for j in range(per_publisher)]
            options = {"payloads": payloads, "to": "outbox", "go": go}
            await bus.spawn(Publisher, name=f"publisher-{p}", restart="temporary", options=options)
        with deadline(args, "collector", lambda: len(received)):
            start = clock()
            go.set()
            await done.wait()
            elapsed = clock() - start
    check_payloads(received, expected, ordered=False)
    return throughput(len(expected), elapsed)


async def bounded_memory(args: PeerArgs) -> Result:
    """W5: notifications pass through a bounded inbound channel; RSS sampled along the way."""
    process = psutil.Process()
    rss: list[int] = []
    done = trio.Event()
    async with open_bus(args) as bus:
        bus.add_channel("inbox", args.capacity)
        await bus.bridge_in(args.channel, "inbox")
        options = {"count": args.messages, "sample_every": args.sample_every, "rss": rss}
        await bus.spawn(Counter, name="counter", inbox="inbox", options={**options, "done": done})
        rss.append(process.memory_info().rss)
        with deadline(args, "counter", lambda: (len(rss) - 1) * args.sample_every):
            start = clock()
            for first in range(1, args.messages + 1, W5_BATCH):
                last = min(first + W5_BATCH - 1, args.messages)
                async with bus.transaction() as tx:
                    await tx.execute(ASYNCPG_BURST, args.channel, first, last)
            await done.wait()
            elapsed = clock() - start
    return memory(rss, args.messages, elapsed)


@contextlib.asynccontextmanager
async def ask_server(args: PeerArgs) -> AsyncIterator[None]:
    """Process B of W8: a node with the public actor ``<channel>_echo``."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "bench.peers.ask_server",
            "pgbus",
            f"--dsn={args.dsn}",
            f"--channel={args.channel}",
            "--application-name=pgbus-bench",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        await read_ready_line(process, args.timeout, "the ask server")
        yield
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
            with trio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def cross_process_ask(args: PeerArgs) -> Result:
    """W8: ``bus.ask`` the public actor of process B, one at a time; each round trip timed."""
    round_trips: list[float] = []
    echo = f"{args.channel}_echo"
    async with (
        ask_server(args),
        pgbus.open_bus(args.dsn, node=f"{args.channel}-a", application_name="pgbus-bench") as bus,
    ):
        with deadline(args, "asks", lambda: len(round_trips)):
            for i in range(args.warmup + args.messages):
                start = clock()
                reply = await bus.ask(echo, i, timeout=args.timeout)
                elapsed = clock() - start
                if reply != i:
                    raise WorkloadError(f"ask {i}: got {reply!r} back")
                if i >= args.warmup:
                    round_trips.append(elapsed)
    return latency(round_trips)


async def concurrent_asks(args: PeerArgs) -> Result:
    """W8C: *publishers* tasks each ``bus.ask`` process B in turn; until every ask is answered."""
    per_task = args.messages // args.publishers
    replies: list[Any] = []
    echo = f"{args.channel}_echo"
    async with (
        ask_server(args),
        pgbus.open_bus(args.dsn, node=f"{args.channel}-a", application_name="pgbus-bench") as bus,
    ):
        await bus.ask(echo, -1, timeout=args.timeout)  # the registry read, outside the clock

        async def ask_in_turn(task: int) -> None:
            for j in range(per_task):
                replies.append(await bus.ask(echo, task * per_task + j, timeout=args.timeout))

        with deadline(args, "asks", lambda: len(replies)):
            start = clock()
            async with trio.open_nursery() as nursery:
                for task in range(args.publishers):
                    nursery.start_soon(ask_in_turn, task)
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
    **DURABLE_WORKLOADS,
    **KEYED_WORKLOADS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one workload under ``trio.run``."""

    def run(args: PeerArgs) -> Result:
        if not hasattr(pgbus, "open_bus"):
            raise PeerUnavailableError("pgbus.open_bus does not exist in this pgbus")
        return trio.run(WORKLOADS[args.workload], args)

    return run_peer("pgbus", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
