"""
Bridges between PostgreSQL channels and Trio channels.

Inbound: one `Listener` per bus owns the listening connection and feeds every `Route` (a Postgres
channel mapped to a Trio channel). Outbound: one `OutboundBridge` per Trio channel publishes what
is queued there to a Postgres channel, in batches.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs
import trio

from ._channel import Channel
from ._codec import check_payload, decoder, encoder, quote_ident, validate_channel_name
from ._errors import CodecError, ConfigError, DatabaseError, DatabaseUnavailableError, PgbusError
from ._pg import Connection, Database

log = logging.getLogger("pgbus.bridge")

DIRECTIONS: tuple[str, ...] = ("in", "out")
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_newest", "drop_oldest")

MAX_BATCH = 5000
"""The most messages one outbound round trip carries."""


@attrs.frozen
class Notification:
    """One PostgreSQL notification, as an inbound bridge delivers it."""

    channel: str
    """The Postgres channel it was sent to, exactly."""
    payload: Any
    """The payload, decoded by the bridge's codec (``str`` for text)."""
    pid: int
    """The backend pid of the sender (this bus's own connections are in ``bus.own_pids``)."""


def _fast_constructor(cls: type) -> Any:
    """
    Build a frozen attrs instance by setting its slots directly.

    Equivalent to ``cls(*values)`` (no validators or converters are involved) at about half the
    cost: frozen attrs classes set each field through ``object.__setattr__``. Used once per
    notification on the inbound hot path.
    """
    new = object.__new__
    setters = [cls.__dict__[field.name].__set__ for field in attrs.fields(cls)]
    channel_set, payload_set, pid_set = setters

    def make(channel: str, payload: Any, pid: int) -> Any:
        instance: Any = new(cls)
        channel_set(instance, channel)
        payload_set(instance, payload)
        pid_set(instance, pid)
        return instance

    return make


_new_notification = _fast_constructor(Notification)


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


@attrs.frozen
class BridgeStatistics:
    """Counters of one bridge since the bus opened."""

    postgres: str
    channel: str
    direction: str
    messages: int
    """Delivered (in) or published (out)."""
    dropped: int
    """Dropped by the overflow policy (in)."""
    rejected: int
    """Refused by the codec: malformed JSON in, oversized or unencodable payloads out."""
    reconnects: int


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


