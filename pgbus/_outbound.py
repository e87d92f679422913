"""Outbound: publishing what is queued in a Trio channel to a Postgres channel, in batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import trio

from ._bridge import BridgeStatistics
from ._channel import Channel
from ._codec import check_payload, encoder, validate_channel_name
from ._errors import DatabaseError, DatabaseUnavailableError, PgbusError
from ._pg import Backoff, Connection, Database, Statement, connect_with_retry

log = logging.getLogger("pgbus.bridge")

MAX_BATCH = 5000
"""The most messages one outbound round trip carries."""


class OutboundBridge:
    """
    Publishes what is queued in a Trio channel to a Postgres channel.

    Whatever queued while the previous round trip was in flight goes in the next one, as a single
    statement (so one transaction): no added latency when idle, one round trip per batch under
    load. A batch never holds the same payload twice — PostgreSQL would merge the two — so such a
    batch is split in order. A batch not confirmed before the connection breaks is published again
    after reconnecting (at-least-once).

    An idle bridge lets the sender start the statement itself (`offer`): the message is
    written to the server from the sender's task, with no hop through the bridge's task, which
    then only reads the reply. Busy, it batches as above.
    """

    direct = True
    """Whether senders may start this bridge's statements themselves (`offer`)."""

    def __init__(self, db: Database, channel: Channel, pg_channel: str, codec: str) -> None:
        self._db = db
        self.channel = channel
        self.pg_channel = validate_channel_name(pg_channel)
        self.codec = codec
        self._encode = encoder(codec)
        self._connection: Connection | None = None
        self._stopping = False
        self._receiver = channel.receiver()  # this bridge's own handle, closed to wake it
        self._parked = False  # waiting on an empty channel with nothing in flight
        self._in_flight: Statement | None = None  # a statement `offer` began
        self._batch: list[str] = []  # taken from the channel, not yet confirmed by the server
        self._loaded = False  # the last batch held more than one message
        self.published = 0
        self.rejected = 0
        self.reconnects = 0

    def statistics(self) -> BridgeStatistics:
        return BridgeStatistics(
            self.pg_channel,
            self.channel.name,
            "out",
            self.published,
            0,
            self.rejected,
            self.reconnects,
            self._connection is not None and not self._connection.closed,
        )

    @property
    def pending(self) -> int:
        """Messages not yet confirmed published: queued in the channel or in the batch in flight."""
        return self.channel.statistics().buffered + len(self._batch)

    def finish(self) -> None:
        """Publish what is queued, then return from `serve` (the caller bounds the wait)."""
        self._stopping = True
        if self._parked:
            self._receiver.close()

    def offer(self, message: object) -> bool:
        """
        Start publishing *message* from the caller's task if this bridge is idle; False if it
        is busy (the caller queues the message in the channel instead).

        Idle means: the bridge waits on an empty channel, nothing is in flight, and no message
        was just handed to it (by a sender that went through the channel itself). The bridge
        task then wakes to read the reply, while the server works on the statement, and
        handles a failure as for any batch: refusal logged and counted, reconnect and publish
        again.
        """
        connection = self._connection
        if (
            not self._parked
            or self._receiver.statistics().tasks_waiting_receive != 1
            or connection is None
            or connection.closed
        ):
            return False
        batch = self._batch  # empty while parked
        self._add(batch, message)
        if batch:  # else refused (logged and counted), like a queued message would be
            self._parked = False
            self._loaded = False
            self._in_flight = self._db.start_publish(connection, self.pg_channel, batch)
            self._receiver.close()  # wakes the bridge, which finishes the statement
        return True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff()
        purpose = f"publish {self.pg_channel}"
        self._connection = await connect_with_retry(self._db, purpose, backoff)
        task_status.started()
        try:
            batch = self._batch
            while True:
                if not await self._collect(batch):
                    return
                while batch:
                    try:
                        if self._in_flight is not None:
                            await self._confirm(batch)
                        else:
                            await self._publish(batch)
                    except DatabaseUnavailableError as exc:
                        log.warning("%s; %d message(s) will be sent again", exc, len(batch))
                        await self._reconnect(purpose, backoff)
        finally:
            self._receiver.close()
            connection, self._connection = self._connection, None
            if connection is not None:
                with trio.CancelScope(shield=True):
                    await connection.aclose()

    async def _reconnect(self, purpose: str, backoff: Backoff) -> None:
        old, self._connection = self._connection, None
        if old is not None:
            await old.aclose()
        self._connection = await connect_with_retry(self._db, purpose, backoff)
        self.reconnects += 1

    async def _collect(self, batch: list[str]) -> bool:
        """Fill *batch* with what is queued, waiting for the first message; False when done."""
        receive_nowait = self.channel.receive_nowait
        if self._loaded:
            # Under load, let the senders that are ready run first: the reply to the last
            # batch may have woken us in the same scheduler pass as them. One pass per round
            # trip (about 13 µs) makes batches, so transactions, the server's main cost, several
            # times larger. Idle (the last batch was one message), it would only add a task
            # step to every round trip.
            await trio.lowlevel.checkpoint()
        while not batch:
            try:
                message = receive_nowait()
            except trio.WouldBlock:
                if self._stopping:
                    return False
                self._parked = True
                try:
                    message = await self._receiver.receive()
                except trio.ClosedResourceError:
                    # offer() began a statement (its message is in the batch), or finish().
                    self._receiver = self.channel.receiver()
                    continue
                except trio.EndOfChannel:
                    return False
                finally:
                    self._parked = False
            except trio.EndOfChannel:
                return False
            self._add(batch, message)
            while len(batch) < MAX_BATCH:
                try:
                    message = receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self._add(batch, message)
        return True

    def _add(self, batch: list[str], message: object) -> None:
        try:
            batch.append(check_payload(self.pg_channel, self._encode(self.pg_channel, message)))
        except PgbusError as exc:
            self.rejected += 1
            log.error(
                "outbound bridge %r -> %r refused a message: %s",
                self.channel.name,
                self.pg_channel,
                exc,
            )

    async def _confirm(self, batch: list[str]) -> None:
        """Read the reply to the statement `offer` began for ``batch[0]``."""
        assert self._connection is not None
        assert self._in_flight is not None
        statement, self._in_flight = self._in_flight, None
        try:
            await self._connection.finish(statement)
        except DatabaseError as exc:
            self._refused(exc)
        else:
            self.published += 1
        del batch[:1]

    def _refused(self, exc: DatabaseError) -> None:
        self.rejected += 1
        log.error("PostgreSQL refused a message for channel %r: %s", self.pg_channel, exc)

    async def _publish(self, batch: list[str]) -> None:
        """Publish *batch*, removing each part from it once the server confirmed it."""
        self._loaded = len(batch) > 1
        for run in list(_without_repeats(batch)):
            refused = await self._publish_run(run)
            del batch[: len(run)]
            self.published += len(run) - refused

    async def _publish_run(self, run: list[str]) -> int:
        """Publish one duplicate-free run; if the server refuses it, isolate what it refused."""
        assert self._connection is not None
        try:
            await self._db.publish(self._connection, self.pg_channel, run)
        except DatabaseError as exc:
            if len(run) == 1:
                self._refused(exc)
                return 1
            return sum([await self._publish_run([payload]) for payload in run])
        return 0


def _without_repeats(payloads: list[str]) -> Iterator[list[str]]:
    """Split *payloads*, in order, into runs in which no payload appears twice."""
    seen: set[str] = set()
    start = 0
    for index, payload in enumerate(payloads):
        if payload in seen:
            yield payloads[start:index]
            seen = set()
            start = index
        seen.add(payload)
    if start < len(payloads):
        yield payloads[start:]
