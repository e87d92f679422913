"""
Membership: this node's registration and liveness, the registry as other nodes see it, and
singletons. PostgreSQL decides; nothing here decides liveness on its own.

- **A node is alive** exactly while its node connection (``pgbus:node``) holds the session
  advisory lock ``(NODE_LOCK_CLASS, its backend pid)``: when the session ends, cleanly or not,
  the server drops the lock. ``pgbus.cluster_nodes`` (a table of the versioned schema) only says
  what each node offers; a row whose lock is gone is never used, and is deleted by the next
  node that joins. A row is checked when read: one that no node could have written is skipped,
  with one warning.
- **Joining** is serialised by a lock on ``pgbus.cluster_nodes`` itself, which a role without
  rights on pgbus's tables cannot take: no client of the database can block joins by holding an
  advisory lock. Every wait is bounded by ``keepalive``; a join that did not finish says why,
  naming the backends it waited for.
- **Polling**: every ``keepalive / 4`` seconds the node re-reads the live membership on its node
  connection (which is also that connection's keepalive). A node that does not find its own row
  (deleted by hand) writes it again, with one warning.
- **Singletons**: a session advisory lock per singleton name, on the node connection: the node
  holding it runs the actor; the others try again every poll. A lock held by a session that is
  not a live node is named: in ``pgbus status``, and by the candidates, who warn after
  ``keepalive``, then at doubling intervals. A node whose node connection stops answering stops
  its singletons before the server can end that session (see `session_settings`), so two never
  run at once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._errors import (
    DatabaseError,
    DatabaseUnavailableError,
    NodeNameTakenError,
    PgbusError,
)
from .._node import node_name_problem
from .._pg import Backoff, Connection, Database, connect_with_retry
from ._wire import is_node_channel

if TYPE_CHECKING:
    from .._inbound import InboundBridge
    from .._supervisor import ActorSpec, Supervisor

log = logging.getLogger("pgbus.cluster")

NODE_LOCK_CLASS = 0x70676273
"""First key of every node's advisory lock (``'pgbs'``); the second is the node's backend pid."""
CLUSTER_CHANNEL = "pgbus.cluster"
"""Every node listens here; a node joining or changing what it offers says so here."""
POLLS_PER_KEEPALIVE = 4
"""Membership (and the node connection's keepalive, and singleton stand-by) every keepalive/4."""

_DATABASE = "(SELECT oid FROM pg_database WHERE datname = current_database())"
# A node is alive while its session holds its lock: the server's own state, never a row.
_ALIVE = f"""
EXISTS (SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = {_DATABASE}
          AND l.classid = {NODE_LOCK_CLASS}::oid AND l.objid = n.pid::oid AND l.pid = n.pid)
"""
_LIVE_NODES = (
    "SELECT n.pid, n.name, n.channel, n.host, n.os_pid, n.started, n.public, n.singletons,"
    f" n.inbound, n.sender_pids FROM pgbus.cluster_nodes n WHERE {_ALIVE} ORDER BY n.name, n.pid"
)
_SINGLETON_LOCKS = (
    "SELECT classid::int8, objid::int8, pid FROM pg_locks"
    f" WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND database = {_DATABASE}"
)
# Try each singleton's lock; for one not won, who holds it (None: nobody, by now).
_TRY_SINGLETONS = f"""
SELECT k, pg_try_advisory_lock(k),
       (SELECT l.pid FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.database = {_DATABASE}
           AND l.classid = ((k >> 32) & 4294967295)::oid AND l.objid = (k & 4294967295)::oid
           AND l.pid <> pg_backend_pid()
         LIMIT 1)
  FROM unnest($1::int8[]) AS k
"""
_BACKENDS = (
    "SELECT pid, usename, application_name FROM pg_stat_activity WHERE pid = ANY($1::int4[])"
    " ORDER BY pid"
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
    sender_pids: tuple[int, ...] = ()
    """The backends it sends requests and replies from (empty: a node older than this check)."""

    @classmethod
    def from_row(cls, row: Any) -> NodeInfo:
        """The node a registry row describes; `ValueError` saying why if no node wrote it."""
        pid, name, channel, host, os_pid, started = row[0], row[1], row[2], row[3], row[4], row[5]
        problem = node_name_problem(name)
        if problem is not None:
            raise ValueError(f"its name {problem}")
        if not is_node_channel(channel):
            raise ValueError(f"its channel is not a node's channel (got {str(channel)[:80]!r})")
        if not isinstance(host, str) or not isinstance(os_pid, int) or started is None:
            raise ValueError("its host, os_pid or started is missing")
        lists = []
        for column, values in (("public", row[6]), ("singletons", row[7]), ("inbound", row[8])):
            if values is None or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"its {column} holds a value that is not a name")
            lists.append(tuple(values))
        senders = row[9] if len(row) > 9 else ()
        if senders is None or not all(isinstance(p, int) for p in senders):
            raise ValueError("its sender_pids holds a value that is not a pid")
        return cls(
            name=name,
            pid=pid,
            channel=channel,
            host=host,
            os_pid=os_pid,
            started=started.isoformat(timespec="seconds"),
            public=lists[0],
            singletons=lists[1],
            inbound=lists[2],
            sender_pids=tuple(senders),
        )


def read_nodes(rows: Iterable[Any], warned: set[Any] | None = None) -> dict[int, NodeInfo]:
    """
    The valid nodes of *rows* by pid. An invalid row is skipped, with a warning the first time
    (its pid and reason not yet in *warned*); without *warned*, silently (``pgbus status``).
    """
    nodes: dict[int, NodeInfo] = {}
    for row in rows:
        try:
            node = NodeInfo.from_row(row)
        except ValueError as exc:
            key = (row[0], str(exc))
            if warned is not None and key not in warned:
                warned.add(key)
                log.warning(
                    "cluster: skipped the registry row of backend %s in pgbus.cluster_nodes: %s "
                    "(no pgbus node writes such a row; a client with write access to pgbus's "
                    "tables did)",
                    row[0],
                    exc,
                )
            continue
        nodes[node.pid] = node
    return nodes


@attrs.frozen
class SingletonStatus:
    """A singleton of the cluster: who holds it (None while nobody does) and who stands by."""

    name: str
    holder: str | None
    holder_pid: int | None
    candidates: tuple[str, ...]
    foreign_holder: str | None = None
    """A session that is not a node holds its lock: ``backend PID (role R, application A)``."""


@attrs.frozen
class ClusterStatus:
    """What ``pgbus status`` shows: live nodes, singletons with their holders."""

    nodes: tuple[NodeInfo, ...]
    singletons: tuple[SingletonStatus, ...]
    durable: tuple[Any, ...] | None = None
    """Durable groups' lag and dead letters, when pgbus's durable tables exist."""
    entities: tuple[Any, ...] | None = None
    """Keyed actors' kinds: messages waiting, dead letters, and activations per node."""

    def as_json(self) -> dict[str, Any]:
        return {
            "nodes": [attrs.asdict(n) for n in self.nodes],
            "singletons": [attrs.asdict(s) for s in self.singletons],
            "durable": None if self.durable is None else list(self.durable),
            "entities": None if self.entities is None else list(self.entities),
        }


async def describe_backends(connection: Connection, pids: Iterable[int]) -> str:
    """``backend 12 (role 'x', application 'psql'), ...`` for *pids*, as the server knows them."""
    wanted = sorted(set(pids))
    if not wanted:
        return "no backend"
    rows = await connection.fetch(_BACKENDS, wanted)
    known = {r[0]: f"backend {r[0]} (role {r[1]!r}, application {r[2]!r})" for r in rows}
    return ", ".join(known.get(pid, f"backend {pid} (ended)") for pid in wanted)


async def read_status(connection: Connection) -> ClusterStatus:
    """The cluster as the server sees it now (a few queries on *connection*)."""
    exists = await connection.fetchval("SELECT to_regclass('pgbus.cluster_nodes') IS NOT NULL")
    if not exists:
        return ClusterStatus(
            (), (), await _durable_status(connection), await _entity_status(connection)
        )
    has_senders = await connection.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'pgbus.cluster_nodes'::regclass"
        " AND attname = 'sender_pids' AND NOT attisdropped)"
    )
    query = _LIVE_NODES if has_senders else _LIVE_NODES.replace(", n.sender_pids", "")
    by_pid = read_nodes(await connection.fetch(query))
    nodes = tuple(by_pid.values())
    locks = {(r[0], r[1]): r[2] for r in await connection.fetch(_SINGLETON_LOCKS)}
    names = sorted({s for n in nodes for s in n.singletons})
    singletons = []
    for name in names:
        pid = locks.get(_lock_halves(singleton_key(name)))
        holder = by_pid.get(pid) if pid is not None else None
        foreign = None
        if pid is not None and holder is None:
            foreign = await describe_backends(connection, [pid])
        candidates = tuple(n.name for n in nodes if name in n.singletons)
        singletons.append(
            SingletonStatus(
                name, holder.name if holder else None, pid if holder else None, candidates, foreign
            )
        )
    return ClusterStatus(
        nodes,
        tuple(singletons),
        await _durable_status(connection),
        await _entity_status(connection),
    )


