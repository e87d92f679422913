"""
Inbound: the bus's listening connection, delivering notifications into Trio channels.

What it delivers: `Notification` (one PostgreSQL notification) and `Gap` (a marker: notifications
may be missing here, after a reconnect or an overflow drop).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import trio

from ._bridge import BridgeStatistics, validate_overflow
from ._channel import Channel
from ._codec import decoder, validate_channel_name
from ._errors import CodecError, ConfigError, DatabaseError, DatabaseUnavailableError
from ._pg import Backoff, Connection, Database, connect_with_retry

log = logging.getLogger("pgbus.bridge")


class Notification(NamedTuple):
    """
    One PostgreSQL notification, as an inbound bridge delivers it.

    A named tuple (one is made for every notification, so it is the cheapest record Python
    has): fields by name, ``channel, payload, pid = notification``, ``_replace``.
    """

    channel: str
    """The Postgres channel it was sent to, exactly."""
    payload: Any
    """The payload, decoded by the bridge's codec (``str`` for text)."""
    pid: int
    """The backend pid of the sender (this bus's own connections are in ``bus.own_pids``)."""


_new_tuple: Any = tuple.__new__
"""``_new_tuple(Notification, (channel, payload, pid))`` makes one at half the cost of the
class's own ``__new__`` (a Python function): the sink does, for every notification."""


@attrs.frozen
class Gap:
    """
    A marker in an inbound stream: notifications may be missing at this point.

    ``reason`` is ``"reconnect"`` (the listening connection broke; whatever was sent while it was
    down is lost, ``dropped`` is None because nobody knows how much) or ``"overflow"`` (the Trio
    channel was full and the bridge's overflow policy dropped ``dropped`` notifications).
    """

    channel: str
    reason: str
    dropped: int | None


