"""`Printer`: each message as one line of JSON."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import pgbus


class Printer(pgbus.Actor):
    """
    Print each message as one JSON line, flushed, to stdout (or *stream*).

    A `pgbus.Notification` prints as ``{"channel", "payload", "pid"}``; a `pgbus.Gap` as
    ``{"channel", "gap", "dropped"}`` (``gap`` is its reason); a `pgbus.DurableMessage` as
    ``{"channel", "payload", "id", "attempt"}`` (acknowledged once printed); any other message as
    ``{"channel", "payload"}`` with this actor's inbox as the channel. Whatever JSON cannot
    represent is printed as its ``repr``, never dropped. Writing blocks the bus while the stream
    does (a terminal or pipe that stops reading stalls it).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    async def handle(self, message: Any) -> None:
        # Looked up on every message, so a replaced sys.stdout (pytest's capsys) is honoured.
        stream = sys.stdout if self.stream is None else self.stream
        stream.write(format_line(message, self._channel_name()) + "\n")
        stream.flush()

    def _channel_name(self) -> str:
        return self.inbox.name if self.inbox is not None else self.name


def format_line(message: object, channel: str) -> str:
    """The JSON line `Printer` prints for *message*, received from the channel *channel*."""
    record: dict[str, object]
    if isinstance(message, pgbus.Notification):
        record = {"channel": message.channel, "payload": message.payload, "pid": message.pid}
    elif isinstance(message, pgbus.Gap):
        record = {"channel": message.channel, "gap": message.reason, "dropped": message.dropped}
    elif isinstance(message, pgbus.DurableMessage):
        record = {
            "channel": message.channel,
            "payload": message.payload,
            "id": message.id,
            "attempt": message.attempt,
        }
    else:
        record = {"channel": channel, "payload": message}
    try:
        return _dumps(record)
    except (TypeError, ValueError):
        # Beyond default=repr: non-string dict keys, or a structure that contains itself.
        return _dumps({**record, "payload": repr(record.get("payload"))})


def _dumps(record: dict[str, object]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=repr)
