"""
Hosting keyed actors on this node: placement of shards, and one batch loop per kind.

**Placement.** Keys map to `SHARDS` shards per kind; a shard belongs to at most one node,
recorded in ``pgbus.entity_shards`` with an epoch. Which live node hosting the kind *should*
own a shard is decided the same way everywhere (rendezvous hashing over the hosts' channels),
from the server's state only: the hosts in ``pgbus.entity_hosts`` whose node session still
holds its lock (`pgbus._cluster._membership`: no lock per key, no lock per shard). Every
period (the cluster's ``keepalive / 4``, or at once when the membership changes) each host:

- takes the shards it should own whose owner is nobody or a node that is no longer alive,
  raising their epoch;
- gives up the shards it owns but should not (a node joined), raising their epoch too, and
  says so on the cluster's channel so the new owner takes them at once.

**The fence.** Every commit of a batch (`pgbus.entity_commit`) locks the shards it touched and
checks each is still this node's at the epoch it had when the batch was read. A node that lost
a shard (it was paused, its connection half-open, it gave it up) can therefore never commit
for it: its batch is discarded, its activations of that shard are dropped, and the new owner
handles the messages again from the last committed state.

**A kind's loop.** Read up to ``batch`` messages of the owned shards (per shard in stored
order, so per key), load the state of keys not active here (one statement), handle each key's
messages in order (different keys concurrently, at most ``concurrency`` at a time), then commit
every effect in one statement: states, acknowledgements (the messages deleted), retries and
dead letters, the tells handlers queued, and the replies to asks (NOTIFY, sent at COMMIT).
Idle, it waits for a wake-up on `WAKE_CHANNEL`, a retry coming due, or the period.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .. import _tracing
from .._cluster._membership import _ALIVE, CLUSTER_CHANNEL
from .._cluster._wire import Failure, Reply, is_node_channel
from .._errors import DatabaseError, DatabaseUnavailableError, PgbusError
from .._pg import Backoff, Connection, Database, connect_with_retry
from ._entity import (
    SHARDS,
    WAKE_CHANNEL,
    Entity,
    KindSpec,
    UnknownEntityKindError,
    shard_of,
)
from ._mail import encode_json, encode_message

if TYPE_CHECKING:
    from .._bus import Bus
    from .._cluster import Cluster
    from .._inbound import InboundBridge

log = logging.getLogger("pgbus.entities")

_json_decode = json.JSONDecoder().decode

MAX_RETRY_DELAY = 300.0
"""A failing message is retried after ``retry_after * 2 ** (attempt - 1)``, at most this."""
IDLE_POLL = 5.0
"""An idle loop reads its shards at least this often (a lost wake-up costs at most this)."""

# A host is live while its node's session holds the node's lock (`_membership`) and it has
# placed within $2 seconds: a paused process keeps its session, not its shards.
_LIVE_HOST = f"""
SELECT 1 FROM pgbus.entity_hosts h JOIN pgbus.cluster_nodes n ON n.channel = h.node
 WHERE h.kind = $1 AND h.seen_at > now() - make_interval(secs => $2) AND {_ALIVE}
"""
_HOSTS = _LIVE_HOST.replace("SELECT 1", "SELECT h.node", 1)
_REGISTER = """
WITH shards AS (
    INSERT INTO pgbus.entity_shards (kind, shard) SELECT $2, s FROM generate_series(0, $3 - 1) s
    ON CONFLICT DO NOTHING
), gone AS (
    DELETE FROM pgbus.entity_hosts h
     WHERE NOT EXISTS (SELECT 1 FROM pgbus.cluster_nodes n WHERE n.channel = h.node)
)
INSERT INTO pgbus.entity_hosts (node, kind) VALUES ($1, $2) ON CONFLICT DO NOTHING
"""
_CLAIM = f"""
WITH free AS (
    SELECT s.shard FROM pgbus.entity_shards s
     WHERE s.kind = $1 AND s.shard = ANY($4::integer[]) AND s.owner IS DISTINCT FROM $3
       AND (s.owner IS NULL OR NOT EXISTS ({_LIVE_HOST} AND h.node = s.owner))
     ORDER BY s.shard FOR UPDATE SKIP LOCKED
)
UPDATE pgbus.entity_shards s SET owner = $3, epoch = s.epoch + 1
  FROM free WHERE s.kind = $1 AND s.shard = free.shard