class Route:
    """One Postgres channel feeding one Trio channel."""

    __slots__ = (
        "channel",
        "codec",
        "decode",
        "delivered",
        "dropped",
        "flushing",
        "gaps",
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
        self.flushing = False  # a task is waiting to put the pending Gap in the channel
        self.delivered = 0
        self.dropped = 0
        self.rejected = 0
        self.gaps = 0

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
            self.gaps += 1
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

    def statistics(self, reconnects: int, connected: bool) -> BridgeStatistics:
        return BridgeStatistics(
            self.pg_channel,
            self.channel.name,
            "in",
            self.delivered,
            self.dropped,
            self.rejected,
            reconnects,
            connected,
            gaps=self.gaps,
        )


class InboundBridge:
    """
    The bus's one listening connection, many Postgres channels on it.

    Hot path: the driver's parser calls `_sink` for each notification, inside the socket read; the
    sink hands the notification to its Trio channels with ``send_nowait``: no callback scheduled,
    no task, no checkpoint per notification. Only when a ``block`` route is full does the sink
    stop reading the socket and queue what that read already parsed in `_backlog`, which the
    listener task then delivers with waiting sends. So memory stays bounded by one socket read.

    The connection proves it receives: at start-up and at every keepalive it sends a
    notification to itself on a private channel and expects it back (behind a
    transaction-pooling proxy, LISTEN holds no session, and nothing would ever arrive).
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
        self._last_read = 0.0  # trio.current_time() of the last socket read (or keepalive)
        self._lock = trio.Lock()  # one statement at a time on the connection
        self._blocked: tuple[Route, float] | None = None  # the full route holding the socket
        self._commands: set[trio.CancelScope] = set()  # LISTEN/UNLISTEN awaiting their reply
        self._hooks: dict[str, list[_Subscriber]] = {}  # pgbus's own subscribers
        self._plain: dict[str, Route] = {}  # see _update_plain
        self._nursery: trio.Nursery | None = None
        self._probe_channel = ""
        self._probe_sent = 0
        self._probe_seen = ""
        self._deaf = 0  # consecutive connections that did not receive their own probe
        self._stopping = False
        self._listening = trio.Event()  # set while LISTEN is active on every channel
        self.reconnects = 0

    # -- the routing table ------------------------------------------------------------------

    @property
    def channels(self) -> set[str]:
        """The Postgres channels this listener is (or will be, once connected) listening on."""
        return set(self._routes) | set(self._hooks)

    @property
    def connected(self) -> bool:
        """Whether the listening connection is up and listening on every channel."""
        return self._listening.is_set() and not self._lost

    async def wait_listening(self) -> None:
        """Wait until LISTEN is active on every channel (at once if it is)."""
        await self._listening.wait()

    def stop_reading(self) -> None:
        """For a shutdown: read nothing more from the socket, deliver only what was read."""
        self._stopping = True
        self._direct = False
        if self._connection is not None:  # where trio-asyncio reads the socket (SSL)
            self._connection.hold_reading()
        if self._waiting is not None:
            self._waiting.cancel()

    @property
    def drained(self) -> bool:
        """True when nothing read from the socket waits for room in a channel."""
        return not self._backlog and not any(route.flushing for route in self.routes())

    @property
    def undelivered(self) -> int:
        """Notifications read from the socket that no channel has taken yet."""
        return sum(type(item) is Notification for _, item in self._backlog)

    def routes(self) -> list[Route]:
        return [route for routes in self._routes.values() for route in routes]

    def statistics(self) -> list[BridgeStatistics]:
        connected = self.connected
        return [route.statistics(self.reconnects, connected) for route in self.routes()]

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
        self._update_plain()
        if len(routes) == 1 and route.pg_channel not in self._hooks:
            try:
                await self._command(route.pg_channel, listen=True)
            except DatabaseError:
                self._drop_route(route)
                raise

    async def remove_route(self, route: Route) -> None:
        """Stop delivering *route* (UNLISTEN when it was the channel's last route)."""
        if self._drop_route(route) and route.pg_channel not in self._hooks:
            await self._command(route.pg_channel, listen=False)

    def _drop_route(self, route: Route) -> bool:
        routes = self._routes.get(route.pg_channel, [])
        if route in routes:
            routes.remove(route)
        if not routes:
            self._routes.pop(route.pg_channel, None)
        self._update_plain()
        return not routes

    async def _command(self, pg_channel: str, *, listen: bool) -> None:
        """
        Send LISTEN/UNLISTEN on the listening connection; the table is already updated.

        While the socket is being read, the command is shielded from cancellation, so the
        table and ``pg_listening_channels()`` never disagree, and bounded by `keepalive`. While
        a full channel holds the socket, its reply waits behind the backlog for as long as the
        consumers take; it is not bounded then, but the caller may cancel. A command that times
        out or is cancelled midway leaves the server in doubt: the connection is dropped and
        the reconnect LISTENs from the table (with a Gap in every stream).
        """
        connection = self._connection
        if connection is None:
            return  # the next connection LISTENs to the whole table
        scope = trio.CancelScope()
        self._set_command_scope(scope)
        self._commands.add(scope)
        answered = False
        try:
            with scope:
                async with self._lock:
                    try:
                        # The listener task reads this socket; the reply reaches us through it.
                        if listen:
                            await connection.listen([pg_channel], pump=False)
                        else:
                            await connection.unlisten(pg_channel, pump=False)
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
        return {row[0] for row in rows} - {self._probe_channel}

    # -- the hot path -----------------------------------------------------------------------

    def _sink(self, pid: int, pg_channel: str, payload: str) -> None:
        route = self._plain.get(pg_channel)
        if route is not None:  # the common case, in short: one route, nothing to decode
            item: object = _new_tuple(Notification, (pg_channel, payload, pid))
            if self._direct and not route.pending_gap:
                try:
                    route.send_nowait(item)
                    route.delivered += 1
                    return
                except trio.WouldBlock:
                    pass
            self._deliver_later(route, item)
            return
        hooks = self._hooks.get(pg_channel)
        if hooks is not None:
            for hook in hooks:
                hook.on_message(pid, payload)
        routes = self._routes.get(pg_channel)
        if routes is None:
            if pg_channel == self._probe_channel:
                self._probe_seen = payload
                if self._connection is not None:
                    self._connection.nudge()
            return  # else UNLISTENed while this notification was in flight
        for route in routes:
            if route.ignore_own and pid in self._own_pids:
                continue
            decode = route.decode
            if decode is None:
                item = _new_tuple(Notification, (pg_channel, payload, pid))
            else:
                try:
                    item = Notification(pg_channel, decode(pg_channel, payload), pid)
                except CodecError as exc:
                    route.rejected += 1
                    log.error("dropped a notification from backend %d: %s", pid, exc)
                    continue
            if self._direct and not route.pending_gap:
                try:
                    route.send_nowait(item)
                    route.delivered += 1
                    continue
                except trio.WouldBlock:
                    pass
            self._deliver_later(route, item)

    def _deliver_later(self, route: Route, item: object) -> None:
        """What the sink cannot put in *route*'s channel right now: a Gap first, or it is full."""
        if self._direct:
            if route.pending_gap or route.overflow != "block":
                self._deliver_dropping(route, item)
                return
            self._hold()
        self._backlog.append((route, item))

    def _update_plain(self) -> None:
        """Note the channels `_sink` can take in short: one route, no decoding, no hooks."""
        self._plain = {
            pg_channel: routes[0]
            for pg_channel, routes in self._routes.items()
            if len(routes) == 1
            and routes[0].decode is None
            and not routes[0].ignore_own
            and not self._hooks.get(pg_channel)
        }

    def _deliver_dropping(self, route: Route, item: object) -> None:
        """Deliver on a drop route; a Gap that finds no room is put in as soon as there is."""
        if route.deliver_dropping(item):
            route.delivered += type(item) is Notification
        if route.pending_gap and not route.flushing and self._nursery is not None:
            route.flushing = True
            self._nursery.start_soon(self._flush_gap, route)

    async def _flush_gap(self, route: Route) -> None:
        """
        Put *route*'s pending Gap in its channel as soon as the consumer makes room, without
        waiting for more traffic. What is dropped meanwhile goes into the next Gap.
        """
        try:
            while route.pending_gap:
                gap = Gap(route.pg_channel, "overflow", route.pending_gap)
                route.pending_gap = 0
                await route.channel.send(gap)
                route.gaps += 1
        finally:
            route.flushing = False

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

    def _connection_lost(self, connection: Connection) -> None:
        if connection is self._connection:  # not an earlier one, whose news came late
            self._mark_lost()

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
                    if self._blocked is None:
                        self._blocked = (route, trio.current_time())
                    await route.channel.send(item)
                route.delivered += type(item) is Notification
            else:
                self._deliver_dropping(route, item)
            backlog.popleft()
        self._blocked = None
        self._holding_changed()
        if self._connection is not None:
            self._connection.release_reading()

    # -- the connection's life ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled, reconnecting for as long as it takes."""
        backoff = Backoff()
        first = True
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_blocked)
            while True:
                self._lost = False
                self._direct = False
                mark = len(self._backlog)
                connection = await connect_with_retry(
                    self._db, "listen", backoff, sink=self._sink, on_lost=self._connection_lost
                )
                # Set before LISTENing, so a route added meanwhile sends its own LISTEN.
                self._connection = connection
                self._probe_channel = f"pgbus:probe:{connection.pid}"
                try:
                    if not await self._listen_all(connection):
                        await trio.sleep(backoff.next_delay())
                        continue
                    if not first:
                        self._announce_gaps(mark)
                        self._call_hooks("")
                    first = False
                    self._listening.set()
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    await self._watch(connection)
                finally:
                    self._connection = None
                    if self._listening.is_set():
                        self._listening = trio.Event()
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
        """LISTEN on every channel of the table, then prove that notifications arrive."""
        try:
            with trio.CancelScope(shield=True), trio.fail_after(self.keepalive):
                async with self._lock:
                    await connection.listen([self._probe_channel, *sorted(self.channels)])
        except (DatabaseUnavailableError, trio.TooSlowError):
            return False
        with trio.CancelScope(shield=True):
            return await self._prove(connection)
        raise AssertionError("unreachable: a shielded scope is never cancelled")

    async def _prove(self, connection: Connection) -> bool:
        """
        Send a notification to ourselves on the private probe channel and wait for it: the
        proof, end to end, that this connection receives. Doubles as the keepalive query.
        """
        self._probe_sent += 1
        token = str(self._probe_sent)
        with trio.move_on_after(self.keepalive):
            try:
                async with self._lock:
                    await connection.execute("SELECT pg_notify($1, $2)", self._probe_channel, token)
                while self._probe_seen != token and not connection.closed:
                    await connection.receive()
            except DatabaseUnavailableError:
                return False
        if self._probe_seen == token:
            self._deaf = 0
            return True
        if not connection.closed:
            self._deaf += 1
            if self._deaf in (1, 2) or self._deaf % 20 == 0:
                log.error(
                    "the listening connection to %s receives no notifications: one it sent "
                    "itself did not come back within %gs. LISTEN needs a session of its own, "
                    "which a transaction-pooling proxy (PgBouncer pool_mode = transaction) "
                    "cannot give; connect pgbus to PostgreSQL directly or through session "
                    "pooling. Retrying.",
                    self._db.where,
                    self.keepalive,
                )
        return False

    def _announce_gaps(self, mark: int) -> None:
        """Put a reconnect `Gap` in every route, after what the old connection delivered."""
        for offset, route in enumerate(self.routes()):
            self._backlog.insert(mark + offset, (route, Gap(route.pg_channel, "reconnect", None)))
            route.gaps += 1
        log.info("listening again on %d channel(s); gap markers queued", len(self._routes))

    async def _watch(self, connection: Connection) -> None:
        """Read the socket, deliver the backlog, keep the connection alive; return once lost."""
        self._last_read = trio.current_time()
        while not self._lost:
            if self._backlog:
                await self._drain_backlog()
                continue
            if self._stopping:
                await trio.sleep_forever()  # until the bus stops this task
            if connection.closed:
                self._mark_lost()
                break
            self._direct = True
            # One cancel scope per quiet spell, not per read: a scope costs a few µs, and this
            # loop is on every notification's path. The deadline is the last read + keepalive.
            with trio.CancelScope(deadline=self._last_read + self.keepalive) as waiting:
                self._waiting = waiting
                while not self._backlog and not connection.closed:
                    await connection.receive()  # the sink delivers each notification as parsed
                    self._last_read = trio.current_time()
            self._waiting = None
            quiet = trio.current_time() - self._last_read >= self.keepalive
            if waiting.cancelled_caught and quiet and not self._lost and not self._stopping:
                if not await self._prove(connection):
                    if not self._deaf:  # else _prove said why
                        log.warning(
                            "listening connection to %s did not answer a keepalive",
                            self._db.where,
                        )
                    self._mark_lost()
                self._last_read = trio.current_time()

    async def _watch_blocked(self) -> None:
        """
        While a full ``block`` channel holds the socket, say which one and for how long, and
        how full PostgreSQL's notification queue is (when it is full, every NOTIFY fails).
        """
        warned_at = 0.0
        warned_usage = 0.0
        while True:
            await trio.sleep(self.keepalive / 2)
            blocked = self._blocked
            if blocked is None:
                warned_at = warned_usage = 0.0
                continue
            route, since = blocked
            held = trio.current_time() - since
            usage = await self._queue_usage()
            due = held >= self.keepalive and held >= 2 * warned_at
            filling = usage is not None and usage >= max(self.queue_warning, warned_usage * 2)
            if due or filling:
                warned_at, warned_usage = held, usage or 0.0
                queue = "unknown" if usage is None else f"{usage * 100:.1f}% full"
                log.warning(
                    "inbound channel %r (from Postgres channel %r) has been full for %.0fs: the "
                    "listening connection is not read meanwhile, so every inbound bridge of "
                    "this bus waits. PostgreSQL's notification queue is %s.",
                    route.channel.name,
                    route.pg_channel,
                    held,
                    queue,
                )

    async def _queue_usage(self) -> float | None:
        try:
            async with self._db.borrow() as connection:
                return float(await connection.fetchval("SELECT pg_notification_queue_usage()"))
        except DatabaseUnavailableError:
            return None

    # -- subscribers: pgbus's own consumers of PostgreSQL channels ------------------------------

    async def subscribe(
        self,
        pg_channel: str,
        on_message: Callable[[int, str], None],
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        """
        Call ``on_message(pid, payload)`` for each notification on *pg_channel* (LISTEN if
        new), and ``on_reconnect()`` after each reconnect, once LISTEN is active again
        (notifications may have been missed meanwhile). As River's notifier ``Listen``: the
        one way pgbus's own services (durable wake-ups, the cluster) subscribe; they appear
        in no channel registry and no statistics.

        Both run inside the socket read: they must be quick and must not raise.
        """
        hooks = self._hooks.setdefault(pg_channel, [])
        hooks.append(_Subscriber(on_message, on_reconnect))
        self._update_plain()
        if len(hooks) == 1 and pg_channel not in self._routes:
            try:
                await self._command(pg_channel, listen=True)
            except DatabaseError:
                self._hooks.pop(pg_channel, None)
                self._update_plain()
                raise

    def unsubscribe(self, pg_channel: str, on_message: Callable[..., None]) -> None:
        """Stop calling *on_message* (the channel stays LISTENed: an extra one costs nothing)."""
        hooks = self._hooks.get(pg_channel, [])
        for hook in hooks:
            if hook.key == on_message:
                hooks.remove(hook)
                break
        self._update_plain()

    async def add_hook(self, pg_channel: str, hook: Callable[[str], None]) -> None:
        """
        Call *hook(payload)* for each notification on *pg_channel* (LISTEN if new), and
        ``hook("")`` after each reconnect: `subscribe` for a wake-up that needs no pid.
        """
        await self.subscribe(pg_channel, lambda _pid, payload: hook(payload), lambda: hook(""))
        self._hooks[pg_channel][-1].key = hook

    def remove_hook(self, pg_channel: str, hook: Callable[[str], None]) -> None:
        """Stop calling *hook* (the channel stays LISTENed: an extra wake-up costs nothing)."""
        self.unsubscribe(pg_channel, hook)

    def _call_hooks(self, payload: str) -> None:
        """After a reconnect: every subscriber's ``on_reconnect``."""
        for hooks in list(self._hooks.values()):
            for hook in list(hooks):
                if hook.on_reconnect is not None:
                    hook.on_reconnect()


class _Subscriber:
    __slots__ = ("key", "on_message", "on_reconnect")

    def __init__(
        self, on_message: Callable[[int, str], None], on_reconnect: Callable[[], None] | None
    ) -> None:
        self.on_message = on_message
        self.on_reconnect = on_reconnect
        self.key: Callable[..., None] = on_message
