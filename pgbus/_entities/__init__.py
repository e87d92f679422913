"""
Keyed actors ("entities"): one actor per key, activated on demand on a node of the cluster that
hosts its kind, handling its messages one at a time in stored order, with JSON state committed
in the same transaction as each acknowledgement.

- `_entity`: the `Entity` base class and the rules for kinds, keys and shards;
- `_mail`: storing messages (one statement, the owner woken at COMMIT);
- `_host`: placement of shards on the live hosts, the fence, and each kind's batch loop.
"""

from typing import TYPE_CHECKING, Any

from ._entity import (
    SHARDS,
    Entity,
    EntityKeyError,
    KindSpec,
    UnknownEntityKindError,
    check_entity_class,
)

if TYPE_CHECKING:
    from ._host import EntityHost, KindStatistics


def __getattr__(name: str) -> Any:
    """The host (and the driver under it) only when asked for: `pgbus check` never loads it."""
    if name in ("EntityHost", "KindStatistics"):
        from . import _host

        return getattr(_host, name)
    raise AttributeError(name)


__all__ = [
    "SHARDS",
    "Entity",
    "EntityHost",
    "EntityKeyError",
    "KindSpec",
    "KindStatistics",
    "UnknownEntityKindError",
    "check_entity_class",
]
