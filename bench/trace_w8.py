"""
Where a W8 round trip goes: ``python -m bench.trace_w8 --dsn DSN [--asks N]``.

Process A (this one) asks the public actor of process B (a child running this module with
``--serve``) one request at a time; both stamp each stage with ``time.perf_counter`` (the
system-wide monotonic clock, so stamps of the two processes compare) by wrapping pgbus's
internal steps. Prints the median time between consecutive stages. The wrappers add a few µs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import pgbus
from pgbus._cluster import Cluster, _sender

STAMPS: dict[str, list[float]] = {}


def mark(stage: str) -> None:
    STAMPS.setdefault(stage, []).append(time.perf_counter())


def instrument() -> None:
    sender: Any = _sender.Sender
    cluster: Any = Cluster
    queue, dispatch = sender.send, cluster._dispatch
    start, publish = _sender.start_publish_each, _sender.publish_each

    def traced_queue(self: Any, *args: Any, **kwargs: Any) -> None:
        mark("queued")
        queue(self, *args, **kwargs)

    def traced_start(*args: Any) -> Any:
        statement = start(*args)  # the caller's task writes it: the sender reads the reply
        mark("written")
        return statement

    async def traced_publish(*args: Any) -> None:
        mark("written")  # the sender's task writes it (it was busy when the message came)
        await publish(*args)

    def traced_dispatch(self: Any, pid: int, payload: str) -> None:
        mark("parsed")
        dispatch(self, pid, payload)

    sender.send, cluster._dispatch = traced_queue, traced_dispatch
    _sender.start_publish_each = traced_start  # type: ignore[assignment]
    _sender.publish_each = traced_publish  # type: ignore[assignment]


class Echo(pgbus.Actor):
    async def handle(self, message: Any) -> Any:
        mark("handle")
        return message


async def serve(dsn: str) -> None:
    async with pgbus.open_bus(dsn, node="trace-b") as bus:
        await bus.spawn(Echo, name="trace_echo", inbox_capacity=100, public=True)
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until A closes our stdin


async def ask(dsn: str, asks: int) -> None:
    async with pgbus.open_bus(dsn, node="trace-a") as bus:
        for i in range(100):  # warm-up
            await bus.ask("trace_echo", i, timeout=10)
        STAMPS.clear()
        for i in range(asks):
            mark("ask")
            await bus.ask("trace_echo", i, timeout=10)
            mark("return")


def report(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    stages = [
        ("A: ask called", a["ask"]),
        ("A: request encoded, sending", a["queued"]),
        ("A: request written", a["written"]),
        ("B: request parsed (listener)", b["parsed"]),
        ("B: actor's handle runs", b["handle"]),
        ("B: reply encoded, sending", b["queued"]),
        ("B: reply written", b["written"]),
        ("A: reply parsed (listener)", a["parsed"]),
        ("A: ask returns", a["return"]),
    ]
    total = statistics.median(r - s for s, r in zip(a["ask"], a["return"], strict=True))
    print(f"round trip p50 {total * 1e6:.0f} µs; median between stages:")
    for (name, before), (next_name, after) in itertools.pairwise(stages):
        gap = statistics.median(y - x for x, y in zip(before, after, strict=True))
        print(f"  {name:32} -> {next_name:32} {gap * 1e6:6.0f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_w8", description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--asks", type=int, default=1000)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    instrument()
    if args.serve is not None:
        trio.run(serve, args.dsn)
        args.serve.write_text(json.dumps(STAMPS))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        command = [sys.executable, "-m", "bench.trace_w8", "--dsn", args.dsn, "--serve", str(out)]
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None
        assert child.stdout is not None
        if child.stdout.readline() != "ready\n":
            raise SystemExit("the serving process did not start")
        trio.run(ask, args.dsn, args.asks)
        child.stdin.close()
        child.wait(timeout=30)
        b = json.loads(out.read_text())
    n = args.asks
    report({k: v[-n:] for k, v in STAMPS.items()}, {k: v[-n:] for k, v in b.items()})


if __name__ == "__main__":
    main()
