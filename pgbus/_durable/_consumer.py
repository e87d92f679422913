"""
The durable inbound bridge: a member of a consumer group, claiming into a Trio channel.

One connection per bridge, one task. Each cycle is one round trip, ``pgbus.claim_v3(...)``: the
acknowledgements gathered since the last cycle, the ids this member holds when their leases
are due for renewal (every third of a lease), then at most as many messages as the Trio
channel has room for (its capacity is the prefetch). Between cycles the task sleeps until there
is something to do: a wake-up NOTIFY for its channel (delivered by the bus's listening
connection), an acknowledgement (which also means room in the channel), or the poll deadline.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import socket
from collections import deque
from typing import Any

import trio

from .. import _tracing
from .._bridge import BridgeStatistics
from .._channel import Channel
from .._codec import decoder, validate_channel_name
from .._errors import CodecError, DatabaseError, DatabaseUnavailableError
from .._pg import Backoff, Connection, Database, connect_with_retry
from ._rules import DurableMessage, validate_prefetch

log = logging.getLogger("pgbus.durable")

POLL_EVERY = 1.0
"""The safety net: a member claims at least this often (seconds) even without a wake-up."""

RECHECK_FIRST = 0.002
"""Seconds before claiming again after a wake-up found nothing (see `_after_claim`)."""

MAX_RECHECK_DOUBLINGS = 9
"""The recheck delay doubles at most this often (2 ms * 2**9 > POLL_EVERY): no overflow."""

RENEW_FRACTION = 1 / 3
"""Held leases are renewed every ``lease * RENEW_FRACTION`` seconds, in a claim's round trip."""

MAX_CLAIM = 1000
"""The most messages one cycle claims, whatever the channel's capacity."""

GIVE_BACK_TIMEOUT = 5.0
"""Bound on writing the last acknowledgements and releasing claims when a member stops."""

STATEMENT_TIMEOUT = 30.0
"""Bound on one cycle's round trip (it may wait for another member's claim to commit)."""

