"""
Schedules: a cron expression (five fields, in a time zone) or a fixed interval that publishes
one durable message per slot, exactly once.

Exactly once by construction: a slot is published by one statement that inserts its row in
``pgbus.schedule_slots`` (primary key ``(name, slot)``, ``ON CONFLICT DO NOTHING``) and, only
when that row was inserted, the message. They commit together, so any number of processes may
run the same schedule (every bus that declares it does): a second one waits for the first's
row and then stores nothing; if the first's transaction rolls back, the second stores it. A
process killed at any moment leaves either both or neither.

Slots are judged by the database's clock. ``missed`` says what a runner does with slots that
passed while no process ran the schedule (those before its start, after the last slot
published): ``skip`` publishes none of them, ``catch_up`` publishes each (in order, at most
`MAX_CATCH_UP` per pass), ``latest`` only the newest.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import zoneinfo
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._codec import encode
from .._errors import DatabaseError, DatabaseUnavailableError, SettingError
from ._rules import WAKE_CHANNEL, loose_scan

if TYPE_CHECKING:  # no driver at import: `pgbus check` loads this module
    from .._pg import Connection, Database

log = logging.getLogger("pgbus.durable")

MISSED_POLICIES = ("skip", "catch_up", "latest")
MAX_CATCH_UP = 1000
"""The most missed slots one pass of a runner publishes (the next pass goes on)."""
MAX_SLEEP = 30.0
"""A runner looks at the database's clock at least this often (seconds)."""
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


@attrs.frozen
class Schedule:
    """One schedule, checked: see `Bus.schedule`."""

    name: str
    postgres: str
    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    payload: Any = None
    missed: str = "skip"

    def slots_after(self, after: datetime.datetime) -> Any:
        """The slots strictly after *after* (aware), in order, as aware datetimes (UTC)."""
        if self.every is not None:
            step = self.every
            n = math.floor((after - _EPOCH).total_seconds() / step) + 1
            while True:
                yield _EPOCH + datetime.timedelta(seconds=n * step)
                n += 1
        from croniter import croniter

        zone = zoneinfo.ZoneInfo(self.timezone)
        times = croniter(self.cron, after.astimezone(zone))
        while True:
            yield times.get_next(datetime.datetime).astimezone(datetime.UTC)

    def latest_at_or_before(self, now: datetime.datetime) -> datetime.datetime:
        """The newest slot at or before *now*."""
        if self.every is not None:
            n = math.floor((now - _EPOCH).total_seconds() / self.every)
            return _EPOCH + datetime.timedelta(seconds=n * self.every)
        from croniter import croniter

        zone = zoneinfo.ZoneInfo(self.timezone)
        later = now + datetime.timedelta(microseconds=1)  # get_prev is strictly before
        previous = croniter(self.cron, later.astimezone(zone)).get_prev(datetime.datetime)
        return previous.astimezone(datetime.UTC)  # type: ignore[no-any-return]

    def payload_for(self, slot: datetime.datetime) -> object:
        if self.payload is not None:
            return self.payload
        return {"schedule": self.name, "slot": slot.isoformat()}


def validate_cron(value: object) -> str:
    """Five fields (minute hour day-of-month month day-of-week), as croniter parses them."""
    rule = "must be a cron expression of five fields (minute hour day month weekday)"
    if not isinstance(value, str) or len(value.split()) != 5:
        raise SettingError("cron", rule, value=value)
    from croniter import croniter

    if not croniter.is_valid(value):
        raise SettingError("cron", rule, value=value)
    return value


