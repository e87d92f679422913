"""
Bridges between PostgreSQL channels and Trio channels: what both directions share.

Inbound (`_inbound.Listener`): one listening connection per bus feeds every route, a Postgres
channel mapped to a Trio channel. Outbound (`_outbound.OutboundBridge`): one per Trio channel,
publishing what is queued there to a Postgres channel, in batches. Here: the messages a bridge
delivers (`Notification`, `Gap`), its statistics, and reconnecting with backoff.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import attrs
import trio

from ._errors import DatabaseUnavailableError
from ._pg import Connection, Database

log = logging.getLogger("pgbus.bridge")

DIRECTIONS: tuple[str, ...] = ("in", "out")
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_newest", "drop_oldest")


@attrs.frozen
class Notification:
    """One PostgreSQL notification, as an inbound bridge delivers it."""

    channel: str
    """The Postgres channel it was sent to, exactly."""
    payload: Any
    """The payload, decoded by the bridge's codec (``str`` for text)."""
    pid: int
    """The backend pid of the sender (this bus's own connections are in ``bus.own_pids``)."""


def _fast_constructor(cls: type) -> Any:
    """
    Build a frozen attrs instance by setting its slots directly.

    Equivalent to ``cls(*values)`` (no validators or converters are involved) at about half the
    cost: frozen attrs classes set each field through ``object.__setattr__``. Used once per
    notification on the inbound hot path.
    """
    new = object.__new__
    setters = [cls.__dict__[field.name].__set__ for field in attrs.fields(cls)]
    channel_set, payload_set, pid_set = setters

    def make(channel: str, payload: Any, pid: int) -> Any:
        instance: Any = new(cls)
        channel_set(instance, channel)
        payload_set(instance, payload)
        pid_set(instance, pid)
        return instance

    return make


make_notification = _fast_constructor(Notification)


@attrs.frozen
class Gap:
    """
    A marker in an inbound stream: notifications may be missing at this point.

    ``reason`` is ``"reconnect"`` (the listening connection broke; whatever was sent while it was
    down is lost, ``dropped`` is None because nobody knows how much) or ``"overflow"`` (the Trio
    channel was full and the bridge's overflow policy dropped ``dropped`` notifications).
    """

    channel: str
    reason: str
    dropped: int | None


@attrs.frozen
class BridgeStatistics:
    """Counters of one bridge since the bus opened."""

    postgres: str
    channel: str
    direction: str
    messages: int
    """Delivered (in) or published (out)."""
    dropped: int
    """Dropped by the overflow policy (in)."""
    rejected: int
    """Refused by the codec: malformed JSON in, oversized or unencodable payloads out."""
    reconnects: int
    gaps: int = 0
    """`Gap` markers queued into the stream (in): one per reconnect, one per run of drops."""
    connected: bool = True
    """Whether the bridge has a connection now (False while it reconnects)."""


class Backoff:
    """Capped exponential backoff with full jitter; the first retry is immediate."""

    def __init__(self, initial: float = 0.05, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        if self.failures == 1:
            return 0.0
        return random.uniform(0, min(self.maximum, self.initial * 2 ** (self.failures - 2)))

    def reset(self) -> None:
        self.failures = 0


async def connect_with_retry(
    db: Database, purpose: str, backoff: Backoff, **kwargs: Any
) -> Connection:
    """Connect, retrying with *backoff* while the server is unreachable; fatal errors raise."""
    while True:
        try:
            connection = await db.connect(purpose, **kwargs)
        except DatabaseUnavailableError as exc:
            if exc.fatal:
                raise
            delay = backoff.next_delay()
            level = (
                logging.WARNING
                if backoff.failures in (1, 2) or backoff.failures % 20 == 0
                else logging.DEBUG
            )
            log.log(level, "%s: %s; retrying in %.1fs", purpose, exc, delay)
            await trio.sleep(delay)
            continue
        if backoff.failures:
            log.warning("%s: connected to %s again", purpose, db.where)
        backoff.reset()
        return connection
