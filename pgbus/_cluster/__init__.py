"""
One bus across processes: a sibling service of the bus, built from the database, the supervisor
and the listener (never the Bus itself).

- `_wire`: the protocol, declared once (tagged types, strict JSON both ways, checked on receipt).
- `_sender`: the connection that sends requests and replies (idle: from the caller's task; busy:
  in batches; a batch PostgreSQL refuses is sent again item by item).
- `_membership`: this node's registration and liveness, the registry, singletons.
- `Cluster` (here): ask, tell, routing, and dispatching what arrives on this node's channel.

What arrives is read by the bus's one listening connection and handed to `Cluster._receive`
through the listener's hooks (`InboundBridge.subscribe`), inside its socket read: no channel of
the bus's registry is involved. Replies are accepted only from the backends the serving node
registered as its senders, and only for an ask that is waiting (ids are random). Requests go into
their actor's inbox; when it is full, into an overflow of that actor's own (bounded), so a slow
actor holds back only its own requests. Whatever cannot be taken is counted: junk (malformed, or
from a backend that is not the serving node) is logged once, then summarized per interval.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import outcome
import trio

from .. import _tracing
from .._actor import NO_REPLY, Request
from .._errors import (
    ActorFailedError,
    ActorUnavailableError,
    AskTimeoutError,
    PgbusError,
    RemoteError,
    UnknownActorError,
)
from ._membership import (
    CLUSTER_CHANNEL,
    NODE_LOCK_CLASS,
    ClusterStatus,
    JoinError,
    Membership,
    NodeInfo,
    SingletonStatus,
    read_status,
    session_settings,
    singleton_key,
)
from ._sender import Outgoing, Sender
from ._wire import (
    NODE_CHANNEL_PREFIX,
    Ask,
    Failure,
    Refusal,
    Reply,
    Tell,
    WireError,
    decode,
    dumps,
    new_id,
    new_node_channel,
)

if TYPE_CHECKING:
    from .._channel import Channel
    from .._inbound import InboundBridge
    from .._pg import Connection, Database
    from .._supervisor import ActorSpec, Supervisor

__all__ = [
    "CLUSTER_CHANNEL",
    "NODE_CHANNEL_PREFIX",
    "NODE_LOCK_CLASS",
    "Cluster",
    "ClusterStatistics",
    "ClusterStatus",
    "JoinError",
    "NodeInfo",
    "SingletonStatus",
    "read_status",
    "session_settings",
    "singleton_key",
]

log = logging.getLogger("pgbus.cluster")

MAX_OVERFLOW_PER_ACTOR = 1000
"""Requests waiting, beyond one actor's full inbox, for room; more are refused (answered)."""
MAX_SUSPECTS = 16
"""Replies to one ask kept, until the next registry read, from a backend not known as the node's."""
JUNK_SUMMARY_EVERY = 60.0
"""After the first one, junk is logged as one summary line per this many seconds."""

_NO_CONTEXT = (None, None)
_NOBODY = NodeInfo("", -1, "", "", 0, "", (), (), (), (-1,))
"""Where a keyed actor's ask went when no node held its key yet."""


@attrs.frozen
class ClusterStatistics:
    """Counters of this bus as a node of the cluster (in `BusStatistics.cluster`)."""

    node: str
    joined: bool
    """True while the node connection holds the node's lock."""
    pending_asks: int
    """Asks of this node waiting for a reply from another node."""
    late_replies: int
    """Replies that came for no waiting ask (it had given up already), dropped."""
    refused: int
    """Requests for actors this node does not run (any more), or beyond an actor's overflow."""
    dropped: int
    """Tells lost with a broken connection, or refused by PostgreSQL."""
    singletons_held: tuple[str, ...]
    junk: int = 0
    """Payloads on this node's channel that are not messages of the protocol, or replies from
    a backend that is not the serving node's: ignored."""
    overflowing: int = 0
    """Requests waiting for room in a full inbox (all actors)."""
    asks: tuple[tuple[str, int], ...] = ()
    """Asks this node sent to other nodes, by outcome: ``replied``, ``failed`` (the remote
    handle raised), ``unavailable`` (the serving node died or refused), ``timeout``."""
    singleton_changes: int = 0
    """Singletons this node started or stopped holding."""