def validate_timezone(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise SettingError("timezone", "must be an IANA time zone name", value=value)
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SettingError(
            "timezone", "must be an IANA time zone name such as 'Europe/Paris'", value=value
        ) from None
    return value


def make_schedule(
    name: object,
    postgres: str,
    *,
    cron: object = None,
    every: object = None,
    timezone: object = "UTC",
    payload: object = None,
    missed: object = "skip",
) -> Schedule:
    """A `Schedule` with every rule checked (the TOML loader and `Bus.schedule` share this)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise SettingError("name", "must be a non-empty string", value=name)
    if (cron is None) == (every is None):
        raise SettingError("cron", "or every is required (one of them, not both)")
    checked_every = None
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int | float):
            raise SettingError("every", "must be a number of seconds > 0", value=every)
        if not 0 < every < math.inf:
            raise SettingError("every", "must be a number of seconds > 0", value=every)
        checked_every = float(every)
    checked_cron = validate_cron(cron) if cron is not None else None
    zone = validate_timezone(timezone)
    if missed not in MISSED_POLICIES:
        raise SettingError(
            "missed", f"must be one of {', '.join(map(repr, MISSED_POLICIES))}", value=missed
        )
    encode(postgres, payload, "json")  # refused now (CodecError) if it cannot be sent
    return Schedule(name, postgres, checked_cron, checked_every, zone, payload, str(missed))


# The slot's row and its message in one statement: the message only if the row is new, and
# never a slot older than one already published (only a runner that looked before another
# published the newer one would try: that slot was published or skipped then). That rule is
# what lets the janitor forget old slots (`FORGET_SLOTS`) without a slot ever coming twice.
_PUBLISH_SLOT = """
WITH slot AS (
    INSERT INTO pgbus.schedule_slots (name, slot, message_id)
    SELECT $1, $2, nextval('pgbus.messages_id_seq')
     WHERE NOT EXISTS (SELECT FROM pgbus.schedule_slots t WHERE t.name = $1 AND t.slot > $2)
    ON CONFLICT (name, slot) DO NOTHING
    RETURNING message_id
), stored AS (
    INSERT INTO pgbus.messages (id, channel, payload) OVERRIDING SYSTEM VALUE
    SELECT message_id, $3, $4 FROM slot
    RETURNING id
)
SELECT id, pg_notify($5, $3) FROM stored
"""

_LOOK = "SELECT clock_timestamp(), max(slot) FROM pgbus.schedule_slots WHERE name = $1"

# What `pgbus status` shows: this runner's rule and next slot; and the database's time.
_NOTE_NEXT = """
INSERT INTO pgbus.schedules AS s
       (name, channel, cron, every, timezone, missed, next_slot, runner, seen_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
ON CONFLICT (name) DO UPDATE
   SET channel = $2, cron = $3, every = $4, timezone = $5, missed = $6, next_slot = $7,
       runner = $8, seen_at = now()
RETURNING clock_timestamp()
"""

# Every schedule a runner has declared, with its last published slot (an index probe), and
# whether a runner wrote its row lately (by the database's clock).
_SCHEDULES = """
SELECT s.name, s.channel, s.cron, s.every, s.timezone, s.missed, s.next_slot, s.runner,
       s.seen_at,
       (SELECT max(t.slot) FROM pgbus.schedule_slots t WHERE t.name = s.name) AS last_slot,
       s.seen_at > now() - make_interval(secs => $1) AS running
  FROM pgbus.schedules s
 ORDER BY s.name
"""

RUNNING_WITHIN = 2 * MAX_SLEEP + 30.0
"""A schedule whose row no runner wrote for this long (seconds) is shown as not running."""

SLOT_HISTORY = 24 * 3600.0
"""Slots older than their schedule's newest by more than this (seconds) are forgotten."""

FORGET_SCHEDULE_AFTER = 7 * 24 * 3600.0
"""A schedule no runner declared for this long (seconds) leaves `pgbus status`."""

# The janitor's part (see `pgbus._durable._admin.janitor_pass`). Slots: each schedule's
# newest is kept for good (see _PUBLISH_SLOT), with those of the SLOT_HISTORY before it (which
# slot was published when, with its message's id); one loose index scan of the schedules'
# names, then a range per name. SKIP LOCKED: janitors of several processes never wait on
# each other.
FORGET_SLOTS = f"""
WITH RECURSIVE {loose_scan("n", "pgbus.schedule_slots", "name")}
DELETE FROM pgbus.schedule_slots s WHERE ctid = ANY(ARRAY(
    SELECT t.ctid FROM n, pgbus.schedule_slots t
     WHERE n.name IS NOT NULL AND t.name = n.name
       AND t.slot < (SELECT max(u.slot) FROM pgbus.schedule_slots u WHERE u.name = n.name)
                    - make_interval(secs => $1)
     LIMIT $2 FOR UPDATE OF t SKIP LOCKED
))
"""

# A schedule removed from every configuration: its row goes once no runner wrote it for
# FORGET_SCHEDULE_AFTER (its newest slot stays, above).
FORGET_SCHEDULES = """
DELETE FROM pgbus.schedules WHERE seen_at < now() - make_interval(secs => $1)
"""


async def schedule_status(connection: Connection) -> list[dict[str, Any]]:
    """
    Each schedule some runner declared, for ``pgbus status``: its rule, ``last_slot`` (the
    newest slot published, ISO 8601, None before the first), ``next_slot`` (the next one its
    last runner was to publish), ``runner`` (that runner's node or process), ``seen_at``
    (when it last wrote this row: a runner writes it once per pass, at least every 30 s) and
    ``running`` (whether that was within `RUNNING_WITHIN` seconds). A schedule no runner
    declared for `FORGET_SCHEDULE_AFTER` is forgotten by the janitor.
    """
    if not await connection.fetchval("SELECT to_regclass('pgbus.schedules') IS NOT NULL"):
        return []
    return [
        {
            "name": r[0],
            "postgres": r[1],
            "cron": r[2],
            "every": r[3],
            "timezone": r[4],
            "missed": r[5],
            "next_slot": _iso(r[6]),
            "runner": r[7],
            "seen_at": _iso(r[8]),
            "last_slot": _iso(r[9]),
            "running": r[10],
        }
        for r in await connection.fetch(_SCHEDULES, RUNNING_WITHIN)
    ]


def _iso(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.astimezone(datetime.UTC).isoformat()


async def publish_slot(
    connection: Connection, schedule: Schedule, slot: datetime.datetime, max_payload: int
) -> int | None:
    """Publish *slot* of *schedule* unless someone did; the new message's id, else None."""
    payload = encode(schedule.postgres, schedule.payload_for(slot), "json", max_payload)
    row = await connection.fetchrow(
        _PUBLISH_SLOT, schedule.name, slot, schedule.postgres, payload, WAKE_CHANNEL
    )
    return None if row is None else int(row[0])


class ScheduleRunner:
    """Runs one schedule in this process, on a connection of its own (see the module)."""

    def __init__(
        self, db: Database, schedule: Schedule, max_payload: int, runner: str = ""
    ) -> None:
        self.db = db
        self.schedule = schedule
        self.max_payload = max_payload
        self.runner = runner or f"{socket.gethostname()}:{os.getpid()}"
        """Who runs it, as `pgbus status` names it (the node's name in a cluster)."""
        self.published = 0
        """Slots this runner published (others may have published the rest)."""
        self.passes = 0
        """Passes done (each publishes what is due)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        connection: Connection | None = None
        started: datetime.datetime | None = None
        try:
            while True:
                wait = 1.0
                try:
                    if connection is None or connection.closed:
                        connection = await self.db.connect(f"schedule {self.schedule.name}")
                    wait, now = await self._pass(connection, started)
                    self.passes += 1
                    if started is None:
                        started = now
                except (DatabaseUnavailableError, DatabaseError) as exc:
                    log.warning("schedule %r: %s", self.schedule.name, exc)
                await trio.sleep(max(0.0, min(wait, MAX_SLEEP)))
        finally:
            if connection is not None:
                with trio.CancelScope(shield=True):
                    await connection.aclose()

    async def _pass(
        self, connection: Connection, started: datetime.datetime | None
    ) -> tuple[float, datetime.datetime]:
        """Publish what is due; seconds until the next slot, and the database's time."""
        row = await connection.fetchrow(_LOOK, self.schedule.name)
        now, last = row[0], row[1]
        floor = started or now  # slots before this runner started are "missed"
        if last is None or last < floor:
            missed = self.schedule.missed
            if last is None or missed == "skip":
                # Start after the newest of: the last published slot, this runner's start.
                last = floor if last is None else max(last, floor)
            elif missed == "latest":
                newest = self.schedule.latest_at_or_before(now)
                if newest > last:  # publish that one only: start just before it
                    last = newest - datetime.timedelta(microseconds=1)
        due = _until(self.schedule.slots_after(last), now)
        for slot in due:
            if await publish_slot(connection, self.schedule, slot, self.max_payload) is not None:
                self.published += 1
        if len(due) >= MAX_CATCH_UP:
            return 0.0, now
        following = next(iter(self.schedule.slots_after(due[-1] if due else last)))
        rule = self.schedule
        current = await connection.fetchval(
            _NOTE_NEXT,
            rule.name,
            rule.postgres,
            rule.cron,
            rule.every,
            rule.timezone,
            rule.missed,
            following,
            self.runner,
        )
        return float((following - current).total_seconds()), now


def _until(slots: Any, now: datetime.datetime) -> list[datetime.datetime]:
    """The slots of *slots* at or before *now* (at most `MAX_CATCH_UP`)."""
    due: list[datetime.datetime] = []
    for slot in slots:
        if slot > now or len(due) >= MAX_CATCH_UP:
            break
        due.append(slot)
    return due
