"""
Ready-made actors, configured from TOML as ``class = "actors.<module>:<Class>"``.

Each is an ordinary `pgbus.Actor` built on public pgbus names only; its ``options`` table is
passed to the constructor as keyword arguments.

- `actors.printer.Printer`: prints each message as one JSON line (stdout, or *stream*), flushed.
- `actors.relay.Relay`: forwards each message's payload to the channel *to*.
- `actors.heartbeat.Heartbeat`: sends ``"<message> <n>"`` to the channel *to* every *every* seconds.
- `actors.table_changes.TableChanges`: installs (idempotently) a trigger that ``pg_notify``s each
  INSERT, UPDATE, DELETE (and TRUNCATE) on *table* as JSON, and delivers those events to the
  channel *to* as `pgbus.Notification` objects whose payload is the decoded dict.
"""
