"""The Bus: one nursery owning the registry of channels, actors and bridges."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import attrs
import outcome
import trio

from . import _tracing
from ._actor import Actor, Request, check_actor_options
from ._bridge import Bridge, BridgeStatistics
from ._channel import Channel, ChannelStatistics
from ._cluster import Cluster, ClusterStatistics, ClusterStatus, read_status
from ._codec import encode, validate_channel_name
from ._dsn import DEFAULT_POOL_SIZE, check_dsn, check_keepalive, check_pool_mode, check_pool_size
from ._durable._admin import GroupStatus, group_status
from ._durable._consumer import POLL_EVERY, DurableConsumer
from ._durable._publish import DurableOutboundBridge
from ._durable._publish import ack_in_transaction as durable_ack_in_transaction
from ._durable._publish import store_message as durable_store_message
from ._durable._publish import wake as durable_wake
from ._durable._publish import wake_movers as durable_wake_movers
from ._durable._rules import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETENTION,
    DEFAULT_RETRY_AFTER,
    DEFAULT_START,
    MAX_DURABLE_PAYLOAD_BYTES,
    MOVER_CHANNEL,
    WAKE_CHANNEL,
    DurableMessage,
    validate_dedup_key,
    validate_dedup_window,
    validate_delay,
    validate_group,
    validate_max_attempts,
    validate_max_payload,
    validate_retention,
    validate_seconds,
    validate_start,
    validate_timing,
)
from ._durable._schedule import ScheduleRunner, make_schedule
from ._durable._support import DurableSupport
from ._durable._time import DelayedMover
from ._entities import Entity, EntityHost, KindSpec, KindStatistics
from ._entities import _entity as entity_rules
from ._entities._mail import store_many as entity_store_many
from ._entities._mail import store_one as entity_store_one
from ._errors import (
    ActorFailedError,
    ActorUnavailableError,
    AskTimeoutError,
    ConfigError,
    DatabaseError,
    DatabaseUnavailableError,
    DuplicateNameError,
    DuplicateNotificationError,
    LeaseLostError,
    NoDatabaseError,
    PgbusError,
    RemoteError,
    SessionNeededError,
    UnknownActorError,
    UnknownChannelError,
    unwrap_group,
)
from ._inbound import InboundBridge, Route
from ._node import default_node_name, validate_node_name
from ._outbound import OutboundBridge
from ._pg import Connection, Database, open_database
from ._supervisor import RESTART_KINDS, ActorSpec, ActorStatistics, Supervision, Supervisor

log = logging.getLogger("pgbus")

# Bus.send skips the scheduler while there is room in the channel, and yields once per this many
# sends so a producer in a tight loop still lets others run and still sees cancellation.
SEND_CHECKPOINT_EVERY = 64
# While shutting down, how often to look whether every queued message has been handled.
DRAIN_POLL = 0.005
HURRIED_GRACE = 1.0
"""Seconds a hurried shutdown (`Bus.hurry`) still gives on_stop, publishing and giving back."""
_DEFAULT = Supervision()


@attrs.frozen
class BusStatistics:
    """A snapshot of the whole bus: see `Bus.statistics`."""

    channels: tuple[ChannelStatistics, ...]
    actors: tuple[ActorStatistics, ...]
    bridges: tuple[BridgeStatistics, ...]
    cluster: ClusterStatistics | None = None
    """This bus as a node of the cluster, once it has joined."""
    connected: bool = True
    """`Bus.connected` when the snapshot was taken."""
    entities: tuple[KindStatistics, ...] = ()
    """The kinds of keyed actors this bus hosts."""


class _Service:
    """
    A long-running task of the bus that stops only when asked, so the bus decides the order
    (River's ``startstop.Service``): every bridge, consumer and the cluster is one, in the bus's
    list, and leaving the bus walks that list in phases (see `Bus._shutdown`).

    *stop_intake* (phase 1) makes it take nothing new; *finish(deadline)* (phase 3, or 2 for an
    *inbound* service, which feeds the actors) hands over what it holds, by *deadline*, and
    says what is left, as phrases for the shutdown's one line. Until it has started it can be
    cancelled like any task; after that its scope is shielded.
    """

    def __init__(
        self,
        name: str,
        *,
        stop_intake: Callable[[], Awaitable[None]] | None = None,
        finish: _Finish | None = None,
        inbound: bool = False,
    ) -> None:
        self.name = name
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.stop_intake = stop_intake
        self.finish = finish
        self.inbound = inbound

    async def run(self, serve: Any, *, task_status: trio.TaskStatus[None]) -> None:
        scope = self.scope

        class _ShieldOnStart:
            def started(self, value: None = None) -> None:
                if trio.current_effective_deadline() == -math.inf:
                    return  # whoever started it gave up: stay cancellable, exit at next await
                scope.shield = True
                task_status.started(value)

        try:
            with scope:
                await serve(task_status=_ShieldOnStart())
        finally:
            self.done.set()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


class Bus:
    """
    A registry of named channels, supervised actors and bridges, living in one nursery.

    Made by `open_bus` only (as a Trio nursery is made by ``open_nursery``): never construct it.
    Leaving that block stops reading notifications, lets the actors handle what their inboxes
    already hold (all within ``stop_timeout``), stops the actors in reverse start order (each
    ``on_stop`` runs), publishes what outbound channels still hold, closes every connection,
    and stops an embedded PostgreSQL the bus started. The bus owns its channels: it never closes
    them while open, which is why an inbox survives its actor's restarts.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        supervision: Supervision,
        database: Database | None,
        *,
        keepalive: float,
        node: str | None = None,
        durable_max_payload: int = MAX_DURABLE_PAYLOAD_BYTES,
    ) -> None:
        self._nursery = nursery
        self.supervision = supervision
        self._db = database
        self._keepalive = keepalive
        self._channels: dict[str, Channel] = {}
        self._supervisor = Supervisor(self, supervision)
        self._listener: InboundBridge | None = None
        self._listener_lock = trio.Lock()
        self._outbound: dict[str, tuple[OutboundBridge, _Service]] = {}
        self._sends = 0
        self._publishers: dict[str, OutboundBridge] = {}  # channels whose bridge takes offers
        self._durable_max_payload = durable_max_payload
        self._durable: DurableSupport | None = None
        self.mover: DelayedMover | None = None
        self._schedules: dict[str, ScheduleRunner] = {}
        """This bus's mover of delayed messages, once durable support started it."""
        self._starting = 0
        """Services being started (each waits for its connection first)."""
        self.hurried = False
        """True once `hurry` was called: shutdown no longer waits for inboxes to empty."""
        self._drain_scope: trio.CancelScope | None = None
        self._durable_in: list[tuple[DurableConsumer, _Service]] = []
        self._node_name = node
        self._cluster: Cluster | None = None
        self._cluster_draft: Cluster | None = None
        self._cluster_lock = trio.Lock()
        self._services: list[_Service] = []
        """Every service started, in start order: what `_shutdown` walks."""
        self._entities: EntityHost | None = None

    # -- channels ----------------------------------------------------------------------------

    def add_channel(self, name: str, capacity: int | float) -> Channel:
        """
        Register a channel. *capacity* is explicit: ``0``, a positive ``int`` or ``math.inf``.

        Raises:
            CapacityError: for any other capacity.
            DuplicateNameError: if the name is taken.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a channel name must be a non-empty string (got {name!r}).")
        if name in self._channels:
            raise DuplicateNameError("channel", name)
        channel = self._channels[name] = Channel(name, capacity)
        return channel

    def channel(self, name: str) -> Channel:
        """The channel registered as *name*, or `UnknownChannelError`."""
        try:
            return self._channels[name]
        except KeyError:
            raise UnknownChannelError(name) from None

    @property
    def channels(self) -> Mapping[str, Channel]:
        """Every registered channel by name (a copy: adding to it registers nothing)."""
        return dict(self._channels)

    async def send(self, channel: str, message: object) -> None:
        """
        Send *message* to the channel named *channel*, waiting while it is full.

        While there is room this does not go through the scheduler (it checkpoints once every
        64 sends); cancellation is atomic: the message is either queued or not at all. To an
        idle outbound bridge, the message is written to PostgreSQL from this call.
        """
        target = self.channel(channel)
        publisher = self._publishers.get(channel)
        if publisher is None or not publisher.offer(message):
            try:
                target.send_nowait(message)
            except trio.WouldBlock:
                await target.send(message)
                return
        self._sends += 1
        if self._sends % SEND_CHECKPOINT_EVERY == 0:
            await trio.lowlevel.checkpoint()

    def send_nowait(self, channel: str, message: object) -> None:
        """Send without waiting; raises `trio.WouldBlock` if the channel is full."""
        target = self.channel(channel)
        publisher = self._publishers.get(channel)
        if publisher is None or not publisher.offer(message):
            target.send_nowait(message)

    # -- actors ------------------------------------------------------------------------------

    async def spawn(
        self,
        actor_class: type[Actor],
        *,
        name: str,
        inbox: str | None = None,
        inbox_capacity: int | float | None = None,
        restart: str = "permanent",
        options: Mapping[str, Any] | None = None,
        public: bool = False,
        singleton: bool = False,
    ) -> None:
        """
        Start a supervised actor, after those already running; returns once ``on_start`` ran.

        The actor consumes the channel *inbox*; or, with *inbox_capacity*, a new channel named
        after the actor; or nothing (an actor that only produces). *options* are passed to the
        class as keyword arguments, and checked against its signature now.

        With *public*, every node of the cluster reaches it by name (`ask`, `tell`); this bus
        joins the cluster if it has not yet. With *singleton*, it runs on one node of the
        cluster at a time: this returns at once, and the actor starts here whenever this node
        takes the singleton's lock (a singleton with an inbox is public).
        """
        if self._supervisor.find(name) is not None or (
            self._cluster is not None and self._cluster.has_singleton(name)
        ):
            raise DuplicateNameError("actor", name)
        if public and inbox is None and inbox_capacity is None:
            raise ConfigError(f"actor {name!r}: a public actor needs an inbox to be asked.")
        if (public or singleton) and self._db is None:
            raise NoDatabaseError()
        if not (isinstance(actor_class, type) and issubclass(actor_class, Actor)):
            raise ConfigError(f"actor {name!r}: {actor_class!r} is not a pgbus.Actor subclass.")
        if restart not in RESTART_KINDS:
            allowed = ", ".join(map(repr, RESTART_KINDS))
            raise ConfigError(
                f"actor {name!r}: restart must be one of {allowed} (got {restart!r})."
            )
        if inbox is not None and inbox_capacity is not None:
            raise ConfigError(f"actor {name!r}: give inbox or inbox_capacity, not both.")
        kwargs = dict(options or {})
        # The first instance is built now: options the constructor refuses, or an option that
        # names a channel the bus does not have, fail this call, before any task starts,
        # instead of sending the actor into a restart loop.
        first = [check_actor_options(name, actor_class, kwargs, self._channels)]
        channel = None
        if inbox is not None:
            channel = self.channel(inbox)
        elif inbox_capacity is not None:
            channel = self.add_channel(name, inbox_capacity)

        def factory() -> Actor:
            return first.pop() if first else actor_class(**kwargs)

        spec = ActorSpec(name, factory, channel, restart)
        if singleton:
            (await self._join_cluster()).add_singleton(spec)
            return
        await self._supervisor.start(spec)
        if public:
            await (await self._join_cluster()).offer(spec)

    async def ask(self, actor: str, message: object, *, timeout: float) -> Any:
        """
        Send *message* to *actor*'s inbox and return what its ``handle`` returns.

        A reply that comes after *timeout* is dropped; it never blocks the actor.

        Raises:
            AskTimeoutError: no reply within *timeout* seconds (queueing included).
            ActorFailedError: ``handle`` raised (the actor is restarted per its policy).
        """
        spec = self._supervisor.find(actor)
        if spec is None:
            if self._db is None:
                raise UnknownActorError(actor)
            deadline = trio.current_time() + timeout
            if self._cluster is None:  # joining takes round trips: bounded by the ask's deadline
                with trio.move_on_at(deadline):
                    await self._join_cluster()
            cluster = self._cluster
            if cluster is None:
                self._raise_join_problem(actor, f"{timeout:g}s")
                raise AskTimeoutError(actor, timeout)
            return await cluster.ask(actor, message, timeout=timeout, deadline=deadline)
        if spec.inbox is None:
            raise ConfigError(f"actor {actor!r} has no inbox, so it cannot be asked.")
        reply_send, reply_receive = trio.open_memory_channel[outcome.Outcome[Any]](1)
        with reply_receive, reply_send:
            with trio.move_on_after(timeout) as scope:
                await spec.inbox.send(Request(message, reply_send))
                result = await reply_receive.receive()
            if scope.cancelled_caught:
                raise AskTimeoutError(actor, timeout)
        if isinstance(result, outcome.Error):
            raise ActorFailedError(actor, result.error) from result.error
        return result.unwrap()

    async def tell(self, actor: str, message: object) -> None:
        """
        Send *message* to *actor*'s inbox without waiting for any reply.

        A local actor: waits while its inbox is full. A public actor on another node: the
        message (JSON) is queued for sending and this returns; a message the actor's node
        cannot take is counted and logged there.

        Raises:
            UnknownActorError: no node runs *actor* (at once).
            MessageNotJSONError, MessageTooLargeError: before anything is sent.
        """
        spec = self._supervisor.find(actor)
        if spec is None:
            if self._db is None:
                raise UnknownActorError(actor)
            with trio.move_on_after(self._keepalive):
                cluster = await self._join_cluster()
            if self._cluster is None:
                self._raise_join_problem(actor, f"{self._keepalive:g}s")
                reason = f"the cluster could not be joined within {self._keepalive:g}s"
                raise ActorUnavailableError(actor, None, reason, while_handling=False)
            await cluster.tell(actor, message)
            return
        if spec.inbox is None:
            raise ConfigError(f"actor {actor!r} has no inbox, so it cannot be told anything.")
        await spec.inbox.send(message)

    def _raise_join_problem(self, actor: str, within: str) -> None:
        """Say why this bus could not join (ActorUnavailableError), if an attempt said why."""
        draft = self._cluster_draft
        problem = draft.join_problem if draft is not None else None
        if problem is not None:
            reason = f"this process could not join the cluster within {within}: {problem}"
            raise ActorUnavailableError(actor, None, reason, while_handling=False)

    @property
    def node(self) -> str | None:
        """This bus's node name once it has joined the cluster, else None."""
        return self._cluster.name if self._cluster is not None else None

    async def cluster_status(self) -> ClusterStatus:
        """The cluster as PostgreSQL sees it now: live nodes, public actors, singletons."""
        async with self._database().borrow(limited=True) as connection:
            return await read_status(connection)

    async def _join_cluster(self) -> Cluster:
        """Become a node of the cluster (once): listen on this node's channel, then register."""
        if self._database().transaction_pooling:
            raise SessionNeededError("the cluster (asks, tells, public actors, singletons)")
        async with self._cluster_lock:
            if self._cluster is None:
                # Kept across a cancelled attempt (an ask that timed out while joining), so
                # the next attempt listens on the same channel instead of adding another.
                listener = await self._get_listener("the cluster")
                cluster = self._cluster_draft
                if cluster is None:
                    name = self._node_name or default_node_name()
                    cluster = Cluster(
                        self._database(),
                        self._supervisor,
                        listener,
                        name=name,
                        keepalive=self._keepalive,
                    )
                    self._cluster_draft = cluster
                service = _Service(
                    "cluster", stop_intake=cluster.withdraw, finish=_finish_cluster(cluster)
                )
                try:
                    await self._start(service, cluster.serve)
                except BaseExceptionGroup as group:
                    error = unwrap_group(group, skip_cancelled=False)
                    if error is group:
                        raise
                    raise error from None
                self._cluster = cluster
        return self._cluster

    # -- keyed actors ------------------------------------------------------------------------

    async def host(
        self,
        entity_class: type[Entity],
        *,
        passivate_after: float = entity_rules.DEFAULT_PASSIVATE_AFTER,
        max_attempts: int = entity_rules.DEFAULT_MAX_ATTEMPTS,
        retry_after: float = entity_rules.DEFAULT_RETRY_AFTER,
        concurrency: int = entity_rules.DEFAULT_CONCURRENCY,
        batch: int = entity_rules.DEFAULT_BATCH,
    ) -> None:
        """
        Host keyed actors of *entity_class*'s kind on this node: from now on some of its keys
        are activated here (the cluster shares them among the nodes hosting the kind).

        *passivate_after*: seconds idle before an activation leaves memory. A handler that
        raises is retried after ``retry_after * 2 ** (attempt - 1)`` seconds, at most
        *max_attempts* times in all, then its message is dead-lettered (``pgbus.entity_dead``);
        the key's later messages wait behind it. At most *concurrency* keys are handled at once
        here, from batches of at most *batch* messages. The bus joins the cluster if it has not.

        Raises:
            ConfigError: *entity_class* is not an `Entity` with a valid ``kind`` and `handle`,
                or a setting is out of range.
        """
        spec = KindSpec.checked(
            entity_class,
            passivate_after=passivate_after,
            max_attempts=max_attempts,
            retry_after=retry_after,
            concurrency=concurrency,
            batch=batch,
        )
        await self._durable_support().ensure_schema()
        host = await self._entity_host()
        await host.add(spec)

    async def _entity_host(self) -> EntityHost:
        if self._entities is None:
            cluster = await self._join_cluster()
            listener = await self._get_listener("keyed actors' wake-ups")
            host = EntityHost(
                self, self._database(), cluster, listener, max_payload=self._durable_max_payload
            )
            service = _Service(
                "entities", stop_intake=host.stop_intake, finish=_finish_entities(host)
            )
            await self._start(service, host.serve)
            self._entities = host
        return self._entities

    def entity(self, kind: str, key: str) -> EntityRef:
        """
        The keyed actor (*kind*, *key*), wherever it is activated: ``await
        bus.entity("account", "42").tell(message)`` or ``.ask(message, timeout=5)``.
        """
        return EntityRef(self, kind, key)

    async def tell_many(self, kind: str, items: Iterable[tuple[str, object]]) -> int:
        """
        Store a message for each (key, message) of *items*, for keyed actors of *kind*, in one
        statement; returns how many. Each key's messages are handled in the order given.

        Raises:
            UnknownEntityKindError: no node has ever hosted *kind*.
            EntityKeyError, CodecError, PayloadTooLargeError: before anything is stored.
        """
        await self._durable_support().ensure_schema()
        with _tracing.storing_entity("tell", kind) as traceparent:
            async with self._database().borrow(limited=True) as connection:
                return await entity_store_many(
                    connection, kind, items, self._durable_max_payload, traceparent
                )

    async def _entity_tell(self, kind: str, key: str, message: object) -> int:
        await self._durable_support().ensure_schema()
        with _tracing.storing_entity("tell", kind) as traceparent:
            async with self._database().borrow(limited=True) as connection:
                id, _ = await entity_store_one(
                    connection,
                    kind,
                    key,
                    message,
                    self._durable_max_payload,
                    traceparent=traceparent,
                )
        return id

    async def _entity_ask(self, kind: str, key: str, message: object, timeout: float) -> Any:
        what = f"{kind}/{key}"
        deadline = trio.current_time() + timeout
        await self._durable_support().ensure_schema()
        if self._cluster is None:  # joining takes round trips: bounded by the ask's deadline
            with trio.move_on_at(deadline):
                await self._join_cluster()
        cluster = self._cluster
        if cluster is None:
            self._raise_join_problem(what, f"{timeout:g}s")
            raise AskTimeoutError(what, timeout)
        pending = cluster.expect_reply(what, None)
        try:
            with (
                _tracing.storing_entity("ask", kind) as traceparent,
                trio.move_on_at(deadline) as scope,
            ):
                async with self._database().borrow(limited=True) as connection:
                    _, owner = await entity_store_one(
                        connection,
                        kind,
                        key,
                        message,
                        self._durable_max_payload,
                        reply_to=cluster.channel,
                        ask_id=pending.id,
                        traceparent=traceparent,
                    )
                node = cluster.node_by_channel(owner)
                if node is not None:
                    pending.node = node
                result = await pending.wait()
        finally:
            cluster.forget(pending)
        if scope.cancelled_caught:
            raise AskTimeoutError(what, timeout)
        if isinstance(result, outcome.Error) and isinstance(result.error, RemoteError):
            raise ActorFailedError(what, result.error) from result.error
        return result.unwrap()

    # -- PostgreSQL --------------------------------------------------------------------------

    @property
    def own_pids(self) -> frozenset[int]:
        """Backend pids of the connections this bus has open (what self-echo filtering skips)."""
        return frozenset(self._database().own_pids)

    @property
    def dsn(self) -> str | None:
        """The DSN the bus connects to (an embedded server's, if it started one)."""
        return self._db.dsn if self._db is not None else None

    def _database(self) -> Database:
        if self._db is None:
            raise NoDatabaseError()
        return self._db

    async def _start(self, service: _Service, serve: Any) -> None:
        """Start *service* (running *serve*) and list it; returns once it has started."""
        self._starting += 1  # a service starts once connected: until then, `connected` is False
        try:
            await self._nursery.start(service.run, serve)
        finally:
            self._starting -= 1
        self._services.append(service)

    @property
    def connected(self) -> bool:
        """
        Whether every connection the bus needs is up: False while a bridge, the listening
        connection, a durable consumer or the cluster waits for the server (the bridges'
        `statistics` say which), True otherwise, a bus with no connection to make included.
        A library user's view of what ``pgbus run`` logs while retrying.
        """
        return self.statistics().connected

    async def _stop(self, service: _Service, deadline: float) -> list[str]:
        """Finish (by *deadline*) and stop *service*, and unlist it; what it left."""
        left = await service.finish(deadline, service.done) if service.finish is not None else []
        await service.stop()
        if service in self._services:
            self._services.remove(service)
        return left

    async def bridge_in(
        self,
        postgres: str,
        channel: str,
        *,
        codec: str = "text",
        overflow: str = "block",
        ignore_own: bool = False,
        durable: bool = False,
        group: str | None = None,
        start: str = DEFAULT_START,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_after: float = DEFAULT_RETRY_AFTER,
        lease: float = DEFAULT_LEASE,
        retention: float = DEFAULT_RETENTION,
        poll: float | None = None,
    ) -> Bridge:
        """
        Deliver notifications sent to the Postgres channel *postgres* into *channel*.

        With ``durable=True``, join consumer *group* of the durable channel *postgres* instead
        (see `_bridge_in_durable`): messages arrive as `DurableMessage`.

        Each arrives as a `Notification` with its payload decoded by *codec*. When *channel* is
        full, *overflow* decides: ``block`` (stop reading; PostgreSQL holds the backlog),
        ``drop_newest`` or ``drop_oldest``; every drop and every reconnect leaves a `Gap`.
        With *ignore_own*, notifications sent by this bus's own connections are skipped.
        Returns once the bus is listening (waiting for the server if need be). Bridging the
        same pair again with the same options does nothing.
        """
        if durable:
            if overflow != "block" or ignore_own:
                raise ConfigError(
                    "a durable inbound bridge never drops: overflow and ignore_own "
                    "do not apply to it."
                )
            return await self._bridge_in_durable(
                postgres,
                channel,
                codec,
                group,
                start,
                max_attempts,
                retry_after,
                lease,
                retention,
                poll,
            )
        if poll is not None:
            raise ConfigError("poll applies only to durable bridges (durable=True).")
        if group is not None:
            raise ConfigError("group applies only to durable bridges (durable=True).")
        route = Route(postgres, self.channel(channel), codec, overflow, ignore_own)
        listener = await self._get_listener(f"the inbound bridge {postgres!r} (LISTEN)")
        await listener.add_route(route)
        return Bridge(f"{postgres!r} -> {channel!r}", lambda: listener.remove_route(route))

    async def listening_channels(self) -> set[str]:
        """The Postgres channels the listening connection is subscribed to, as the server says."""
        if self._listener is None:
            return set()
        return await self._listener.server_channels()

    async def bridge_out(
        self,
        channel: str,
        postgres: str,
        *,
        codec: str = "text",
        durable: bool = False,
        delay: float | None = None,
        dedup_key: Callable[[object], str | None] | None = None,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
    ) -> Bridge:
        """
        Publish every message sent to *channel* to the Postgres channel *postgres*.

        With ``durable=True``, store them in the durable channel *postgres* instead: one INSERT
        and one wake-up per batch, payloads up to ``durable_max_payload`` bytes. Durable only:
        with *delay* (seconds), each message is delivered that long after it is stored (by
        the database's clock); with *dedup_key*, a function of the message giving its
        deduplication key (or None), a message whose key is taken within *dedup_window*
        seconds is not stored (see `notify`).

        The bridge becomes *channel*'s consumer. Messages are encoded by *codec*; one that is
        too large or cannot be encoded is refused with a logged error and counted in
        `statistics`, and the rest flow on. Returns once connected.
        """
        database = self._database()
        source = self.channel(channel)
        if channel in self._outbound:
            raise ConfigError(f"channel {channel!r} already has an outbound bridge.")
        delay = validate_delay(delay)
        dedup_window = validate_dedup_window(dedup_window)
        if not durable and (delay is not None or dedup_key is not None):
            raise ConfigError("delay and dedup_key apply only to durable bridges (durable=True).")
        if dedup_key is not None and not callable(dedup_key):
            raise ConfigError(
                f"dedup_key of a bridge must be a function of the message (got {dedup_key!r})."
            )
        bridge: OutboundBridge
        if durable:
            await self._durable_support().ensure_schema()
            bridge = DurableOutboundBridge(
                database,
                source,
                postgres,
                codec,
                self._durable_max_payload,
                delay=delay or None,
                dedup_key=dedup_key,
                dedup_window=dedup_window,
            )
        else:
            bridge = OutboundBridge(database, source, postgres, codec)
        service = _Service(f"publish {postgres}", finish=_finish_outbound(bridge))
        self._outbound[channel] = (bridge, service)
        await self._start(service, bridge.serve)
        if bridge.direct:
            self._publishers[channel] = bridge

        async def close() -> None:
            self._publishers.pop(channel, None)
            await self._stop(service, trio.current_time() + self.supervision.stop_timeout)
            del self._outbound[channel]

        return Bridge(f"{channel!r} -> {postgres!r}", close)

    async def notify(
        self,
        postgres: str,
        message: object,
        *,
        codec: str = "text",
        durable: bool = False,
        delay: float | None = None,
        at: datetime.datetime | None = None,
        dedup_key: str | None = None,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
    ) -> int | None:
        """
        Send one notification now, outside any transaction (returns None).

        With ``durable=True``, store *message* in the durable channel *postgres* instead
        (returns its message id once it is committed). Durable only:

        - *delay* (seconds >= 0) or *at* (an aware datetime): consumers get it then, by the
          database's clock, never earlier (and within a few milliseconds after, while a bus
          with durable support runs: every one moves due messages).
        - *dedup_key* (a non-empty string): while another message of this channel holds the
          key (for *dedup_window* seconds after it was stored, 1 hour by default), nothing is
          stored and that message's id is returned. Concurrent publishers of one key wait for
          the first one's transaction: exactly one stores.

        Raises:
            PayloadTooLargeError, CodecError, ChannelNameError: before anything is sent.
            SettingError: a negative or infinite *delay*, both *delay* and *at*, a naive *at*,
                a *dedup_key* that is not a non-empty string, a *dedup_window* <= 0.
        """
        if durable:
            payload = encode(
                validate_channel_name(postgres), message, codec, self._durable_max_payload
            )
            timing = _durable_timing(delay, at, dedup_key, dedup_window)
            await self._durable_support().ensure_schema()
            async with self._database().borrow(limited=True) as connection:
                stored = await durable_store_message(
                    connection, postgres, payload, **timing, wake=True
                )
                return stored.ids[0]
        _durable_timing_only_if_durable(delay, at, dedup_key)
        payload = encode(validate_channel_name(postgres), message, codec)
        database = self._database()
        async with database.borrow(limited=True) as connection:
            await database.publish(connection, postgres, [payload])
        return None

    @asynccontextmanager
    async def transaction(self, *, ack: DurableMessage | None = None) -> AsyncIterator[Transaction]:
        """
        A database transaction whose `Transaction.publish` calls are delivered at COMMIT.

        The block commits when it ends normally and rolls back on an exception or a
        cancellation: then nothing it published is ever delivered.

        With *ack*, the durable message is acknowledged in this transaction: the block's writes
        and the acknowledgement commit together or not at all (exactly-once effects). Its
        delivery row is locked from the start, so no other member can take it meanwhile.

        Raises:
            LeaseLostError: on entry, if this bridge no longer holds *ack* (its lease expired
                and another member claimed it, or it was acknowledged already).
        """
        database = self._database()
        if ack is not None:
            await self._durable_support().ensure_schema()
        if ack is not None:
            ack._receipt.acking(ack, pending=True)
        try:
            async with database.borrow(limited=True) as connection:
                async with connection.transaction():
                    tx = Transaction(
                        database, connection, self._durable_max_payload, self._durable_support
                    )
                    if ack is not None:
                        await _ack_in(connection, ack)
                    yield tx
                    await tx._flush()
                if ack is not None:
                    ack._receipt.acked_elsewhere(ack)
        finally:
            if ack is not None:
                ack._receipt.acking(ack, pending=False)

    # -- introspection and shutdown ----------------------------------------------------------

    def statistics(self) -> BusStatistics:
        """Per channel: buffered and capacity; per actor: state and restarts; per bridge: counts."""
        bridges: list[BridgeStatistics] = []
        if self._listener is not None:
            bridges += self._listener.statistics()
        bridges += [bridge.statistics() for bridge, _ in self._outbound.values()]
        bridges += [consumer.statistics() for consumer, _ in self._durable_in]
        return BusStatistics(
            channels=tuple(c.statistics() for c in self._channels.values()),
            actors=tuple(self._supervisor.statistics()),
            bridges=tuple(bridges),
            cluster=self._cluster.statistics() if self._cluster is not None else None,
            entities=self._entities.statistics() if self._entities is not None else (),
            connected=not self._starting
            and (self._listener is None or self._listener.connected)
            and all(bridge.connected for bridge in bridges),
        )

    def hurry(self) -> None:
        """
        Cut a shutdown short (``pgbus run``'s second Ctrl-C): stop waiting for the actors to
        empty their inboxes; the rest (actors' ``on_stop``, publishing what outbound channels
        hold, giving back durable claims) gets `HURRIED_GRACE` seconds. What was left is
        counted and logged as on any shutdown.
        """
        self.hurried = True
        if self._drain_scope is not None:
            self._drain_scope.cancel()

    def _quiet(self) -> bool:
        """Nothing left to do: no backlog inbound, every actor idle, every outbound sent."""
        if self._listener is not None and not self._listener.drained:
            return False
        if not self._supervisor.idle():
            return False
        return all(bridge.pending == 0 for bridge, _ in self._outbound.values())

    async def _shutdown(self, *, drain: bool) -> None:
        """
        Stop in phases over the list of services, all within ``stop_timeout``:

        1. every service takes nothing new (the cluster withdraws this node, the listener stops
           reading, durable consumers claim nothing more), last started first;
        2. producers stop and the actors handle what their inboxes hold (with *drain*); then
           the inbound services deliver what they had read, and stop;
        3. the actors stop, in reverse start order;
        4. the other services, last started first, hand over what they hold (publish, give
           back, send replies) and stop.

        What could not be handled or published in time is counted and logged in one line.
        """
        stop_timeout = self.supervision.stop_timeout
        deadline = trio.current_time() + stop_timeout
        for service in reversed(self._services):
            if service.stop_intake is not None:
                with trio.move_on_at(deadline), contextlib.suppress(PgbusError):
                    await service.stop_intake()
        if drain:
            await self._supervisor.stop_producers()
            with trio.move_on_at(deadline) as self._drain_scope:
                # Polling: a memory channel has no "became empty" event to wait for.
                while not self.hurried and not self._quiet():  # noqa: ASYNC110
                    await trio.sleep(DRAIN_POLL)
            self._drain_scope = None
        if self.hurried:
            deadline = min(deadline, trio.current_time() + HURRIED_GRACE)
        left: list[str] = []
        for service in [s for s in reversed(self._services) if s.inbound]:
            left += await self._stop(service, deadline)
        unhandled = self._supervisor.unhandled()
        await self._supervisor.stop_all(deadline=deadline)
        for service in list(reversed(self._services)):
            left += await self._stop(service, deadline)
        parts = [
            f"{count} unhandled in {channel!r} (actor {actor!r})"
            for channel, actor, count in unhandled
        ]
        parts += left
        if parts:
            log.warning("shutdown after %gs: messages left: %s", stop_timeout, "; ".join(parts))

    # -- durable channels ---------------------------------------------------------------------

    def _durable_support(self) -> DurableSupport:
        if self._durable is None:
            self._durable = DurableSupport(
                self._database(), self._durable_max_payload, on_ready=self._start_mover
            )
        return self._durable

    async def schedule(
        self,
        name: str,
        postgres: str,
        *,
        cron: str | None = None,
        every: float | None = None,
        timezone: str = "UTC",
        payload: object = None,
        missed: str = "skip",
    ) -> ScheduleRunner:
        """
        Publish one durable message to *postgres* per slot of schedule *name*, exactly once
        across every process that runs it (see ``pgbus._durable._schedule``).

        Slots come from *cron* (five fields, read in *timezone*, an IANA name) or *every*
        seconds (aligned on the Unix epoch), judged by the database's clock. The payload is
        *payload* encoded as JSON, or ``{"schedule": name, "slot": ISO time}`` without one.
        *missed* says what to do with slots that passed while no process ran the schedule:
        ``"skip"`` (default), ``"catch_up"`` (publish each, in order) or ``"latest"``.
        Each slot's row and its message commit together under a unique key, so each slot is
        published once whoever runs it. In session mode the schedule is a singleton of the
        cluster (this bus joins it): one node at a time runs it, named ``schedule:NAME`` in
        ``pgbus status``, and another takes over within *keepalive* when that node dies.
        Behind a transaction pooler (no session locks) every bus that declares it runs it,
        and the unique key alone keeps each slot once.

        Raises:
            SettingError: a cron expression that does not parse, an unknown time zone, both
                or neither of *cron* and *every*, *every* <= 0, an unknown *missed*.
        """
        checked = make_schedule(
            name,
            validate_channel_name(postgres),
            cron=cron,
            every=every,
            timezone=timezone,
            payload=payload,
            missed=missed,
        )
        if name in self._schedules:
            raise ConfigError(f"schedule {name!r} already runs in this bus.")
        await self._durable_support().ensure_schema()
        database = self._database()
        if database.transaction_pooling:
            runner = ScheduleRunner(database, checked, self._durable_max_payload)
            self._schedules[name] = runner
            await self._start(_Service(f"schedule {name}"), runner.serve)
            return runner
        cluster = await self._join_cluster()
        runner = ScheduleRunner(database, checked, self._durable_max_payload, runner=cluster.name)
        self._schedules[name] = runner
        cluster.add_singleton(
            ActorSpec(f"schedule:{name}", partial(_ScheduleActor, runner), None, "permanent")
        )
        return runner

    async def _start_mover(self) -> None:
        """
        Every bus with durable support moves due delayed messages (several at once are safe),
        woken early by publishers' NOTIFYs on its listening connection (polling every second
        behind a transaction pooler). Subscribing is done here, before the first store; if
        it fails the mover starts anyway and retries it with the rest of its work (backoff,
        one warning line), instead of leaving the bus without a mover.
        """
        mover = DelayedMover(self._database())
        if not self._database().transaction_pooling:
            try:
                await self._subscribe_mover(mover.wake)
            except (DatabaseUnavailableError, DatabaseError) as exc:
                log.warning("delayed mover: could not listen for wake-ups: %s; retrying", exc)
                mover.subscribe = self._subscribe_mover
        self.mover = mover
        await self._start(_Service("delayed mover"), mover.serve)

    async def _subscribe_mover(self, wake: Callable[[str], None]) -> None:
        listener = await self._get_listener("the delayed messages' wake-ups")
        await listener.add_hook(MOVER_CHANNEL, wake)

    async def _bridge_in_durable(
        self,
        postgres: str,
        channel: str,
        codec: str,
        group: str | None,
        start: str,
        max_attempts: int,
        retry_after: float,
        lease: float,
        retention: float,
        poll: float | None = None,
    ) -> Bridge:
        """
        Join consumer *group* of the durable channel *postgres*, delivering into *channel*.

        Each group gets every message (published after the group first joined, with
        ``start="latest"``, or every one still kept, with ``"earliest"``); inside a group each
        message goes to one member at a time, in (transaction, id) order for a single member.
        The bridge never claims more than *channel* can hold (its capacity is the prefetch).
        An actor's ``handle`` returning acknowledges the message; raising retries it after
        *retry_after* seconds, doubling per attempt with jitter, and after *max_attempts*
        attempts it becomes a dead letter. What this bridge holds (in *channel* or in
        ``handle``) has its lease renewed while the process lives; a claim whose lease runs out
        (its process died or froze) goes back to the group after *lease* seconds. A group not
        seen for *retention* seconds is retired.
        New messages are noticed through a wake-up NOTIFY on the bus's listening connection,
        with a claim at least every second as a safety net. With *poll* (seconds) the bridge
        is poll-only, as a bus behind a transaction-pooling proxy needs (`open_bus`'s
        ``pool_mode="transaction"``, where it polls every second unless *poll* says otherwise):
        no LISTEN, a claim every *poll* seconds, and at once again while claims come back full.
        Returns once the group is joined.
        """
        if group is None:
            raise ConfigError("a durable inbound bridge needs a group (group=...).")
        support = self._durable_support()
        consumer = DurableConsumer(
            self._database(),
            self.channel(channel),
            postgres,
            group=validate_group(group),
            start=validate_start(start),
            max_attempts=validate_max_attempts(max_attempts),
            retry_after=validate_seconds("retry_after", retry_after),
            lease=validate_seconds("lease", lease),
            codec=codec,
            retention=validate_retention(retention),
            poll=(
                validate_seconds("poll", poll)
                if poll is not None
                else POLL_EVERY
                if self._database().transaction_pooling
                else None
            ),
        )
        for existing, _ in self._durable_in:
            if existing.pg_channel == postgres and existing.channel is consumer.channel:
                if existing.settings() == consumer.settings():
                    return Bridge(f"{postgres!r} -> {channel!r} (durable, {group!r})", _nothing)
                raise ConfigError(
                    f"durable channel {postgres!r} is already bridged into {channel!r} with "
                    "other options."
                )
        await support.ensure_schema()
        listener = None
        if consumer.poll is None:
            listener = await self._get_listener(f"the durable wake-ups of {postgres!r}")
            await listener.add_hook(WAKE_CHANNEL, consumer.wake)
        service = _Service(
            f"durable {postgres}/{group}",
            stop_intake=_sync(consumer.finish),
            finish=_finish_durable(consumer),
        )
        await self._start(service, consumer.serve)
        self._durable_in.append((consumer, service))
        support.consumers.append(consumer)
        if not support.janitor_started:
            support.janitor_started = True
            await self._nursery.start(support.serve_janitor)

        async def close() -> None:
            if listener is not None:
                listener.remove_hook(WAKE_CHANNEL, consumer.wake)
            await self._stop(service, trio.current_time() + self.supervision.stop_timeout)
            self._durable_in.remove((consumer, service))
            support.consumers.remove(consumer)

        return Bridge(f"{postgres!r} -> {channel!r} (durable, {group!r})", close)

    async def _get_listener(self, what: str) -> InboundBridge:
        """The bus's listening connection, started if need be, for *what* (named in errors)."""
        database = self._database()
        if database.transaction_pooling:
            raise SessionNeededError(what)
        async with self._listener_lock:
            if self._listener is None:
                # Listed only once started: a cancelled start leaves no half-made listener.
                listener = InboundBridge(database, keepalive=self._keepalive)
                service = _Service(
                    "listener",
                    stop_intake=_sync(listener.stop_reading),
                    finish=_finish_listener(listener),
                    inbound=True,
                )
                await self._start(service, listener.serve)
                self._listener = listener
        return self._listener

    def ack(self, message: DurableMessage) -> None:
        """
        Acknowledge *message* (for consumers that are not actors; actors need not call it).

        Does not wait: acknowledgements are written in batches by the bridge, within one round
        trip. One still unwritten when the process dies is lost, and the message comes again.
        """
        message._receipt.handled(message)

    def nack(self, message: DurableMessage, error: BaseException | str | None = None) -> None:
        """Give *message* back for a retry (or to the dead letters after its last attempt)."""
        message._receipt.failed(message, error)

    async def durable_groups(self, channel: str | None = None) -> list[GroupStatus]:
        """Each consumer group (of *channel*, or of all): lag, in-flight, dead letters."""
        await self._durable_support().ensure_schema()
        async with self._database().borrow(limited=True) as connection:
            return await group_status(connection, channel)