RETURNING s.shard, s.epoch
"""
_RELEASE = """
WITH mine AS (
    SELECT shard FROM pgbus.entity_shards
     WHERE kind = $1 AND owner = $2 AND NOT (shard = ANY($3::integer[]))
     ORDER BY shard FOR UPDATE
)
UPDATE pgbus.entity_shards s SET owner = NULL, epoch = s.epoch + 1
  FROM mine WHERE s.kind = $1 AND s.shard = mine.shard
RETURNING s.shard
"""
_OWNED = "SELECT shard, epoch FROM pgbus.entity_shards WHERE kind = $1 AND owner = $2"
_SEEN = (
    "UPDATE pgbus.entity_hosts SET activations = $3, seen_at = now() WHERE node = $1 AND kind = $2"
)
_LEAVE = """
WITH released AS (
    UPDATE pgbus.entity_shards SET owner = NULL, epoch = epoch + 1 WHERE owner = $1
)
DELETE FROM pgbus.entity_hosts WHERE node = $1
"""

# Per shard, the oldest messages first: a key lives in one shard, so its order is kept.
_FETCH = """
SELECT m.id, m.key, m.shard, m.message, m.reply_to, m.ask_id, m.attempts,
       coalesce(extract(epoch FROM m.not_before - now()), 0)::float8, m.traceparent
  FROM unnest($2::integer[]) AS s(shard)
 CROSS JOIN LATERAL (
    SELECT * FROM pgbus.entity_mail e WHERE e.kind = $1 AND e.shard = s.shard
     ORDER BY e.id LIMIT $3) AS m
