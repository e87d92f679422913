"""Named Trio memory channels with explicit capacity."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ._errors import CapacityError

Capacity = int | float
"""``0`` (rendezvous), a positive ``int``, or ``math.inf``."""


def validate_capacity(value: object, where: str = "capacity") -> Capacity:
    """
    Return *value* if it is a valid channel capacity, else raise `CapacityError`.

    Valid: ``0``, a positive ``int`` or ``math.inf``. ``True``, ``2.5``, ``-1``, ``"10"`` are
    refused: a capacity is a decision about memory and back-pressure, so nothing is guessed.
    """
    if isinstance(value, bool):
        raise CapacityError(where, value)
    if isinstance(value, int):
        if value < 0:
            raise CapacityError(where, value)
        return value
    if isinstance(value, float) and value == math.inf:
        return math.inf
    raise CapacityError(where, value)


@attrs.frozen
class ChannelStatistics:
    """A snapshot of one channel."""

    name: str
    capacity: Capacity
    buffered: int
    senders_waiting: int
    receivers_waiting: int


class Channel:
    """
    A named Trio memory channel with explicit capacity, registered on a `Bus`.

    Every message goes to exactly one receiver. `sender()` and `receiver()` hand out Trio clones,
    so several tasks can send and receive; the bus keeps the originals open for its whole life,
    which is why an actor's inbox (and what is queued in it) survives the actor's restarts.
    """

    __slots__ = ("_receive", "_send", "capacity", "name", "receive_nowait", "send_nowait")

    send_nowait: Callable[[object], None]
    """
    Put a message in this channel without waiting.

    Raises `trio.WouldBlock` if the channel is full (or, at capacity 0, no receiver is waiting).
    """
    receive_nowait: Callable[[], Any]
    """Take the oldest message without waiting; raises `trio.WouldBlock` if the channel is empty."""

    def __init__(self, name: str, capacity: object) -> None:
        self.name = name
        self.capacity: Capacity = validate_capacity(capacity, f"channel {name!r}: capacity")
        self._send, self._receive = trio.open_memory_channel[object](self.capacity)
        # The Trio methods themselves, not wrappers: these two are on every message's path.
        self.send_nowait = self._send.send_nowait
        self.receive_nowait = self._receive.receive_nowait

    def __repr__(self) -> str:
        return f"<Channel {self.name!r} capacity={self.capacity}>"

    async def send(self, message: object) -> None:
        """
        Put *message* in this channel, waiting while it is full.

        Never waits when the capacity is ``math.inf``. Cancellation is atomic: the message is
        either queued or not at all.
        """
        await self._send.send(message)

    async def receive(self) -> Any:
        """
        Take the oldest message, waiting while the channel is empty.

        Typed ``Any``: a channel carries whatever its senders put in it (a `Notification` from
        an inbound bridge, your own objects from actors), so narrow it where you use it.
        """
        return await self._receive.receive()

    def sender(self) -> trio.MemorySendChannel[object]:
        """A new Trio send handle on this channel; close it when done (``async with``)."""
        return self._send.clone()

    def receiver(self) -> trio.MemoryReceiveChannel[object]:
        """A new Trio receive handle on this channel; close it when done (``async with``)."""
        return self._receive.clone()

    def statistics(self) -> ChannelStatistics:
        """Buffered messages, capacity and waiting tasks, right now."""
        stats = self._send.statistics()
        return ChannelStatistics(
            name=self.name,
            capacity=self.capacity,
            buffered=stats.current_buffer_used,
            senders_waiting=stats.tasks_waiting_send,
            receivers_waiting=stats.tasks_waiting_receive,
        )

    def close(self) -> None:
        """Close the bus's own handles; receivers drain what is queued, then see end-of-channel."""
        self._send.close()
        self._receive.close()
