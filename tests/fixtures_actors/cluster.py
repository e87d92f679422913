"""
Actors and a node program for the cluster tests.

``python tests/fixtures_actors/cluster.py --dsn DSN --node NAME [--keepalive S] [--public echo]
[--singleton marked] [--inbound CHANNEL]`` runs one bus as a node until SIGTERM, printing JSON
lines on stdout: ``{"event": "ready", ...}`` once joined, one line per singleton start and stop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

import trio

import pgbus


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Echo(pgbus.Actor):
    """Replies with the message and the name of the node that handled it; raises on "boom"."""

    async def handle(self, message: Any) -> Any:
        if message == "boom":
            raise ValueError("remote trouble")
        if isinstance(message, dict) and "sleep" in message:
            say("sleeping", node=self.bus.node)
            await trio.sleep(message["sleep"])
        if isinstance(message, dict) and "double" in message:
            return message["double"] * 2
        if isinstance(message, dict) and "tell" in message:
            say("told", node=self.bus.node, message=message)
            return None
        return {"node": self.bus.node, "echo": message}


class Marked(pgbus.Actor):
    """
    A singleton that records each run in table ``cluster_holds`` (started, ended: the database's
    clock), so a test can check that no two runs ever overlapped.
    """

    async def on_start(self) -> None:
        async with self.bus.transaction() as tx:
            self.hold = await tx.fetchval(
                "INSERT INTO cluster_holds (node, started) VALUES ($1, clock_timestamp())"
                " RETURNING id",
                self.bus.node,
            )
        say("singleton", name=self.name, node=self.bus.node, hold=self.hold)

    async def handle(self, message: Any) -> Any:
        return self.bus.node

    async def on_stop(self) -> None:
        async with self.bus.transaction() as tx:
            await tx.execute(
                "UPDATE cluster_holds SET ended = clock_timestamp() WHERE id = $1", self.hold
            )
        say("singleton stopped", name=self.name, node=self.bus.node, hold=self.hold)


async def main(args: argparse.Namespace) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with pgbus.open_bus(args.dsn, node=args.node, keepalive=args.keepalive) as bus:
            for name in args.public:
                await bus.spawn(Echo, name=name, inbox_capacity=100, public=True)
            for name in args.singleton:
                await bus.spawn(Marked, name=name, inbox_capacity=10, singleton=True)
            for name in args.inbound:
                bus.add_channel(name, 10)
                await bus.bridge_in(name, name)
            assert bus._cluster is not None
            say("ready", node=bus.node, pid=os.getpid(), backend=bus._cluster.pid)
            async for _ in signals:
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--keepalive", type=float, default=1.0)
    parser.add_argument("--public", action="append", default=[])
    parser.add_argument("--singleton", action="append", default=[])
    parser.add_argument("--inbound", action="append", default=[])
    trio.run(main, parser.parse_args())
    sys.exit(0)