async def _nothing() -> None:
    pass


class _ScheduleActor(Actor):
    """A schedule run as a singleton of the cluster: its runner, while this node holds it."""

    def __init__(self, runner: ScheduleRunner) -> None:
        self.runner = runner

    async def run(self) -> None:
        await self.runner.serve()


_Finish = Callable[[float, trio.Event], Awaitable[list[str]]]
"""A service's last phase: ``finish(deadline, done)``, *done* set when its task has ended."""


def _sync(function: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        function()

    return call


def _finish_listener(listener: InboundBridge) -> _Finish:
    async def finish(deadline: float, done: trio.Event) -> list[str]:
        undelivered = listener.undelivered
        return [f"{undelivered} notification(s) read but not delivered"] if undelivered else []

    return finish


def _finish_durable(consumer: DurableConsumer) -> _Finish:
    async def finish(deadline: float, done: trio.Event) -> list[str]:
        # Acknowledge what was handled, give back the rest: let the statement in flight finish
        # (a cancelled one would take the connection with it).
        consumer.close()
        with trio.move_on_at(max(deadline, trio.current_time() + 1.0)):
            await done.wait()
        return []

    return finish


def _finish_outbound(bridge: OutboundBridge) -> _Finish:
    async def finish(deadline: float, done: trio.Event) -> list[str]:
        """Publish what the channel holds (until *deadline*); what is left."""
        bridge.finish()
        with trio.move_on_at(max(deadline, trio.current_time() + 0.25)):
            await done.wait()
        left = bridge.pending
        if not left:
            return []
        return [f"{left} unpublished from {bridge.channel.name!r} to {bridge.pg_channel!r}"]

    return finish


def _finish_entities(host: EntityHost) -> _Finish:
    async def finish(deadline: float, done: trio.Event) -> list[str]:
        return await host.finish(deadline)

    return finish


class EntityRef:
    """A keyed actor, by kind and key (`Bus.entity`): where it runs is the cluster's business."""

    __slots__ = ("_bus", "key", "kind")

    def __init__(self, bus: Bus, kind: str, key: str) -> None:
        self._bus = bus
        self.kind = kind
        self.key = key

    def __repr__(self) -> str:
        return f"EntityRef({self.kind!r}, {self.key!r})"

    async def tell(self, message: object) -> int:
        """
        Store *message* in this key's mailbox; returns its id once stored (it is handled at
        least once, after every message stored for the key before it).

        Raises:
            UnknownEntityKindError: no node has ever hosted this kind.
            EntityKeyError, CodecError, PayloadTooLargeError: nothing is stored.
        """
        return await self._bus._entity_tell(self.kind, self.key, message)

    async def ask(self, message: object, *, timeout: float) -> Any:
        """
        Store *message* and wait for what `Entity.handle` returns for it.

        The message is stored whatever happens next: after *timeout* it is still handled
        (later), only its reply is dropped. If the node handling the key dies, the node that
        takes the key over handles it and replies.

        Raises:
            AskTimeoutError: no reply within *timeout* seconds.
            ActorFailedError: ``handle`` raised on every attempt (the message is dead-lettered).
            UnknownEntityKindError, EntityKeyError, CodecError, PayloadTooLargeError.
        """
        return await self._bus._entity_ask(self.kind, self.key, message, timeout)


def _finish_cluster(cluster: Cluster) -> _Finish:
    async def finish(deadline: float, done: trio.Event) -> list[str]:
        # Requests still waiting for room are refused (answered), then replies and tells the
        # actors left are sent; then the node's session ends, and its locks with it.
        left = [
            f"{count} request(s) from other nodes waiting for room in {inbox!r}"
            for inbox, count in cluster.left()
            if count
        ]
        await cluster.flush(max(0.25, deadline - trio.current_time()))
        return left

    return finish


async def _ack_in(connection: Connection, message: DurableMessage) -> None:
    receipt = message._receipt
    if not receipt.holds(message) or not await durable_ack_in_transaction(
        connection, message.id, message.group, receipt.member, message.attempt
    ):
        raise LeaseLostError(message.channel, message.group, message.id)


def _durable_timing(
    delay: float | None,
    at: datetime.datetime | None,
    dedup_key: str | None,
    dedup_window: float,
) -> dict[str, Any]:
    """*delay*, *at* and the key of one durable message, checked (`notify` and `publish`)."""
    delay, at = validate_timing(delay, at)
    return {
        "delay": delay,
        "at": at,
        "key": validate_dedup_key(dedup_key),
        "window": validate_dedup_window(dedup_window),
    }


def _durable_timing_only_if_durable(
    delay: float | None, at: datetime.datetime | None, dedup_key: str | None
) -> None:
    if delay is not None or at is not None or dedup_key is not None:
        raise ConfigError("delay, at and dedup_key apply only to durable messages (durable=True).")


class Transaction:
    """A database transaction opened by `Bus.transaction`."""

    def __init__(
        self,
        database: Database,
        connection: Connection,
        durable_max_payload: int = MAX_DURABLE_PAYLOAD_BYTES,
        durable_support: Callable[[], DurableSupport] | None = None,
    ) -> None:
        self._db = database
        self._connection = connection
        self._durable_support = durable_support
        self._durable_max_payload = durable_max_payload
        self._woken: dict[str, None] = {}  # durable channels stored to: woken before COMMIT
        self._wake_movers = False  # a delayed message was stored: movers woken before COMMIT
        self._pending: dict[str, dict[str, None]] = {}  # channel -> payloads, in order

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._connection.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._connection.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._connection.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._connection.fetchval(sql, *args)

    async def publish(
        self,
        postgres: str,
        message: object,
        *,
        codec: str = "text",
        durable: bool = False,
        delay: float | None = None,
        at: datetime.datetime | None = None,
        dedup_key: str | None = None,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
    ) -> int | None:
        """
        Publish *message* to the Postgres channel *postgres* when (and only if) this commits.

        With ``durable=True`` the message is stored in the durable channel *postgres* at once,
        inside this transaction (the outbox pattern): consumers see it from COMMIT on, never
        after ROLLBACK. Repeating a payload is fine then. The first durable use of a bus
        creates pgbus's schema if need be (on a connection of its own). Returns the durable
        message's id (None for a notification). *delay*, *at*, *dedup_key* and
        *dedup_window* are as for `Bus.notify`; a key taken here is free again if this
        transaction rolls back, and a concurrent publisher of the same key waits for it.

        Raises:
            PayloadTooLargeError, CodecError, ChannelNameError: at once.
            DuplicateNotificationError: the same payload was already published to that channel
                in this transaction; PostgreSQL would deliver it once.
        """
        if durable:
            payload = encode(
                validate_channel_name(postgres), message, codec, self._durable_max_payload
            )
            timing = _durable_timing(delay, at, dedup_key, dedup_window)
            if self._durable_support is not None:
                await self._durable_support().ensure_schema()
            stored = await durable_store_message(
                self._connection, postgres, payload, **timing, wake=False
            )
            if stored.delayed:
                self._wake_movers = True
            elif stored.new[0]:
                self._woken[postgres] = None
            return stored.ids[0]
        _durable_timing_only_if_durable(delay, at, dedup_key)
        payload = encode(validate_channel_name(postgres), message, codec)
        payloads = self._pending.setdefault(postgres, {})
        if payload in payloads:
            raise DuplicateNotificationError(postgres)
        payloads[payload] = None
        return None

    async def tell(self, kind: str, key: str, message: object) -> int:
        """
        Store *message* for the keyed actor (*kind*, *key*) when (and only if) this commits:
        the outbox pattern for keyed actors. Returns its id.
        """
        if self._durable_support is not None:
            await self._durable_support().ensure_schema()
        with _tracing.storing_entity("tell", kind) as traceparent:
            id, _ = await entity_store_one(
                self._connection,
                kind,
                key,
                message,
                self._durable_max_payload,
                traceparent=traceparent,
            )
        return id

    async def _flush(self) -> None:
        for channel, payloads in self._pending.items():
            await self._db.publish(self._connection, channel, list(payloads))
        self._pending.clear()
        if self._woken:
            await durable_wake(self._connection, list(self._woken))
            self._woken.clear()
        if self._wake_movers:
            await durable_wake_movers(self._connection)
            self._wake_movers = False


@asynccontextmanager
async def open_bus(
    dsn: str | None = None,
    *,
    embedded: bool = False,
    application_name: str = "pgbus",
    strategy: str = _DEFAULT.strategy,
    max_restarts: int = _DEFAULT.max_restarts,
    within_seconds: float = _DEFAULT.within_seconds,
    backoff_initial: float = _DEFAULT.backoff_initial,
    backoff_max: float = _DEFAULT.backoff_max,
    stop_timeout: float = _DEFAULT.stop_timeout,
    keepalive: float = 10.0,
    supervision: Supervision | None = None,
    node: str | None = None,
    durable_max_payload: int = MAX_DURABLE_PAYLOAD_BYTES,
    pool_mode: str = "session",
    pool_size: int = DEFAULT_POOL_SIZE,
) -> AsyncIterator[Bus]:
    """
    Open a bus; leaving the block stops everything it started, in order.

    With *dsn* the bus connects to that PostgreSQL; with ``embedded=True`` and no *dsn* it starts
    a private PostgreSQL for the block; with neither it runs actors and channels only.
    The supervisor's policy comes from *strategy*, *max_restarts*, *within_seconds* and the
    backoff values, or whole from *supervision* (a `Supervision`, as ``[supervisor]`` loads).
    *keepalive* (seconds) bounds every wait on the network: an idle listening connection is
    checked that often, and a statement or connection that stops answering is
    detected, aborted and reconnected within it.
    In the cluster, asks pending on a node that died fail within *keepalive*, and a singleton
    moves within it. With *node* (a name), the bus joins the cluster as that node when it
    opens; without, it joins (as ``"<hostname>:<pid>"``) when it first needs to.
    *durable_max_payload* is the largest durable message, in bytes once encoded (1 MiB).
    *pool_mode* says how the connections reach PostgreSQL: ``"session"`` (directly, or through
    a session-pooling proxy: everything works) or ``"transaction"`` (through a
    transaction-pooling proxy such as PgBouncer's ``pool_mode = transaction``: publishing,
    transactions and durable in-bridges, which then poll, work; LISTEN bridges and the cluster
    need a session of their own and are refused at once).
    *pool_size* bounds the pooled connections the bus's calls (durable publishing,
    transactions, keyed tells and asks, status) hold at once; a call waits for one at most 30 s,
    then raises `PoolExhaustedError`. Bridges, the cluster and hosts have connections of their
    own.

    If the supervisor gives up, the block raises `RestartIntensityError`.
    """
    if dsn is not None:
        check_dsn(dsn)
    if supervision is None:
        supervision = Supervision(
            strategy, max_restarts, within_seconds, backoff_initial, backoff_max, stop_timeout
        )
    if not (isinstance(application_name, str) and application_name.startswith("pgbus")):
        raise ConfigError(f"application_name must start with 'pgbus' (got {application_name!r}).")
    keepalive = check_keepalive(keepalive)
    pool_mode = check_pool_mode(pool_mode)
    pool_size = check_pool_size(pool_size)
    if node is not None and pool_mode == "transaction":
        raise SessionNeededError("the cluster (node)")
    if node is not None:
        validate_node_name(node)
        if dsn is None and not embedded:
            raise NoDatabaseError()
    try:
        async with AsyncExitStack() as stack:
            if dsn is None and embedded:
                from ._embedded import open_embedded_postgres

                server = await stack.enter_async_context(open_embedded_postgres())
                dsn = server.dsn
            database = None
            if dsn is not None:
                database = await stack.enter_async_context(
                    open_database(
                        dsn,
                        application_name,
                        keepalive=keepalive,
                        transaction_pooling=pool_mode == "transaction",
                        pool_size=pool_size,
                    )
                )
            async with trio.open_nursery() as nursery:
                bus = Bus(
                    nursery,
                    supervision,
                    database,
                    keepalive=keepalive,
                    node=node,
                    durable_max_payload=validate_max_payload(durable_max_payload),
                )
                await nursery.start(bus._supervisor.run)
                drain = True
                try:
                    if node is not None:
                        await bus._join_cluster()
                    yield bus
                except BaseException as exc:
                    # Leaving on an error: stop at once. On a cancellation (a signal, a
                    # timeout): first let the actors handle what they hold.
                    drain = isinstance(unwrap_group(exc, skip_cancelled=False), trio.Cancelled)
                    raise
                finally:
                    with trio.CancelScope(shield=True):
                        await bus._shutdown(drain=drain)
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nurseries inside (ours, trio-asyncio's) wrap errors in groups; a user of the bus
        # should see the one error that happened, as itself, with the chain it already had.
        error = unwrap_group(group, skip_cancelled=False)
        if error is group:
            raise
        cause, context, suppress = error.__cause__, error.__context__, error.__suppress_context__
        try:
            raise error
        finally:
            error.__cause__, error.__context__ = cause, context
            error.__suppress_context__ = suppress
