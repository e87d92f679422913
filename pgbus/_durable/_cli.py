"""
The durable channels' commands: ``migrate``, ``groups``, ``dead-letters list|retry|purge``.

Registered on the main parser by `add_durable_commands`; each prints and returns an exit status
the way `pgbus._cli` does (errors become one line there).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the driver is imported only when a command runs (check never loads it)
    from .._pg import Connection


def add_durable_commands(
    commands: Any, formatter: type, prog: str, add_dsn: Callable[..., None], env_dsn: str
) -> None:
    migrate_cmd = commands.add_parser(
        "migrate",
        help="create or upgrade pgbus's schema for durable channels",
        description="Create the schema pgbus (durable channels' tables, the cluster's registry)\n"
        "or bring it to the current version, as the role that owns it.\n\n"
        "Safe while buses of this release and of the previous one run (a rolling\n"
        "upgrade): a migration only adds tables, columns, indexes and functions under new\n"
        "names, and never removes or changes what the previous release uses. Safe from\n"
        "many places at once: they take turns on one lock, and a wait for a lock held\n"
        "elsewhere gives up after 30 s naming its holder.",
        formatter_class=formatter,
    )
    add_dsn(migrate_cmd, f"default: {env_dsn}")
    migrate_cmd.set_defaults(command_function=partial(_client, _migrate))

    groups = commands.add_parser(
        "groups",
        help="show durable consumer groups: lag, in flight, dead letters",
        description="Print one JSON line per consumer group of durable channels:\n"
        '{"channel", "group", "lag", "in_flight", "dead_letters", "seen_at"}.',
        formatter_class=formatter,
    )
    groups.add_argument("channel", metavar="CHANNEL", nargs="?", help="only this channel")
    add_dsn(groups, f"default: {env_dsn}")
    groups.set_defaults(command_function=partial(_client, _groups))

    dead = commands.add_parser(
        "dead-letters",
        help="list, retry or purge a group's dead letters",
        description="Dead letters are messages a group gave up on after max_attempts.\n"
        "list prints one JSON line per dead letter; retry gives them back to the group\n"
        "with a fresh count of attempts; purge forgets them. --id limits to some.",
        epilog=f"examples:\n  {prog} dead-letters list orders --group billing\n"
        f"  {prog} dead-letters retry orders --group billing --id 42",
        formatter_class=formatter,
    )
    dead.add_argument("action", choices=("list", "retry", "purge"))
    dead.add_argument("channel", metavar="CHANNEL", help="the durable channel, exactly")
    dead.add_argument("--group", required=True, help="the consumer group")
    dead.add_argument("--id", type=int, action="append", dest="ids", metavar="ID")
    add_dsn(dead, f"default: {env_dsn}")
    dead.set_defaults(command_function=partial(_client, _dead_letters))


def _client(
    command: Callable[[Connection, argparse.Namespace, str], Any], args: argparse.Namespace
) -> int:
    from .._cli import _dsn_for_client, _logging_to_stderr, _trio_run
    from .._pg import open_database

    dsn = _dsn_for_client(args.dsn)

    async def run() -> None:
        async with open_database(dsn, "pgbus") as db, db.connection("cli") as connection:
            await command(connection, args, db.where)

    with _logging_to_stderr("warning"):
        return _trio_run(run)


async def _migrate(connection: Connection, args: argparse.Namespace, where: str) -> None:
    from ._schema import migrate

    before, after = await migrate(connection, where)
    if before == after:
        _say(f"the pgbus schema at {where} is at version {after}: nothing to do")
    else:
        _say(f"the pgbus schema at {where} migrated from version {before} to {after}")


async def _require_schema(connection: Connection, where: str) -> None:
    from ._schema import schema_version

    if await schema_version(connection) == 0:
        from .._cli import UsageError

        raise UsageError(f"no pgbus schema at {where} yet (run 'pgbus migrate').")


async def _groups(connection: Connection, args: argparse.Namespace, where: str) -> None:
    from ._admin import group_status

    await _require_schema(connection, where)
    statuses = await group_status(connection, args.channel)
    if not statuses:  # stdout stays JSON lines (none); the person reading is told why
        of = f" of durable channel {args.channel!r}" if args.channel else ""
        _say(f"no consumer group{of} at {where}")
    for status in statuses:
        print_json_line(
            {
                "channel": status.channel,
                "group": status.group,
                "lag": status.lag,
                "in_flight": status.in_flight,
                "dead_letters": status.dead_letters,
                "seen_at": status.seen_at,
            }
        )


async def _dead_letters(connection: Connection, args: argparse.Namespace, where: str) -> None:
    from ._admin import dead_letters, purge_dead_letters, retry_dead_letters

    await _require_schema(connection, where)
    await _require_group(connection, args.channel, args.group, where)
    if args.action == "list":
        for letter in await dead_letters(connection, args.channel, args.group, args.ids):
            print_json_line(
                {
                    "id": letter.id,
                    "channel": letter.channel,
                    "group": letter.group,
                    "attempts": letter.attempts,
                    "error": letter.error,
                    "payload": letter.payload,
                }
            )
        return
    act = retry_dead_letters if args.action == "retry" else purge_dead_letters
    count = await act(connection, args.channel, args.group, args.ids)
    verb = "gave back" if args.action == "retry" else "purged"
    _say(f"{verb} {count} dead letter(s) of {args.channel!r}, group {args.group!r} at {where}")


async def _require_group(connection: Connection, channel: str, group: str, where: str) -> None:
    """Refuse, in one line, a group the durable channel does not have (naming those it has)."""
    from .._errors import ConfigError

    groups = [
        row[0]
        for row in await connection.fetch(
            "SELECT group_name FROM pgbus.groups WHERE channel = $1 ORDER BY group_name", channel
        )
    ]
    if group in groups:
        return
    known = ", ".join(map(repr, groups))
    raise ConfigError(
        f"durable channel {channel!r} at {where} has no group {group!r} "
        + (f"(its groups: {known})." if groups else "(no group has joined it).")
    )


def print_json_line(record: dict[str, Any]) -> None:
    """One JSON line on stdout (what the listing commands print), written at once."""
    print(json.dumps(record, ensure_ascii=False), flush=True)


def _say(line: str) -> None:
    import sys

    print(f"pgbus: {line}", file=sys.stderr, flush=True)
