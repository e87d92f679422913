"""
One bus across processes: nodes, public actors, remote ask/tell, singletons.

PostgreSQL is the engine; nothing here decides liveness on its own:

- **Membership.** A node holds a session advisory lock ``(NODE_LOCK_CLASS, its backend pid)`` on
  its own connection (``pgbus:node``). It is alive exactly while ``pg_locks`` shows that lock
  granted: when the session ends, cleanly or not, the server drops the lock. The table
  ``pgbus.cluster_nodes`` only says what each node offers (name, channel, public actors,
  singletons, inbound channels); a row whose lock is gone describes a dead node, is never used,
  and is deleted by the next node that joins.
- **Transport.** Requests and replies are JSON in NOTIFY payloads sent to the receiving node's
  channel (``pgbus.node.<random>``), read by the bus's listening connection and sent in batches
  by one task on a connection of its own. Every payload carries an id, so none repeats.
- **Failure.** Every ``keepalive / 4`` seconds a node re-reads the live membership on its node
  connection (which is also that connection's keepalive); asks pending on a node that is no
  longer alive fail at once with `ActorUnavailableError`.
- **Singletons.** A session advisory lock per singleton name, on the node connection: the node
  holding it runs the actor; the others try again every ``keepalive / 4`` seconds. A node whose
  node connection stops answering stops its singletons before the server can end that session
  (see ``session_settings``), so two never run at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import outcome
import trio

from ._actor import Request
from ._channel import Channel
from ._codec import MAX_PAYLOAD_BYTES, payload_size
from ._errors import (
    ActorFailedError,
    ActorUnavailableError,
    AskTimeoutError,
    DatabaseError,
    DatabaseUnavailableError,
    MessageNotJSONError,
    MessageTooLargeError,
    NodeNameTakenError,
    PgbusError,
    RemoteError,
    UnknownActorError,
)
from ._inbound import Gap, Notification
from ._pg import (
    Backoff,
    Connection,
    Database,
    Statement,
    connect_with_retry,
    publish_each,
    start_publish_each,
)

if TYPE_CHECKING:
    from ._bus import Bus
    from ._supervisor import ActorSpec

log = logging.getLogger("pgbus.cluster")

NODE_LOCK_CLASS = 0x70676273
"""First key of every node's advisory lock (``'pgbs'``); the second is the node's backend pid.
``(NODE_LOCK_CLASS, 0)`` serialises joins (a transaction lock)."""
CLUSTER_CHANNEL = "pgbus.cluster"
"""Every node listens here; a node joining or changing what it offers says so here."""
NODE_CHANNEL_PREFIX = "pgbus.node."
INBOX_NAME = "pgbus:cluster"
"""The bus channel this node's PostgreSQL channels (and the cluster's) are bridged into."""
MAX_BATCH = 1000
"""The most notifications one send carries."""
MAX_OVERFLOW = 10_000
"""Requests waiting, beyond full inboxes, for room; more are refused (counted, logged)."""
POLLS_PER_KEEPALIVE = 4
"""Membership (and the node connection's keepalive, and singleton stand-by) every keepalive/4."""
MAX_ERROR_TEXT = 2000
"""A remote error's message is cut to this many characters, so its reply always fits."""

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS pgbus;
CREATE TABLE IF NOT EXISTS pgbus.cluster_nodes (
    pid integer PRIMARY KEY,
    name text NOT NULL,
    channel text NOT NULL,
    host text NOT NULL,
    os_pid integer NOT NULL,
    started timestamptz NOT NULL DEFAULT now(),
    public text[] NOT NULL DEFAULT '{}',
    singletons text[] NOT NULL DEFAULT '{}',
    inbound text[] NOT NULL DEFAULT '{}'
)
"""
# A node is alive while its session holds its lock: the server's own state, never a row.
_ALIVE = f"""
EXISTS (SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = {NODE_LOCK_CLASS}::oid AND l.objid = n.pid::oid AND l.pid = n.pid)
"""
_LIVE_NODES = (
    "SELECT n.pid, n.name, n.channel, n.host, n.os_pid, n.started, n.public, n.singletons,"
    f" n.inbound FROM pgbus.cluster_nodes n WHERE {_ALIVE} ORDER BY n.name, n.pid"
)
_SINGLETON_LOCKS = (
    "SELECT classid::int8, objid::int8, pid FROM pg_locks"
    " WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def singleton_key(name: str) -> int:
    """The 64-bit advisory lock key of singleton *name* (stable across processes)."""
    digest = hashlib.blake2b(b"pgbus singleton:" + name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock_halves(key: int) -> tuple[int, int]:
    """How ``pg_locks`` shows a bigint advisory key: (classid, objid)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


def session_settings(keepalive: float) -> dict[str, str]:
    """
    Settings of the node connection, whose session holds the node's and singletons' locks.

    The server must not end the session sooner than the node itself notices a dead connection
    (at most keepalive/2 after its last successful poll): TCP keepalives probe after
    ``keepalive`` idle seconds, every ``keepalive/4``, 4 times, so the server gives up no sooner
    than 2 x keepalive after the last traffic; ``tcp_user_timeout`` (unacknowledged data) is
    2 x keepalive too. An idle-session timeout set server-wide must not end it either.
    """
    idle = max(1, math.ceil(keepalive))
    interval = max(1, math.ceil(keepalive / POLLS_PER_KEEPALIVE))
    return {
        "idle_session_timeout": "0",
        "idle_in_transaction_session_timeout": "0",
        "statement_timeout": "0",
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(interval),
        "tcp_keepalives_count": str(max(POLLS_PER_KEEPALIVE, math.ceil(idle / interval))),
        "tcp_user_timeout": str(2 * idle * 1000),
    }


_json_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_json_decode = json.JSONDecoder().decode


def _encode(actor: str, what: str, value: object) -> str:
    try:
        text = _json_encode(value)
        text.encode()  # a lone surrogate would fail in the driver, after sending began
    except (TypeError, ValueError, RecursionError) as exc:
        raise MessageNotJSONError(actor, what, str(exc)) from None
    return text


def _checked_size(actor: str, what: str, payload: str) -> str:
    size = payload_size(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise MessageTooLargeError(actor, what, size, MAX_PAYLOAD_BYTES)
    return payload


@attrs.frozen
class NodeInfo:
    """One live node of the cluster, as the registry describes it."""

    name: str
    pid: int
    """The backend pid of its node connection: the session whose life is the node's."""
    channel: str
    """The PostgreSQL channel its requests and replies go to."""
    host: str
    os_pid: int
    started: str
    public: tuple[str, ...]
    """Public actors it serves (singletons it holds included)."""
    singletons: tuple[str, ...]
    """Singletons it runs or stands by for."""
    inbound: tuple[str, ...]
    """The PostgreSQL channels its inbound bridges listen on."""

    @classmethod
    def from_row(cls, row: Any) -> NodeInfo:
        return cls(
            name=row[1],
            pid=row[0],
            channel=row[2],
            host=row[3],
            os_pid=row[4],
            started=row[5].isoformat(timespec="seconds"),
            public=tuple(row[6]),
            singletons=tuple(row[7]),
            inbound=tuple(row[8]),
        )


@attrs.frozen
class ClusterStatistics:
    """Counters of this bus as a node of the cluster (in `BusStatistics.cluster`)."""

    node: str
    joined: bool
    """True while the node connection holds the node's lock."""
    pending_asks: int
    """Asks of this node waiting for a reply from another node."""
    late_replies: int
    """Replies that came after their ask had given up (dropped)."""
    refused: int
    """Requests for actors this node does not run (any more), or beyond its overflow."""
    dropped: int
    """Malformed messages, and tells lost with a broken connection."""
    singletons_held: tuple[str, ...]


@attrs.frozen
class SingletonStatus:
    """A singleton of the cluster: who holds it (None while nobody does) and who stands by."""

    name: str
    holder: str | None
    holder_pid: int | None
    candidates: tuple[str, ...]


@attrs.frozen
class ClusterStatus:
    """What ``pgbus status`` shows: live nodes, singletons with their holders."""

    nodes: tuple[NodeInfo, ...]
    singletons: tuple[SingletonStatus, ...]
    durable: tuple[Any, ...] | None = None
    """Durable groups' lag and dead letters: filled by `_durable` once it exists (hook below)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "nodes": [attrs.asdict(n) for n in self.nodes],
            "singletons": [attrs.asdict(s) for s in self.singletons],
            "durable": None if self.durable is None else list(self.durable),
        }


async def read_status(connection: Connection) -> ClusterStatus:
    """The cluster as the server sees it now (two or three queries on *connection*)."""
    exists = await connection.fetchval("SELECT to_regclass('pgbus.cluster_nodes') IS NOT NULL")
    if not exists:
        return ClusterStatus((), (), await _durable_status(connection))
    nodes = tuple(NodeInfo.from_row(r) for r in await connection.fetch(_LIVE_NODES))
    locks = {(r[0], r[1]): r[2] for r in await connection.fetch(_SINGLETON_LOCKS)}
    by_pid = {n.pid: n for n in nodes}
    names = sorted({s for n in nodes for s in n.singletons})
    singletons = []
    for name in names:
        pid = locks.get(_lock_halves(singleton_key(name)))
        holder = by_pid.get(pid) if pid is not None else None
        candidates = tuple(n.name for n in nodes if name in n.singletons)
        singletons.append(
            SingletonStatus(
                name, holder.name if holder else None, pid if holder else None, candidates
            )
        )
    return ClusterStatus(nodes, tuple(singletons), await _durable_status(connection))


async def _durable_status(connection: Connection) -> tuple[dict[str, Any], ...] | None:
    """Durable channels' groups (lag, in flight, dead letters) for ``pgbus status``, if any."""
    if not await connection.fetchval("SELECT to_regclass('pgbus.deliveries') IS NOT NULL"):
        return None
    from ._durable._admin import group_status

    return tuple(attrs.asdict(group) for group in await group_status(connection))


class _Pending:
    """An ask waiting for its reply from another node: the first `settle` wins."""

    __slots__ = ("actor", "id", "node", "result", "task")

    def __init__(self, id: int, actor: str, node: NodeInfo) -> None:
        self.id = id
        self.actor = actor
        self.node = node
        self.result: outcome.Outcome[Any] | None = None
        self.task: trio.lowlevel.Task | None = None

    def settle(self, result: outcome.Outcome[Any]) -> None:
        if self.result is not None:
            return  # already settled (a reply after a failure, or the reverse)
        self.result = result
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> outcome.Outcome[Any]:
        """Wait for `settle`; cancellation leaves the ask unsettled (a reply then is late)."""
        if self.result is None:
            self.task = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self.task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        else:
            await trio.lowlevel.checkpoint()
        assert self.result is not None
        return self.result

    def fail(self, reason: str, *, while_handling: bool = True) -> None:
        error = ActorUnavailableError(
            self.actor, self.node.name, reason, while_handling=while_handling
        )
        self.settle(outcome.Error(error))


_Outgoing = tuple[str, str, "_Pending | None", bool]
"""What the sender sends: (channel, payload, the ask it carries or None, whether a reply)."""
_STARTED: Any = ("", "", None, False)  # in the outbox: `_queue_send` began a statement itself


class _RemoteReply:
    """Where a remote request's answer goes: encoded and queued for the asking node."""

    __slots__ = ("actor", "channel", "cluster", "id")

    def __init__(self, cluster: Cluster, channel: str, id: int, actor: str) -> None:
        self.cluster = cluster
        self.channel = channel
        self.id = id
        self.actor = actor

    def send_nowait(self, result: outcome.Outcome[Any]) -> None:
        """Called once by the actor loop, synchronously; never raises."""
        head = f'{{"k":"r","i":{self.id},'
        try:
            if isinstance(result, outcome.Value):
                payload = _checked_size(
                    self.actor,
                    "the reply",
                    f'{head}"v":{_encode(self.actor, "the reply", result.value)}}}',
                )
            else:
                assert isinstance(result, outcome.Error)
                payload = _error_payload(self.id, result.error)
        except PgbusError as exc:
            payload = _error_payload(self.id, exc)
        self.cluster._queue_send(self.channel, payload, None, reply=True)


def _error_payload(id: int, error: BaseException) -> str:
    return _json_encode(
        {"k": "e", "i": id, "t": type(error).__name__, "e": str(error)[:MAX_ERROR_TEXT]}
    )


class _Handoff(Channel):
    """A channel that is never full: each message goes straight to *handler*, synchronously."""

    def __init__(self, name: str, handler: Callable[[object], None]) -> None:
        super().__init__(name, 0)
        self.send_nowait = handler


@attrs.define(eq=False)
class _Singleton:
    spec: ActorSpec
    key: int
    held: bool = False


class Cluster:
    """
    This bus as a node of the cluster. Made by the bus (`Bus._join_cluster`); `serve` runs it.

    Tasks (in `serve`'s nursery): the node task (join, poll membership, hold singletons), the
    sender (batches what queued into one ``pg_notify`` statement per round trip; an ask or a
    tell is sent from its caller's task when the connection is free) and the forwarder (waits
    for room in full inboxes). What arrives on this node's channel is handled inside the
    listener's socket read (`_receive`): replies settle asks, requests go into inboxes.
    """

    def __init__(self, bus: Bus, database: Database, *, name: str, keepalive: float) -> None:
        self._bus = bus
        self._db = database
        self.inbox: Channel = _Handoff(INBOX_NAME, self._receive)
        """What the inbound bridges of this node's channels deliver to: `_receive`, directly."""
        self.name = name
        self.keepalive = keepalive
        self.period = keepalive / POLLS_PER_KEEPALIVE
        self.channel = NODE_CHANNEL_PREFIX + secrets.token_hex(8)
        self.host = socket.gethostname()
        self.pid: int | None = None
        """Backend pid of the node connection while joined (the node's identity)."""
        self._nodes: dict[int, NodeInfo] = {}
        self._serving: dict[str, list[NodeInfo]] = {}
        self._standby: set[str] = set()  # singletons some live node waits to run
        self._turn = itertools.count()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._outbox_send, self._outbox = trio.open_memory_channel[_Outgoing](math.inf)
        self._public: dict[str, ActorSpec] = {}
        self._singletons: dict[str, _Singleton] = {}
        self._overflow: deque[tuple[Channel, object]] = deque()
        self._overflow_ready = trio.Event()
        self._wake: trio.CancelScope | None = None
        self._poll_now = False
        self._dirty = True
        self._sender_idle = trio.Event()
        self._send_connection: Connection | None = None
        self._sender_parked = False  # the sender waits on an empty outbox, nothing in flight
        self._started: tuple[Statement, _Outgoing] | None = None  # begun by `_queue_send`
        self._queued = 0  # in the outbox, not yet taken by the sender
        self._acquired: list[_Singleton] = []
        self._registered: tuple[list[str], list[str], list[str]] | None = None
        self._stopping = False
        self.late_replies = 0
        self.refused = 0
        self.dropped = 0

    def statistics(self) -> ClusterStatistics:
        return ClusterStatistics(
            node=self.name,
            joined=self.pid is not None,
            pending_asks=len(self._pending),
            late_replies=self.late_replies,
            refused=self.refused,
            dropped=self.dropped,
            singletons_held=tuple(n for n, s in self._singletons.items() if s.held),
        )

    # -- what this node offers ---------------------------------------------------------------

    async def offer(self, spec: ActorSpec) -> None:
        """Make the local actor of *spec* public; returns once the registry says so."""
        self._public[spec.name] = spec
        await self._update_registry_now()

    def add_singleton(self, spec: ActorSpec) -> None:
        """Stand by to run *spec* whenever this node gets its lock (within keepalive/4)."""
        self._singletons[spec.name] = _Singleton(spec, singleton_key(spec.name))
        self._dirty = True
        self._wake_node()

    def has_singleton(self, name: str) -> bool:
        return name in self._singletons

    def _offered(self) -> list[str]:
        held = [s.spec.name for s in self._singletons.values() if s.held and s.spec.inbox]
        return list(dict.fromkeys([*self._public, *held]))

    def _inbound(self) -> list[str]:
        listener = self._bus._listener
        channels = listener.channels if listener is not None else set()
        return sorted(c for c in channels if c not in (self.channel, CLUSTER_CHANNEL))

    # -- asking other nodes ------------------------------------------------------------------

    async def ask(self, actor: str, message: object, *, timeout: float, deadline: float) -> Any:
        """See `Bus.ask`: the remote half, giving up at *deadline* (*timeout* for messages)."""
        body = _encode(actor, "the message", message)
        node = self._serving_now(actor)
        if node is None:  # a miss reads the registry again: bounded by the ask's deadline
            with trio.move_on_at(deadline):
                node = await self._route(actor)
            if node is None:
                raise AskTimeoutError(actor, timeout)
        id = next(self._ids)
        payload = _checked_size(
            actor,
            "the request",
            f'{{"k":"a","i":{id},"a":{_json_encode(actor)},"r":"{self.channel}","m":{body}}}',
        )
        pending = self._pending[id] = _Pending(id, actor, node)
        try:
            # Sent first, then the deadline's cancel scope: its few µs are not on the way out.
            self._queue_send(node.channel, payload, pending)
            with trio.move_on_at(deadline) as scope:
                result = await pending.wait()
        finally:
            del self._pending[id]
        if scope.cancelled_caught:
            raise AskTimeoutError(actor, timeout)
        if isinstance(result, outcome.Error) and isinstance(result.error, RemoteError):
            raise ActorFailedError(actor, result.error) from result.error
        return result.unwrap()

    async def tell(self, actor: str, message: object) -> None:
        """See `Bus.tell`: the remote half. Returns once queued for sending."""
        body = _encode(actor, "the message", message)
        node: NodeInfo | None = None
        with trio.move_on_after(self.keepalive):
            node = await self._route(actor)
        if node is None:
            reason = f"the cluster's registry could not be read within {self.keepalive:g}s"
            raise ActorUnavailableError(actor, None, reason, while_handling=False)
        id = next(self._ids)
        payload = f'{{"k":"t","i":{id},"a":{_json_encode(actor)},"m":{body}}}'
        self._queue_send(node.channel, _checked_size(actor, "the message", payload), None)
        await trio.lowlevel.checkpoint()

    def _serving_now(self, actor: str) -> NodeInfo | None:
        """A live node serving *actor*, in turn, as far as the last registry read knows."""
        nodes = self._serving.get(actor)
        return nodes[next(self._turn) % len(nodes)] if nodes else None

    async def _route(self, actor: str) -> NodeInfo:
        """A live node serving *actor*, in turn; the registry is read again on a miss."""
        node = self._serving_now(actor)
        if node is not None:
            return node
        await self._refresh()
        nodes = self._serving.get(actor)
        if not nodes:
            if actor in self._standby:
                raise ActorUnavailableError(
                    actor,
                    None,
                    "it is a singleton and no node holds it right now",
                    while_handling=False,
                )
            raise UnknownActorError(actor, where="on any node of the cluster")
        return nodes[next(self._turn) % len(nodes)]

    async def _refresh(self) -> None:
        async with self._db.borrow() as connection:
            rows = await connection.fetch(_LIVE_NODES)
        self._apply(rows)

    def _apply(self, rows: Iterable[Any]) -> None:
        """Take a fresh membership; asks pending on a node that is gone fail now."""
        nodes = {}
        for row in rows:
            node = NodeInfo.from_row(row)
            nodes[node.pid] = node
        serving: dict[str, list[NodeInfo]] = {}
        standby: set[str] = set()
        for node in nodes.values():
            if node.pid == self.pid:
                continue  # what this node runs, it asks locally
            for name in node.public:
                serving.setdefault(name, []).append(node)
            standby.update(node.singletons)
        standby.update(self._singletons)
        self._nodes, self._serving, self._standby = nodes, serving, standby
        for pending in list(self._pending.values()):
            if pending.node.pid not in nodes:
                pending.fail("its session ended")

    def _queue_send(
        self, channel: str, payload: str, pending: _Pending | None, *, reply: bool = False
    ) -> None:
        """
        Send from the caller's task if the sender is idle: the statement is written here and
        the sender only reads its reply (one task switch fewer on every request and reply).
        Else queue it for the sender, which batches. A *reply* is sent again if the connection
        breaks; a request or tell is not (one sent twice could be handled twice).
        """
        item = (channel, payload, pending, reply)
        self._queued += 1
        connection = self._send_connection
        if (
            self._sender_parked
            and self._queued == 1
            and connection is not None
            and connection.poll()  # not gone while idle (a restart, a terminate)
        ):
            self._sender_parked = False
            self._started = (start_publish_each(connection, (channel,), (payload,)), item)
            self._outbox_send.send_nowait(_STARTED)  # wakes the sender, to read the reply
            return
        self._outbox_send.send_nowait(item)

    # -- the tasks ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled; started once joined (its lock held, its row written)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._send_loop)
            nursery.start_soon(self._forward_loop)
            await nursery.start(self._node_loop)
            task_status.started()

    async def withdraw(self) -> None:
        """Leaving: tell the others to send nothing more here (bounded by keepalive)."""
        self._stopping = True
        self._public.clear()
        with trio.move_on_after(self.keepalive):
            await self._update_registry_now(offer=False)

    async def flush(self, timeout: float) -> None:
        """Wait (at most *timeout*) until everything queued for sending has been sent."""
        with trio.move_on_after(timeout):
            while self._queued or not self._sender_idle.is_set():
                await self._sender_idle.wait()
                await trio.lowlevel.checkpoint()

    # .. sending ..............................................................................

    async def _send_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        backoff = Backoff()
        connection = await connect_with_retry(self._db, "cluster send", backoff)
        self._send_connection = connection
        task_status.started()
        batch: list[_Outgoing] = []
        try:
            while True:
                started: Statement | None = None
                if not batch:
                    if trio.lowlevel.current_statistics().tasks_runnable:
                        await trio.lowlevel.checkpoint()  # senders that are ready queue first
                    try:
                        item = self._outbox.receive_nowait()
                    except trio.WouldBlock:
                        self._sender_idle.set()
                        self._sender_parked = True
                        try:
                            item = await self._outbox.receive()
                        finally:
                            self._sender_parked = False
                        self._sender_idle = trio.Event()
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
                            self._send_connection = None
                            connection = await connect_with_retry(self._db, "cluster send", backoff)
                            self._send_connection = connection
                        await publish_each(connection, [b[0] for b in batch], [b[1] for b in batch])
                    batch.clear()
                except DatabaseError as exc:
                    self._lost_sends(batch, f"PostgreSQL refused it: {exc}")
                    batch.clear()
                except DatabaseUnavailableError as exc:
                    # Replies go again (the asker keeps the first, drops a repeat as late);
                    # requests and tells do not: one sent twice could be handled twice.
                    reason = f"the connection broke while sending: {exc}"
                    self._lost_sends([b for b in batch if not b[3]], reason)
                    batch[:] = [b for b in batch if b[3]]
                    self._send_connection = None
                    connection.abort()
                    connection = await connect_with_retry(self._db, "cluster send", backoff)
                    self._send_connection = connection
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose()

    def _lost_sends(self, lost: Sequence[_Outgoing], reason: str) -> None:
        """Messages that may not have gone out, and will not go again: their asks fail now."""
        if not lost:
            return
        log.warning("cluster: %d message(s) not sent: %s", len(lost), reason)
        for _, _, pending, _ in lost:
            if pending is None:
                self.dropped += 1
            else:
                pending.fail(f"the request may not have been sent: {reason}")

    # .. receiving ............................................................................

    def _receive(self, item: object) -> None:
        """
        Called by the listener for each notification on this node's channels, inside its socket
        read: replies settle their asks and requests go into inboxes right here, without a
        task switch. Never waits (a full inbox: `_forward_loop` waits) and never raises.
        """
        try:
            if type(item) is Notification:
                if item.channel == CLUSTER_CHANNEL:
                    self._poll_soon()
                else:
                    self._dispatch(item.payload)
            elif type(item) is Gap:
                self._on_gap(item)
        except Exception as exc:  # a bug here must not stop the bus's listener
            self.dropped += 1
            log.error("cluster: dropped a message: %r", exc, exc_info=exc)

    def _on_gap(self, gap: Gap) -> None:
        if gap.channel == CLUSTER_CHANNEL:
            self._poll_soon()
            return
        # Replies sent while this node's listening connection was down are lost for good.
        for pending in list(self._pending.values()):
            pending.fail("this node's listening connection reconnected; the reply may be lost")

    def _dispatch(self, payload: str) -> None:
        try:
            message = _json_decode(payload)
            kind = message["k"]
            id = message["i"]
        except (ValueError, KeyError, TypeError) as exc:
            self.dropped += 1
            log.error("cluster: dropped a malformed message on %r: %r", self.channel, exc)
            return
        if kind == "r" or kind == "e":
            pending = self._pending.get(id)
            if pending is None:
                self.late_replies += 1
                log.info("cluster: dropped a reply to ask #%s, which had already given up", id)
            elif kind == "r":
                pending.settle(outcome.Value(message.get("v")))
            elif message.get("t") is None:  # "u": the node does not run it (any more)
                pending.fail(str(message.get("e")), while_handling=False)
            else:
                error = RemoteError(str(message.get("t")), str(message.get("e")), pending.node.name)
                pending.settle(outcome.Error(error))
            return
        if kind != "a" and kind != "t":
            self.dropped += 1
            log.error("cluster: dropped a message of unknown kind %r on %r", kind, self.channel)
            return
        actor = message.get("a")
        spec = self._public.get(actor) if isinstance(actor, str) else None
        if spec is None and isinstance(actor, str):
            singleton = self._singletons.get(actor)
            if singleton is not None and singleton.held:
                spec = singleton.spec
        if spec is None or spec.inbox is None:
            self._refuse(message, f"it is not running on node {self.name!r}")
            return
        if kind == "a":
            item: object = Request(
                message.get("m"), _RemoteReply(self, str(message.get("r")), id, actor)
            )
        else:
            item = message.get("m")
        inbox = spec.inbox
        if not self._overflow:
            try:
                inbox.send_nowait(item)
                return
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._refuse(message, "its inbox is closed")
                return
        if len(self._overflow) >= MAX_OVERFLOW:
            self._refuse(message, f"node {self.name!r} already holds {MAX_OVERFLOW} requests")
            return
        self._overflow.append((inbox, item))
        self._overflow_ready.set()

    def _refuse(self, message: dict[str, Any], reason: str) -> None:
        self.refused += 1
        actor = message.get("a")
        if message.get("k") == "a" and isinstance(message.get("r"), str):
            unavailable = _json_encode({"k": "e", "i": message["i"], "t": None, "e": reason})
            self._queue_send(message["r"], unavailable, None, reply=True)
        log.warning("cluster: refused a message for actor %r: %s", actor, reason)

    async def _forward_loop(self) -> None:
        """Move requests that found an inbox full into it, in order, waiting for room."""
        while True:
            await self._overflow_ready.wait()
            self._overflow_ready = trio.Event()
            while self._overflow:
                inbox, item = self._overflow[0]
                try:
                    await inbox.send(item)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.dropped += 1
                    log.warning("cluster: dropped a request: inbox %r closed", inbox.name)
                self._overflow.popleft()

    # .. the node connection ..................................................................

    def _wake_node(self) -> None:
        self._poll_now = True
        if self._wake is not None:
            self._wake.cancel()

    def _poll_soon(self) -> None:
        self._wake_node()

    async def _node_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        backoff = Backoff()
        first = True
        while True:
            connection = await connect_with_retry(self._db, "node", backoff)
            try:
                try:
                    await self._join(connection, first=first)
                except NodeNameTakenError:
                    if first:
                        raise
                    # Our own previous session, not yet ended by the server: wait for it.
                    await trio.sleep(backoff.next_delay() or self.period)
                    continue
                except (DatabaseUnavailableError, trio.TooSlowError) as exc:
                    log.warning("cluster: joining failed: %s; retrying", exc)
                    await trio.sleep(backoff.next_delay())
                    continue
                if first:
                    task_status.started()
                    first = False
                await self._watch(connection)
            finally:
                self.pid = None
                with trio.CancelScope(shield=True):
                    await self._release_singletons()
                    if self._stopping and not connection.closed:
                        await connection.aclose()
                    else:
                        connection.abort()
            log.warning("cluster: node %r lost its node connection; joining again", self.name)

    async def _join(self, connection: Connection, *, first: bool) -> None:
        with trio.fail_after(self.keepalive):
            version = int(await connection.fetchval("SELECT current_setting('server_version_num')"))
            for key, value in session_settings(self.keepalive).items():
                if key == "idle_session_timeout" and version < 140000:
                    continue
                await connection.execute("SELECT set_config($1, $2, false)", key, value)
            listener = self._bus._listener
            if listener is not None:
                # Advertise this node only once its channel is listened to again (after a
                # reconnect): a request sent before would be lost.
                await listener.wait_listening()
            for attempt in (1, 2):
                try:
                    await self._register(connection)
                    break
                except DatabaseError as exc:
                    # Two processes creating the schema at once: one loses; try once more.
                    if attempt == 2 or exc.sqlstate not in ("23505", "42P06", "42P07"):
                        raise
        self.pid = connection.pid
        await self._poll(connection)

    async def _register(self, connection: Connection) -> None:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1, 0)", NODE_LOCK_CLASS)
            await connection.execute(_SCHEMA)
            await connection.execute(f"DELETE FROM pgbus.cluster_nodes n WHERE NOT {_ALIVE}")
            taken = await connection.fetchval(
                "SELECT pid FROM pgbus.cluster_nodes WHERE name = $1 AND pid <> pg_backend_pid()",
                self.name,
            )
            if taken is not None:
                raise NodeNameTakenError(self.name, taken)
            await connection.execute(
                "INSERT INTO pgbus.cluster_nodes"
                " (pid, name, channel, host, os_pid, public, singletons, inbound)"
                " VALUES (pg_backend_pid(), $1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (pid) DO UPDATE SET name = $1, channel = $2, host = $3,"
                " os_pid = $4, public = $5, singletons = $6, inbound = $7, started = now()",
                self.name,
                self.channel,
                self.host,
                os.getpid(),
                self._offered(),
                list(self._singletons),
                self._inbound(),
            )
            await connection.execute(
                "SELECT pg_advisory_lock($1, pg_backend_pid())", NODE_LOCK_CLASS
            )
            await connection.execute(
                "SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, f"join {self.name}"
            )
        self._dirty = False
        self._registered = (self._offered(), list(self._singletons), self._inbound())

    async def _watch(self, connection: Connection) -> None:
        """Poll every period (or sooner when asked); return when the connection is lost."""
        await self._start_acquired()
        next_poll = trio.current_time() + self.period
        while True:
            if not self._poll_now:
                with trio.CancelScope(deadline=next_poll) as waiting:
                    self._wake = waiting
                    # The server's farewell (an administrator's pg_terminate_backend, a
                    # shutdown) is read at once, not at the next poll.
                    await connection.receive()
                self._wake = None
            if connection.closed:
                return
            if self._poll_now or trio.current_time() >= next_poll:
                self._poll_now = False
                try:
                    with trio.fail_after(self.period):
                        await self._poll(connection)
                except (DatabaseUnavailableError, trio.TooSlowError, DatabaseError) as exc:
                    log.warning(
                        "cluster: node connection to %s did not answer its keepalive (%s)",
                        self._db.where,
                        exc,
                    )
                    return
                next_poll = trio.current_time() + self.period
                await self._start_acquired()

    async def _poll(self, connection: Connection) -> None:
        """Registry up to date, singletons tried, membership read: one period's work."""
        current = (self._offered(), list(self._singletons), self._inbound())
        if (self._dirty or current != self._registered) and not self._stopping:
            await self._write_registry(connection, *current)  # (leaving: withdrawn for good)
        waiting = [s.key for s in self._singletons.values() if not s.held]
        if waiting and not self._stopping:
            rows = await connection.fetch(
                "SELECT k, pg_try_advisory_lock(k) FROM unnest($1::int8[]) AS k", waiting
            )
            won = {r[0] for r in rows if r[1]}
            for singleton in self._singletons.values():
                if singleton.key in won:
                    singleton.held = True  # started by _start_acquired, outside the bound
                    self._acquired.append(singleton)
            if won:  # advertised at once: requests wait in its inbox until it has started
                await self._write_registry(
                    connection, self._offered(), list(self._singletons), self._inbound()
                )
        self._apply(await connection.fetch(_LIVE_NODES))

    async def _start_acquired(self) -> None:
        acquired, self._acquired = self._acquired, []
        for singleton in acquired:
            log.info("cluster: node %r runs singleton %r", self.name, singleton.spec.name)
            await self._bus._supervisor.start(singleton.spec)

    async def _write_registry(
        self, connection: Connection, public: list[str], singletons: list[str], inbound: list[str]
    ) -> None:
        await connection.execute(
            "UPDATE pgbus.cluster_nodes SET public = $1, singletons = $2, inbound = $3"
            " WHERE pid = pg_backend_pid()",
            public,
            singletons,
            inbound,
        )
        await connection.execute("SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, f"change {self.name}")
        self._dirty = False
        self._registered = (public, singletons, inbound)

    async def _update_registry_now(self, *, offer: bool = True) -> None:
        """Write what this node offers on a pooled connection, now (the node row is ours)."""
        if self.pid is None:
            self._dirty = True
            return
        public = self._offered() if offer else []
        singletons = list(self._singletons) if offer else []
        async with self._db.borrow() as connection:
            await connection.execute(
                "UPDATE pgbus.cluster_nodes SET public = $1, singletons = $2, inbound = $3"
                " WHERE pid = $4",
                public,
                singletons,
                self._inbound(),
                self.pid,
            )
            await connection.execute(
                "SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, f"change {self.name}"
            )
        self._registered = (public, singletons, self._inbound())

    async def _release_singletons(self) -> None:
        """The node connection is gone, so are its locks: stop every singleton held here."""
        self._acquired = []
        for singleton in self._singletons.values():
            if singleton.held:
                if not self._stopping:  # leaving: the bus has stopped its actors already
                    log.warning(
                        "cluster: node %r stops singleton %r (its lock went with the node "
                        "connection)",
                        self.name,
                        singleton.spec.name,
                    )
                await self._bus._supervisor.remove(singleton.spec.name)
                singleton.held = False
