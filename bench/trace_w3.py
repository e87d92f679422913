"""
Where a W3 round trip goes: ``python -m bench.trace_w3 [--dsn DSN] [--trips N]``.

The W3 ping-pong of the pgbus peer (one bus; main task -> 'ping' outbound bridge -> PostgreSQL
-> listener -> responder actor -> 'pong' outbound bridge -> PostgreSQL -> listener -> main task),
with each stage stamped by wrapping pgbus's internal steps (``time.perf_counter``). Prints the
median time of each stage after the send, and between consecutive stages, in order of time.
Without ``--dsn`` an embedded PostgreSQL is started. The wrappers add about a microsecond per
stage.

An idle outbound bridge lets the sender write the statement (``sender wrote the statement``);
the bridge's task only reads the reply (``reply read by the bridge``). A stage that shows up in
fewer round trips than the others is named with its share (a bridge still busy with the last
reply takes the message from its channel instead: ``bridge publishes``).
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
    offer = _outbound.OutboundBridge.offer
    confirm = _outbound.OutboundBridge._confirm
    publish = _outbound.OutboundBridge._publish
    sink = _inbound.InboundBridge._sink

    def side_of(pg_channel: str) -> str:
        return "ping" if pg_channel.endswith("_ping") else "pong"

    def traced_offer(self: Any, message: object) -> bool:
        taken = offer(self, message)
        if taken:
            mark(f"{side_of(self.pg_channel)}: sender wrote the statement")
        return taken

    async def traced_confirm(self: Any, batch: list[str]) -> None:
        await confirm(self, batch)
        mark(f"{side_of(self.pg_channel)}: reply read by the bridge")

    async def traced_publish(self: Any, batch: list[str]) -> None:
        mark(f"{side_of(self.pg_channel)}: bridge publishes")
        await publish(self, batch)
        mark(f"{side_of(self.pg_channel)}: reply read by the bridge")

    def traced_sink(self: Any, pid: int, channel: str, payload: str) -> None:
        mark(f"{side_of(channel)}: notification at the sink")
        sink(self, pid, channel, payload)

    _outbound.OutboundBridge.offer = traced_offer  # type: ignore[method-assign]
    _outbound.OutboundBridge._confirm = traced_confirm  # type: ignore[method-assign]
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
    medians = {
        stage: statistics.median((s[stage] - s["send"]) * 1e6 for s in STAMPS if stage in s)
        for stage in {stage for s in STAMPS for stage in s} - {"send"}
    }
    print(f"{len(STAMPS)} round trips; median µs since the send, and since the stage before:")
    previous = 0.0
    for stage, since in sorted(medians.items(), key=lambda item: item[1]):
        share = sum(stage in s for s in STAMPS) / len(STAMPS)
        label = stage if share > 0.95 else f"{stage} ({share:.0%} of trips)"
        print(f"  {label:46s} {since:8.0f} {since - previous:+8.0f}")
        previous = since


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn", help="default: an embedded PostgreSQL for the run")
    parser.add_argument("--trips", type=int, default=2000)
    args = parser.parse_args()
    trio.run(trace, args.dsn, args.trips)


if __name__ == "__main__":
    main()
