"""
The contract between the harness and a peer process: its arguments, its one JSON line, its exit.

A peer prints exactly one JSON object on stdout and exits with:

- 0 and ``{"ok": true, ...metrics}`` when the workload completed and its messages checked out;
- 1 and ``{"ok": false, "error": "..."}`` when it failed (a timeout, a lost message, a crash);
- 3 and ``{"ok": false, "unavailable": "..."}`` when the peer cannot run that workload at all
  (the harness shows "n/a" and does not retry it).

Metrics: ``msg_per_s`` (W1, W2, W4), ``p50_us``/``p99_us`` (W3), ``rss_growth_mb`` (W5), plus
``seconds`` and ``messages``; anything extra (raw RSS samples) is kept in ``--json`` output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ..workloads import WORKLOADS

Result = dict[str, Any]

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3


class PeerUnavailableError(Exception):
    """This peer cannot run this workload (not implemented, or its library is missing)."""


class WorkloadError(Exception):
    """The workload ran but did not complete correctly: a timeout or wrong messages."""


@attrs.frozen
class PeerArgs:
    """One run: which workload, where, how big, on which PostgreSQL channel names."""

    workload: str
    dsn: str
    channel: str
    """Prefix of every PostgreSQL channel this run uses; unique per run so runs never mix."""
    messages: int
    warmup: int
    publishers: int
    capacity: int
    sample_every: int
    keys: int
    """W9, W9A, W9C: how many distinct keys the messages go to."""
    timeout: float
    """Seconds each wait for messages may take before the run fails."""
    application_name: str
    """Set on every connection, so the harness can find any backend left behind."""


def parse_args(peer: str, argv: Sequence[str] | None) -> PeerArgs:
    """Parse a peer's command line; sizes default to the full-size workload."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.peers.{peer}", description=f"Run one workload on {peer}."
    )
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--dsn", required=True, help="PostgreSQL URI")
    parser.add_argument("--channel", default=None, help="channel name prefix (default: bench_w1)")
    parser.add_argument("--messages", type=int, help="messages (W3: round trips)")
    parser.add_argument("--warmup", type=int, help="W3: warm-up round trips")
    parser.add_argument("--publishers", type=int, help="W4: concurrent publishers")
    parser.add_argument("--capacity", type=int, help="W5: channel capacity")
    parser.add_argument("--sample-every", type=int, help="W5: messages between RSS samples")
    parser.add_argument("--keys", type=int, help="W9: distinct keys")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per wait")
    ns = parser.parse_args(argv)
    sizes = WORKLOADS[ns.workload].sizes(1.0)

    def pick(value: int | None, default: int) -> int:
        return default if value is None else value

    return PeerArgs(
        workload=ns.workload,
        dsn=ns.dsn,
        channel=ns.channel or f"bench_{ns.workload.lower()}",
        messages=pick(ns.messages, sizes.messages),
        warmup=pick(ns.warmup, sizes.warmup),
        publishers=pick(ns.publishers, sizes.publishers),
        capacity=pick(ns.capacity, sizes.capacity),
        sample_every=pick(ns.sample_every, sizes.sample_every),
        keys=pick(ns.keys, sizes.keys),
        timeout=ns.timeout,
        application_name=f"bench-{peer}",
    )


def run_peer(peer: str, run: Callable[[PeerArgs], Result], argv: Sequence[str] | None) -> int:
    """Parse *argv*, call ``run(args)``, print the one JSON line and return the exit status."""
    args = parse_args(peer, argv)
    header = {"peer": peer, "workload": args.workload}
    try:
        result = run(args)
    except PeerUnavailableError as exc:
        _emit({**header, "ok": False, "unavailable": str(exc)})
        return EXIT_UNAVAILABLE
    except BaseException as exc:
        # Anything else is this cell's failure, reported in the table; the traceback goes to
        # stderr, which the harness shows when asked (--verbose).
        traceback.print_exc()
        _emit({**header, "ok": False, "error": _describe(exc)})
        return EXIT_FAILED
    _emit({**header, "ok": True, **result})
    return 0


def _describe(exc: BaseException) -> str:
    # Unwrap the single-exception groups Trio nurseries and asyncio TaskGroups produce.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _emit(record: Result) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# --- what every peer measures the same way ---------------------------------------------------

clock = time.perf_counter


def throughput(messages: int, seconds: float) -> Result:
    """The result of a throughput workload: *messages* delivered in *seconds*."""
    return {"messages": messages, "seconds": seconds, "msg_per_s": messages / seconds}


def latency(round_trips_s: Sequence[float]) -> Result:
    """The result of W3 from each round trip's duration in seconds."""
    micros = sorted(t * 1e6 for t in round_trips_s)
    return {
        "messages": len(micros),
        "seconds": sum(round_trips_s),
        "p50_us": statistics.median(micros),
        "p99_us": _percentile(micros, 0.99),
        "max_us": micros[-1],
    }


def memory(rss_samples: Sequence[int], messages: int, seconds: float) -> Result:
    """The result of W5 from RSS samples in bytes, the first taken before any message."""
    mb = [s / 2**20 for s in rss_samples]
    return {
        **throughput(messages, seconds),
        "rss_growth_mb": mb[-1] - mb[0],
        "rss_peak_growth_mb": max(mb) - mb[0],
        "rss_samples_mb": [round(x, 2) for x in mb],
    }


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    # Nearest rank: with 2,000 samples p99 is the 1,980th, a value that was really observed.
    rank = max(1, round(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def check_payloads(received: Sequence[str], expected: Sequence[str], *, ordered: bool) -> None:
    """
    Fail the run unless *received* is exactly *expected* (in order, when *ordered*).

    Checked after the clock stops: a benchmark that loses or duplicates messages is not fast.
    """
    if len(received) != len(expected):
        raise WorkloadError(f"received {len(received)} messages, expected {len(expected)}")
    if (list(received) if ordered else sorted(received)) != (
        list(expected) if ordered else sorted(expected)
    ):
        detail = "in the sent order" if ordered else "as a set"
        raise WorkloadError(f"received messages differ from those sent ({detail})")


def stalled(what: str, got: int, wanted: int, timeout: float) -> WorkloadError:
    """The error for a wait that timed out, saying how far it got."""
    return WorkloadError(f"{what}: {got} of {wanted} messages within {timeout:g}s")


async def read_ready_line(process: Any, timeout: float, what: str) -> None:
    """Wait (at most *timeout* s, with trio) for a started *process* to print ``ready``."""
    import trio

    assert process.stdout is not None
    said = b""
    with trio.fail_after(timeout):
        while not said.endswith(b"\n"):
            chunk = await process.stdout.receive_some()
            if not chunk:
                break
            said += chunk
    if said != b"ready\n":
        raise WorkloadError(f"{what} did not start (said {said!r})")
