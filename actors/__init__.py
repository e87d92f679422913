"""
Ready-made actors, configured from TOML as ``class = "pgbus.actors.<module>:<Class>"``.

Each is an ordinary `pgbus.Actor` built on public pgbus names only; its ``options`` table is
passed to the constructor as keyword arguments.

- `pgbus.actors.printer.Printer`: prints each message as one JSON line (stdout, or *stream*),
  flushed.
- `pgbus.actors.relay.Relay`: forwards each message's payload to the channel *to*.
- `pgbus.actors.heartbeat.Heartbeat`: sends ``"<message> <n>"`` to the channel *to* every
  *every* seconds.
- `pgbus.actors.table_changes.TableChanges`: installs (idempotently) a trigger that calls
  ``pg_notify`` for each INSERT, UPDATE, DELETE (and TRUNCATE) on *table* with the change as
  JSON, and delivers those events to the channel *to* as `pgbus.Notification` objects whose
  payload is the decoded dict.

The repository keeps them in its top-level ``actors/`` directory; installed (wheel or editable),
they are this package, ``pgbus.actors``.
"""
