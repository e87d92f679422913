"""
pgbus durable channels for W6 and W7, as its README shows them (public names only).

- W6: the publisher sends every message to a channel with a durable outbound bridge (one
  INSERT and one wake-up per batch); each of the 4 worker processes runs a bus with a durable
  inbound bridge (group ``bench``, channel capacity 1000 = prefetch) feeding an actor. The clock
  stops when the actors have handled every message and no delivery is left unacknowledged.
- W6R: W6 with ``lease = 2`` and a handler that takes 1 ms: what renewing the held leases
  (every 0.67 s, in the claims' round trips) costs; any message handled twice fails the run.
- W6D: W6 with a ``dedup_key`` on every message (the bridge's ``dedup_key=`` function gives
  each payload as its key, all distinct): what taking a key (``pgbus.messages.dedup_key``,
  under a unique index) costs.
- W7: ``bus.notify(channel, payload, durable=True)`` one at a time; one worker process (W7L is
  W7 again while the harness holds a writing transaction open in another database).
- W10: delayed-message lateness. Messages published with ``delay=`` uniform in 0-10 s (in
  transactions of 500 ``Transaction.publish`` calls), handled by one worker process; lateness
  is the handle time minus the later of its due time (the publish call's start + delay, a lower
  bound of the server's ``deliver_at``) and its transaction's commit. A message handled before
  its due time fails the run. The delays, the due times and the check are shared with
  pgqueuer's and procrastinate's W10 (``_durable_tools``).

Run as ``python -m bench.peers.pgbus_peer W6 ...`` (the harness does); the workers are
``python -m bench.peers.pgbus_durable worker W6 ...``.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import trio

import pgbus

from ._durable_tools import (
    DEFAULT_WORKERS,
    DELAY_BATCH,
    MAX_DELAY,
    WorkerReport,
    Workers,
    check_finals,
    collect_lateness,
    parse_worker_args,
    w10_delays,
)
from ._protocol import PeerArgs, Result, WorkloadError, clock, latency, throughput

PREFETCH = 1000
OUT_CAPACITY = 5000
GROUP = "bench"
MODULE = "bench.peers.pgbus_durable"
_UNACKNOWLEDGED = "SELECT EXISTS (SELECT FROM pgbus.deliveries WHERE channel = $1)"


def _bus(dsn: str) -> Any:
    return pgbus.open_bus(dsn=dsn, application_name="pgbus-bench")


async def _sql(bus: pgbus.Bus, sql: str, *args: Any) -> Any:
    async with bus.transaction() as tx:
        return await tx.fetchval(sql, *args)


async def _storage(bus: pgbus.Bus, channel: str) -> dict[str, Any]:
    async with bus.transaction() as tx:
        row = await tx.fetchrow(
            "SELECT (SELECT count(*) FROM pgbus.messages WHERE channel = $1),"
            " pg_total_relation_size('pgbus.messages'),"
            " pg_total_relation_size('pgbus.deliveries')",
            channel,
        )
    return {"rows": row[0], "messages_mb": row[1] / 2**20, "deliveries_mb": row[2] / 2**20}


async def durable_throughput(args: PeerArgs, mode: str = "W6") -> Result:
    expected = [str(i) for i in range(args.messages)]
    async with _bus(args.dsn) as bus:
        await bus.notify(args.channel, "schema", durable=True)  # creates the schema if need be
        workers = Workers(MODULE, mode, DEFAULT_WORKERS, args)
        try:
            await trio.to_thread.run_sync(workers.wait_ready, args.timeout)
            workers.expect(args.messages)
            bus.add_channel("out", OUT_CAPACITY)
            keyed = {"dedup_key": str} if mode == "W6D" else {}
            await bus.bridge_out("out", args.channel, durable=True, **keyed)
            start = clock()
            for payload in expected:
                await bus.send("out", payload)
            await trio.to_thread.run_sync(workers.wait_handled, args.timeout)
            # Polling: acknowledgements committed by other processes have no event to await.
            with trio.fail_after(args.timeout):
                while True:
                    if not await _sql(bus, _UNACKNOWLEDGED, args.channel):
                        break
                    await trio.sleep(0.002)
            elapsed = clock() - start
            at_end = await _storage(bus, args.channel)
            # The workers' janitor deletes what every group has handled, every 2 s.
            with trio.move_on_after(30):
                while True:
                    if not (await _storage(bus, args.channel))["rows"]:
                        break
                    await trio.sleep(0.2)
            retained = await _storage(bus, args.channel)
        finally:
            finals = await trio.to_thread.run_sync(workers.stop)
    result = throughput(args.messages, elapsed)
    result.update(check_finals(finals, expected, DEFAULT_WORKERS))
    result["storage_at_end"] = at_end
    result["storage_after_janitor"] = retained
    return result


async def durable_latency(args: PeerArgs) -> Result:
    async with _bus(args.dsn) as bus:
        await bus.notify(args.channel, "schema", durable=True)
        workers = Workers(MODULE, "W7", 1, args)
        try:
            await trio.to_thread.run_sync(workers.wait_ready, args.timeout)
            times: list[float] = []
            for i in range(args.warmup + args.messages):
                payload = str(i)
                sent = clock()
                await bus.notify(args.channel, payload, durable=True)
                got, at = await trio.to_thread.run_sync(workers.events.get, True, args.timeout)
                if got != payload:
                    raise WorkloadError(f"worker handled {got!r}, expected {payload!r}")
                if i >= args.warmup:
                    times.append(at - sent)
        finally:
            await trio.to_thread.run_sync(workers.stop)
    return latency(times)


async def lease_renewal(args: PeerArgs) -> Result:
    return await durable_throughput(args, "W6R")


async def dedup_throughput(args: PeerArgs) -> Result:
    return await durable_throughput(args, "W6D")


async def delayed_lateness(args: PeerArgs) -> Result:
    delays = w10_delays(args.messages)
    due: dict[str, float] = {}
    async with _bus(args.dsn) as bus:
        await bus.notify(args.channel, "schema", durable=True)
        workers = Workers(MODULE, "W10", 1, args)
        try:
            await trio.to_thread.run_sync(workers.wait_ready, args.timeout)
            start = clock()
            for first in range(0, args.messages, DELAY_BATCH):
                batch = range(first, min(first + DELAY_BATCH, args.messages))
                async with bus.transaction() as tx:
                    for i in batch:
                        due[str(i)] = clock() + delays[i]
                        await tx.publish(args.channel, str(i), durable=True, delay=delays[i])
                committed = clock()
                for i in batch:
                    due[str(i)] = max(due[str(i)], committed)
            return await trio.to_thread.run_sync(
                collect_lateness, workers, due, args.timeout + MAX_DELAY, clock() - start
            )
        finally:
            await trio.to_thread.run_sync(workers.stop)


class Handler(pgbus.Actor):
    def __init__(self, report: WorkerReport, pause: float = 0.0) -> None:
        self.report = report
        self.pause = pause

    async def handle(self, message: pgbus.DurableMessage) -> None:
        self.report.handled(message.payload)
        if self.pause:
            await trio.sleep(self.pause)


async def _worker(argv: list[str]) -> None:
    args = parse_worker_args(argv)
    report = WorkerReport(args.mode)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with _bus(args.dsn) as bus:
            bus.add_channel("in", PREFETCH)
            lease = 2.0 if args.mode == "W6R" else 30.0  # 30 s: the default
            await bus.bridge_in(args.channel, "in", durable=True, group=GROUP, lease=lease)
            pause = 0.001 if args.mode == "W6R" else 0.0
            options = {"report": report, "pause": pause}
            await bus.spawn(Handler, name="handler", inbox="in", options=options)
            report.ready()
            async for _ in signals:
                break
    report.final()


WORKLOADS = {
    "W6": durable_throughput,
    "W6R": lease_renewal,
    "W6D": dedup_throughput,
    "W7": durable_latency,
    "W10": delayed_lateness,
}

if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        raise SystemExit("run through bench.peers.pgbus_peer")
    trio.run(_worker, sys.argv[2:])
