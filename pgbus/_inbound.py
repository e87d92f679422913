"""Inbound: the bus's listening connection, delivering notifications into Trio channels."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable

import trio

from ._bridge import (
    OVERFLOW_POLICIES,
    Backoff,
    BridgeStatistics,
    Gap,
    Notification,
    connect_with_retry,
    make_notification,
)
from ._channel import Channel
from ._codec import decoder, quote_ident, validate_channel_name
from ._errors import CodecError, ConfigError, DatabaseError, DatabaseUnavailableError
from ._pg import Connection, Database

log = logging.getLogger("pgbus.bridge")


def validate_overflow(overflow: str, channel: Channel) -> str:
    if overflow not in OVERFLOW_POLICIES:
        allowed = ", ".join(map(repr, OVERFLOW_POLICIES))
        raise ConfigError(f"overflow must be one of {allowed} (got {overflow!r}).")
    if overflow != "block" and channel.capacity < 2:
        raise ConfigError(
            f"overflow {overflow!r} needs channel {channel.name!r} to hold at least 2 messages "
            f"(the gap marker and the newest message), but its capacity is {channel.capacity}."
        )
    return overflow


class Route:
    """One Postgres channel feeding one Trio channel."""

    __slots__ = (
        "channel",
        "codec",
        "decode",
        "delivered",
        "dropped",
        "ignore_own",
        "overflow",
        "pending_gap",
        "pg_channel",
        "rejected",
        "send_nowait",
    )

    def __init__(
        self, pg_channel: str, channel: Channel, codec: str, overflow: str, ignore_own: bool
    ) -> None:
        self.pg_channel = validate_channel_name(pg_channel)
        self.channel = channel
        self.codec = codec
        self.decode = None if codec == "text" else decoder(codec)
        self.overflow = validate_overflow(overflow, channel)
        self.ignore_own = ignore_own
        self.send_nowait = channel.send_nowait
        self.pending_gap = 0
        self.delivered = 0
        self.dropped = 0
        self.rejected = 0

    def settings(self) -> str:
        return f"codec={self.codec!r}, overflow={self.overflow!r}, ignore_own={self.ignore_own}"

    def deliver_dropping(self, item: object) -> bool:
        """
        Deliver without ever waiting: make room or drop, and leave a `Gap` where data went.

        Returns whether *item* was delivered.
        """
        channel = self.channel
        if self.overflow == "drop_oldest":
            while channel.capacity - channel.statistics().buffered < 2:
                try:
                    oldest = channel.receive_nowait()
                except trio.WouldBlock:
                    break  # a receiver took it meanwhile
                self._count_drop(oldest)
        free = channel.capacity - channel.statistics().buffered
        if self.pending_gap:
            if free < 2:
                self._count_drop(item)
                return False
            channel.send_nowait(Gap(self.pg_channel, "overflow", self.pending_gap))
            self.pending_gap = 0
        try:
            channel.send_nowait(item)
        except trio.WouldBlock:
            self._count_drop(item)
            return False
        return True

    def _count_drop(self, item: object) -> None:
        if type(item) is Gap:  # an undelivered marker folds into the next one
            self.pending_gap += item.dropped or 0
            return
        self.pending_gap += 1
        self.dropped += 1

    def statistics(self, reconnects: int) -> BridgeStatistics:
        return BridgeStatistics(
            self.pg_channel,
            self.channel.name,
            "in",
            self.delivered,
            self.dropped,
            self.rejected,
            reconnects,
        )


class Listener:
    """
    The bus's one listening connection, many Postgres channels on it.

    Hot path: asyncpg's parser calls `_sink` for each notification, inside the socket read; the
    sink hands the notification to its Trio channels with ``send_nowait`` — no callback scheduled,
    no task, no checkpoint per notification. Only when a ``block`` route is full does the sink
    stop reading the socket and queue what that read already parsed in `_backlog`, which the
    listener task then delivers with waiting sends. So memory stays bounded by one socket read.
    """

    def __init__(
        self, db: Database, *, keepalive: float = 10.0, queue_warning: float = 0.5
    ) -> None:
        self._db = db
        self._own_pids = db.own_pids
        self.keepalive = keepalive
        self.queue_warning = queue_warning
        self._routes: dict[str, list[Route]] = {}
        self._backlog: deque[tuple[Route, object]] = deque()
        self._direct = False  # deliver straight from the sink (no backlog, not reconnecting)
        self._connection: Connection | None = None
        self._lost = False
        self._waiting: trio.CancelScope | None = None  # the listener task's wait for data
        self._lock = trio.Lock()  # one statement at a time on the connection
        self._blocked_since: float | None = None
        self._commands: set[trio.CancelScope] = set()  # LISTEN/UNLISTEN awaiting their reply
        self._hooks: dict[str, list[Callable[[str], None]]] = {}  # pgbus's own wake-ups
        self.reconnects = 0

    # -- the routing table ------------------------------------------------------------------

    @property
    def channels(self) -> set[str]:
        """The Postgres channels this listener is (or will be, once connected) listening on."""
        return set(self._routes) | set(self._hooks)

    def routes(self) -> list[Route]:
        return [route for routes in self._routes.values() for route in routes]

    async def add_route(self, route: Route) -> None:
        """
        Deliver *route*'s Postgres channel to its Trio channel from now on (LISTEN if new).

        Adding a route identical to an existing one does nothing (an actor may set up its bridge
        again on every restart); one that differs only in its options is refused.
        """
        routes = self._routes.setdefault(route.pg_channel, [])
        for existing in routes:
            if existing.channel is route.channel:
                if existing.settings() == route.settings():
                    return
                raise ConfigError(
                    f"Postgres channel {route.pg_channel!r} is already bridged into "
                    f"{route.channel.name!r} with other options ({existing.settings()})."
                )
        routes.append(route)
        if len(routes) == 1 and route.pg_channel not in self._hooks:
            try:
                await self._command(f"LISTEN {quote_ident(route.pg_channel)}")
            except DatabaseError:
                self._drop_route(route)
                raise

    async def remove_route(self, route: Route) -> None:
        """Stop delivering *route* (UNLISTEN when it was the channel's last route)."""
        if self._drop_route(route) and route.pg_channel not in self._hooks:
            await self._command(f"UNLISTEN {quote_ident(route.pg_channel)}")

    def _drop_route(self, route: Route) -> bool:
        routes = self._routes.get(route.pg_channel, [])
        if route in routes:
            routes.remove(route)
        if routes:
            return False
        self._routes.pop(route.pg_channel, None)
        return True

    async def _command(self, sql: str) -> None:
        connection = self._connection
        if connection is None:
            return  # the next connection LISTENs to the whole table
        """
        Send LISTEN/UNLISTEN on the listening connection; the table is already updated.

        While the socket is being read, the command is shielded from cancellation, so the
        table and ``pg_listening_channels()`` never disagree, and bounded by `keepalive`. While
        a full channel holds the socket, its reply waits behind the backlog for as long as the
        consumers take; it is not bounded then, but the caller may cancel. A command that times
        out or is cancelled midway leaves the server in doubt: the connection is dropped and
        the reconnect LISTENs from the table (with a Gap in every stream).
        """
        scope = trio.CancelScope()
        self._set_command_scope(scope)
        self._commands.add(scope)
        answered = False
        try:
            with scope:
                async with self._lock:
                    try:
                        # The listener task reads this socket; the reply reaches us through it.
                        await connection.execute(sql, pump=False)
                    except DatabaseError:
                        answered = True  # refused: the server's set is unchanged
                        raise
                    answered = True
        except DatabaseUnavailableError:
            pass
        finally:
            self._commands.discard(scope)
            if not answered:  # timed out, cancelled or broken: the server's set is in doubt
                connection.abort()
                self._mark_lost()

    def _set_command_scope(self, scope: trio.CancelScope) -> None:
        """Shield and bound a pending command while the socket is read; neither while held."""
        reading = self._direct or not self._backlog
        scope.shield = reading
        scope.deadline = trio.current_time() + self.keepalive if reading else math.inf

    async def server_channels(self) -> set[str]:
        """What the server says this connection listens on (``pg_listening_channels()``)."""
        connection = self._connection
        if connection is None:
            return set()
        async with self._lock:
            rows = await connection.fetch("SELECT pg_listening_channels()", pump=False)
        return {row[0] for row in rows}

    # -- the hot path -----------------------------------------------------------------------

    def _sink(self, pid: int, pg_channel: str, payload: str) -> None:
        hooks = self._hooks.get(pg_channel)
        if hooks is not None:
            for hook in hooks:
                hook(payload)
        routes = self._routes.get(pg_channel)
        if routes is None:
            return  # UNLISTENed while this notification was in flight
        for route in routes:
            if route.ignore_own and pid in self._own_pids:
                continue
            decode = route.decode
            if decode is None:
                item: object = make_notification(pg_channel, payload, pid)
            else:
                try:
                    item = make_notification(pg_channel, decode(pg_channel, payload), pid)
                except CodecError as exc:
                    route.rejected += 1
                    log.error("dropped a notification from backend %d: %s", pid, exc)
                    continue
            if self._direct:
                if route.pending_gap:  # a Gap must go first
                    route.delivered += route.deliver_dropping(item)
                    continue
                try:
                    route.send_nowait(item)
                    route.delivered += 1
                    continue
                except trio.WouldBlock:
                    if route.overflow != "block":
                        route.delivered += route.deliver_dropping(item)
                        continue
                    self._hold()
            self._backlog.append((route, item))

    def _holding_changed(self) -> None:
        for scope in self._commands:
            self._set_command_scope(scope)

    def _hold(self) -> None:
        """
        Switch from direct delivery to the backlog.

        The sink runs inside the listener task's socket read, so once this read is parsed the
        task delivers the backlog with waiting sends, and reads nothing more until it is done:
        the socket is not read while a ``block`` channel is full.
        """
        self._direct = False
        self._holding_changed()
        connection = self._connection
        if connection is not None:  # only matters where trio-asyncio reads the socket (SSL)
            connection.hold_reading()
            connection.nudge()

    def _mark_lost(self) -> None:
        self._lost = True
        self._direct = False
        if self._waiting is not None:
            self._waiting.cancel()

    async def _drain_backlog(self) -> None:
        backlog = self._backlog
        while backlog:
            route, item = backlog[0]
            if route.overflow == "block":
                try:
                    route.send_nowait(item)
                except trio.WouldBlock:
                    self._blocked_since = trio.current_time()
                    await route.channel.send(item)
                route.delivered += type(item) is Notification
            elif route.deliver_dropping(item):
                route.delivered += type(item) is Notification
            backlog.popleft()
        self._blocked_since = None
        self._holding_changed()
        if self._connection is not None:
            self._connection.release_reading()

    # -- the connection's life ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled, reconnecting for as long as it takes."""
        backoff = Backoff()
        first = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_queue_usage)
            while True:
                self._lost = False
                self._direct = False
                mark = len(self._backlog)
                connection = await connect_with_retry(
                    self._db, "listen", backoff, sink=self._sink, on_lost=self._mark_lost
                )
                # Set before LISTENing, so a route added meanwhile sends its own LISTEN.
                self._connection = connection
                try:
                    if not await self._listen_all(connection):
                        await trio.sleep(backoff.next_delay())
                        continue
                    if not first:
                        self._announce_gaps(mark)
                        self._call_hooks("")
                    first = False
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    await self._watch(connection)
                finally:
                    self._connection = None
                    self._db.own_pids.discard(connection.pid)
                    if self._lost:
                        connection.abort()  # a half-open peer would make a polite close wait
                    else:
                        with trio.CancelScope(shield=True):
                            await connection.aclose()
                self.reconnects += 1
                log.warning(
                    "listening connection to %s lost; reconnecting. Notifications sent while it is "
                    "down are lost: each inbound channel will receive a pgbus.Gap at that point.",
                    self._db.where,
                )

    async def _listen_all(self, connection: Connection) -> bool:
        if not self.channels:
            return True
        sql = "; ".join(f"LISTEN {quote_ident(name)}" for name in sorted(self.channels))
        try:
            with trio.CancelScope(shield=True), trio.fail_after(self.keepalive):
                async with self._lock:
                    await connection.execute(sql)
        except (DatabaseUnavailableError, trio.TooSlowError):
            return False
        return True

    def _announce_gaps(self, mark: int) -> None:
        """Put a reconnect `Gap` in every route, after what the old connection delivered."""
        for offset, route in enumerate(self.routes()):
            self._backlog.insert(mark + offset, (route, Gap(route.pg_channel, "reconnect", None)))
        log.info("listening again on %d channel(s); gap markers queued", len(self._routes))

    async def _watch(self, connection: Connection) -> None:
        """Read the socket, deliver the backlog, keep the connection alive; return once lost."""
        while not self._lost:
            if self._backlog:
                await self._drain_backlog()
                continue
            if connection.closed:
                self._mark_lost()
                break
            self._direct = True
            with trio.move_on_after(self.keepalive) as waiting:
                self._waiting = waiting
                await connection.receive()  # the sink delivers each notification as it is parsed
            self._waiting = None
            if waiting.cancelled_caught and not self._lost:
                await self._ping(connection)

    async def _ping(self, connection: Connection) -> None:
        """A keepalive that cannot lose notifications: a query on the listening connection."""
        try:
            with trio.fail_after(self.keepalive):
                async with self._lock:
                    await connection.fetchval("SELECT 1")
        except (DatabaseUnavailableError, trio.TooSlowError):
            log.warning("listening connection to %s did not answer a keepalive", self._db.where)
            self._mark_lost()

    async def _watch_queue_usage(self) -> None:
        """While a full channel holds the socket, warn as PostgreSQL's notification queue fills."""
        warned = 0.0
        while True:
            await trio.sleep(self.keepalive / 2)
            if self._blocked_since is None:
                warned = 0.0
                continue
            try:
                async with self._db.connection("monitor") as connection:
                    usage = float(await connection.fetchval("SELECT pg_notification_queue_usage()"))
            except DatabaseUnavailableError:
                continue
            if usage >= max(self.queue_warning, warned * 2) or usage >= 0.9:
                warned = usage
                blocked = trio.current_time() - self._blocked_since
                log.warning(
                    "a full inbound channel has held the listening connection for %.0fs; "
                    "PostgreSQL's notification queue is %.1f%% full (when it is full, every NOTIFY "
                    "in the cluster fails)",
                    blocked,
                    usage * 100,
                )

    # -- hooks: pgbus's own wake-ups (durable channels) ---------------------------------------

    async def add_hook(self, pg_channel: str, hook: Callable[[str], None]) -> None:
        """
        Call *hook(payload)* for each notification on *pg_channel* (LISTEN if new), and
        ``hook("")`` after each reconnect (notifications may have been missed meanwhile).

        The hook runs inside the socket read: it must be quick and must not raise.
        """
        hooks = self._hooks.setdefault(pg_channel, [])
        hooks.append(hook)
        if len(hooks) == 1 and pg_channel not in self._routes:
            try:
                await self._command(f"LISTEN {quote_ident(pg_channel)}")
            except DatabaseError:
                self._hooks.pop(pg_channel, None)
                raise

    def remove_hook(self, pg_channel: str, hook: Callable[[str], None]) -> None:
        """Stop calling *hook* (the channel stays LISTENed: an extra wake-up costs nothing)."""
        hooks = self._hooks.get(pg_channel, [])
        if hook in hooks:
            hooks.remove(hook)

    def _call_hooks(self, payload: str) -> None:
        for hooks in self._hooks.values():
            for hook in hooks:
                hook(payload)
