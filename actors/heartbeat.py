"""`Heartbeat`: a tick on a channel at a steady rate."""

from __future__ import annotations

import math

import trio

import pgbus


class Heartbeat(pgbus.Actor):
    """
    Send ``f"{message} {n}"`` (n = 1, 2, ...) to the channel *to* every *every* seconds.

    Ticks follow a fixed schedule (the first *every* seconds after start), so a slow send does
    not make later ticks drift. If sending blocked for longer than a period, the next tick goes
    out at once and the schedule continues from there: missed ticks are not sent in a burst.
    Counting starts again at 1 after a restart.
    """

    channel_options = ("to",)

    def __init__(self, to: str, every: float = 1.0, message: str = "tick") -> None:
        if not isinstance(to, str) or not to:
            raise ValueError(f"'to' must be a non-empty channel name (got {to!r}).")
        if (
            isinstance(every, bool)
            or not isinstance(every, int | float)
            or not 0 < every < math.inf
        ):
            raise ValueError(f"'every' must be a positive number of seconds (got {every!r}).")
        if not isinstance(message, str):
            raise TypeError(f"'message' must be a string (got {message!r}).")
        self.to = to
        self.every = float(every)
        self.message = message

    async def run(self) -> None:
        deadline = trio.current_time()
        n = 0
        while True:
            deadline += self.every
            await trio.sleep_until(deadline)
            n += 1
            await self.bus.send(self.to, f"{self.message} {n}")
            deadline = max(deadline, trio.current_time() - self.every)
