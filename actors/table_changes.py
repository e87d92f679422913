"""`TableChanges`: row changes of a table, as they commit, through a trigger and pg_notify."""

from __future__ import annotations

import hashlib

import pgbus

MAX_IDENTIFIER_BYTES = 63
"""PostgreSQL's NAMEDATALEN - 1: longer identifiers and channel names are silently truncated."""

TRIGGER = "pgbus_changes"
"""The row trigger's name (trigger names are per table, so one name serves every table)."""

TRUNCATE_TRIGGER = "pgbus_changes_truncate"
"""The statement trigger that reports TRUNCATE, which fires no row trigger."""

# The trigger function's body, completed server-side by format() with the channel name as a
# quoted literal (%L), so that no name is ever pasted into SQL by this module. Any other percent
# sign here would have to be written %%.
_FUNCTION_BODY = """
DECLARE
    seq bigint;
    event text;
    row_data json;
    row_key json;
BEGIN
    -- The event's place in its transaction. It also makes every event of a transaction
    -- distinct: PostgreSQL delivers identical notifications of one transaction only once.
    seq := coalesce(nullif(current_setting('pgbus.change_seq', true), ''), '0')::bigint + 1;
    PERFORM set_config('pgbus.change_seq', seq::text, true);
    IF TG_LEVEL = 'STATEMENT' THEN
        event := json_build_object(
            'op', TG_OP, 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
            'xid', txid_current(), 'seq', seq, 'new', NULL, 'old', NULL)::text;
    ELSE
        event := json_build_object(
            'op', TG_OP, 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
            'xid', txid_current(), 'seq', seq,
            'new', CASE WHEN TG_OP <> 'DELETE' THEN row_to_json(NEW) END,
            'old', CASE WHEN TG_OP <> 'INSERT' THEN row_to_json(OLD) END)::text;
        IF octet_length(event) > 7999 THEN
            -- Too large for NOTIFY: send the row's key instead, so the event is not lost and
            -- the consumer can read the row itself.
            IF TG_OP = 'DELETE' THEN
                row_data := row_to_json(OLD);
            ELSE
                row_data := row_to_json(NEW);
            END IF;
            -- Looked up now rather than at install time, so it follows ALTER TABLE.
            SELECT json_object_agg(a.attname, row_data -> a.attname ORDER BY k.ord)
              INTO row_key
              FROM pg_catalog.pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_catalog.pg_attribute a
                ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = TG_RELID AND i.indisprimary;
            IF row_key IS NULL THEN  -- no primary key: the row's physical address
                IF TG_OP = 'DELETE' THEN
                    row_key := json_build_object('ctid', OLD.ctid::text);
                ELSE
                    row_key := json_build_object('ctid', NEW.ctid::text);
                END IF;
            END IF;
            event := json_build_object(
                'op', TG_OP, 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                'xid', txid_current(), 'seq', seq, 'truncated', true, 'key', row_key)::text;
            IF octet_length(event) > 7999 THEN
                -- Even the key is too large; failing here would fail the user's write.
                event := json_build_object(
                    'op', TG_OP, 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                    'xid', txid_current(), 'seq', seq, 'truncated', true, 'key', NULL)::text;
            END IF;
        END IF;
    END IF;
    PERFORM pg_notify(%L, event);
    RETURN NULL;
END
"""

# The durable mode's body: the event is stored in pgbus's durable table in the row change's own
# transaction (so it commits or rolls back with it), whole, then a wake-up is sent. %1$L is the
# channel, twice.
_DURABLE_FUNCTION_BODY = """
DECLARE
    seq bigint;
    event text;
BEGIN
    seq := coalesce(nullif(current_setting('pgbus.change_seq', true), ''), '0')::bigint + 1;
    PERFORM set_config('pgbus.change_seq', seq::text, true);
    IF TG_LEVEL = 'STATEMENT' THEN
        event := json_build_object(
            'op', TG_OP, 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
            'xid', txid_current(), 'seq', seq, 'new', NULL, 'old', NULL)::text;
    ELSE
        event := json_build_object(
            'op', TG_OP, 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
            'xid', txid_current(), 'seq', seq,
            'new', CASE WHEN TG_OP <> 'DELETE' THEN row_to_json(NEW) END,
            'old', CASE WHEN TG_OP <> 'INSERT' THEN row_to_json(OLD) END)::text;
    END IF;
    INSERT INTO pgbus.messages (channel, payload) VALUES (%1$L, event);
    PERFORM pg_notify('pgbus_durable', %1$L);
    RETURN NULL;
END
"""

