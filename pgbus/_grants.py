"""
Least privilege: the SQL that lets a role use every feature of pgbus without owning or creating
anything (``pgbus grants ROLE``), and the one line a permission refusal gets.

The owner of schema ``pgbus`` (the role that ran ``pgbus migrate``, or the first bus) runs the
SQL once. The role then produces and consumes durable messages, joins groups, handles dead
letters, joins the cluster (nodes, public actors, singletons) and reads ``status``. LISTEN,
NOTIFY and advisory locks need no grant. Default privileges cover the tables and functions a
later ``pgbus migrate`` (by the same owner) adds.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._codec import quote_ident
from ._durable._schema import SCHEMA
from ._errors import ConfigError


def grants_sql(role: str) -> str:
    """The statements, one per line, that give *role* what every feature of pgbus needs."""
    who = quote_ident(role)
    schema = quote_ident(SCHEMA)
    return "\n".join(
        [
            f"-- pgbus: what role {role!r} needs to use every feature of pgbus, owning nothing.",
            f"-- Run as the owner of schema {SCHEMA} (the role that ran `pgbus migrate`).",
            "-- CONNECT on the database is PUBLIC's by default; where it was revoked, the",
            f"-- database's owner also runs: GRANT CONNECT ON DATABASE <database> TO {who};",
            f"GRANT USAGE ON SCHEMA {schema} TO {who};",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {who};",
            f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {schema} TO {who};",
            f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {who};",
            "-- What a later `pgbus migrate` by the same owner adds is covered as well:",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema}"
            f" GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {who};",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema}"
            f" GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {who};",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT EXECUTE ON FUNCTIONS TO {who};",
        ]
    )


def validate_role(role: str) -> str:
    """*role* if PostgreSQL can name a role so, else `ValueError` with the rule."""
    if not role or "\x00" in role or len(role.encode()) > 63:
        raise ValueError(f"ROLE must be a role name of 1 to 63 bytes, without NUL (got {role!r})")
    return role


def add_grants_command(commands: Any, formatter: type[argparse.HelpFormatter], prog: str) -> None:
    grants = commands.add_parser(
        "grants",
        help="print the SQL that lets a role use pgbus without owning anything",
        description="Print the SQL that lets ROLE use every feature of pgbus (durable\n"
        "channels, groups, dead letters, the cluster, status) without owning or\n"
        "creating anything. The owner of schema pgbus runs it once; nothing is\n"
        "changed by this command itself.",
        epilog=f"example:\n  {prog} grants app_worker    # then run its output as the owner",
        formatter_class=formatter,
    )
    grants.add_argument("role", metavar="ROLE", help="the role, exactly (case-sensitive)")
    grants.set_defaults(command_function=_grants)


def _grants(args: argparse.Namespace) -> int:
    try:
        role = validate_role(args.role)
    except ValueError as exc:
        raise ConfigError(f"{exc}.") from None
    print(grants_sql(role), flush=True)  # a closed pipe: the command line's one rule applies
    return 0
