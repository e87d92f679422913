"""
Durable channels: the message they deliver and every rule and default they share.

No driver here: the TOML loader, the bus and the SQL modules all check options with these.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

import attrs

from .._errors import ConfigError, SettingError

WAKE_CHANNEL = "pgbus_durable"
"""The Postgres channel publishers NOTIFY after storing messages; the payload names the channel."""

MOVER_CHANNEL = "pgbus_delayed"
"""The Postgres channel publishers of delayed messages NOTIFY so movers wake up early."""

DEFAULT_DEDUP_WINDOW = 3600.0
"""Seconds a ``dedup_key`` stays taken after the message that took it was stored (1 hour)."""

MAX_DURABLE_PAYLOAD_BYTES = 1 << 20
"""Default limit of one durable payload (1 MiB): ``open_bus(durable_max_payload=...)``."""

START_POSITIONS: tuple[str, ...] = ("latest", "earliest")
DEFAULT_START = "latest"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_AFTER = 1.0
DEFAULT_LEASE = 30.0
DEFAULT_RETENTION = 7 * 24 * 3600.0
MIN_RETENTION = 300.0
"""Members refresh their group's ``seen_at`` once a minute; less would retire live groups."""

MAX_GROUP_NAME_BYTES = 63


@attrs.frozen
class DurableMessage:
    """
    One message of a durable channel, as a durable inbound bridge delivers it.

    An actor's ``handle`` returning acknowledges it; raising schedules a retry (see
    `Bus.bridge_in`). Other consumers call ``bus.ack(message)`` or ``bus.nack(message)``.
    """

    channel: str
    """The durable channel it was published to."""
    payload: Any
    """The payload, decoded by the bridge's codec."""
    id: int
    """Its id, unique across all durable channels; ascending in publishing order per publisher."""
    attempt: int
    """1 on first delivery, then 2, 3, ... (a retry or an expired lease counts)."""
    group: str
    """The consumer group this delivery belongs to."""
    _receipt: Any = attrs.field(eq=False, repr=False, alias="receipt")
    """The bridge that claimed it (acknowledgements go back through it)."""
    _trace: str | None = attrs.field(default=None, eq=False, repr=False, alias="trace")
    """None when the bridge traced nothing when claiming it; else the stored ``traceparent``
    of its publish span, or "" (published without one): its ``handle`` then runs in a span."""


def validate_group(group: object, where: str = "group") -> str:
    if not isinstance(group, str) or not group:
        raise ConfigError(f"{where} must be a non-empty string (got {group!r}).")
    if "\x00" in group or len(group.encode()) > MAX_GROUP_NAME_BYTES:
        raise ConfigError(
            f"{where} must be at most {MAX_GROUP_NAME_BYTES} bytes without NUL (got {group!r})."
        )
    return group


def validate_start(start: object) -> str:
    if start not in START_POSITIONS:
        allowed = ", ".join(map(repr, START_POSITIONS))
        raise ConfigError(f"start must be one of {allowed} (got {start!r}).")
    return str(start)


def validate_max_attempts(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_attempts must be an integer >= 1 (got {value!r}).")
    return value


def validate_seconds(name: str, value: object, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number of seconds > {minimum:g} (got {value!r}).")
    if not (minimum < value < math.inf):
        raise ConfigError(f"{name} must be a number of seconds > {minimum:g} (got {value!r}).")
    return float(value)


def validate_retention(value: object) -> float:
    seconds = validate_seconds("retention", value)
    if seconds < MIN_RETENTION:
        raise ConfigError(f"retention must be at least {MIN_RETENTION:g} seconds (got {value!r}).")
    return seconds


def validate_prefetch(channel: str, capacity: float) -> int:
    """A durable bridge claims at most its channel's capacity: that must be a positive integer."""
    if capacity == math.inf or capacity < 1:
        shown = "inf" if capacity == math.inf else f"{capacity:g}"
        raise ConfigError(
            f"a durable inbound bridge claims at most what channel {channel!r} can hold, so its "
            f"capacity must be a positive integer (got {shown})."
        )
    return int(capacity)


def validate_max_payload(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"durable_max_payload must be a positive number of bytes (got {value!r})."
        )
    return value


def validate_dedup_key(value: object) -> str | None:
    """None (no deduplication) or a non-empty string without NUL."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        raise SettingError("dedup_key", "must be a non-empty string without NUL", value=value)
    return value


def validate_dedup_window(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise SettingError("dedup_window", "must be a number of seconds > 0", value=value)
    return float(value)


def validate_delay(value: object) -> float | None:
    """None (no delay) or a finite number of seconds >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise SettingError("delay", "must be a number of seconds >= 0", value=value)
    return float(value)


def validate_at(value: object) -> datetime.datetime | None:
    """None or an aware `datetime.datetime` (a naive one's time zone would be a guess)."""
    if value is None:
        return None
    if not isinstance(value, datetime.datetime):
        raise SettingError("at", "must be an aware datetime.datetime", value=value)
    if value.tzinfo is None or value.utcoffset() is None:
        raise SettingError(
            "at", "must be an aware datetime (with tzinfo; naive times are ambiguous)", value=value
        )
    return value


def validate_timing(delay: object, at: object) -> tuple[float | None, datetime.datetime | None]:
    """*delay* and *at* checked together: at most one of them."""
    checked_delay, checked_at = validate_delay(delay), validate_at(at)
    if checked_delay is not None and checked_at is not None:
        raise SettingError("delay", "and at cannot both be given; pass one of them")
    return checked_delay, checked_at


def loose_scan(cte: str, table: str, column: str) -> str:
    """
    ``RECURSIVE cte(column)``: the distinct values of *table*'s *column* (the first column of an
    index), one index probe each instead of a pass over the table; the last row is NULL. For
    pgbus's own constant names only (never a user's: they are formatted in).
    """
    return f"""{cte} AS (
    (SELECT t.{column} FROM {table} t ORDER BY t.{column} LIMIT 1)
    UNION ALL
    SELECT (SELECT t.{column} FROM {table} t WHERE t.{column} > {cte}.{column}
             ORDER BY t.{column} LIMIT 1)
      FROM {cte} WHERE {cte}.{column} IS NOT NULL
)"""