async def _entity_status(connection: Connection) -> tuple[dict[str, Any], ...] | None:
    from .._entities._status import entity_status

    return await entity_status(connection)


async def _durable_status(connection: Connection) -> tuple[dict[str, Any], ...] | None:
    """Durable channels' groups (lag, in flight, dead letters) for ``pgbus status``, if any."""
    if not await connection.fetchval("SELECT to_regclass('pgbus.deliveries') IS NOT NULL"):
        return None
    from .._durable._admin import group_status

    return tuple(attrs.asdict(group) for group in await group_status(connection))


class JoinError(PgbusError):
    """Joining did not finish; the text says why (what it waited for, or what failed)."""


@attrs.define(eq=False)
class _Singleton:
    spec: ActorSpec
    key: int
    held: bool = False
    squatted_since: float | None = None  # a session that is not a node holds the lock
    warn_at: float = 0.0


class Membership:
    """
    This node in the registry: join, poll, re-register, singletons; `serve` runs it.

    *on_nodes(nodes)* is called with the live nodes (by backend pid) after every read.
    """

    def __init__(
        self,
        database: Database,
        supervisor: Supervisor,
        listener: InboundBridge,
        *,
        name: str,
        channel: str,
        keepalive: float,
        sender_pids: Callable[[], list[int]],
        on_nodes: Callable[[dict[int, NodeInfo]], None],
    ) -> None:
        self._db = database
        self._supervisor = supervisor
        self._listener = listener
        self.name = name
        self.channel = channel
        self.keepalive = keepalive
        self.period = keepalive / POLLS_PER_KEEPALIVE
        self.host = socket.gethostname()
        self.pid: int | None = None
        """Backend pid of the node connection while joined (the node's identity)."""
        self._sender_pids = sender_pids
        self._on_nodes = on_nodes
        self.public: dict[str, ActorSpec] = {}
        self.singletons: dict[str, _Singleton] = {}
        self._wake: trio.CancelScope | None = None
        self._poll_now = False
        self._dirty = True
        self._acquired: list[_Singleton] = []
        self._registered: tuple[list[str], list[str], list[str], list[int]] | None = None
        self._warned_rows: set[Any] = set()
        self._node_pids: set[int] = set()  # the live nodes' backends, as last read
        self.stopping = False
        self.singleton_changes = 0
        """Singletons this node started or stopped holding (a holder change, seen from here)."""
        self.join_problem: str | None = None
        """Why the last attempt to join failed (None once joined)."""
        self.rejoined = 0
        """Times this node found its row gone and wrote it again."""

    # -- what this node offers ---------------------------------------------------------------

    async def offer(self, spec: ActorSpec) -> None:
        """Make the local actor of *spec* public; returns once the registry says so."""
        self.public[spec.name] = spec
        await self._update_registry_now()

    def add_singleton(self, spec: ActorSpec) -> None:
        """Stand by to run *spec* whenever this node gets its lock (within keepalive/4)."""
        self.singletons[spec.name] = _Singleton(spec, singleton_key(spec.name))
        self._dirty = True
        self.poll_soon()

    def serving(self, actor: str) -> ActorSpec | None:
        """The local spec of *actor* if this node serves it right now."""
        spec = self.public.get(actor)
        if spec is None:
            singleton = self.singletons.get(actor)
            if singleton is not None and singleton.held:
                spec = singleton.spec
        return spec

    def held(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.singletons.items() if s.held)

    def _current(self) -> tuple[list[str], list[str], list[str], list[int]]:
        held = [s.spec.name for s in self.singletons.values() if s.held and s.spec.inbox]
        offered = list(dict.fromkeys([*self.public, *held]))
        channels = self._listener.channels
        inbound = sorted(c for c in channels if c not in (self.channel, CLUSTER_CHANNEL))
        return offered, list(self.singletons), inbound, self._sender_pids()

    def poll_soon(self) -> None:
        self._poll_now = True
        if self._wake is not None:
            self._wake.cancel()

    async def advertise_sender(self, connection: Connection, senders: list[int]) -> None:
        """*connection* sends for this node from now on (with *senders*): say so, on it."""
        pid = self.pid
        if pid is not None:  # else the registration will say it
            with trio.fail_after(self.keepalive):
                await connection.execute(
                    "UPDATE pgbus.cluster_nodes SET sender_pids ="
                    " (SELECT array_agg(DISTINCT p ORDER BY p)"
                    "    FROM unnest($2::integer[] || pg_backend_pid()) AS p)"
                    " WHERE pid = $1",
                    pid,
                    senders,
                )
                await connection.execute(
                    "SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, f"change {self.name}"
                )
        self._dirty = True
        self.poll_soon()

    async def refresh(self) -> None:
        """Read the live membership now, on a pooled connection."""
        async with self._db.borrow() as connection:
            rows = await connection.fetch(_LIVE_NODES)
        self._on_nodes(read_nodes(rows, self._warned_rows))

    # -- the node connection ------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff()  # connecting
        retry = Backoff()  # joining
        first = True
        while True:
            connection = await connect_with_retry(self._db, "node", backoff)
            try:
                try:
                    await self._join(connection)
                except NodeNameTakenError:
                    if first:
                        raise
                    # Our own previous session, not yet ended by the server: wait for it.
                    await trio.sleep(retry.next_delay() or self.period)
                    continue
                except (DatabaseUnavailableError, DatabaseError, JoinError) as exc:
                    if first and isinstance(exc, DatabaseError) and exc.sqlstate == "42501":
                        raise  # not allowed: retrying cannot help
                    self.join_problem = str(exc) or type(exc).__name__
                    log.warning("cluster: node %r could not join: %s; retrying", self.name, exc)
                    await trio.sleep(retry.next_delay())
                    continue
                self.join_problem = None
                if first:
                    task_status.started()
                    first = False
                retry.reset()
                await self._watch(connection)
            finally:
                self.pid = None
                with trio.CancelScope(shield=True):
                    await self._release_singletons()
                    if self.stopping and not connection.closed:
                        await connection.aclose()
                    else:
                        connection.abort()
            log.warning("cluster: node %r lost its node connection; joining again", self.name)

    async def _join(self, connection: Connection) -> None:
        """Settings, schema, registration, first poll: each wait bounded, a failure explained."""
        step = ["connecting"]
        blockers = [""]

        async def name_blockers() -> None:
            # Asked halfway, and finished even if the join gives up meanwhile: a backend that
            # waits for a lock keeps waiting after its client has gone, so it is still named.
            await trio.sleep(self.keepalive / 2)
            blockers[0] = await self._blockers(connection.pid)

        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(name_blockers)
            try:
                with trio.fail_after(self.keepalive):
                    await self._join_steps(connection, step)
            except Exception as exc:  # raised below, outside the nursery (no group)
                error = exc
            waited = isinstance(error, DatabaseError) and error.sqlstate == "55P03"
            if not (waited or isinstance(error, trio.TooSlowError)):
                nursery.cancel_scope.cancel()
        if waited or isinstance(error, trio.TooSlowError):
            self.pid = None
            raise JoinError(
                f"{step[0]} did not finish within {self.keepalive:g}s{blockers[0]}"
            ) from None
        if error is not None:
            self.pid = None
            raise error

    async def _join_steps(self, connection: Connection, step: list[str]) -> None:
        step[0] = "setting up the session"
        version = int(await connection.fetchval("SELECT current_setting('server_version_num')"))
        for key, value in session_settings(self.keepalive).items():
            if key == "idle_session_timeout" and version < 140000:
                continue
            await connection.execute("SELECT set_config($1, $2, false)", key, value)
        # Advertise this node only once its channel is listened to again (after a reconnect):
        # a request sent before would be lost.
        step[0] = "waiting for the listening connection"
        await self._listener.wait_listening()
        step[0] = "migrating pgbus's schema"
        from .._durable._schema import migrate

        await migrate(connection, self._db.where)
        step[0] = "registering"
        await self._register(connection)
        self.pid = connection.pid
        step[0] = "reading the membership"
        await self._poll(connection)

    async def _blockers(self, pid: int) -> str:
        """``; waiting for backend 12 (role ...)`` naming what blocks *pid*, or ''."""
        try:
            with trio.fail_after(self.keepalive / 2):
                async with self._db.borrow() as other:
                    pids = await other.fetchval("SELECT pg_blocking_pids($1)", pid)
                    if pids:
                        return f"; waiting for {await describe_backends(other, pids)}"
        except (PgbusError, trio.TooSlowError):
            pass
        return ""

    async def _register(self, connection: Connection) -> None:
        offered, singletons, inbound, senders = current = self._current()
        async with connection.transaction():
            # Joins take turns on the table itself: only a role with rights on pgbus's tables
            # can take this lock, so no other client can hold joins up. The wait gives up on
            # its own (the backend would wait on after its client gave up and left).
            timeout = f"{max(1, int(self.keepalive * 750))}ms"
            await connection.execute("SELECT set_config('lock_timeout', $1, true)", timeout)
            await connection.execute("LOCK TABLE pgbus.cluster_nodes IN SHARE ROW EXCLUSIVE MODE")
            await connection.execute(f"DELETE FROM pgbus.cluster_nodes n WHERE NOT {_ALIVE}")
            taken = await connection.fetchval(
                "SELECT pid FROM pgbus.cluster_nodes WHERE name = $1 AND pid <> pg_backend_pid()",
                self.name,
            )
            if taken is not None:
                raise NodeNameTakenError(self.name, taken)
            locked = await connection.fetchval(
                "SELECT pg_try_advisory_lock($1, pg_backend_pid())", NODE_LOCK_CLASS
            )
            if not locked:  # a client took this backend's node lock before it could
                holders = await connection.fetchval(
                    "SELECT array_agg(pid) FROM pg_locks WHERE locktype = 'advisory'"
                    f" AND objsubid = 2 AND classid = {NODE_LOCK_CLASS}::oid"
                    " AND objid = pg_backend_pid()::oid AND granted"
                )
                raise JoinError(
                    f"the node lock of backend {connection.pid} is held by "
                    f"{await describe_backends(connection, holders or [])}"
                )
            await connection.execute(
                "INSERT INTO pgbus.cluster_nodes"
                " (pid, name, channel, host, os_pid, public, singletons, inbound, sender_pids)"
                " VALUES (pg_backend_pid(), $1, $2, $3, $4, $5, $6, $7, $8)"
                " ON CONFLICT (pid) DO UPDATE SET name = $1, channel = $2, host = $3,"
                " os_pid = $4, public = $5, singletons = $6, inbound = $7, sender_pids = $8,"
                " started = now()",
                self.name,
                self.channel,
                self.host,
                os.getpid(),
                offered,
                singletons,
                inbound,
                senders,
            )
            await connection.execute(
                "SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, f"join {self.name}"
            )
        self._dirty = False
        self._registered = current

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
                except (NodeNameTakenError, JoinError) as exc:  # registering again failed
                    log.warning("cluster: node %r could not register again: %s", self.name, exc)
                    return
                except (DatabaseUnavailableError, trio.TooSlowError, DatabaseError) as exc:
                    log.warning(
                        "cluster: node connection to %s did not answer its keepalive (%s)",
                        self._db.where,
                        exc or type(exc).__name__,
                    )
                    return
                next_poll = trio.current_time() + self.period
                await self._start_acquired()

    async def _poll(self, connection: Connection) -> None:
        """Registry up to date, singletons tried, membership read: one period's work."""
        current = self._current()
        if (self._dirty or current != self._registered) and not self.stopping:
            await self._write_registry(connection, current)  # (leaving: withdrawn for good)
        waiting = [s for s in self.singletons.values() if not s.held]
        if waiting and not self.stopping:
            rows = await connection.fetch(_TRY_SINGLETONS, [s.key for s in waiting])
            outcome = {r[0]: (r[1], r[2]) for r in rows}
            won = False
            for singleton in waiting:
                taken, holder = outcome.get(singleton.key, (False, None))
                if taken:
                    singleton.held = True  # started by _start_acquired, outside the bound
                    singleton.squatted_since = None
                    self._acquired.append(singleton)
                    won = True
                else:
                    await self._check_squatter(connection, singleton, holder)
            if won:  # advertised at once: requests wait in its inbox until it has started
                await self._write_registry(connection, self._current())
        nodes = read_nodes(await connection.fetch(_LIVE_NODES), self._warned_rows)
        if self.pid is not None and self.pid not in nodes and not self.stopping:
            self.rejoined += 1
            log.warning(
                "cluster: node %r found no registry row of its own (deleted by someone); "
                "registering again",
                self.name,
            )
            await self._register(connection)
            nodes = read_nodes(await connection.fetch(_LIVE_NODES), self._warned_rows)
        self._node_pids = set(nodes)
        self._on_nodes(nodes)

    async def _check_squatter(
        self, connection: Connection, singleton: _Singleton, holder: int | None
    ) -> None:
        """A singleton's lock held by a session that is not a node: warn, then less and less."""
        if holder is None or holder in self._node_pids:
            singleton.squatted_since = None
            return
        now = trio.current_time()
        if singleton.squatted_since is None:
            singleton.squatted_since = now
            singleton.warn_at = now + self.keepalive
            return
        if now < singleton.warn_at:
            return
        held = now - singleton.squatted_since
        singleton.warn_at = now + held  # the next warning after twice as long in all
        log.warning(
            "cluster: singleton %r cannot run anywhere for %.0fs: its lock is held by %s, "
            "which is not a node of the cluster",
            singleton.spec.name,
            held,
            await describe_backends(connection, [holder]),
        )

    async def _start_acquired(self) -> None:
        acquired, self._acquired = self._acquired, []
        for singleton in acquired:
            log.info("cluster: node %r runs singleton %r", self.name, singleton.spec.name)
            self.singleton_changes += 1
            await self._supervisor.start(singleton.spec)

    async def _write_registry(
        self, connection: Connection, current: tuple[list[str], list[str], list[str], list[int]]
    ) -> None:
        public, singletons, inbound, senders = current
        await connection.execute(
            "UPDATE pgbus.cluster_nodes SET public = $1, singletons = $2, inbound = $3,"
            " sender_pids = $4 WHERE pid = pg_backend_pid()",
            public,
            singletons,
            inbound,
            senders,
        )
        await connection.execute("SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, f"change {self.name}")
        self._dirty = False
        self._registered = current

    async def _update_registry_now(self, *, offer: bool = True) -> None:
        """Write what this node offers on a pooled connection, now (the node row is ours)."""
        if self.pid is None:
            self._dirty = True
            return
        public, singletons, inbound, senders = self._current()
        if not offer:
            public, singletons = [], []
        async with self._db.borrow() as connection:
            await connection.execute(
                "UPDATE pgbus.cluster_nodes SET public = $1, singletons = $2, inbound = $3,"
                " sender_pids = $4 WHERE pid = $5",
                public,
                singletons,
                inbound,
                senders,
                self.pid,
            )
            await connection.execute(
                "SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, f"change {self.name}"
            )
        self._registered = (public, singletons, inbound, senders)

    async def withdraw(self) -> None:
        """Leaving: tell the others to send nothing more here (bounded by keepalive)."""
        self.stopping = True
        self.public.clear()
        with trio.move_on_after(self.keepalive):
            await self._update_registry_now(offer=False)

    async def _release_singletons(self) -> None:
        """The node connection is gone, so are its locks: stop every singleton held here."""
        self._acquired = []
        for singleton in self.singletons.values():
            if singleton.held:
                if not self.stopping:  # leaving: the bus has stopped its actors already
                    log.warning(
                        "cluster: node %r stops singleton %r (its lock went with the node "
                        "connection)",
                        self.name,
                        singleton.spec.name,
                    )
                await self._supervisor.remove(singleton.spec.name)
                singleton.held = False
                self.singleton_changes += 1
