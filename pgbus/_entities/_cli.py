"""The keyed actors' command: ``entity-dead-letters list|retry|purge KIND``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs

from .._durable._cli import _client, _require_schema, _say, print_json_line

if TYPE_CHECKING:  # the driver is imported only when a command runs (check never loads it)
    from .._pg import Connection


def add_entity_commands(
    commands: Any, formatter: type, prog: str, add_dsn: Callable[..., None], env_dsn: str
) -> None:
    dead = commands.add_parser(
        "entity-dead-letters",
        help="list, retry or purge a keyed actor kind's dead letters",
        description="Dead letters of keyed actors are messages a handler failed on\n"
        "max_attempts times. list prints one JSON line per dead letter; retry puts them\n"
        "back at the end of their key's mailbox with a fresh count of attempts; purge\n"
        "forgets them. --key and --id limit to some.",
        epilog=f"examples:\n  {prog} entity-dead-letters list account\n"
        f"  {prog} entity-dead-letters retry account --key 42",
        formatter_class=formatter,
    )
    dead.add_argument("action", choices=("list", "retry", "purge"))
    dead.add_argument("kind", metavar="KIND", help="the keyed actor kind, exactly")
    dead.add_argument("--key", help="only this key's")
    dead.add_argument("--id", type=int, action="append", dest="ids", metavar="ID")
    add_dsn(dead, f"default: {env_dsn}")
    dead.set_defaults(command_function=partial(_client, _dead_letters))


async def _dead_letters(connection: Connection, args: argparse.Namespace, where: str) -> None:
    from ._dead import (
        entity_dead_letters,
        purge_entity_dead_letters,
        retry_entity_dead_letters,
    )

    await _require_schema(connection, where)
    of = f"kind {args.kind!r}" + (f", key {args.key!r}" if args.key is not None else "")
    if args.action == "list":
        letters = await entity_dead_letters(connection, args.kind, args.key, args.ids)
        for letter in letters:
            print_json_line(attrs.asdict(letter))
        if not letters:
            _say(f"no dead letter of {of} at {where}")
        return
    act = retry_entity_dead_letters if args.action == "retry" else purge_entity_dead_letters
    count = await act(connection, args.kind, args.key, args.ids)
    verb = "gave back" if args.action == "retry" else "purged"
    _say(f"{verb} {count} dead letter(s) of {of} at {where}")
