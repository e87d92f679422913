"""
Where a W3 round trip goes: ``python -m bench.trace_w3 [--dsn DSN] [--trips N]``.

The W3 ping-pong of the pgbus peer (one bus; main task -> 'ping' outbound bridge -> PostgreSQL
-> listener -> responder actor -> 'pong' outbound bridge -> PostgreSQL -> listener -> main task),
with each stage stamped by wrapping pgbus's internal steps (``time.perf_counter``). Prints the
median time of each stage after the send, and between consecutive stages. Without ``--dsn`` an
embedded PostgreSQL is started. The wrappers add about a microsecond per stage.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import trio

import pgbus
from pgbus import _inbound, _outbound

STAMPS: list[dict[str, float]] = []


def mark(stage: str) -> None:
    if STAMPS:
        STAMPS[-1].setdefault(stage, time.perf_counter())


def instrument() -> None:
    publish = _outbound.OutboundBridge._publish
    sink = _inbound.InboundBridge._sink

    async def traced_publish(self: Any, batch: list[str]) -> None:
        side = "ping" if self.pg_channel.endswith("_ping") else "pong"
        mark(f"{side}: bridge publishes")
        await publish(self, batch)
        mark(f"{side}: reply parsed")

    def traced_sink(self: Any, pid: int, channel: str, payload: str) -> None:
        side = "ping" if channel.endswith("_ping") else "pong"
        mark(f"{side}: notification at the sink")
        sink(self, pid, channel, payload)

    _outbound.OutboundBridge._publish = traced_publish  # type: ignore[method-assign]
    # The listener hands its bound _sink to the connection when it connects: patch the class.
    _inbound.InboundBridge._sink = traced_sink  # type: ignore[method-assign]


class Responder(pgbus.Actor):
    def __init__(self, to: str) -> None:
        self.to = to

    async def handle(self, message: Any) -> None:
        mark("responder handles")
        await self.send(self.to, message.payload)


async def trace(dsn: str | None, trips: int) -> None:
    instrument()
    async with pgbus.open_bus(dsn, embedded=dsn is None) as bus:
        for name in ("pings", "pings_out", "pongs", "pongs_out"):
            bus.add_channel(name, 1000)
        await bus.bridge_in("trace_ping", "pings")
        await bus.bridge_in("trace_pong", "pongs")
        await bus.bridge_out("pings_out", "trace_ping")
        await bus.bridge_out("pongs_out", "trace_pong")
        await bus.spawn(Responder, name="responder", inbox="pings", options={"to": "pongs_out"})
        pongs = bus.channel("pongs")
        for i in range(trips + 100):
            STAMPS.append({"send": time.perf_counter()})
            await bus.send("pings_out", str(i))
            with trio.fail_after(10):
                await pongs.receive()
            mark("main task has the pong")
    del STAMPS[:100]  # warm-up
    stages = list(STAMPS[0])
    print(f"{len(STAMPS)} round trips; median µs since the send, and since the stage before:")
    previous = 0.0
    for stage in stages[1:]:
        since = statistics.median((s[stage] - s["send"]) * 1e6 for s in STAMPS if stage in s)
        print(f"  {stage:32s} {since:8.0f} {since - previous:+8.0f}")
        previous = since


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn", help="default: an embedded PostgreSQL for the run")
    parser.add_argument("--trips", type=int, default=2000)
    args = parser.parse_args()
    trio.run(trace, args.dsn, args.trips)


if __name__ == "__main__":
    main()