_CLAIM = (
    "SELECT id, attempt, payload, reclaimed"
    " FROM pgbus.claim_v3($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)

# Only while tracing (pgbus._tracing): the publish contexts of one claim's messages.
_TRACE_CONTEXTS = "SELECT id, traceparent FROM pgbus.messages WHERE id = ANY($1::bigint[])"

# 'latest': what is visible in the snapshot at joining is not for this group; what commits
# after it is. 'earliest': a tick that sees nothing.
_JOIN = """
INSERT INTO pgbus.groups (channel, group_name, position_xid, position_id, tick_from)
SELECT $1, $2, pg_snapshot_xmin(s.tick), 0, s.tick
  FROM (SELECT CASE WHEN $3 = 'earliest' THEN '1:1:'::pg_snapshot
                    ELSE pg_current_snapshot() END AS tick) s
ON CONFLICT (channel, group_name) DO UPDATE SET seen_at = now()
"""

_RETRY = """
UPDATE pgbus.deliveries d
   SET available_at = now() + make_interval(secs => f.delay), member = NULL, last_error = f.error
  FROM unnest($3::bigint[], $4::integer[], $5::float8[], $6::text[]) AS f(id, attempt, delay, error)
 WHERE d.message_id = f.id AND d.group_name = $1 AND d.member = $2 AND d.attempts = f.attempt
"""

_DEAD = """
UPDATE pgbus.deliveries d
   SET available_at = 'infinity', member = NULL, last_error = f.error
  FROM unnest($3::bigint[], $4::integer[], $5::text[]) AS f(id, attempt, error)
 WHERE d.message_id = f.id AND d.group_name = $1 AND d.member = $2 AND d.attempts = f.attempt
"""

# Given back at once (SIGTERM, bus exit): the attempt it had does not count.
_RELEASE = """
UPDATE pgbus.deliveries d
   SET available_at = now(), member = NULL, attempts = d.attempts - 1
  FROM unnest($3::bigint[], $4::integer[]) AS f(id, attempt)
 WHERE d.message_id = f.id AND d.group_name = $1 AND d.member = $2 AND d.attempts = f.attempt
"""


def member_name() -> str:
    """``host:pid:random``: tells the members of a group apart, also across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class DurableConsumer:
    """
    One member of *group* on the durable channel *pg_channel*, delivering into *channel*.

    Messages arrive in *channel* as `DurableMessage`; the bridge never claims more than
    *channel* has room for. `handled` acknowledges (batched into the next cycle), `failed`
    schedules a retry after ``retry_after * 2**(attempt-1)`` seconds (with jitter) or, at
    *max_attempts*, makes the message a dead letter. What this member holds (in *channel* or
    being handled) has its lease renewed every ``lease * RENEW_FRACTION`` seconds, in the
    claim's round trip; a member that stops renewing (dead, frozen) loses its claims to the
    other members once *lease* has passed. `finish` stops claiming; once `serve` returns, what
    this member claimed and did not handle has been given back to the group.
    """

    def __init__(
        self,
        db: Database,
        channel: Channel,
        pg_channel: str,
        *,
        group: str,
        start: str,
        max_attempts: int,
        retry_after: float,
        lease: float,
        codec: str,
        retention: float,
        poll: float | None = None,
    ) -> None:
        self._db = db
        self.poll = poll
        """Poll-only (no wake-ups): claim at least every *poll* seconds. None: wake-ups, and a
        claim at least every `POLL_EVERY` seconds as the safety net."""
        self.poll_every = POLL_EVERY if poll is None else poll
        self.channel = channel
        self.pg_channel = validate_channel_name(pg_channel)
        self.prefetch = min(validate_prefetch(channel.name, channel.capacity), MAX_CLAIM)
        self.group = group
        self.start = start
        self.max_attempts = max_attempts
        self.retry_after = retry_after
        self.lease = lease
        self.codec = codec
        self.retention = retention
        self._decode = decoder(codec)
        self.member = member_name()
        self._connection: Connection | None = None
        self._inflight: dict[int, int] = {}  # id -> attempt, claimed by this member
        self._acking: set[int] = set()  # being acknowledged in a caller's transaction
        self._acks: list[tuple[int, int]] = []
        self._fails: list[tuple[int, int, str]] = []
        self._fails_dead: set[int] = set()  # undecodable: dead letters at once
        self._overflow: deque[DurableMessage] = deque()  # claimed, waiting for channel room
        self._work = trio.Event()
        self._maybe_more = True
        self._next_reclaim = 0.0  # when to look for due retries and expired leases again
        self._next_renew = math.inf  # when to renew the leases of what this member holds
        self._retry_at = math.inf  # the earliest retry this member scheduled
        self._notified = False  # a wake-up for this channel came since the last claim
        self._recheck_at = math.inf
        self._rechecks = 0
        self._stopping = False
        self._closing = False
        self.delivered = 0
        self.acked = 0
        self.retried = 0
        self.dead = 0
        self.rejected = 0
        self.reconnects = 0
        self.leases_lost = 0

    def settings(self) -> tuple[object, ...]:
        return (
            self.group,
            self.start,
            self.max_attempts,
            self.retry_after,
            self.lease,
            self.codec,
            self.poll,
        )

    # -- called by consumers (synchronous, cheap: no round trip) -------------------------------

    def handled(self, message: DurableMessage) -> None:
        """Acknowledge *message*: written with the next cycle (a few ms under load)."""
        # The attempt this member holds now (a copy of an earlier attempt counts: it was handled).
        attempt = self._inflight.pop(message.id, None)
        if attempt is not None:
            self._acks.append((message.id, attempt))
            self._work.set()

    def failed(self, message: DurableMessage, error: BaseException | str | None = None) -> None:
        """Give *message* back for a retry (or to the dead letters once attempts are used up)."""
        attempt = self._inflight.pop(message.id, None)
        if attempt is not None:
            text = error if isinstance(error, str) or error is None else _describe(error)
            self._fails.append((message.id, attempt, text or "failed"))
            self._work.set()

    def acking(self, message: DurableMessage, *, pending: bool) -> None:
        """
        *message* is being acknowledged in a caller's transaction (*pending*), or that
        transaction has ended: meanwhile a renewal that finds it gone does not call it lost.
        """
        if pending:
            self._acking.add(message.id)
        else:
            self._acking.discard(message.id)

    def acked_elsewhere(self, message: DurableMessage) -> None:
        """*message* was acknowledged in a committed transaction (``bus.transaction(ack=)``)."""
        self._acking.discard(message.id)
        if self._inflight.get(message.id) == message.attempt:
            del self._inflight[message.id]
            self.acked += 1
            self._work.set()  # its place in the channel is free

    def holds(self, message: DurableMessage) -> bool:
        """Whether this member still holds *message* (its lease was not lost)."""
        return message.id in self._inflight

    def wake(self, payload: str) -> None:
        """The listener's hook: messages were published to *payload* ("" after a reconnect)."""
        if payload == self.pg_channel or not payload:
            self._maybe_more = self._notified = True
            self._work.set()

    def close(self) -> None:
        """Stop after the statement in flight, if any: `serve` then gives back and returns."""
        self._stopping = self._closing = True
        self._work.set()

    def finish(self) -> None:
        """Claim nothing more; keep acknowledging until `serve` is cancelled."""
        self._stopping = True
        self._work.set()

    def statistics(self) -> BridgeStatistics:
        return BridgeStatistics(
            self.pg_channel,
            self.channel.name,
            "in",
            self.delivered,
            0,
            self.rejected,
            self.reconnects,
        )

    # -- the task ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """
        Join the group and deliver until cancelled, reconnecting for as long as it takes.

        Cancellation: acknowledgements gathered so far are written and unhandled claims are
        given back (shielded, bounded by a few seconds), then this returns.
        """
        backoff = Backoff()
        purpose = f"durable {self.pg_channel}/{self.group}"[:40]
        started = False
        try:
            while True:
                try:
                    await self._connect(purpose, backoff)
                    if not started:
                        started = True
                        task_status.started()
                    await self._cycle_forever()
                    return  # closed: the finally clause gives back what is left
                except DatabaseUnavailableError as exc:
                    log.warning("%s: %s; reconnecting (nothing is lost)", purpose, exc)
                    self.reconnects += 1
                    await self._drop_connection()
                    await trio.sleep(backoff.next_delay())
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(GIVE_BACK_TIMEOUT):
                await self._give_back(purpose)
            await self._drop_connection()

    async def _connect(self, purpose: str, backoff: Backoff) -> None:
        connection = await connect_with_retry(self._db, purpose, backoff)
        self._connection = connection
        # Claims and acknowledgements are safe to lose in a crash (the message comes again):
        # they need not wait for the WAL flush. Publishing does.
        if not self._db.transaction_pooling:  # a pooled session's settings are not ours
            await connection.execute("SET synchronous_commit = off")
        await connection.execute(_JOIN, self.pg_channel, self.group, self.start)
        self._maybe_more = True

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()

    async def _cycle_forever(self) -> None:
        next_poll = trio.current_time()
        while not self._closing:
            # Waiting for room never outlasts a renewal: what is held must keep its lease.
            with trio.move_on_at(self._next_renew if self._inflight else math.inf):
                while self._overflow:
                    await self.channel.send(self._overflow[0])
                    self._overflow.popleft()
            room = 0 if self._stopping else self._room()
            now = trio.current_time()
            if now >= self._retry_at:
                self._retry_at = math.inf
                self._maybe_more = True  # a retry of ours is due: claim it now
            if now >= self._recheck_at:
                self._recheck_at = math.inf
                self._maybe_more = self._notified = True
            want_claim = room > 0 and (self._maybe_more or now >= next_poll)
            want_renew = bool(self._inflight) and now >= self._next_renew
            if self._fails:
                await self._write_failures()
            if want_claim or self._acks or want_renew:
                notified, self._notified = self._notified, False
                claimed = await self._claim(room if want_claim else 0, renew=want_renew)
                if want_claim:
                    next_poll = trio.current_time() + self.poll_every
                    self._maybe_more = claimed >= room
                    self._after_claim(claimed, notified)
                # Let the consumers run before the next cycle, so its batch is larger.
                await trio.lowlevel.checkpoint()
                continue
            self._work = trio.Event()
            if (
                self._acks
                or self._fails
                or (not self._stopping and self._maybe_more and self._room())
            ):
                continue
            wake_at = min(next_poll, self._retry_at, self._recheck_at)
            if self._inflight:
                wake_at = min(wake_at, self._next_renew)
            if self._stopping:  # acknowledging and renewing only, until cancelled
                wake_at = self._next_renew if self._inflight else trio.current_time() + 3600
            with trio.move_on_at(wake_at):
                await self._work.wait()

    def _after_claim(self, claimed: int, notified: bool) -> None:
        """
        Woken for a message and found none: look again soon (2 ms, doubling up to the poll).

        A wake-up comes after its transaction committed, so a claim normally sees its messages
        at once; this covers the rest (a wake-up a claim already answered, one sent by anyone
        who can connect) at a bounded cost: the doubling stops at the poll interval, however
        many fruitless wake-ups come in a row.
        """
        if claimed or not notified:
            self._rechecks = 0
            return
        self._rechecks = min(self._rechecks + 1, MAX_RECHECK_DOUBLINGS + 1)
        delay = min(self.poll_every, RECHECK_FIRST * 2 ** (self._rechecks - 1))
        self._recheck_at = trio.current_time() + delay

    def _room(self) -> int:
        free = self.prefetch - self.channel.statistics().buffered
        return max(0, min(free, MAX_CLAIM))

    async def _claim(self, limit: int, *, renew: bool = False) -> int:
        """
        One round trip: acknowledge, renew what this member holds (when *renew*, or when none
        is held yet), claim up to *limit*; the number of messages claimed.

        Due retries and expired leases are looked for once a second, and again at once while
        a claim of them fills *limit* (a dead member's claims all come back together).
        """
        assert self._connection is not None
        acks = self._acks
        self._acks = []
        ids = [a[0] for a in acks]
        attempts = [a[1] for a in acks]
        now = trio.current_time()
        reclaim = limit > 0 and now >= self._next_reclaim
        if reclaim:
            self._next_reclaim = now + self.poll_every
        held = list(self._inflight) if renew else []
        renews = renew or not self._inflight
        try:
            with trio.fail_after(STATEMENT_TIMEOUT):
                rows = await self._connection.fetch(
                    _CLAIM,
                    self.pg_channel,
                    self.group,
                    self.member,
                    limit,
                    self.lease,
                    self.max_attempts,
                    ids,
                    attempts,
                    held,
                    reclaim,
                )
        except trio.TooSlowError:
            self._acks[:0] = acks
            raise DatabaseUnavailableError(self._db.where, "a claim took too long") from None
        except DatabaseError as exc:
            self._acks[:0] = acks
            if exc.sqlstate == "P0002":  # the group was retired meanwhile: join again
                raise DatabaseUnavailableError(self._db.where, exc.message) from None
            raise
        except BaseException:
            self._acks[:0] = acks  # not confirmed: sent again with the next cycle
            raise
        if renews:  # what this claim takes, or what it renewed, has a whole lease from now
            self._next_renew = now + self.lease * RENEW_FRACTION
        self.acked += len(acks)
        contexts = await self._trace_contexts(rows) if rows and _tracing.active() else None
        claimed = self._deliver(rows, contexts)
        if reclaim and sum(1 for row in rows if row[3]) >= limit:
            self._next_reclaim = now  # maybe more are due: look again in the next claim
        return claimed

    async def _trace_contexts(self, rows: list[Any]) -> dict[int, str]:
        """
        While tracing: the stored publish contexts of the claimed *rows*, one statement per
        claim. Tracing never stops delivery: when this fails, the messages go without.
        """
        assert self._connection is not None
        # Only what will be delivered: not a lost lease (attempt 0), not what is held already.
        ids = [row[0] for row in rows if row[1] and row[0] not in self._inflight]
        if not ids:
            return {}
        try:
            with trio.fail_after(STATEMENT_TIMEOUT):
                found = await self._connection.fetch(_TRACE_CONTEXTS, ids)
        except (trio.TooSlowError, DatabaseError, DatabaseUnavailableError) as exc:
            log.warning("durable %r: could not read trace contexts: %s", self.pg_channel, exc)
            return {}
        return {row[0]: row[1] for row in found if row[1] is not None}

    def _deliver(self, rows: list[Any], contexts: dict[int, str] | None = None) -> int:
        """
        Put claimed rows in the channel; forget the leases lost (attempt 0); how many claimed.

        *contexts* (while tracing only): the publish contexts stored with them, by id.
        """
        decode = self._decode
        channel = self.pg_channel
        inflight = self._inflight
        send_nowait = self.channel.send_nowait
        claimed = 0
        lost = 0
        for message_id, attempt, payload, _reclaimed in rows:
            if attempt == 0:  # held, but another member has it now (this one was frozen)
                if message_id in self._acking:
                    continue  # or acknowledged by a transaction that just committed
                if inflight.pop(message_id, None) is not None:
                    lost += 1
                continue
            claimed += 1
            if message_id in inflight:
                # Already here (never claimed twice by a live member, but a copy is never
                # delivered twice by this one either): its acknowledgement covers this attempt.
                inflight[message_id] = attempt
                continue
            try:
                value = decode(channel, payload)
            except CodecError as exc:
                # Never handled: straight to the dead letters, where it can be looked at. Not
                # held: the failure is written with the next cycle.
                self.rejected += 1
                log.error("durable message %d: %s; moved to the dead letters", message_id, exc)
                self._fails.append((message_id, attempt, str(exc)))
                self._fails_dead.add(message_id)
                continue
            message = DurableMessage(
                channel,
                value,
                message_id,
                attempt,
                self.group,
                receipt=self,
                trace=None if contexts is None else contexts.get(message_id, ""),
            )
            inflight[message_id] = attempt
            self.delivered += 1
            if self._overflow:
                self._overflow.append(message)
                continue
            try:
                send_nowait(message)  # room was counted before claiming...
            except trio.WouldBlock:
                self._overflow.append(message)  # ...unless someone else sent to the channel
        if lost:
            self.leases_lost += lost
            log.warning(
                "durable %r, group %r: %d lease(s) expired before they could be renewed (was "
                "this process stopped?); another member has those messages now",
                self.pg_channel,
                self.group,
                lost,
            )
        return claimed

    async def _write_failures(self) -> None:
        assert self._connection is not None
        fails, self._fails = self._fails, []
        retry: list[tuple[int, int, float, str]] = []
        dead: list[tuple[int, int, str]] = []
        for message_id, attempt, error in fails:
            if attempt >= self.max_attempts or message_id in self._fails_dead:
                dead.append((message_id, attempt, error))
            else:
                delay = self.retry_after * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                retry.append((message_id, attempt, delay, error))
                due = trio.current_time() + delay
                self._next_reclaim = min(self._next_reclaim, due)
                self._retry_at = min(self._retry_at, due)
        try:
            with trio.fail_after(STATEMENT_TIMEOUT):
                if retry:
                    await self._connection.execute(
                        _RETRY,
                        self.group,
                        self.member,
                        [r[0] for r in retry],
                        [r[1] for r in retry],
                        [r[2] for r in retry],
                        [r[3] for r in retry],
                    )
                if dead:
                    await self._connection.execute(
                        _DEAD,
                        self.group,
                        self.member,
                        [d[0] for d in dead],
                        [d[1] for d in dead],
                        [d[2] for d in dead],
                    )
        except BaseException:
            self._fails[:0] = fails
            raise
        for message_id, attempt, _ in dead:
            self._fails_dead.discard(message_id)
            log.warning(
                "durable message %d of %r, group %r: %d attempt(s) failed; it is a dead letter",
                message_id,
                self.pg_channel,
                self.group,
                attempt,
            )
        self.retried += len(retry)
        self.dead += len(dead)

    async def _give_back(self, purpose: str) -> None:
        """
        Write pending acknowledgements and failures, and release every unhandled claim, on a
        new connection if the last one is gone (a cancelled statement drops its connection).
        """
        if not (self._acks or self._fails or self._inflight):
            return
        try:
            if self._connection is None or self._connection.closed:
                await self._drop_connection()
                self._connection = await self._db.connect(purpose)
            connection = self._connection
            if self._fails:
                await self._write_failures()
            if self._acks:
                await self._claim(0)
            if self._inflight:
                held = list(self._inflight.items())
                await connection.execute(
                    _RELEASE,
                    self.group,
                    self.member,
                    [h[0] for h in held],
                    [h[1] for h in held],
                )
                self._inflight.clear()
                log.info(
                    "durable %r, group %r: gave back %d unhandled message(s)",
                    self.pg_channel,
                    self.group,
                    len(held),
                )
        except (DatabaseUnavailableError, DatabaseError) as exc:
            log.warning(
                "durable %r, group %r: could not give back %d claim(s) (%s); their lease "
                "(%gs) returns them to the group",
                self.pg_channel,
                self.group,
                len(self._inflight),
                exc,
                self.lease,
            )


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