_FIND_TABLE = """
SELECT c.relkind::text
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname = $2
"""

# Every statement of the installation, built by the server: identifiers with %I, the function
# body (itself holding the channel as a %L literal) with %L.
_BUILD_INSTALL = """
SELECT format('LOCK TABLE %I.%I IN SHARE ROW EXCLUSIVE MODE', $1::text, $2::text),
       format('CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql AS %L',
              $1::text, $3::text, format($4::text, $5::text)),
       format('DROP TRIGGER IF EXISTS %I ON %I.%I', $6::text, $1::text, $2::text),
       format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %I.%I'
              ' FOR EACH ROW EXECUTE FUNCTION %I.%I()',
              $6::text, $1::text, $2::text, $1::text, $3::text),
       format('DROP TRIGGER IF EXISTS %I ON %I.%I', $7::text, $1::text, $2::text),
       format('CREATE TRIGGER %I AFTER TRUNCATE ON %I.%I'
              ' FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()',
              $7::text, $1::text, $2::text, $1::text, $3::text)
"""

_TABLE_KINDS = frozenset({"r", "p"})  # tables and partitioned tables
_OTHER_KINDS = {
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
    "S": "sequence",
    "i": "index",
    "I": "partitioned index",
    "c": "composite type",
    "t": "TOAST table",
}


