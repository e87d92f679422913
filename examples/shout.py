"""
A custom actor: upper-case each text message and pass it on.

Run it with the bus in ``shout.toml`` (python -m pgbus run examples/shout.toml).
"""

from typing import Any

import pgbus


class Shout(pgbus.Actor):
    """Upper-case each payload and send it to the channel named by the option *to*."""

    channel_options = ("to",)  # options that name channels: `check` makes sure they exist

    def __init__(self, to: str) -> None:
        self.to = to

    async def handle(self, message: Any) -> None:
        if isinstance(message, pgbus.Gap):  # notifications may be missing here
            return
        text = message.payload if isinstance(message, pgbus.Notification) else message
        await self.send(self.to, str(text).upper())
