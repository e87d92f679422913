"""`Printer`: each message as one line of JSON."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any, TextIO

import pgbus

log = logging.getLogger("pgbus.actors")


class Printer(pgbus.Actor):
    """
    Print each message as one JSON line, flushed, to stdout (or *stream*).

    A `pgbus.Notification` prints as ``{"channel", "payload", "pid"}``; a `pgbus.Gap` as
    ``{"channel", "gap", "dropped"}`` (``gap`` is its reason); a `pgbus.DurableMessage` as
    ``{"channel", "payload", "id", "attempt"}`` (acknowledged once printed); any other message as
    ``{"channel", "payload"}`` with this actor's inbox as the channel. Whatever JSON cannot
    represent is printed as its ``repr``, never dropped. Writing blocks the bus while the stream
    does (a terminal or pipe that stops reading stalls it).

    When the reader goes away (``pgbus run bus.toml | head -2``: a broken pipe), the printer
    says so in one warning line and discards what it receives from then on; it does not fail,
    so it is not restarted, and the rest of the bus runs on until it is stopped.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._closed = False

    async def handle(self, message: Any) -> None:
        if self._closed:
            return
        # Looked up on every message, so a replaced sys.stdout (pytest's capsys) is honoured.
        stream = sys.stdout if self.stream is None else self.stream
        try:
            stream.write(format_line(message, self._channel_name()) + "\n")
            stream.flush()
        except BrokenPipeError:
            self._closed = True
            _point_at_devnull(stream)
            log.warning(
                "printer %r: its output was closed (broken pipe); "
                "it discards the messages it receives from now on",
                self.name,
            )

    def _channel_name(self) -> str:
        return self.inbox.name if self.inbox is not None else self.name


def _point_at_devnull(stream: TextIO) -> None:
    """
    Point *stream*'s file descriptor at /dev/null: what its buffer still holds (and Python's
    flush at exit) then goes nowhere, instead of failing again with a traceback.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


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