class TableChanges(pgbus.Actor):
    """
    Deliver every committed INSERT, UPDATE, DELETE and TRUNCATE on *table* to the channel *to*.

    On start it installs, idempotently, a trigger function ``<schema>.pgbus_notify_<table>`` and
    the triggers ``pgbus_changes`` (each row) and ``pgbus_changes_truncate`` on the table, which
    ``pg_notify`` the Postgres channel *channel* (default ``pgbus_changes_<table>``, or
    ``pgbus_changes_<schema>.<table>`` outside ``public``) with one JSON event per change::

        {"op": "UPDATE", "table": "orders", "schema": "public", "xid": 1234, "seq": 1,
         "new": {...the row...}, "old": {...the row before...}}

    ``xid`` is the transaction's id (``txid_current()``) and ``seq`` the event's place in that
    transaction (1, 2, ...); ``seq`` also keeps PostgreSQL from merging two identical events of
    one transaction into one. ``new`` is null for a DELETE, ``old`` for an INSERT, both for a
    TRUNCATE. An event of 8000 bytes or more (PostgreSQL's NOTIFY limit) is sent instead as
    ``{"op", "table", "schema", "xid", "seq", "truncated": true, "key": {...}}`` with the row's
    primary key columns (``{"ctid": "(0,1)"}`` for a table without one), so the consumer can
    read the row itself; ``key`` is null only if the key alone is too large to send. For a
    partitioned table, a row's ``table`` names the partition that holds it.

    Then it bridges that Postgres channel into *to* with the ``json`` codec: each event arrives
    as a `pgbus.Notification` whose payload is the decoded dict, in commit order; nothing is
    delivered for a rolled-back transaction. Like every notification, events sent while the bus
    is disconnected are lost to it; a `pgbus.Gap` in *to* marks the place. The triggers stay
    installed when the actor stops (a restart reinstalls them in place).

    With ``durable = true`` the trigger stores each event, whole (no 8000-byte limit, so never
    ``truncated``), in pgbus's durable channel *channel*, in the same transaction as the row
    change, and the actor joins that channel as consumer group *group* (default: the actor's
    name): events arrive in *to* (a channel of positive capacity) as `pgbus.DurableMessage`,
    nothing is lost while the bus is down, and the consumer of *to* acknowledges each event by
    handling it. Writers of the table then need the right to insert into ``pgbus.messages``.

    The bus's connection needs the right to create a trigger on the table (owner, or the
    TRIGGER privilege) and a function in its schema. Every name is used exactly as given:
    mixed case, spaces and quotes are fine.
    """

    channel_options = ("to",)
    needs_database = True  # it installs its trigger through the bus

    def __init__(
        self,
        table: str,
        to: str,
        channel: str | None = None,
        schema: str = "public",
        durable: bool = False,
        group: str | None = None,
    ) -> None:
        self.table = _identifier("table", table)
        self.schema = _identifier("schema", schema)
        if not isinstance(to, str) or not to:
            raise ValueError(f"'to' must be a non-empty channel name (got {to!r}).")
        self.to = to
        if channel is None:
            where = self.table if self.schema == "public" else f"{self.schema}.{self.table}"
            channel = _fit("pgbus_changes_", where)
        self.channel = pgbus.validate_channel_name(channel)
        self.function = _fit("pgbus_notify_", self.table)
        if not isinstance(durable, bool):
            raise ValueError(f"'durable' must be true or false (got {durable!r}).")  # noqa: TRY004
        if group is not None and not durable:
            raise ValueError("'group' applies only with durable = true.")
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError(f"'group' must be a non-empty string (got {group!r}).")
        self.durable = durable
        self.group = group

    async def on_start(self) -> None:
        # Listen (or join the group) first: every change committed once the trigger exists is
        # then delivered.
        if self.durable:
            await self.bus.bridge_in(
                self.channel, self.to, codec="json", durable=True, group=self.group or self.name
            )
        else:
            await self.bus.bridge_in(self.channel, self.to, codec="json")
        await self.install()

    async def install(self) -> None:
        """Create or replace the trigger function and the triggers, in one transaction."""
        async with self.bus.transaction() as tx:
            kind = await tx.fetchval(_FIND_TABLE, self.schema, self.table)
            if kind is None:
                raise pgbus.ConfigError(
                    f"actor {self.name!r}: table {self._where()} does not exist; create it "
                    "before the actor starts (or fix the 'table' and 'schema' options)."
                )
            if kind not in _TABLE_KINDS:
                raise pgbus.ConfigError(
                    f"actor {self.name!r}: {self._where()} is a "
                    f"{_OTHER_KINDS.get(kind, f'relation of kind {kind!r}')}, not a table."
                )
            statements = await tx.fetchrow(
                _BUILD_INSTALL,
                self.schema,
                self.table,
                self.function,
                _DURABLE_FUNCTION_BODY if self.durable else _FUNCTION_BODY,
                self.channel,
                TRIGGER,
                TRUNCATE_TRIGGER,
            )
            for statement in statements:
                await tx.execute(statement)

    def _where(self) -> str:
        return f"{self.schema!r}.{self.table!r}"


def _identifier(option: str, value: object) -> str:
    """*value* if PostgreSQL will use it exactly as an identifier, else ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{option}' must be a non-empty string (got {value!r}).")
    if "\x00" in value:
        raise ValueError(f"'{option}' must not contain NUL characters (got {value!r}).")
    size = len(value.encode())
    if size > MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"'{option}' must be at most {MAX_IDENTIFIER_BYTES} bytes, or PostgreSQL would "
            f"truncate it (got {value!r}, {size} bytes)."
        )
    return value


def _fit(prefix: str, name: str) -> str:
    """
    ``prefix + name``, shortened to 63 bytes if need be.

    A shortened name ends in a hash of *name*, so two long names that share a beginning still
    get different results (truncation alone would make them collide).
    """
    full = prefix + name
    if len(full.encode()) <= MAX_IDENTIFIER_BYTES:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    room = MAX_IDENTIFIER_BYTES - len(digest) - 1
    head = full.encode()[:room].decode(errors="ignore")  # never split a UTF-8 character
    return f"{head}_{digest}"
