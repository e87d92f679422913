"""
Durable channels (design section 9): messages kept in pgbus's own tables, NOTIFY only as the
wake-up. At-least-once, replayable, shared by the members of consumer groups.

- `_rules`: `DurableMessage`, defaults and validators (no driver; the TOML loader uses them).
- `_schema`: the ``pgbus`` schema and its migrations.
- `_publish`: storing messages (bridge, one-off, inside a caller's transaction), with
  deduplication keys and delays.
- `_consumer`: `DurableConsumer`, one member of a group feeding a Trio channel.
- `_time`: `DelayedMover`, which moves due delayed messages into their channels.
- `_schedule`: schedules (cron or interval), each slot published exactly once.
- `_admin`: retention, group status, dead letters.
- `_support`: `DurableSupport`, what a `Bus` holds: the schema checked once, its consumers, the
  janitor.
- `_cli`: the ``migrate``, ``groups`` and ``dead-letters`` commands.

This package imports nothing itself: `_rules` (no driver) is what the TOML loader and the actor
loop use, so ``pgbus check`` never loads asyncpg.
"""