class _Pending:
    """An ask waiting for its reply from another node: the first `settle` wins."""

    __slots__ = ("actor", "any_node", "id", "node", "result", "suspects", "task")

    def __init__(self, id: int, actor: str, node: NodeInfo, *, any_node: bool = False) -> None:
        self.id = id
        self.actor = actor
        self.node = node
        self.any_node = any_node
        """An entity's ask: any node of the cluster may answer (the key may move meanwhile),
        and the node it was sent to leaving fails nothing (the message is stored)."""
        self.result: outcome.Outcome[Any] | None = None
        self.task: trio.lowlevel.Task | None = None
        self.suspects: list[tuple[int, Reply | Failure | Refusal]] = []
        """Replies from a backend the registry did not (yet) name as the node's sender."""

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

    def answer(self, message: Reply | Failure | Refusal) -> None:
        if type(message) is Reply:
            self.settle(outcome.Value(message.value))
        elif type(message) is Refusal:  # the node does not run it (any more), or is full
            self.fail(message.reason, while_handling=False)
        else:
            assert type(message) is Failure
            error = RemoteError(message.type_name, message.text, self.node.name)
            self.settle(outcome.Error(error))


class _RemoteReply:
    """Where a remote request's answer goes: encoded and queued for the asking node."""

    __slots__ = ("actor", "channel", "cluster", "id")

    def __init__(self, cluster: Cluster, channel: str, id: str | int, actor: str) -> None:
        self.cluster = cluster
        self.channel = channel
        self.id = id
        self.actor = actor

    def send_nowait(self, result: outcome.Outcome[Any]) -> None:
        """Called once by the actor loop, synchronously; never raises."""
        try:
            if isinstance(result, outcome.Value):
                payload = Reply(self.id, result.value).encode(self.actor)
            else:
                assert isinstance(result, outcome.Error)
                payload = Failure.of(self.id, result.error).encode()
        except PgbusError as exc:
            payload = Failure.of(self.id, exc).encode()
        self.cluster._sender.send(self.channel, payload, None, reply=True)


