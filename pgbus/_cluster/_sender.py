"""
The cluster's sender: one connection that sends requests and replies to other nodes' channels.

Why not `OutboundBridge`'s code: both follow the same rule (an idle sender writes the statement
from the caller's task, a busy one batches what queued meanwhile into one statement per round
trip), but the outbound bridge publishes a Trio channel's messages, in order, to one PostgreSQL
channel, at least once (a batch is sent again after a reconnect), and must split repeats. The
cluster's items go to many channels, each carries a fresh id (so none repeats), an item knows
the ask waiting on it (which must fail at once when its request may be lost), and a request must
not be sent twice (it could be handled twice) while a reply may. Sharing the loop would mean
parameterizing each of those four points; the two loops stay apart, and each says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .._errors import DatabaseError, DatabaseUnavailableError
from .._pg import (
    Backoff,
    Connection,
    Database,
    Statement,
    connect_with_retry,
    publish_each,
    start_publish_each,
)

log = logging.getLogger("pgbus.cluster")

MAX_BATCH = 1000
"""The most notifications one send carries."""

Outgoing = tuple[str, str, Any, bool]
"""What the sender sends: (channel, payload, the ask it carries or None, whether a reply)."""
_STARTED: Any = ("", "", None, False)  # in the outbox: `send` began a statement itself

LostHandler = Callable[[Sequence[Outgoing], str], None]


class Sender:
    """
    Sends ``(channel, payload)`` items, batching under load; see the module's docstring.

    *on_lost(items, reason)* is told of items that may not have gone out and will not go again
    (a request or tell when the connection broke mid-send, or an item PostgreSQL refused).
    *on_connected(connection)* runs after each (re)connection, before anything is sent on it:
    the node advertises the new backend as its sender.
    """

    def __init__(
        self,
        database: Database,
        on_lost: LostHandler,
        on_connected: Callable[[Connection], Awaitable[None]],
    ) -> None:
        self._db = database
        self._on_lost = on_lost
        self._on_connected = on_connected
        self._outbox_send, self._outbox = trio.open_memory_channel[Outgoing](math.inf)
        self._idle = trio.Event()
        self._connection: Connection | None = None
        self._parked = False  # the loop waits on an empty outbox, nothing in flight
        self._started: tuple[Statement, Outgoing] | None = None  # begun by `send`
        self._queued = 0  # in the outbox, not yet taken by the loop
        self.pid: int | None = None
        """The backend pid this sender sends from (receivers check it)."""

    def send(self, channel: str, payload: str, pending: Any = None, *, reply: bool = False) -> None:
        """
        Send from the caller's task if the sender is idle: the statement is written here and
        the loop only reads its reply (one task switch fewer on every request and reply).
        Else queue it for the loop, which batches. A *reply* is sent again if the connection
        breaks; a request or tell is not (one sent twice could be handled twice). Never waits.
        """
        item = (channel, payload, pending, reply)
        self._queued += 1
        connection = self._connection
        if (
            self._parked
            and self._queued == 1
            and connection is not None
            and connection.poll()  # not gone while idle (a restart, a terminate)
        ):
            self._parked = False
            self._started = (start_publish_each(connection, (channel,), (payload,)), item)
            self._outbox_send.send_nowait(_STARTED)  # wakes the loop, to read the reply
            return
        self._outbox_send.send_nowait(item)

    async def flush(self, timeout: float) -> None:
        """Wait (at most *timeout*) until everything queued has been sent."""
        with trio.move_on_after(timeout):
            while self._queued or not self._idle.is_set():
                await self._idle.wait()
                await trio.lowlevel.checkpoint()

    async def _connect(self, backoff: Backoff) -> Connection:
        self._connection = None
        while True:
            connection = await connect_with_retry(self._db, "cluster send", backoff)
            self.pid = connection.pid
            try:
                await self._on_connected(connection)
            except (DatabaseError, DatabaseUnavailableError, trio.TooSlowError) as exc:
                log.warning("cluster: the new sending connection could not register: %s", exc)
                connection.abort()
                await trio.sleep(backoff.next_delay())
                continue
            self._connection = connection
            return connection

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff()
        connection = await self._connect(backoff)
        task_status.started()
        batch: list[Outgoing] = []
        try:
            while True:
                started: Statement | None = None
                if not batch:
                    if trio.lowlevel.current_statistics().tasks_runnable:
                        await trio.lowlevel.checkpoint()  # senders that are ready queue first
                    try:
                        item = self._outbox.receive_nowait()
                    except trio.WouldBlock:
                        self._idle.set()
                        self._parked = True
                        try:
                            item = await self._outbox.receive()
                        finally:
                            self._parked = False
                        self._idle = trio.Event()
                    self._queued -= 1
                    if item is _STARTED:
                        assert self._started is not None
                        started, item = self._started
                        self._started = None
                    batch.append(item)
                while started is None and len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._outbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                    self._queued -= 1
                try:
                    if started is not None:
                        await connection.finish(started)
                    else:
                        if not connection.poll():  # gone while idle (a restart, a terminate)
                            connection = await self._connect(backoff)
                        try:
                            await publish_each(
                                connection, [b[0] for b in batch], [b[1] for b in batch]
                            )
                        except DatabaseError:
                            if len(batch) == 1:
                                raise
                            # One statement is one transaction: nothing of it went out. Send
                            # each item alone, so one that PostgreSQL refuses costs only itself.
                            await self._one_by_one(connection, batch)
                    batch.clear()
                except DatabaseError as exc:
                    self._on_lost(batch, f"PostgreSQL refused it: {exc}")
                    batch.clear()
                except DatabaseUnavailableError as exc:
                    # Replies go again (the asker keeps the first, drops a repeat as late);
                    # requests and tells do not: one sent twice could be handled twice.
                    reason = f"the connection broke while sending: {exc}"
                    self._lost([b for b in batch if not b[3]], reason)
                    batch[:] = [b for b in batch if b[3]]
                    connection.abort()
                    connection = await self._connect(backoff)
        finally:
            self._connection = None
            with trio.CancelScope(shield=True):
                await connection.aclose()

    async def _one_by_one(self, connection: Connection, batch: list[Outgoing]) -> None:
        """Send *batch* item by item, removing each once sent or refused."""
        while batch:
            item = batch[0]
            try:
                await publish_each(connection, (item[0],), (item[1],))
            except DatabaseError as exc:
                self._on_lost([item], f"PostgreSQL refused it: {exc}")
            del batch[0]

    def _lost(self, lost: Sequence[Outgoing], reason: str) -> None:
        if lost:
            self._on_lost(lost, reason)
