"""Storing durable messages: one INSERT and one wake-up NOTIFY per batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .. import _tracing
from .._channel import Channel
from .._codec import check_payload
from .._errors import DatabaseError, PgbusError
from .._outbound import OutboundBridge
from .._pg import Connection, Database
from ._rules import WAKE_CHANNEL

log = logging.getLogger("pgbus.durable")

# One statement, so one transaction when sent alone: the rows, then one wake-up for the batch.
_STORE = """
WITH stored AS (
    INSERT INTO pgbus.messages (channel, payload) SELECT $1, p FROM unnest($2::text[]) AS p
)
SELECT pg_notify($3, $1)
"""

# Inside a caller's transaction: the wake-up is sent once, just before COMMIT (PostgreSQL would
# merge repeated ones anyway).
_STORE_ONLY = (
    "INSERT INTO pgbus.messages (channel, payload) SELECT $1, p FROM unnest($2::text[]) AS p"
)
_WAKE = "SELECT pg_notify($1, $2)"

# The same, with the publish span's context stored with each message (only while tracing).
_STORE_TRACED = """
WITH stored AS (
    INSERT INTO pgbus.messages (channel, payload, traceparent)
    SELECT $1, p, $4 FROM unnest($2::text[]) AS p
)
SELECT pg_notify($3, $1)
"""
_STORE_ONLY_TRACED = (
    "INSERT INTO pgbus.messages (channel, payload, traceparent)"
    " SELECT $1, p, $3 FROM unnest($2::text[]) AS p"
)

_ACK_IN_TRANSACTION = """
DELETE FROM pgbus.deliveries
 WHERE message_id = $1 AND group_name = $2 AND member = $3 AND attempts = $4
"""


async def store(
    connection: Connection, channel: str, payloads: Sequence[str], *, root: bool = False
) -> None:
    """
    Store *payloads* in *channel*, in order, and wake its consumers: one statement.

    While tracing, in a ``publish {channel}`` span (the current span's child, or a root with
    *root*) whose context is stored with each of them.
    """
    with _tracing.publishing(channel, len(payloads), root=root) as traceparent:
        if traceparent is None:
            await connection.execute(_STORE, channel, list(payloads), WAKE_CHANNEL)
        else:
            await connection.execute(
                _STORE_TRACED, channel, list(payloads), WAKE_CHANNEL, traceparent
            )


async def store_in_transaction(
    connection: Connection, channel: str, payloads: Sequence[str]
) -> None:
    """Store *payloads* inside the transaction open on *connection* (no wake-up yet); traced
    as `store` is."""
    with _tracing.publishing(channel, len(payloads)) as traceparent:
        if traceparent is None:
            await connection.execute(_STORE_ONLY, channel, list(payloads))
        else:
            await connection.execute(_STORE_ONLY_TRACED, channel, list(payloads), traceparent)


async def wake(connection: Connection, channels: Sequence[str]) -> None:
    for channel in channels:
        await connection.execute(_WAKE, WAKE_CHANNEL, channel)


async def ack_in_transaction(
    connection: Connection, message_id: int, group: str, member: str, attempt: int
) -> bool:
    """
    Delete the delivery inside the caller's transaction; False if this member no longer holds it.

    The row stays locked until the transaction ends, so no other member can claim it meanwhile.
    """
    tag = await connection.execute(_ACK_IN_TRANSACTION, message_id, group, member, attempt)
    return tag.endswith(" 1")


class DurableOutboundBridge(OutboundBridge):
    """
    An outbound bridge that stores what its channel receives in a durable channel.

    Each batch is one INSERT with one wake-up NOTIFY, in one transaction. Repeated payloads are
    fine here (they are rows, not notifications). Payloads are checked against *max_payload*.
    """

    direct = False  # each batch is a transaction of its own: always from the bridge's task

    def __init__(
        self, db: Database, channel: Channel, pg_channel: str, codec: str, max_payload: int
    ) -> None:
        super().__init__(db, channel, pg_channel, codec)
        self.max_payload = max_payload

    def _add(self, batch: list[str], message: object) -> None:
        try:
            payload = self._encode(self.pg_channel, message)
            batch.append(check_payload(self.pg_channel, payload, self.codec, self.max_payload))
        except PgbusError as exc:
            self.rejected += 1
            log.error(
                "durable outbound bridge %r -> %r refused a message: %s",
                self.channel.name,
                self.pg_channel,
                exc,
            )

    async def _publish(self, batch: list[str]) -> None:
        assert self._connection is not None
        try:
            # One span per batch, a root: the senders' spans stayed in their own tasks.
            await store(self._connection, self.pg_channel, batch, root=True)
        except DatabaseError as exc:
            log.error(
                "PostgreSQL refused %d durable message(s) for %r: %s",
                len(batch),
                self.pg_channel,
                exc,
            )
            self.rejected += len(batch)
        else:
            self.published += len(batch)
        batch.clear()
