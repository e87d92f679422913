"""`Relay`: forward each message's payload to another channel."""

from __future__ import annotations

import logging
from typing import Any

import pgbus

log = logging.getLogger("pgbus.actors")


class Relay(pgbus.Actor):
    """
    Forward each message's payload to the channel named *to*, waiting while it is full.

    A `pgbus.Notification` or a `pgbus.DurableMessage` is forwarded as its ``payload`` (a
    durable message is acknowledged once forwarded); any other message as it is. A
    `pgbus.Gap` carries no payload: it is logged as a warning and nothing is forwarded.
    """

    channel_options = ("to",)

    def __init__(self, to: str) -> None:
        if not isinstance(to, str) or not to:
            raise ValueError(f"'to' must be a non-empty channel name (got {to!r}).")
        self.to = to

    async def handle(self, message: Any) -> None:
        if isinstance(message, pgbus.Gap):
            log.warning(
                "actor %r: notifications may be missing from Postgres channel %r (%s, dropped: %s);"
                " nothing forwarded to %r",
                self.name,
                message.channel,
                message.reason,
                "unknown" if message.dropped is None else message.dropped,
                self.to,
            )
            return
        carries_payload = isinstance(message, (pgbus.Notification, pgbus.DurableMessage))
        payload = message.payload if carries_payload else message
        await self.bus.send(self.to, payload)
