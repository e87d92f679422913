"""
What the keyed workload (W9) shares, whatever the peer: its messages and the checks of its state.

Message *i* of *n* goes to key ``k{i % keys}`` with sequence number ``i // keys`` (so every key
gets ``n // keys`` messages, spread through the whole stream) and carries ``"key:seq"``. Every
peer's handler keeps, per key, a count of the messages it handled (its state) and checks that
the message's sequence number equals the count before it: a message handled out of its key's
order, twice, or after one that was lost is reported as a problem and fails the run. After the
clock, the peer reads every key's committed count: each must equal the key's messages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs

from ._protocol import WorkloadError


@attrs.frozen
class KeyedMessage:
    key: str
    seq: int

    @property
    def payload(self) -> str:
        return f"{self.key}:{self.seq}"


def keyed_messages(messages: int, keys: int) -> list[KeyedMessage]:
    """The W9 stream: *messages* messages over *keys* keys, in publishing order."""
    return [KeyedMessage(f"k{i % keys}", i // keys) for i in range(messages)]


def parse_payload(payload: str) -> tuple[str, int]:
    key, _, seq = payload.rpartition(":")
    return key, int(seq)


def out_of_order(key: str, seq: int, count_before: int) -> str | None:
    """The problem with handling message *seq* of *key* when its state counts *count_before*."""
    if seq == count_before:
        return None
    return f"key {key!r}: message {seq} handled when its state counted {count_before}"


def check_counts(counts: Mapping[str, int], stream: list[KeyedMessage]) -> None:
    """Fail unless every key's committed count equals the number of messages sent to it."""
    expected: dict[str, int] = {}
    for message in stream:
        expected[message.key] = expected.get(message.key, 0) + 1
    wrong = {k: (counts.get(k, 0), n) for k, n in expected.items() if counts.get(k, 0) != n}
    extra = set(counts) - set(expected)
    if wrong or extra:
        sample = ", ".join(f"{k}: {got} (sent {n})" for k, (got, n) in list(wrong.items())[:3])
        raise WorkloadError(
            f"{len(wrong)} key(s) with a wrong committed count ({sample}); "
            f"{len(extra)} unexpected key(s)"
        )


def check_keyed_finals(
    finals: list[dict[str, Any]], stream: list[KeyedMessage], workers: int
) -> dict[str, Any]:
    """
    Every message handled at least once, no problem seen by a handler; the workers' RSS, and
    how many handler calls were repeats (allowed: effects commit exactly once, and the
    committed counts are checked separately, but a repeat is work the peer did twice).
    """
    if len(finals) != workers:
        raise WorkloadError(f"{workers - len(finals)} worker(s) sent no final report")
    problems = [p for f in finals for p in f.get("problems", [])]
    if problems:
        raise WorkloadError(f"{len(problems)} problem(s) in the workers, first: {problems[0]}")
    handled = Counter(p for f in finals for p in f["payloads"])
    expected = {m.payload for m in stream}
    missing = expected - set(handled)
    unexpected = set(handled) - expected
    if missing or unexpected:
        raise WorkloadError(
            f"{len(missing)} message(s) never handled, {len(unexpected)} never sent"
        )
    rss = [f["rss"] / 2**20 for f in finals]
    return {
        "handled_again": sum(handled.values()) - len(expected),
        "worker_rss_mb": [round(r, 1) for r in rss],
        "worker_rss_max_mb": max(rss),
    }
