"""Small actor classes for the configuration tests."""

from __future__ import annotations

from typing import Any

import pgbus


class Echo(pgbus.Actor):
    """Sends each message on to the channel *to*, with *prefix* in front."""

    def __init__(self, to: str, prefix: str = "") -> None:
        self.to = to
        self.prefix = prefix

    async def handle(self, message: Any) -> None:
        await self.send(self.to, f"{self.prefix}{message}")


class Sink(pgbus.Actor):
    """Takes no options and drops every message."""

    async def handle(self, message: Any) -> None:
        pass


class NotAnActor:
    """A class that does not derive from pgbus.Actor."""


def not_a_class() -> None:
    """A function, where a class is expected."""


class Fanout(pgbus.Actor):
    """Names two channels in its options, one with a default: both are checked."""

    channel_options = ("to", "audit")

    def __init__(self, to: str, audit: str = "audit") -> None:
        self.to = to
        self.audit = audit

    async def handle(self, message: Any) -> None:
        await self.send(self.to, message)
        await self.send(self.audit, message)


class SlowPrinter(pgbus.Actor):
    """Prints each notification's payload on a line of its own, flushed, after *delay* seconds."""

    def __init__(self, delay: float = 0.001) -> None:
        self.delay = delay

    async def handle(self, message: Any) -> None:
        import sys

        import trio

        await trio.sleep(self.delay)
        payload = getattr(message, "payload", None)
        print(payload if payload is not None else repr(message), flush=True)
        sys.stdout.flush()
