"""
What both bridge directions share, free of the driver: the `Bridge` handle, `BridgeStatistics`,
and the rules of a bridge's options (directions, overflow policies), which the TOML loader and
the Python API both use.

Inbound (`_inbound.InboundBridge`): one listening connection per bus feeds every route, a
Postgres channel mapped to a Trio channel. Outbound (`_outbound.OutboundBridge`): one per Trio
channel, publishing what is queued there to a Postgres channel, in batches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs

from ._channel import Channel
from ._errors import ConfigError

DIRECTIONS: tuple[str, ...] = ("in", "out")
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_newest", "drop_oldest")


def validate_overflow(overflow: str, channel: Channel) -> str:
    """Return *overflow* if it is a policy *channel* can follow, else raise `ConfigError`."""
    if overflow not in OVERFLOW_POLICIES:
        allowed = ", ".join(map(repr, OVERFLOW_POLICIES))
        raise ConfigError(f"overflow must be one of {allowed} (got {overflow!r}).")
    if overflow != "block" and channel.capacity < 2:
        raise ConfigError(
            f"overflow {overflow!r} needs channel {channel.name!r} to hold at least 2 messages "
            f"(the gap marker and the newest message), but its capacity is {channel.capacity}."
        )
    return overflow


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
    connected: bool = True
    """Whether the bridge's connection is up right now."""
    gaps: int = 0
    """`Gap` markers put into the stream (in): one per reconnect, one per run of drops."""


class Bridge:
    """
    A running bridge, as `Bus.bridge_in` and `Bus.bridge_out` return it.

    Made by the bus only; `aclose` removes it (the bus removes every bridge when it closes).
    """

    def __init__(self, description: str, close: Callable[[], Awaitable[None]]) -> None:
        self.description = description
        self._close: Callable[[], Awaitable[None]] | None = close

    def __repr__(self) -> str:
        return f"<Bridge {self.description}>"

    async def aclose(self) -> None:
        """Remove the bridge (an inbound one UNLISTENs if it was the channel's last)."""
        close, self._close = self._close, None
        if close is not None:
            await close()
