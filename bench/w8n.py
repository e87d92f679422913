"""
W8N: how the cluster's cost grows with its size. ``python -m bench.w8n [--dsn DSN]
[--sizes 2,16,64] [--asks N] [--concurrent N] [--repeat R]``

For each size *n*: process B (``bench.peers.ask_server pgbus``, one public actor) and *n - 2*
idle nodes (``python -m bench.w8n --idle-node NAME``: a bus that joined the cluster, no actor)
are started; then this process, node A, runs W8 (one ask at a time, p50 / p99 µs) and W8C (100
tasks asking in turn, msg/s) against B. Before measuring, it checks that every node holds
exactly one listening session (``pgbus-bench:listen`` in ``pg_stat_activity``).

Why it grows: up to PostgreSQL 18, every NOTIFY signals every backend that listens on anything
in the database, and each of them wakes to read the queue; PostgreSQL 19 signals only those
listening on the notification's channel. Without ``--dsn``, an embedded PostgreSQL 18 is started
with ``max_connections = 400`` (64 nodes hold about 3 connections each).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

import pgbus

APPLICATION_NAME = "pgbus-bench"
ECHO_CHANNEL = "w8n"
WAIT = 120.0
CONCURRENCY = 100


async def idle_node(dsn: str, name: str) -> None:
    """A node that joins the cluster and does nothing until SIGTERM."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with pgbus.open_bus(dsn, node=name, application_name=APPLICATION_NAME):
            print("ready", flush=True)
            async for _ in signals:
                break


async def _wait_ready(process: trio.Process) -> None:
    assert process.stdout is not None
    said = b""
    while not said.endswith(b"\n"):
        chunk = await process.stdout.receive_some()
        if not chunk:
            break
        said += chunk
    if said != b"ready\n":
        raise RuntimeError(f"a node did not start (said {said!r})")


@contextlib.asynccontextmanager
async def processes(commands: list[list[str]]) -> AsyncIterator[None]:
    """Start every command (each prints ``ready``), wait for all; SIGTERM them on the way out."""
    started: list[trio.Process] = []
    try:
        for command in commands:
            started.append(
                await trio.lowlevel.open_process(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
                )
            )
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for process in started:
                    nursery.start_soon(_wait_ready, process)
        yield
    finally:
        with trio.CancelScope(shield=True):
            for process in started:
                if process.returncode is None:
                    process.terminate()
            with trio.move_on_after(30):
                for process in started:
                    await process.wait()
            for process in started:
                if process.returncode is None:
                    process.kill()
                    await process.wait()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(dsn: str, size: int, asks: int, concurrent: int) -> dict[str, Any]:
    server = [
        sys.executable,
        "-m",
        "bench.peers.ask_server",
        "pgbus",
        f"--dsn={dsn}",
        f"--channel={ECHO_CHANNEL}",
        f"--application-name={APPLICATION_NAME}",
    ]
    idle = [
        [sys.executable, "-m", "bench.w8n", "--dsn", dsn, "--idle-node", f"idle-{i}"]
        for i in range(size - 2)
    ]
    echo = f"{ECHO_CHANNEL}_echo"
    async with (
        processes([server, *idle]),
        pgbus.open_bus(dsn, node="w8n-a", application_name=APPLICATION_NAME) as bus,
    ):
        async with bus.transaction() as tx:
            nodes = await tx.fetchval("SELECT count(*) FROM pgbus.cluster_nodes")
            listening = await tx.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                f"{APPLICATION_NAME}:listen",
            )
        if (nodes, listening) != (size, size):
            raise RuntimeError(f"{size} nodes expected: {nodes} registered, {listening} listening")
        for i in range(100):  # warm-up (and the registry read)
            await bus.ask(echo, i, timeout=WAIT)
        round_trips = []
        for i in range(asks):
            start = time.perf_counter()
            await bus.ask(echo, i, timeout=WAIT)
            round_trips.append(time.perf_counter() - start)
        per_task = concurrent // CONCURRENCY

        async def ask_in_turn() -> None:
            for j in range(per_task):
                await bus.ask(echo, j, timeout=WAIT)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(ask_in_turn)
        elapsed = time.perf_counter() - start
    return {
        "nodes": size,
        "listening": listening,
        "p50": _quantile(round_trips, 0.5) * 1e6,
        "p99": _quantile(round_trips, 0.99) * 1e6,
        "rate": per_task * CONCURRENCY / elapsed,
    }


@contextlib.asynccontextmanager
async def server(dsn: str | None) -> AsyncIterator[str]:
    if dsn is not None:
        yield dsn
        return
    from pgbus._embedded import open_embedded_postgres

    async with open_embedded_postgres() as postgres:
        async with pgbus.open_bus(postgres.dsn) as bus, bus._database().borrow() as connection:
            await connection.execute("ALTER SYSTEM SET max_connections = 400")
        await postgres.stop_server()
        await postgres.start_server()
        yield postgres.dsn


async def main(args: argparse.Namespace) -> None:
    if args.idle_node:
        await idle_node(args.dsn, args.idle_node)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    async with server(args.dsn) as dsn:
        results: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
        for repeat in range(args.repeat):
            for size in sizes:
                result = await measure(dsn, size, args.asks, args.concurrent)
                print(
                    f"  [W8N {repeat + 1}/{args.repeat}] {size:3d} nodes: W8 p50 "
                    f"{result['p50']:.0f} µs, p99 {result['p99']:.0f} µs; W8C "
                    f"{result['rate']:.0f} msg/s",
                    flush=True,
                )
                results[size].append(result)
    print()
    header = "| nodes | listening sessions | W8 p50 µs | W8 p99 µs | W8C msg/s | W8 p50 vs first |"
    print(header)
    print("| --- | --- | --- | --- | --- | --- |")
    base = statistics.median(r["p50"] for r in results[sizes[0]])
    for size in sizes:
        runs = results[size]
        p50 = statistics.median(r["p50"] for r in runs)
        p99 = statistics.median(r["p99"] for r in runs)
        rate = statistics.median(r["rate"] for r in runs)
        print(
            f"| {size} | {runs[0]['listening']} | {p50:.0f} | {p99:.0f} | {rate:.0f} | "
            f"{p50 / base:.2f}x |"
        )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.w8n", description=__doc__.split("\n")[1])
    parser.add_argument("--dsn", help="a PostgreSQL with max_connections >= 3 x the largest size")
    parser.add_argument("--sizes", default="2,16,64", help="cluster sizes (default 2,16,64)")
    parser.add_argument("--asks", type=int, default=2000, help="W8 asks per size (2000)")
    parser.add_argument("--concurrent", type=int, default=10_000, help="W8C asks (10000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; medians shown")
    parser.add_argument("--idle-node", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse())