"""
_LOAD = "SELECT key, state::text FROM pgbus.entity_state WHERE kind = $1 AND key = ANY($2::text[])"
_COMMIT = (
    "SELECT pgbus.entity_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
    " $13, $14, $15, $16, $17, $18, $19)"
)


def rendezvous(shard: int, hosts: list[str]) -> str:
    """The host that should own *shard*: the same answer in every process."""
    return max(
        hosts,
        key=lambda host: hashlib.blake2b(f"{host}/{shard}".encode(), digest_size=8).digest(),
    )


class _Activation:
    __slots__ = ("encoded", "entity", "epoch", "last_used", "ready")

    def __init__(self, entity: Entity, encoded: str, epoch: int) -> None:
        self.entity = entity
        self.encoded = encoded  # the state as last committed (or handled, within a batch)
        self.epoch = epoch  # its shard's epoch when loaded: another epoch, another activation
        self.last_used = trio.current_time()
        self.ready = False  # on_activate has run


@attrs.define
class _Effects:
    """What one batch commits."""

    keys: list[str] = attrs.Factory(list)
    states: list[str] = attrs.Factory(list)
    counts: list[int] = attrs.Factory(list)
    acked: list[int] = attrs.Factory(list)
    failed: list[int] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)
    delays: list[float] = attrs.Factory(list)
    out_kinds: list[str] = attrs.Factory(list)
    out_keys: list[str] = attrs.Factory(list)
    out_shards: list[int] = attrs.Factory(list)
    out_messages: list[str] = attrs.Factory(list)
    out_traces: list[str | None] = attrs.Factory(list)
    reply_channels: list[str] = attrs.Factory(list)
    replies: list[str] = attrs.Factory(list)


@attrs.frozen
class KindStatistics:
    """One hosted kind on this node (in `EntityHost.statistics`)."""

    kind: str
    shards: int
    activations: int
    handled: int
    failed: int
    dead: int
    stale_batches: int


class _Kind:
    """One hosted kind: its owned shards, activations and batch loop."""

    def __init__(self, host: EntityHost, spec: KindSpec) -> None:
        self.host = host
        self.spec = spec
        self.kind = spec.kind
        self.owned: dict[int, int] = {}  # shard -> epoch
        self.active: dict[str, _Activation] = {}
        self.wake = trio.Event()
        self.dirty: set[int] | None = None
        """The shards to read next, as wake-ups named them (None: every owned shard)."""
        self.handled = 0
        self.failed = 0
        self.dead = 0
        self.stale_batches = 0
        self.connection: Connection | None = None
        self.stopped = trio.Event()
        """Set once the loop has returned (the bus is stopping): no batch runs any more."""

    def statistics(self) -> KindStatistics:
        return KindStatistics(
            self.kind,
            len(self.owned),
            len(self.active),
            self.handled,
            self.failed,
            self.dead,
            self.stale_batches,
        )

    def poke(self, shard: int | None = None) -> None:
        """Read *shard* (None: every owned shard) at once."""
        if shard is None:
            self.dirty = None
        elif self.dirty is not None:
            self.dirty.add(shard)
        self.wake.set()

    # -- the loop -----------------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            await self._serve()
        finally:
            self.stopped.set()

    async def _serve(self) -> None:
        backoff = Backoff()
        while not self.host.stopping:
            connection = await connect_with_retry(self.host.db, f"entities {self.kind}", backoff)
            old = self.connection.pid if self.connection is not None else None
            self.connection = connection
            try:
                await self.host.cluster.add_sender(connection, old)
                await self._loop(connection)
            except (DatabaseUnavailableError, DatabaseError, trio.TooSlowError) as exc:
                await self.passivate_all()  # what they handled may not be committed
                log.warning("entities %s: %s; reconnecting", self.kind, exc or type(exc).__name__)
                await trio.sleep(backoff.next_delay())
            finally:
                if self.host.stopping and not connection.closed:
                    with trio.CancelScope(shield=True):
                        await connection.aclose()
                else:
                    connection.abort()

    async def _loop(self, connection: Connection) -> None:
        next_sweep = trio.current_time() + self.spec.passivate_after / 4
        while not self.host.stopping:
            self.wake = trio.Event()
            dirty, self.dirty = self.dirty, set()
            owned = dict(self.owned)
            await self._drop_moved(owned)
            wait = IDLE_POLL
            handled = 0
            if owned and self.host.cluster.pid is not None:
                shards = sorted(owned if dirty is None else dirty.intersection(owned))
                if shards:
                    handled, wait = await self._batch(connection, owned, shards)
            if trio.current_time() >= next_sweep:
                await self._passivate_idle()
                next_sweep = trio.current_time() + self.spec.passivate_after / 4
            if handled or self.host.stopping:
                await trio.lowlevel.checkpoint()
                continue
            with trio.move_on_after(
                min(wait, next_sweep - trio.current_time(), IDLE_POLL)
            ) as timer:
                await self.wake.wait()
            if timer.cancelled_caught:  # a retry came due, or the safety poll: read them all
                self.dirty = None

    async def _batch(
        self, connection: Connection, owned: dict[int, int], shards: list[int]
    ) -> tuple[int, float]:
        """
        One batch of *shards*: read, handle, commit. (messages handled, seconds until one is
        due). The shards it handled messages of are read again next (more may wait).
        """
        per_shard = max(1, self.spec.batch // len(shards))
        rows = await connection.fetch(_FETCH, self.kind, shards, per_shard)
        if not rows:
            return 0, IDLE_POLL
        groups: dict[str, list[Any]] = {}
        later: set[str] = set()
        wait = IDLE_POLL
        for row in rows:
            key = row[1]
            if key in later:
                continue
            group = groups.get(key)
            if group is None:
                if row[7] > 0:  # its oldest message waits for a retry: the key waits
                    later.add(key)
                    wait = min(wait, row[7])
                    continue
                group = groups[key] = []
            group.append(row)
        if not groups:
            return 0, wait
        cold = []
        for key, group in groups.items():
            activation = self.active.get(key)
            if activation is None or activation.epoch != owned[group[0][2]]:
                cold.append(key)  # (a key that left and came back: from the database again)
                if activation is not None:
                    await self._drop(key)
        if cold:
            await self._load(connection, cold, owned)
        effects = _Effects()
        items = list(groups.items())
        if self.spec.concurrency == 1 or len(items) == 1:
            for key, group in items:
                await self._handle_key(key, group, effects)
        else:
            position = iter(items)

            async def worker() -> None:
                for key, group in position:
                    await self._handle_key(key, group, effects)

            async with trio.open_nursery() as nursery:
                for _ in range(min(self.spec.concurrency, len(items))):
                    nursery.start_soon(worker)
        touched = sorted({row[2] for group in groups.values() for row in group})
        epochs = [owned[shard] for shard in touched]
        stale = await connection.fetchval(
            _COMMIT,
            self.kind,
            self.host.cluster.channel,
            touched,
            epochs,
            effects.keys,
            effects.states,
            effects.counts,
            effects.acked,
            effects.failed,
            effects.errors,
            effects.delays,
            self.spec.max_attempts,
            effects.out_kinds,
            effects.out_keys,
            effects.out_shards,
            effects.out_messages,
            effects.out_traces,
            effects.reply_channels,
            effects.replies,
        )
        if stale:
            self.stale_batches += 1
            for key in groups:  # what they handled is not committed: from the database again
                await self._drop(key)
            for shard in stale:
                if self.owned.get(shard) == owned[shard]:
                    del self.owned[shard]
            log.warning(
                "entities %s: %d shard(s) moved to another node while a batch ran; "
                "its %d message(s) will be handled there",
                self.kind,
                len(stale),
                len(rows),
            )
            self.host.poll_soon()
            self.dirty = None
            return 0, 0.0
        if self.dirty is not None:
            self.dirty.update(touched)
        self.handled += len(effects.acked)
        return len(effects.acked) + len(effects.failed), wait

    async def _load(self, connection: Connection, keys: list[str], owned: dict[int, int]) -> None:
        rows = await connection.fetch(_LOAD, self.kind, keys)
        found = {row[0]: row[1] for row in rows}
        bus = self.host.bus
        for key in keys:
            encoded = found.get(key, "{}")
            entity = self.spec.cls()
            entity.key = key
            entity.bus = bus
            entity.state = _json_decode(encoded)
            if not isinstance(entity.state, dict):  # written by hand: said, and started over
                log.warning(
                    "entities %s/%s: the stored state is not a JSON object (%.60s); "
                    "starting from {}",
                    self.kind,
                    key,
                    encoded,
                )
                entity.state = {}
            self.active[key] = _Activation(entity, encoded, owned[shard_of(key)])

    async def _handle_key(self, key: str, rows: list[Any], effects: _Effects) -> None:
        activation = self.active[key]
        entity = activation.entity
        count = 0
        for row in rows:
            id, attempts = row[0], row[6]
            outbox = entity._outbox = []
            try:
                if not activation.ready:
                    await entity.on_activate()
                    activation.ready = True
                with _tracing.handling_entity(self.kind, key, id, row[8], attempts + 1):
                    value = await entity.handle(_json_decode(row[3]))
                encoded = self._encoded_state(key, entity.state)
                out = [self.host.outgoing(kind, k, m, tp) for kind, k, m, tp in outbox]
                for kind, *_ in out:
                    await self.host.check_kind(kind)
                reply = None
                if row[5] is not None and is_node_channel(row[4]):
                    reply = Reply(_ask_id(row[5]), value).encode(f"{self.kind}/{key}")
            except Exception as exc:
                entity.state = _json_decode(activation.encoded)
                self._failed(key, row, exc, attempts, effects)
                break
            activation.encoded = encoded
            count += 1
            effects.acked.append(id)
            for kind, k, shard, payload, tp in out:
                effects.out_kinds.append(kind)
                effects.out_keys.append(k)
                effects.out_shards.append(shard)
                effects.out_messages.append(payload)
                effects.out_traces.append(tp)
            if reply is not None:
                effects.reply_channels.append(row[4])
                effects.replies.append(reply)
        entity._outbox = []
        activation.last_used = trio.current_time()
        if count:
            effects.keys.append(key)
            effects.states.append(activation.encoded)
            effects.counts.append(count)

    def _encoded_state(self, key: str, state: object) -> str:
        """*state* as JSON text; `CodecError` or `TypeError` saying what is wrong with it."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a JSON object (dict), not {type(state).__name__}")
        return encode_json(f"entity {self.kind}/{key}", "state", state, self.host.max_payload)

    def _failed(self, key: str, row: Any, exc: Exception, attempts: int, effects: _Effects) -> None:
        attempt = attempts + 1
        dead = attempt >= self.spec.max_attempts
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.failed += 1
        effects.failed.append(row[0])
        effects.errors.append(text[:2000])
        delay = min(self.spec.retry_after * 2 ** (attempt - 1), MAX_RETRY_DELAY)
        effects.delays.append(delay)
        if dead:
            self.dead += 1
            log.warning(
                "entities %s/%s: message %d failed %d time(s), dead-lettered: %s",
                self.kind,
                key,
                row[0],
                attempt,
                text,
            )
            if row[5] is not None and is_node_channel(row[4]):
                effects.reply_channels.append(row[4])
                effects.replies.append(Failure.of(_ask_id(row[5]), exc).encode())
        else:
            log.warning(
                "entities %s/%s: message %d failed (attempt %d of %d), retrying in %gs: %s",
                self.kind,
                key,
                row[0],
                attempt,
                self.spec.max_attempts,
                delay,
                text,
            )

    # -- activations ----------------------------------------------------------------------------

    async def _drop(self, key: str) -> None:
        activation = self.active.pop(key, None)
        if activation is not None and activation.ready:
            await self._passivate(activation)

    async def _drop_moved(self, owned: dict[int, int]) -> None:
        """Activations of shards no longer owned here, or owned at another epoch, leave."""
        moved = [k for k, a in self.active.items() if owned.get(shard_of(k)) != a.epoch]
        for key in moved:
            await self._drop(key)

    async def _passivate_idle(self) -> None:
        horizon = trio.current_time() - self.spec.passivate_after
        idle = [k for k, a in self.active.items() if a.last_used <= horizon]
        for key in idle:
            activation = self.active.pop(key)
            if activation.ready:
                await self._passivate(activation)

    async def _passivate(self, activation: _Activation) -> None:
        try:
            await activation.entity.on_passivate()
        except Exception as exc:
            log.warning(
                "entities %s/%s: on_passivate raised %s: %s",
                self.kind,
                activation.entity.key,
                type(exc).__name__,
                exc,
            )

    async def passivate_all(self) -> None:
        active, self.active = self.active, {}
        for activation in active.values():
            if activation.ready:
                await self._passivate(activation)