class Backoff:
    """Capped exponential backoff with full jitter; the first retry is immediate."""

    def __init__(self, initial: float = 0.05, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        if self.failures == 1:
            return 0.0
        return random.uniform(0, min(self.maximum, self.initial * 2 ** (self.failures - 2)))

    def reset(self) -> None:
        self.failures = 0


async def connect_with_retry(
    db: Database, purpose: str, backoff: Backoff, **kwargs: Any
) -> Connection:
    """Connect, retrying with *backoff* while the server is unreachable; fatal errors raise."""
    while True:
        try:
            connection = await db.connect(purpose, **kwargs)
        except DatabaseUnavailableError as exc:
            if exc.fatal:
                raise
            delay = backoff.next_delay()
            level = (
                logging.WARNING
                if backoff.failures in (1, 2) or backoff.failures % 20 == 0
                else logging.DEBUG
            )
            log.log(level, "%s: %s; retrying in %.1fs", purpose, exc, delay)
            await trio.sleep(delay)
            continue
        if backoff.failures:
            log.warning("%s: connected to %s again", purpose, db.where)
        backoff.reset()
        return connection


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
        self.reconnects = 0

    # -- the routing table ------------------------------------------------------------------

    @property
    def channels(self) -> set[str]:
        """The Postgres channels this listener is (or will be, once connected) listening on."""
        return set(self._routes)

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
        if len(routes) == 1:
            # Shielded: the routing table and pg_listening_channels() must never disagree.
            with trio.CancelScope(shield=True):
                try:
                    await self._command(f"LISTEN {quote_ident(route.pg_channel)}")
                except DatabaseError:
                    self._drop_route(route)
                    raise

    async def remove_route(self, route: Route) -> None:
        """Stop delivering *route* (UNLISTEN when it was the channel's last route)."""
        if self._drop_route(route):
            with trio.CancelScope(shield=True):
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
        try:
            with trio.fail_after(self.keepalive):
                async with self._lock:
                    # The listener task reads this socket; the reply reaches us through it.
                    await connection.execute(sql, pump=False)
        except (DatabaseUnavailableError, trio.TooSlowError):
            self._mark_lost()  # reconnecting re-LISTENs from the table

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
        routes = self._routes.get(pg_channel)
        if routes is None:
            return  # UNLISTENed while this notification was in flight
        for route in routes:
            if route.ignore_own and pid in self._own_pids:
                continue
            decode = route.decode
            if decode is None:
                item: object = _new_notification(pg_channel, payload, pid)
            else:
                try:
                    item = _new_notification(pg_channel, decode(pg_channel, payload), pid)
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

    def _hold(self) -> None:
        """
        Switch from direct delivery to the backlog.

        The sink runs inside the listener task's socket read, so once this read is parsed the
        task delivers the backlog with waiting sends, and reads nothing more until it is done:
        the socket is not read while a ``block`` channel is full.
        """
        self._direct = False

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
        if not self._routes:
            return True
        sql = "; ".join(f"LISTEN {quote_ident(name)}" for name in self._routes)
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
                await connection.wait_readable()
                connection.read()  # the sink delivers each notification as it is parsed
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


class OutboundBridge:
    """
    Publishes what is queued in a Trio channel to a Postgres channel.

    Whatever queued while the previous round trip was in flight goes in the next one, as a single
    statement (so one transaction): no added latency when idle, one round trip per batch under
    load. A batch never holds the same payload twice — PostgreSQL would merge the two — so such a
    batch is split in order. A batch not confirmed before the connection breaks is published again
    after reconnecting (at-least-once).
    """

    def __init__(self, db: Database, channel: Channel, pg_channel: str, codec: str) -> None:
        self._db = db
        self.channel = channel
        self.pg_channel = validate_channel_name(pg_channel)
        self.codec = codec
        self._encode = encoder(codec)
        self._connection: Connection | None = None
        self._stopping = False
        self._idle: trio.CancelScope | None = None
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
        )

    def finish(self) -> None:
        """Publish what is queued, then return from `serve` (the caller bounds the wait)."""
        self._stopping = True
        if self._idle is not None:
            self._idle.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff()
        purpose = f"publish {self.pg_channel}"
        self._connection = await connect_with_retry(self._db, purpose, backoff)
        task_status.started()
        try:
            batch: list[str] = []
            while True:
                if not await self._collect(batch):
                    return
                while batch:
                    try:
                        await self._publish(batch)
                    except DatabaseUnavailableError as exc:
                        log.warning(
                            "%s: %s; %d message(s) will be sent again", purpose, exc, len(batch)
                        )
                        await self._reconnect(purpose, backoff)
        finally:
            connection, self._connection = self._connection, None
            if connection is not None:
                self._db.own_pids.discard(connection.pid)
                await connection.aclose()

    async def _reconnect(self, purpose: str, backoff: Backoff) -> None:
        old = self._connection
        if old is not None:
            self._db.own_pids.discard(old.pid)
            await old.aclose()
        self._connection = await connect_with_retry(self._db, purpose, backoff)
        self.reconnects += 1

    async def _collect(self, batch: list[str]) -> bool:
        """Fill *batch* with what is queued, waiting for the first message; False when done."""
        receive_nowait = self.channel.receive_nowait
        # Let the senders that are ready run first: the reply to the last batch may have woken
        # us in the same scheduler pass as them. One pass per round trip (about 13 µs) makes
        # batches, so transactions, the server's main cost, several times larger under load.
        await trio.lowlevel.checkpoint()
        while not batch:
            try:
                message = receive_nowait()
            except trio.WouldBlock:
                if self._stopping:
                    return False
                with trio.CancelScope() as idle:
                    self._idle = idle
                    message = await self.channel.receive()
                self._idle = None
                if idle.cancelled_caught:
                    return False
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

    async def _publish(self, batch: list[str]) -> None:
        """Publish *batch*, removing each part from it once the server confirmed it."""
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
                self.rejected += 1
                log.error("PostgreSQL refused a message for channel %r: %s", self.pg_channel, exc)
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
