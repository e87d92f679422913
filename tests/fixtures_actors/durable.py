"""An actor for the durable crash tests: records each message it handles as a row."""

from __future__ import annotations

import os

import trio

import pgbus


class RecordEffect(pgbus.Actor):
    """
    Insert ``(message_id, payload, pid)`` into *table* for each durable message.

    With *exactly_once* the insert and the acknowledgement share one transaction
    (``bus.transaction(ack=message)``); otherwise the insert commits first and the ack follows
    when handle returns (at-least-once). *pause* seconds after each message keep it mid-stream.
    """

    def __init__(self, table: str, exactly_once: bool = False, pause: float = 0.0) -> None:
        self.table = table
        self.exactly_once = exactly_once
        self.pause = pause
        self.sql = f'INSERT INTO "{table}" (message_id, payload, pid) VALUES ($1, $2, $3)'

    async def handle(self, message: pgbus.DurableMessage) -> None:
        ack = message if self.exactly_once else None
        async with self.bus.transaction(ack=ack) as tx:
            await tx.execute(self.sql, message.id, message.payload, os.getpid())
        if self.pause:
            await trio.sleep(self.pause)
