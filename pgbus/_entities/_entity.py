"""The Entity base class (a keyed actor), and the rules its names, keys and messages follow."""

from __future__ import annotations

import math
import re
import zlib
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .. import _tracing
from .._errors import ConfigError, PgbusError, SettingError

if TYPE_CHECKING:
    from .._bus import Bus

SHARDS = 256
"""Shards per kind: a key's shard is ``crc32(key) % SHARDS``; nodes own shards, not keys."""
MAX_KEY_CHARS = 256
"""The longest key (in characters)."""
WAKE_CHANNEL = "pgbus.entities"
"""A stored message says ``kind:shard`` here (``kind:*`` for a batch), waking its owner."""

_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}\Z")

DEFAULT_PASSIVATE_AFTER = 60.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_AFTER = 1.0
DEFAULT_CONCURRENCY = 64
DEFAULT_BATCH = 1000


def check_settings(
    passivate_after: object,
    max_attempts: object,
    retry_after: object,
    concurrency: object,
    batch: object,
) -> tuple[float, int, float, int, int]:
    """A kind's hosting settings (`Bus.host`, ``[entities.KIND]``), each checked by its rule."""
    return (
        _seconds("passivate_after", passivate_after, zero=False),
        _count("max_attempts", max_attempts),
        _seconds("retry_after", retry_after, zero=True),
        _count("concurrency", concurrency),
        _count("batch", batch),
    )


def _seconds(name: str, value: object, *, zero: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        bound = "at least 0" if zero else "greater than 0"
        raise SettingError(name, f"must be a number of seconds {bound}", value=value)
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(name, "must be an integer of at least 1", value=value)
    return value


class UnknownEntityKindError(PgbusError, LookupError):
    """No node of the cluster has ever hosted this kind of entity (a typo, or none started)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(
            f"no node has ever hosted entity kind {kind!r}: host it first "
            f"([entities.{kind}] in a node's config, or bus.host(...)), or check the name."
        )


class EntityKeyError(ConfigError, ValueError):
    """
    A key that is not a non-empty string of at most `MAX_KEY_CHARS` characters (on the command
    line, a usage error: exit status 2).
    """


def validate_kind(kind: object, where: str = "entity kind") -> str:
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise ConfigError(
            f"{where} must be 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a "
            f"letter (got {kind!r})."
        )
    return kind


def validate_key(kind: str, key: object) -> str:
    if not isinstance(key, str):
        raise EntityKeyError(
            f"entity {kind!r}: a key must be a string (got {type(key).__name__} {key!r:.40})."
        )
    if not key or len(key) > MAX_KEY_CHARS or "\x00" in key:
        raise EntityKeyError(
            f"entity {kind!r}: a key must be 1-{MAX_KEY_CHARS} characters without NUL "
            f"(got {len(key)} characters: {key[:40]!r})."
        )
    try:
        key.encode()
    except UnicodeEncodeError:
        raise EntityKeyError(f"entity {kind!r}: key {key[:40]!r} is not valid UTF-8.") from None
    return key


def shard_of(key: str) -> int:
    """The shard of *key*: the same in every process and every release."""
    return zlib.crc32(key.encode()) % SHARDS


class Entity:
    """
    Subclass this, set `kind`, and implement `handle`: one instance per key, activated on
    demand on one node of the cluster that hosts the kind.

    Messages for a key are handled one at a time, in the order they were stored. `state` is the
    key's JSON object, loaded on activation and written in the same transaction that
    acknowledges the message (with the tells `tell` queued meanwhile and the reply to an ask):
    a handler that returns has its effects committed exactly once; one that raises commits
    nothing (the state is as before the message) and the message is retried, then
    dead-lettered. Hooks: `on_activate` (once loaded, before the first message), `handle`,
    `on_passivate` (when idle for ``passivate_after`` seconds, or when the key moves to another
    node; never a place to save state: it is already saved).
    """

    kind: ClassVar[str] = ""
    """The kind's name, as addressed: ``bus.entity("account", "42")``."""
    key: str
    """This activation's key."""
    state: dict[str, Any]
    """The key's state: a JSON object, ``{}`` for a new key. Change it in `handle`."""
    bus: Bus
    """The bus hosting this activation."""

    def __init__(self) -> None:
        self._outbox: list[tuple[str, str, object, str | None]] = []

    async def on_activate(self) -> None:
        """Called once the key's state is loaded, before its first message here."""

    async def handle(self, message: Any) -> Any:
        """Handle one *message*; what it returns is the reply to an ask (JSON)."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle()")

    async def on_passivate(self) -> None:
        """
        Called when this activation leaves memory, once it has been activated: idle for
        ``passivate_after``, its key moved to another node (or came back: a new activation
        then), its connection was lost, or the node stops. Its state is saved already.
        """

    def tell(self, kind: str, key: str, message: object) -> None:
        """
        Send *message* to entity (*kind*, *key*) when, and only if, this handler's effects
        commit: in the same transaction as this key's state and acknowledgement.
        """
        validate_kind(kind)
        validate_key(kind, key)
        self._outbox.append((kind, key, message, _tracing.current_traceparent()))


def check_entity_class(cls: object) -> type[Entity]:
    if not (isinstance(cls, type) and issubclass(cls, Entity)):
        raise ConfigError(f"{cls!r} is not a subclass of pgbus.Entity.")
    validate_kind(cls.kind, f"{cls.__name__}.kind")
    if cls.handle is Entity.handle:
        raise ConfigError(f"{cls.__name__} must implement handle().")
    return cls


@attrs.frozen
class KindSpec:
    """How this node hosts one kind (`Bus.host`, ``[entities.<kind>]``)."""

    cls: type[Entity]
    passivate_after: float = DEFAULT_PASSIVATE_AFTER
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_after: float = DEFAULT_RETRY_AFTER
    concurrency: int = DEFAULT_CONCURRENCY
    batch: int = DEFAULT_BATCH

    @classmethod
    def checked(cls, entity_class: object, **settings: object) -> KindSpec:
        """*entity_class* and *settings* (the fields above), each checked by its rule."""
        values = {f.name: settings.pop(f.name, f.default) for f in attrs.fields(cls)[1:]}
        if settings:
            raise TypeError(f"unknown settings: {', '.join(sorted(settings))}")
        return cls(check_entity_class(entity_class), *check_settings(**values))

    @property
    def kind(self) -> str:
        return self.cls.kind