class Cluster:
    """
    This bus as a node of the cluster; `serve` runs it (made by the bus, which starts it).

    Tasks (in `serve`'s nursery): the sender, the membership (join, poll, singletons), and a
    forwarder per actor whose inbox overflowed, while it has requests waiting.
    """

    def __init__(
        self,
        database: Database,
        supervisor: Supervisor,
        listener: InboundBridge,
        *,
        name: str,
        keepalive: float,
    ) -> None:
        self._listener = listener
        self.keepalive = keepalive
        self.channel = new_node_channel()
        self._sender = Sender(database, self._lost_sends, self._sender_connected)
        self._membership = Membership(
            database,
            supervisor,
            listener,
            name=name,
            channel=self.channel,
            keepalive=keepalive,
            sender_pids=self._sender_pids,
            on_nodes=self._apply,
        )
        self.name = name
        self._nodes: dict[int, NodeInfo] = {}
        self._serving: dict[str, list[NodeInfo]] = {}
        self._standby: set[str] = set()  # singletons some live node waits to run
        # A random first turn: a process that asks once (the CLI) must not always pick the
        # first node by name.
        self._turn = itertools.count(secrets.randbelow(1 << 16))
        self._pending: dict[int | str, _Pending] = {}
        self._watchers: list[Callable[[], None]] = []
        self._extra_senders: set[int] = set()
        """Backends besides the sender that send replies for this node (keyed actors' commits)."""
        self._overflows: dict[Channel, deque[tuple[object, Ask | Tell]]] = {}
        self._nursery: trio.Nursery | None = None
        self.late_replies = 0
        self.refused = 0
        self.dropped = 0
        self.junk = 0
        self.asks: Counter[str] = Counter()
        """Asks sent to other nodes, by outcome (see `ClusterStatistics.asks`)."""
        self._junk_logged = False
        self._junk_unlogged = 0
        self._junk_since = 0.0

    @property
    def join_problem(self) -> str | None:
        """Why the last attempt to join failed, or None."""
        return self._membership.join_problem

    @property
    def pid(self) -> int | None:
        """Backend pid of the node connection while joined (the node's identity)."""
        return self._membership.pid

    def statistics(self) -> ClusterStatistics:
        return ClusterStatistics(
            node=self.name,
            joined=self._membership.pid is not None,
            pending_asks=len(self._pending),
            late_replies=self.late_replies,
            refused=self.refused,
            dropped=self.dropped,
            singletons_held=self._membership.held(),
            junk=self.junk,
            overflowing=sum(len(q) for q in self._overflows.values()),
            asks=tuple(sorted(self.asks.items())),
            singleton_changes=self._membership.singleton_changes,
        )

    # -- what this node offers ---------------------------------------------------------------

    async def offer(self, spec: ActorSpec) -> None:
        """Make the local actor of *spec* public; returns once the registry says so."""
        await self._membership.offer(spec)

    def add_singleton(self, spec: ActorSpec) -> None:
        """Stand by to run *spec* whenever this node gets its lock (within keepalive/4)."""
        self._membership.add_singleton(spec)

    def has_singleton(self, name: str) -> bool:
        return name in self._membership.singletons

    def _sender_pids(self) -> list[int]:
        pid = self._sender.pid
        return sorted(self._extra_senders if pid is None else {pid, *self._extra_senders})

    async def _sender_connected(self, connection: Connection) -> None:
        # Registered from the new backend itself, before it sends anything: a reply it sends
        # next is committed after the registry says it may come from there.
        await self._membership.advertise_sender(connection, self._sender_pids())

    async def add_sender(self, connection: Connection, old_pid: int | None = None) -> None:
        """
        *connection* sends replies for this node too (a keyed actors' commit connection,
        replacing *old_pid*): registered from it before it sends any.
        """
        if old_pid is not None:
            self._extra_senders.discard(old_pid)
        self._extra_senders.add(connection.pid)
        await self._membership.advertise_sender(connection, self._sender_pids())

    def remove_sender(self, pid: int) -> None:
        self._extra_senders.discard(pid)

    # -- asking other nodes ------------------------------------------------------------------

    async def ask(self, actor: str, message: object, *, timeout: float, deadline: float) -> Any:
        """See `Bus.ask`: the remote half, giving up at *deadline* (*timeout* for messages)."""
        try:
            reply = await self._ask(actor, message, timeout=timeout, deadline=deadline)
        except AskTimeoutError:
            self.asks["timeout"] += 1
            raise
        except ActorFailedError:
            self.asks["failed"] += 1
            raise
        except ActorUnavailableError:
            self.asks["unavailable"] += 1
            raise
        self.asks["replied"] += 1
        return reply

    async def _ask(self, actor: str, message: object, *, timeout: float, deadline: float) -> Any:
        node = self._serving_now(actor)
        if node is None:  # a miss reads the registry again: bounded by the ask's deadline
            dumps(message, actor, "the message")  # not JSON: said before any round trip
            with trio.move_on_at(deadline):
                node = await self._route(actor)
            if node is None:
                raise AskTimeoutError(actor, timeout)
        with _tracing.sending("ask", actor, node.name) as context:
            id = new_id()
            payload = Ask(id, actor, self.channel, message, *(context or _NO_CONTEXT)).encode()
            pending = self._pending[id] = _Pending(id, actor, node)
            try:
                # Sent first, then the deadline's cancel scope: its few µs are not on the way out.
                self._sender.send(node.channel, payload, pending)
                with trio.move_on_at(deadline) as scope:
                    result = await pending.wait()
            finally:
                del self._pending[id]
            if scope.cancelled_caught:
                raise AskTimeoutError(actor, timeout)
            if isinstance(result, outcome.Error) and isinstance(result.error, RemoteError):
                raise ActorFailedError(actor, result.error) from result.error
            return result.unwrap()

    def expect_reply(self, what: str, node: NodeInfo | None) -> _Pending:
        """
        A reply to come for *what* (a keyed actor's ask, stored by the caller with this
        node's channel and the pending's id), from any node; `forget` it when done.
        """
        pending = _Pending(new_id(), what, node or _NOBODY, any_node=True)
        self._pending[pending.id] = pending
        return pending

    def forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.id, None)

    def node_by_channel(self, channel: str | None) -> NodeInfo | None:
        """The live node listening on *channel*, as the last registry read knows."""
        for node in self._nodes.values():
            if node.channel == channel:
                return node
        return None

    async def tell(self, actor: str, message: object) -> None:
        """See `Bus.tell`: the remote half. Returns once queued for sending."""
        dumps(message, actor, "the message")
        node: NodeInfo | None = None
        with trio.move_on_after(self.keepalive):
            node = await self._route(actor)
        if node is None:
            reason = f"the cluster's registry could not be read within {self.keepalive:g}s"
            raise ActorUnavailableError(actor, None, reason, while_handling=False)
        with _tracing.sending("tell", actor, node.name) as context:
            tell = Tell(new_id(), actor, message, *(context or _NO_CONTEXT))
            self._sender.send(node.channel, tell.encode(), None)
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
        await self._membership.refresh()
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

    def _apply(self, nodes: dict[int, NodeInfo]) -> None:
        """Take a fresh membership; asks pending on a node that is gone fail now."""
        own = self._membership.pid
        serving: dict[str, list[NodeInfo]] = {}
        standby: set[str] = set()
        for node in nodes.values():
            if node.pid == own:
                continue  # what this node runs, it asks locally
            for name in node.public:
                serving.setdefault(name, []).append(node)
            standby.update(node.singletons)
        standby.update(self._membership.singletons)
        self._nodes, self._serving, self._standby = nodes, serving, standby
        for pending in list(self._pending.values()):
            current = nodes.get(pending.node.pid)
            if current is None and not pending.any_node:
                pending.fail("its session ended")
                continue
            if current is not None:
                pending.node = current
            if pending.suspects:
                suspects, pending.suspects = pending.suspects, []
                for pid, message in suspects:
                    if self._accepts(pending, pid, nodes):
                        pending.answer(message)
                    else:
                        self._junk(f"a reply from backend {pid}, not node {pending.node.name!r}'s")
        self._summarize_junk()
        for watcher in self._watchers:
            watcher()

    def on_nodes(self, watcher: Callable[[], None]) -> None:
        """Call *watcher()* after every read of the membership (a change or not)."""
        self._watchers.append(watcher)

    # -- what arrives ---------------------------------------------------------------------------

    def _receive(self, pid: int, payload: str) -> None:
        """
        Called by the listener for each notification on this node's channel, inside its socket
        read: replies settle their asks and requests go into inboxes right here, without a
        task switch. Never waits (a full inbox: a forwarder waits) and never raises.
        """
        try:
            self._dispatch(pid, payload)
        except Exception as exc:  # a bug here must not stop the bus's listener
            self.junk += 1
            log.error("cluster: dropped a message: %r", exc, exc_info=exc)

    def _cluster_news(self, pid: int, payload: str) -> None:
        self._membership.poll_soon()

    def _reconnected(self) -> None:
        """The listening connection reconnected: what was sent here meanwhile is lost."""
        self._membership.poll_soon()
        for pending in list(self._pending.values()):
            pending.fail("this node's listening connection reconnected; the reply may be lost")

    def _dispatch(self, pid: int, payload: str) -> None:
        try:
            message = decode(payload)
        except WireError as exc:
            self._junk(f"{exc} (from backend {pid})")
            return
        kind = type(message)
        if kind is Ask or kind is Tell:
            assert isinstance(message, Ask | Tell)
            self._deliver(message)
            return
        assert isinstance(message, Reply | Failure | Refusal)
        pending = self._pending.get(message.id)
        if pending is None:
            self.late_replies += 1
            log.debug("cluster: dropped a reply to ask %s, which had already given up", message.id)
        elif self._accepts(pending, pid, self._nodes):
            pending.answer(message)
        else:
            # Maybe the node's sender reconnected and the registry read is behind: decided at
            # the next read, which is asked for now.
            if len(pending.suspects) < MAX_SUSPECTS:
                pending.suspects.append((pid, message))
            else:
                self._junk(f"a reply from backend {pid}, which is not node {pending.node.name!r}")
            self._membership.poll_soon()

    def _accepts(self, pending: _Pending, pid: int, nodes: dict[int, NodeInfo]) -> bool:
        """Whether a reply from backend *pid* may settle *pending*."""
        if pending.any_node:  # a keyed actor's: from a sender any live node registered
            return pid in self._extra_senders or any(pid in n.sender_pids for n in nodes.values())
        return self._from_node(pending.node, pid)

    @staticmethod
    def _from_node(node: NodeInfo, pid: int) -> bool:
        # A node older than this check registers no sender: any backend is taken for it.
        return not node.sender_pids or pid in node.sender_pids

    def _deliver(self, message: Ask | Tell) -> None:
        spec = self._membership.serving(message.actor)
        if spec is None or spec.inbox is None:
            self._refuse(message, f"it is not running on node {self.name!r}")
            return
        item: object
        kind = "ask" if type(message) is Ask else "tell"
        traced = _tracing.incoming(kind, message.actor, message.traceparent, message.tracestate)
        if type(message) is Ask:
            reply = _RemoteReply(self, message.reply_to, message.id, message.actor)
            item = Request(message.message, reply, traced)
        elif traced is not None:  # a tell, as a request nobody waits for: traced alike
            item = Request(message.message, NO_REPLY, traced)
        else:
            item = message.message
        inbox = spec.inbox
        queue = self._overflows.get(inbox)
        if queue is None:
            try:
                inbox.send_nowait(item)
                return
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._refuse(message, "its inbox is closed")
                return
            if self._nursery is None:
                self._refuse(message, f"node {self.name!r} is not running")
                return
            queue = self._overflows[inbox] = deque()
            self._nursery.start_soon(self._forward, inbox, queue)
        elif len(queue) >= MAX_OVERFLOW_PER_ACTOR:
            self._refuse(
                message,
                f"its inbox on node {self.name!r} is full and {len(queue)} more requests wait",
            )
            return
        queue.append((item, message))

    def _refuse(self, message: Ask | Tell, reason: str) -> None:
        self.refused += 1
        if type(message) is Ask:
            self._sender.send(message.reply_to, Refusal(message.id, reason).encode(), reply=True)
        log.warning("cluster: refused a message for actor %r: %s", message.actor, reason)

    async def _forward(self, inbox: Channel, queue: deque[tuple[object, Ask | Tell]]) -> None:
        """Move requests that found *inbox* full into it, in order, waiting for room."""
        try:
            while queue:
                item, message = queue[0]
                try:
                    await inbox.send(item)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._refuse(message, "its inbox is closed")
                if queue:  # (emptied by `left` meanwhile)
                    queue.popleft()
        finally:
            if self._overflows.get(inbox) is queue and not queue:
                del self._overflows[inbox]

    def _junk(self, what: str) -> None:
        """Count a payload that is not for us; log the first, then a summary per interval."""
        self.junk += 1
        if not self._junk_logged:
            self._junk_logged = True
            self._junk_since = trio.current_time()
            log.warning(
                "cluster: ignored a message on node %r's channel: %s. Such messages are counted "
                "(statistics().cluster.junk) and summarized every %gs.",
                self.name,
                what,
                JUNK_SUMMARY_EVERY,
            )
        else:
            self._junk_unlogged += 1

    def _summarize_junk(self) -> None:
        if self._junk_unlogged and trio.current_time() - self._junk_since >= JUNK_SUMMARY_EVERY:
            log.warning(
                "cluster: ignored %d more message(s) on node %r's channel in the last %.0fs",
                self._junk_unlogged,
                self.name,
                trio.current_time() - self._junk_since,
            )
            self._junk_unlogged = 0
            self._junk_since = trio.current_time()

    # -- the service ----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled; started once joined (its lock held, its row written)."""
        listener = self._listener
        await listener.subscribe(self.channel, self._receive, self._reconnected)
        await listener.subscribe(CLUSTER_CHANNEL, self._cluster_news, self._membership.poll_soon)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._sender.serve)
                await nursery.start(self._membership.serve)
                task_status.started()
        finally:
            self._nursery = None
            listener.unsubscribe(self.channel, self._receive)
            listener.unsubscribe(CLUSTER_CHANNEL, self._cluster_news)

    async def withdraw(self) -> None:
        """Leaving: tell the others to send nothing more here (bounded by keepalive)."""
        await self._membership.withdraw()

    def left(self) -> list[tuple[str, int]]:
        """Leaving, once the actors stopped: (inbox, requests) still waiting in overflows.

        Asks among them are answered with a refusal, so their askers need not time out.
        """
        counts = []
        for inbox, queue in self._overflows.items():
            for _, message in queue:
                if type(message) is Ask:
                    refusal = Refusal(message.id, f"node {self.name!r} stopped before handling it")
                    self._sender.send(message.reply_to, refusal.encode(), reply=True)
            counts.append((inbox.name, len(queue)))
            queue.clear()
        return counts

    async def flush(self, timeout: float) -> None:
        """Wait (at most *timeout*) until everything queued for sending has been sent."""
        await self._sender.flush(timeout)

    def _lost_sends(self, lost: Sequence[Outgoing], reason: str) -> None:
        """Messages that may not have gone out, and will not go again: their asks fail now."""
        if not lost:
            return
        log.warning("cluster: %d message(s) not sent: %s", len(lost), reason)
        for _, _, pending, _ in lost:
            if pending is None:
                self.dropped += 1
            else:
                pending.fail(f"the request may not have been sent: {reason}")