def _ask_id(text: str) -> int | str:
    return int(text) if text.isdigit() else text


class EntityHost:
    """
    This node's keyed actors: every kind it hosts, and their placement; `serve` runs them
    (a service of the bus, started by `Bus.host`).
    """

    def __init__(
        self,
        bus: Bus,
        database: Database,
        cluster: Cluster,
        listener: InboundBridge,
        *,
        max_payload: int,
    ) -> None:
        self.bus = bus
        self.db = database
        self.cluster = cluster
        self.listener = listener
        self.max_payload = max_payload
        self.kinds: dict[str, _Kind] = {}
        self._known: set[str] = set()  # kinds some node has hosted
        self.stopping = False
        self._nursery: trio.Nursery | None = None
        self._placement_wake = trio.Event()
        self.period = cluster.keepalive / 4
        self.stale_after = 2 * cluster.keepalive
        """A host that has not placed for this long (a paused process) loses its shards."""

    def statistics(self) -> tuple[KindStatistics, ...]:
        return tuple(k.statistics() for k in self.kinds.values())

    def outgoing(
        self, kind: str, key: str, message: object, traceparent: str | None
    ) -> tuple[str, str, int, str, str | None]:
        """A tell queued by a handler, encoded for the commit (or the handler's error)."""
        payload = encode_message(kind, key, message, self.max_payload)
        return kind, key, shard_of(key), payload, traceparent

    def poll_soon(self) -> None:
        self._placement_wake.set()

    async def check_kind(self, kind: str) -> None:
        """`UnknownEntityKindError` unless some node has hosted *kind* (cached once known)."""
        if kind in self.kinds or kind in self._known:
            return
        async with self.db.borrow() as connection:
            known = await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pgbus.entity_shards WHERE kind = $1)", kind
            )
        if not known:
            raise UnknownEntityKindError(kind)
        self._known.add(kind)

    def _woken(self, payload: str) -> None:
        """A message was stored (``kind:shard``), or the listener reconnected (``""``)."""
        kind_name, _, shard = payload.partition(":")
        if not payload:
            for kind in self.kinds.values():
                kind.poke()
            return
        found = self.kinds.get(kind_name)
        if found is None:
            return
        kind = found
        if shard.isdigit():
            if int(shard) in kind.owned:
                kind.poke(int(shard))
        else:  # "kind:*" (a batch), or junk: read every shard
            kind.poke()

    async def add(self, spec: KindSpec) -> None:
        """Host *spec*'s kind from now on; returns once registered and placed once."""
        if spec.kind in self.kinds:
            raise PgbusError(f"entity kind {spec.kind!r} is hosted on this bus already.")
        kind = self.kinds[spec.kind] = _Kind(self, spec)
        async with self.db.borrow() as connection:
            await connection.execute(_REGISTER, self.cluster.channel, spec.kind, SHARDS)
            await connection.execute("SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, "entities")
        assert self._nursery is not None
        self._nursery.start_soon(kind.serve)
        await self._place(kind)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.listener.add_hook(WAKE_CHANNEL, self._woken)
        self.cluster.on_nodes(self.poll_soon)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._placement)
                task_status.started()
        finally:
            self.listener.remove_hook(WAKE_CHANNEL, self._woken)

    async def _placement(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            self._placement_wake = trio.Event()
            try:
                for kind in list(self.kinds.values()):
                    await self._place(kind)
                backoff.reset()
            except (DatabaseUnavailableError, DatabaseError, trio.TooSlowError) as exc:
                log.warning("entities: placement failed (%s); retrying", exc or type(exc).__name__)
                await trio.sleep(backoff.next_delay())
                continue
            with trio.move_on_after(self.period):
                await self._placement_wake.wait()

    async def _place(self, kind: _Kind) -> None:
        """Take the shards this node should own and are free; give up the others."""
        me = self.cluster.channel
        if self.cluster.pid is None or self.stopping:
            return
        with trio.fail_after(self.cluster.keepalive):
            async with self.db.borrow() as connection:
                # Seen first: a host that was paused is live again before it decides anything.
                seen = await connection.execute(_SEEN, me, kind.kind, len(kind.active))
                if seen.endswith(" 0"):  # our row went (deleted by hand): written again
                    await connection.execute(_REGISTER, me, kind.kind, SHARDS)
                horizon = self.stale_after
                hosts = sorted(r[0] for r in await connection.fetch(_HOSTS, kind.kind, horizon))
                hosts = sorted({*hosts, me})
                mine = [s for s in range(SHARDS) if rendezvous(s, hosts) == me]
                released = await connection.fetch(_RELEASE, kind.kind, me, mine)
                claimed = await connection.fetch(_CLAIM, kind.kind, horizon, me, mine)
                owned = {r[0]: r[1] for r in await connection.fetch(_OWNED, kind.kind, me)}
                if released:
                    await connection.execute(
                        "SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, "entities"
                    )
        kind.owned = owned
        if claimed or released:
            log.info(
                "entities %s: node %r owns %d shard(s) (took %d, gave up %d) of %d host(s)",
                kind.kind,
                self.cluster.name,
                len(owned),
                len(claimed),
                len(released),
                len(hosts),
            )
        if claimed:
            kind.poke()

    # -- leaving ------------------------------------------------------------------------------

    async def stop_intake(self) -> None:
        self.stopping = True
        for kind in self.kinds.values():
            kind.poke()

    async def finish(self, deadline: float) -> list[str]:
        """Wait for the batches running, then give every shard back (others take them now)."""
        self.stopping = True
        with trio.move_on_at(deadline):
            for kind in self.kinds.values():
                await kind.stopped.wait()
        for kind in self.kinds.values():
            await kind.passivate_all()
        if self.cluster.pid is not None:
            with trio.move_on_at(deadline), contextlib.suppress(PgbusError):
                async with self.db.borrow() as connection:
                    await connection.execute(_LEAVE, self.cluster.channel)
                    await connection.execute(
                        "SELECT pg_notify($1, $2)", CLUSTER_CHANNEL, "entities"
                    )
        return []
