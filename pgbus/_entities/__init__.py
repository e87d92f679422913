"""
Keyed actors ("entities"): one actor per key, activated on demand on a node of the cluster that
hosts its kind, handling its messages one at a time in stored order, with JSON state committed
in the same transaction as each acknowledgement.

- `_entity`: the `Entity` base class and the rules for kinds, keys and shards;
- `_mail`: storing messages (one statement, the owner woken at COMMIT);
- `_host`: placement of shards on the live hosts, the fence, and each kind's batch loop.
"""

from ._entity import SHARDS, Entity, EntityKeyError, UnknownEntityKindError, check_entity_class
from ._host import EntityHost, KindSpec, KindStatistics

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
