"""
What the durable workloads (W6, W7) share, whatever the queue: worker processes and their reports.

W6: the peer process publishes every message; ``--workers`` worker processes (the same module,
run as ``python -m <module> worker ...``) handle them. Each worker prints ``ready`` once it is
consuming, then its running count of handled messages (``n COUNT``, at most every 5 ms) and,
when it gets SIGTERM, one final JSON line with its payloads and RSS. The clock stops when the
counts add up to every message and the queue says all of them are acknowledged.

W7: one worker; for each message it prints ``h PAYLOAD TIME`` (``time.perf_counter()``, the
system-wide monotonic clock on Linux, so comparable across processes) as soon as its handler
has it; latency is that time minus the publisher's time just before publishing.

W10: one worker, reporting as in W7. Every peer publishes the same delays (``w10_delays``), in
batches of ``DELAY_BATCH``, and takes each message's due time the same way: the publisher's
clock just before the call that stores it plus its delay, or the clock once that call (or its
transaction) has committed if that is later. The queue itself computes its due time later, in
the database or the client's wall clock (``CLOCK_REALTIME`` of this same host; on Linux it
advances at the rate of ``perf_counter``'s ``CLOCK_MONOTONIC``, so only a step of the wall clock
during a run could break this), so the publisher's figure is a lower bound of it: a message
handled before it was surely early.
``collect_lateness`` gathers the handle times and fails the run if any message came early.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import psutil

from ..workloads import WORKLOADS
from ._protocol import PeerArgs, PeerUnavailableError, Result, WorkloadError, latency, run_peer

PROGRESS_EVERY = 0.005
DEFAULT_WORKERS = 4
MAX_DELAY = 10.0
"""W10 at full size: delays are uniform in 0 to this many seconds (``w10_delays``)."""
DELAY_BATCH = 500
"""W10: messages stored per transaction (or per call, for a queue that stores a batch at once)."""


def parse_worker_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="worker")
    parser.add_argument("mode", choices=("W6", "W6R", "W6D", "W7", "W9", "W10"))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--application-name", required=True)
    return parser.parse_args(argv)


class WorkerReport:
    """The worker side: handled payloads, progress printed from a thread (cheap for handlers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.payloads: list[str] = []
        self.problems: list[str] = []
        """What the handler saw wrong (W9: a message out of its key's order); fails the run."""
        self._stop = threading.Event()
        if mode.startswith(("W6", "W9")):
            threading.Thread(target=self._progress, daemon=True).start()

    def ready(self) -> None:
        _line("ready")

    def handled(self, payload: str) -> None:
        """Call from the handler, once per message, as soon as it has it."""
        if self.mode in ("W7", "W10"):
            _line(f"h {payload} {time.perf_counter()!r}")
        self.payloads.append(payload)

    def _progress(self) -> None:
        last = -1
        while not self._stop.wait(PROGRESS_EVERY):
            count = len(self.payloads)
            if count != last:
                _line(f"n {count}")
                last = count

    def final(self) -> None:
        self._stop.set()
        rss = psutil.Process().memory_info().rss
        _line(json.dumps({"payloads": self.payloads, "rss": rss, "problems": self.problems}))


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Workers:
    """The publisher side: start the worker processes, follow their counts, stop them."""

    def __init__(self, module: str, mode: str, count: int, args: Any) -> None:
        command = [
            sys.executable,
            "-m",
            module,
            "worker",
            mode,
            f"--dsn={args.dsn}",
            f"--channel={args.channel}",
            f"--application-name={args.application_name}",
        ]
        self.processes = [
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=os.getcwd(),
            )
            for _ in range(count)
        ]
        self.counts = [0] * count
        self.finals: list[dict[str, Any] | None] = [None] * count
        self.events: queue.Queue[tuple[str, float]] = queue.Queue()
        self._ready = [threading.Event() for _ in range(count)]
        self._target = 0
        self.all_handled = threading.Event()
        self.handled_at = 0.0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, index: int) -> None:
        stream = self.processes[index].stdout
        assert stream is not None
        for line in stream:
            if line.startswith("n "):
                with self._lock:
                    self.counts[index] = int(line[2:])
                    done = self._target and sum(self.counts) >= self._target
                    if done and not self.all_handled.is_set():
                        self.handled_at = time.perf_counter()
                        self.all_handled.set()
            elif line.startswith("h "):
                _, payload, at = line.split()
                self.events.put((payload, float(at)))
            elif line.startswith("ready"):
                self._ready[index].set()
            elif line.startswith("{"):
                self.finals[index] = json.loads(line)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for index, ready in enumerate(self._ready):
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise WorkloadError(f"worker {index} did not start within {timeout:g}s")

    def expect(self, total: int) -> None:
        with self._lock:
            self._target = total

    def wait_handled(self, timeout: float) -> float:
        """Block until the counts reach the target; the time they did (perf_counter)."""
        deadline = time.monotonic() + timeout
        while not self.all_handled.wait(0.1):
            dead = [p.returncode for p in self.processes if p.poll() is not None]
            if dead:
                raise WorkloadError(f"a worker exited early (status {dead[0]})")
            if time.monotonic() > deadline:
                raise WorkloadError(
                    f"workers handled {sum(self.counts)} of {self._target} within {timeout:g}s"
                )
        return self.handled_at

    def stop(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """SIGTERM every worker; their final reports."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in self._threads:
            thread.join(5)
        return [f for f in self.finals if f is not None]


def w10_delays(messages: int) -> list[float]:
    """
    W10: the delay of each message in seconds, the same for every peer: uniform in 0 to
    ``MAX_DELAY``, a span that shrinks with the messages below W10's full size (``--scale``), so
    that the due times come as densely (1,000 a second) and a smoke run takes a moment.
    """
    span = MAX_DELAY * min(1.0, messages / WORKLOADS["W10"].messages)
    rng = random.Random(10)
    return [rng.uniform(0, span) for _ in range(messages)]


def collect_lateness(
    workers: Workers, due: dict[str, float], timeout: float, publish_s: float
) -> Result:
    """
    W10, blocking: wait until the one worker has handled every payload of *due* (payload ->
    due time, ``perf_counter``), each within *timeout* of the one before; the lateness of each
    (handle time minus due time) as a latency result, with *publish_s* (how long the publisher
    took to store them all). A payload not sent (or handled twice) fails the run, and so does
    any message handled before its due time.
    """
    total = len(due)
    lateness: list[float] = []
    while due:
        try:
            got, at = workers.events.get(True, timeout)
        except queue.Empty:
            raise WorkloadError(
                f"worker handled {len(lateness)} of {total}, then nothing for {timeout:g}s"
            ) from None
        if got not in due:
            raise WorkloadError(f"worker handled {got!r}, which was not sent (or twice)")
        lateness.append(at - due.pop(got))
    early = [t for t in lateness if t < 0]
    if early:
        raise WorkloadError(f"{len(early)} message(s) handled early (by up to {-min(early):.4f}s)")
    result = latency(lateness)
    result["early"] = 0
    result["publish_s"] = publish_s
    return result


def check_finals(finals: list[dict[str, Any]], expected: list[str], workers: int) -> dict[str, Any]:
    """Every message handled exactly once across the workers; the workers' RSS."""
    if len(finals) != workers:
        raise WorkloadError(f"{workers - len(finals)} worker(s) sent no final report")
    problems = [p for f in finals for p in f.get("problems", [])]
    if problems:
        raise WorkloadError(f"{len(problems)} problem(s) in the workers, first: {problems[0]}")
    received = [p for f in finals for p in f["payloads"]]
    if len(received) != len(expected) or sorted(received) != sorted(expected):
        raise WorkloadError(
            f"workers handled {len(received)} messages ({len(set(received))} distinct), "
            f"expected {len(expected)}"
        )
    rss = [f["rss"] / 2**20 for f in finals]
    return {"worker_rss_mb": [round(r, 1) for r in rss], "worker_rss_max_mb": max(rss)}


def asyncio_peer_main(
    name: str,
    label: str,
    workloads: Mapping[str, Callable[[PeerArgs], Coroutine[Any, Any, Result]]],
    worker: Callable[[list[str]], Coroutine[Any, Any, None]],
) -> None:
    """
    The ``python -m bench.peers.X`` entry of an asyncio durable peer: ``worker ARGS`` runs one
    worker process; anything else runs a workload (*label* names the peer in "runs only").
    """
    import asyncio

    if sys.argv[1:2] == ["worker"]:
        asyncio.run(worker(sys.argv[2:]))
        return

    def run(args: PeerArgs) -> Result:
        if args.workload not in workloads:
            raise PeerUnavailableError(f"{label} runs only {', '.join(workloads)}")
        return asyncio.run(workloads[args.workload](args))

    raise SystemExit(run_peer(name, run, sys.argv[1:]))
