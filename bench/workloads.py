"""
The workloads: what each measures, its default size, and how ``--scale`` shrinks it.

Shared by the harness (which sizes every run) and the peers (whose CLI defaults come from here),
so this module imports nothing heavy.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Workload:
    """One workload: its name (``W1``), a one-line title, what it reports, and its full size."""

    name: str
    title: str
    metric: str
    """``"throughput"`` (msg/s, higher is better), ``"latency"`` (µs, lower is better) or
    ``"memory"`` (RSS growth in MB, lower is better)."""
    messages: int
    """Messages at scale 1 (round trips for W3)."""
    warmup: int = 0
    """W3: round trips before measuring, not counted."""
    publishers: int = 1
    """W4: concurrent publishing tasks; each sends ``messages // publishers``."""
    capacity: int = 0
    """W5: capacity of the bounded channel the messages pass through."""
    samples: int = 0
    """W5: how many RSS samples to take along the way (every ``messages // samples``)."""
    keys: int = 0
    """W9: distinct keys the messages are spread over (``messages // keys`` each); scales with
    the messages, so every key keeps the same number of messages at any ``--scale``."""
    default_peers: tuple[str, ...] | None = None
    """Peers run when ``--peers`` is not given; None means all."""
    reference: str = "asyncpg_asyncio"
    """The peer this workload's ratios are against."""
    peers: tuple[str, ...] | None = None
    """The only peers that implement this workload (None: every peer); others are not run."""

    def sizes(self, scale: float) -> Sizes:
        """The sizes of one run at *scale* (``1.0`` is full size), never below a useful minimum."""
        if self.publishers > 1:
            per_publisher = max(1, round(self.messages / self.publishers * scale))
            messages = per_publisher * self.publishers
        elif self.capacity:
            # Whole channel-fulls, so the peers' batches divide the total evenly.
            messages = max(1, round(self.messages * scale / self.capacity)) * self.capacity
        else:
            messages = max(10, round(self.messages * scale))
        return Sizes(
            messages=messages,
            warmup=max(1, round(self.warmup * scale)) if self.warmup else 0,
            publishers=self.publishers,
            capacity=self.capacity,
            sample_every=max(1, messages // self.samples) if self.samples else 0,
            keys=max(1, round(self.keys * scale)) if self.keys else 0,
        )


@attrs.frozen
class Sizes:
    """The concrete sizes one peer process is given on its command line."""

    messages: int
    warmup: int
    publishers: int
    capacity: int
    sample_every: int
    keys: int


REFERENCE = "asyncpg_asyncio"
"""Ratios of W1-W5 are against this peer, measured in the same run."""

DURABLE_PEERS = ("pgqueuer", "procrastinate", "bare_queue", "pgbus")
"""The peers of the durable workloads (W6, W7), whose reference is pgqueuer."""

KEYED_PEERS = ("dbos", "keyed_fifo", "pgbus")
"""The peers of keyed throughput (W9), whose reference is DBOS."""

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "W1",
            "inbound burst: notifications from one statement, until a consumer task has them all",
            "throughput",
            messages=50_000,
        ),
        Workload(
            "W2",
            "sequential publish, one message at a time, until a listener has them all",
            "throughput",
            messages=10_000,
        ),
        Workload(
            "W3",
            "ping-pong through PostgreSQL, round trip p50 / p99",
            "latency",
            messages=2_000,
            warmup=100,
        ),
        Workload(
            "W4",
            "50 concurrent publishers, until a listener has them all",
            "throughput",
            messages=10_000,
            publishers=50,
        ),
        Workload(
            "W5",
            "RSS growth while messages pass through a channel of capacity 1000",
            "memory",
            messages=1_000_000,
            capacity=1_000,
            samples=10,
            # Memory is pgbus's claim to check; the reference is the yardstick. The other peers
            # implement W5 too (pass --peers to include them) but would double the run time.
            default_peers=(REFERENCE, "pgbus"),
        ),
        Workload(
            "W6",
            "durable throughput: published by one process, handled by a group of 4 worker "
            "processes, until all are acknowledged",
            "throughput",
            messages=100_000,
            reference="pgqueuer",
            peers=DURABLE_PEERS,
            # procrastinate does about 500 jobs/s here: 100k would take minutes per run. Name it
            # with --peers (and a --scale) to include it.
            default_peers=("pgqueuer", "bare_queue", "pgbus"),
        ),
        Workload(
            "W7",
            "durable latency: one message at a time, publish -> handle, p50 / p99",
            "latency",
            messages=1_000,
            warmup=50,
            reference="pgqueuer",
            peers=DURABLE_PEERS,
        ),
        Workload(
            "W7L",
            "W7 while another session holds a writing transaction open in another database; "
            "ratio to W7 run just before, same peer",
            "latency",
            messages=1_000,
            warmup=50,
            reference="pgbus",
            peers=DURABLE_PEERS,
            default_peers=("pgbus",),
        ),
        Workload(
            "W6R",
            "lease renewal cost: W6 with lease 2 s and a 1 ms handler (held leases renewed every "
            "0.67 s); any message handled twice fails the run",
            "throughput",
            messages=20_000,
            reference="pgbus",
            peers=("pgbus",),
        ),
        Workload(
            "W6D",
            "W6 with a dedup_key on every message (all distinct): the cost of taking keys; "
            "compare with pgbus's W6 of the same run (target >= 80%)",
            "throughput",
            messages=100_000,
            reference="pgbus",
            peers=("pgbus",),
        ),
        Workload(
            "W10",
            "delayed lateness: messages with random delays of 0-10 s, handled by one worker "
            "process; handle time minus due time, p50 / p99 (none early)",
            "latency",
            messages=10_000,
            reference="pgbus",
            # pgqueuer's deferred jobs (execute_after) and procrastinate's scheduled ones
            # (schedule_in), measured the same way. The delays' span shrinks with the messages
            # below full size (peers/_durable_tools.py: w10_delays).
            peers=("pgqueuer", "procrastinate", "pgbus"),
        ),
        Workload(
            "W9",
            "keyed throughput: tells to 10k keys published by one process, handled one at a "
            "time per key by 4 worker processes, until every key's state is committed",
            "throughput",
            messages=100_000,
            keys=10_000,
            reference="dbos",
            peers=KEYED_PEERS,
            # DBOS handles 50-500 messages per second here: 100k would take it many minutes per
            # run. Name it with --peers (and a --scale) for the ratio against it.
            default_peers=("keyed_fifo", "pgbus"),
        ),
        Workload(
            "W9A",
            "warm keyed ask: process A asks an entity hosted by process B, one at a time, "
            "p50 / p99; ratio to W8 run just before",
            "latency",
            messages=2_000,
            warmup=100,
            keys=100,
            reference="pgbus",
            peers=("pgbus",),
        ),
        Workload(
            "W9C",
            "cold activation: process A asks entities that have state but no activation "
            "(a freshly started host), one key at a time, p50 / p99; each key then asked warm",
            "latency",
            messages=1_000,
            keys=1_000,
            reference="pgbus",
            peers=("pgbus",),
        ),
        Workload(
            "W8",
            "cross-process ask: process A asks an actor in process B, one at a time, p50 / p99",
            "latency",
            messages=2_000,
            warmup=100,
            default_peers=(REFERENCE, "pgbus"),
        ),
        Workload(
            "W8C",
            "cross-process asks, 100 in flight, until all are answered",
            "throughput",
            messages=20_000,
            publishers=100,
            default_peers=(REFERENCE, "pgbus"),
        ),
    )
}
