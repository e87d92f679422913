"""
The TOML configuration file: read with `tomllib` into frozen attrs classes.

Every rule is checked here, before anything starts, and a broken rule raises `ConfigFileError`
whose one-line message names the file, the table and key, the rule and the bad value.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import difflib
import importlib
import importlib.util
import math
import os
import re
import sys
import tomllib
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import attrs

from ._actor import Actor, check_actor_options
from ._bridge import DIRECTIONS, OVERFLOW_POLICIES
from ._channel import Capacity, validate_capacity
from ._codec import CODECS, validate_channel_name
from ._dsn import (
    DEFAULT_KEEPALIVE,
    DEFAULT_POOL_SIZE,
    check_dsn,
    check_keepalive,
    check_pool_mode,
    check_pool_size,
    redact_dsn,
)
from ._durable._rules import (
    DEFAULT_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETENTION,
    DEFAULT_RETRY_AFTER,
    DEFAULT_START,
    MIN_RETENTION,
    START_POSITIONS,
    validate_delay,
    validate_group,
    validate_prefetch,
    validate_retention,
    validate_seconds,
)
from ._durable._schedule import Schedule, make_schedule
from ._entities._entity import Entity, KindSpec, validate_kind
from ._errors import (
    ActorOptionsError,
    CapacityError,
    ChannelNameError,
    ConfigError,
    PgbusError,
    SettingError,
)
from ._metrics import parse_listen
from ._node import node_name_problem
from ._rules import check_choice
from ._supervisor import RESTART_KINDS, Supervision

MAX_APPLICATION_NAME_BYTES = 63
"""NAMEDATALEN - 1: PostgreSQL truncates a longer ``application_name``."""

APPLICATION_NAME_PREFIX = "pgbus"
"""Every connection pgbus opens carries an ``application_name`` starting with this."""


class ConfigFileError(ConfigError):
    """
    A configuration file that breaks a rule.

    *where* is the table (``[channels.orders]``, ``[[bridge]] #2``) or ``""`` for the whole file,
    *key* the key inside it (or None), and *rule* the rest of the sentence, bad value included.
    """

    def __init__(self, file: str, where: str, key: str | None, rule: str) -> None:
        self.file = file
        self.where = where
        self.key = key
        self.rule = rule
        label = f"{where}:" if where.startswith("[[") else where
        super().__init__(" ".join(part for part in (f"{file}:", label, key, rule) if part))


def _freeze_options(options: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(copy.deepcopy(dict(options)))


@attrs.frozen
class PostgresConfig:
    """The ``[postgres]`` table. Without *dsn* an embedded PostgreSQL is started for the run."""

    dsn: str | None = None
    application_name: str = APPLICATION_NAME_PREFIX
    keepalive: float = DEFAULT_KEEPALIVE
    """Seconds: an idle connection is checked that often; a stalled one is noticed within it."""
    pool_mode: str = "session"
    """``session`` (direct, or a session-pooling proxy) or ``transaction`` (see `open_bus`)."""
    pool_size: int = DEFAULT_POOL_SIZE
    """The most pooled connections the bus's calls hold at once (see `open_bus`)."""


SupervisorConfig = Supervision
"""The ``[supervisor]`` table is `pgbus.Supervision` itself: one schema, one set of rules."""


@attrs.frozen
class ChannelConfig:
    """One ``[channels.NAME]`` table: a named Trio channel."""

    name: str
    capacity: Capacity
    """``0``, a positive ``int`` or ``math.inf`` (written ``"inf"`` in the file)."""


@attrs.frozen
class BridgeConfig:
    """One ``[[bridge]]`` entry between a PostgreSQL channel and a Trio channel."""

    index: int
    """1-based position in the file, for messages."""
    postgres: str
    channel: str
    direction: str
    codec: str = "text"
    overflow: str = "block"
    ignore_own: bool = False
    durable: DurableBridgeConfig | None = None
    """Set for a durable bridge (``durable = true``): its group options (in) or defaults (out)."""


@attrs.frozen
class DurableBridgeConfig:
    """The durable keys of a ``[[bridge]]``; *group* is None for an "out" bridge."""

    group: str | None = None
    start: str = DEFAULT_START
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_after: float = DEFAULT_RETRY_AFTER
    lease: float = DEFAULT_LEASE
    retention: float = DEFAULT_RETENTION
    poll: float | None = None
    """Seconds between claims, with no LISTEN for wake-ups (poll-only; see `Bus.bridge_in`)."""
    delay: float | None = None
    """An "out" bridge's delay: each message is delivered this many seconds after it is stored."""


@attrs.frozen
class MetricsConfig:
    """The ``[metrics]`` table: where ``/metrics``, ``/healthz`` and the dashboard are served."""

    listen: str
    """``"HOST:PORT"`` (see `pgbus._metrics.parse_listen`)."""
    dashboard: bool = True
    """Whether ``/`` serves the read-only dashboard (`pgbus._dashboard`) too."""


@attrs.frozen
class ActorConfig:
    """One ``[actors.NAME]`` table; *actor_class* is already imported and checked."""

    name: str
    class_path: str
    actor_class: type[Actor]
    inbox: str | None
    restart: str = "permanent"
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_options)
    """Keyword arguments for the constructor; a read-only copy."""
    public: bool = False
    """Reachable by name from every node of the cluster."""
    singleton: bool = False
    """Runs on one node of the cluster at a time."""


@attrs.frozen
class EntityConfig:
    """One ``[entities.KIND]`` table: this node hosts keyed actors of that kind."""

    class_path: str
    spec: KindSpec
    """The class and its settings, checked by the same rules as `Bus.host`'s."""

    @property
    def kind(self) -> str:
        return self.spec.kind


@attrs.frozen
class NodeConfig:
    """The ``[node]`` table: this process as a node of the cluster."""

    name: str | None = None
    """None: ``"<hostname>:<pid>"``."""


@attrs.frozen
class BusConfig:
    """A whole configuration file, every rule already checked."""

    source: str
    postgres: PostgresConfig = attrs.field(factory=PostgresConfig)
    supervisor: Supervision = attrs.field(factory=Supervision)
    channels: tuple[ChannelConfig, ...] = ()
    bridges: tuple[BridgeConfig, ...] = ()
    actors: tuple[ActorConfig, ...] = ()
    metrics: MetricsConfig | None = None
    node: NodeConfig | None = None
    """The ``[node]`` table, if the file has one (then the bus joins the cluster at start)."""
    schedules: tuple[Schedule, ...] = ()
    """The ``[[schedule]]`` tables: each publishes one durable message per slot."""
    entities: tuple[EntityConfig, ...] = ()
    """The ``[entities.KIND]`` tables: the keyed actors this node hosts."""

    @property
    def needs_database(self) -> bool:
        """
        Whether anything declared here needs PostgreSQL: a bridge, ``[node]``, a public or
        singleton actor, or an actor class that says so (`Actor.needs_database`). Without a
        DSN, ``run`` starts an embedded PostgreSQL only then.
        """
        return bool(
            self.bridges
            or self.schedules
            or self.entities
            or self.node is not None
            or any(a.public or a.singleton or a.actor_class.needs_database for a in self.actors)
        )

    def with_metrics(self, listen: str, *, origin: str = "--metrics") -> BusConfig:
        """Return a copy serving metrics on *listen* (``run --metrics HOST:PORT``)."""
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise ConfigError(f"{origin} {exc}.") from None
        return attrs.evolve(self, metrics=MetricsConfig(listen))

    def with_dsn(self, dsn: str | None, *, origin: str = "dsn") -> BusConfig:
        """
        Return a copy that connects to *dsn* (None: embedded PostgreSQL), for ``--dsn`` and
        ``PGBUS_DSN``. *origin* names the DSN's source in the `ConfigError` a bad DSN raises.
        """
        if dsn is not None:
            try:
                check_dsn(dsn)
            except SettingError as exc:
                raise SettingError(origin, exc.rule) from None
        return attrs.evolve(self, postgres=attrs.evolve(self.postgres, dsn=dsn))

    def warnings(self) -> tuple[str, ...]:
        """
        What is legal but likely wrong, one sentence each: today, a channel fed by an inbound
        bridge that nothing consumes (no actor's inbox, no "out" bridge, no actor option that
        names it). `summary` lists them and ``pgbus run`` logs them.
        """
        consumed = {a.inbox for a in self.actors} | {
            b.channel for b in self.bridges if b.direction == "out"
        }
        for actor in self.actors:
            consumed.update(
                value
                for option, value in actor.options.items()
                if option in actor.actor_class.channel_options and isinstance(value, str)
            )
        feeders: dict[str, list[BridgeConfig]] = {}
        for bridge in self.bridges:
            if bridge.direction == "in" and bridge.channel not in consumed:
                feeders.setdefault(bridge.channel, []).append(bridge)
        capacities = {c.name: c.capacity for c in self.channels}
        found = []
        for channel, bridges in feeders.items():
            fed_by = "[[bridge]] " + ", ".join(f"#{b.index}" for b in bridges)
            if capacities.get(channel) == math.inf:
                then = 'it grows without bound (capacity "inf")'
            elif any(b.overflow == "block" for b in bridges):
                then = 'once full it stops every inbound bridge of the bus (overflow "block")'
            else:
                policies = " and ".join(sorted({f'"{b.overflow}"' for b in bridges}))
                then = f"once full, its notifications are dropped (overflow {policies})"
            found.append(f"channel {channel!r} is fed by {fed_by} but nothing consumes it; {then}")
        return tuple(found)

    def summary(self) -> str:
        """A short human summary, several lines, with any password in the DSN redacted."""
        pg = self.postgres
        sv = self.supervisor
        if pg.dsn is not None:
            where = redact_dsn(pg.dsn)
        else:
            where = "embedded" if self.needs_database else "none (nothing here needs PostgreSQL)"
        lines = [
            f"{self.source}: {_count(self.channels, 'channel')}, {_count(self.bridges, 'bridge')}, "
            f"{_count(self.actors, 'actor')}",
            f"postgres: {where} (application_name {pg.application_name!r}"
            + ("" if pg.keepalive == DEFAULT_KEEPALIVE else f", keepalive {pg.keepalive:g}s")
            + ("" if pg.pool_mode == "session" else f", pool_mode {pg.pool_mode}")
            + ("" if pg.pool_size == DEFAULT_POOL_SIZE else f", pool_size {pg.pool_size}")
            + ")",
            f"supervisor: {sv.strategy}, at most {sv.max_restarts} restarts within "
            f"{sv.within_seconds:g}s",
        ]
        if self.node is not None:
            lines.append(f"node: {self.node.name or '<hostname>:<pid>'!r}")
        lines += [f"channel {c.name!r}: capacity {_show(c.capacity)}" for c in self.channels]
        for b in self.bridges:
            pg_name, trio_name = f"postgres {b.postgres!r}", f"channel {b.channel!r}"
            if b.durable is not None:
                lines.append(_durable_summary(b))
            elif b.direction == "in":
                extra = f", overflow {b.overflow}" + (", ignore_own" if b.ignore_own else "")
                lines.append(f"bridge #{b.index}: {pg_name} -> {trio_name} (in, {b.codec}{extra})")
            else:
                lines.append(f"bridge #{b.index}: {trio_name} -> {pg_name} (out, {b.codec})")
        for a in self.actors:
            inbox = "no inbox" if a.inbox is None else f"inbox {a.inbox!r}"
            cluster = ", singleton" if a.singleton else ", public" if a.public else ""
            lines.append(f"actor {a.name!r}: {a.class_path}, {inbox}, restart {a.restart}{cluster}")
        for sch in self.schedules:
            when = f"cron {sch.cron!r} ({sch.timezone})" if sch.cron else f"every {sch.every:g}s"
            lines.append(
                f"schedule {sch.name!r}: {when} -> durable {sch.postgres!r}, missed {sch.missed}"
            )
        for e in self.entities:
            lines.append(
                f"entities {e.kind!r}: {e.class_path}, passivate after "
                f"{e.spec.passivate_after:g}s, {e.spec.max_attempts} attempts, "
                f"concurrency {e.spec.concurrency}"
            )
        if self.metrics is not None:
            dashboard = ", dashboard on /" if self.metrics.dashboard else ""
            lines.append(f"metrics: http://{self.metrics.listen}/metrics and /healthz{dashboard}")
        lines += [f"warning: {warning}" for warning in self.warnings()]
        return "\n".join(lines)


def _durable_summary(b: BridgeConfig) -> str:
    d = b.durable
    assert d is not None
    pg_name, trio_name = f"durable {b.postgres!r}", f"channel {b.channel!r}"
    if b.direction == "out":
        delayed = "" if not d.delay else f", delay {d.delay:g}s"
        return f"bridge #{b.index}: {trio_name} -> {pg_name} (out, {b.codec}{delayed})"
    return (
        f"bridge #{b.index}: {pg_name} -> {trio_name} (in, {b.codec}, group {d.group!r}, "
        f"start {d.start}, max_attempts {d.max_attempts}, retry_after {d.retry_after:g}s, "
        f"lease {d.lease:g}s, retention {d.retention:g}s"
        + ("" if d.poll is None else f", polls every {d.poll:g}s")
        + ")"
    )


def _count(items: tuple[object, ...], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def load_config(path: str | os.PathLike[str]) -> BusConfig:
    """
    Read and check the TOML file at *path*.

    Actor classes are imported with the file's own directory and the current directory at the
    front of ``sys.path`` (only while importing).

    Raises:
        ConfigFileError: (a `ConfigError`) naming the file, table, key, rule and bad value.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(
            source, "", None, f"cannot read the file: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(source, "", None, f"the file is not valid UTF-8: {exc}") from None
    return parse_config(text, source, base_dir=Path(source).absolute().parent)


def parse_config(
    text: str, source: str = "<string>", *, base_dir: str | os.PathLike[str] | None = None
) -> BusConfig:
    """
    Check the TOML *text*; *source* names it in messages. Actor classes are imported with
    *base_dir* (if given) and the current directory at the front of ``sys.path``.

    Raises:
        ConfigFileError: (a `ConfigError`) naming the file, table, key, rule and bad value.
    """
    try:
        data = tomllib.loads(text)
    except RecursionError:  # tables or arrays nested some hundreds deep
        raise ConfigFileError(
            source, "", None, "invalid TOML: nested too deeply for Python's TOML reader."
        ) from None
    except ValueError as exc:  # TOMLDecodeError, or int() refusing over 4300 digits
        raise ConfigFileError(source, "", None, f"invalid TOML: {_one_line_text(exc)}") from None
    root = _Table(source, "", data)
    root.no_unknown_keys(_TOP_LEVEL_KEYS, "top-level key")

    postgres = _parse_postgres(root.table("postgres", "[postgres]"))
    node = _parse_node(root.table("node", "[node]")) if "node" in root.data else None
    supervisor = _parse_supervisor(root.table("supervisor", "[supervisor]"))
    channels = tuple(
        _parse_channel(name, table) for name, table in root.tables_of("channels", "[channels.NAME]")
    )
    declared = {c.name for c in channels}
    out_sources: dict[str, int] = {}  # channel -> the "out" bridge that consumes it
    capacities = {c.name: c.capacity for c in channels}
    bridges = tuple(
        _parse_bridge(index, table, declared, out_sources, capacities)
        for index, table in enumerate(root.array_of_tables("bridge"), start=1)
    )

    paths = [Path(base_dir)] if base_dir is not None else []
    with _importable(*paths, Path.cwd()):
        actors = tuple(
            _parse_actor(name, table, declared, out_sources)
            for name, table in root.tables_of("actors", "[actors.NAME]")
        )
        entities = tuple(
            _parse_entity(kind, table)
            for kind, table in root.tables_of("entities", "[entities.KIND]")
        )
    if entities and node is None:
        root.fail(
            "entities",
            "needs a [node] table: keyed actors are hosted by nodes of the cluster "
            "(add [node], with or without a name).",
        )
    metrics = _parse_metrics(root)
    schedules: dict[str, Schedule] = {}
    for table in root.array_of_tables("schedule"):
        schedule = _parse_schedule(table)
        if schedule.name in schedules:
            table.fail("name", f"{schedule.name!r} is the name of another [[schedule]].")
        schedules[schedule.name] = schedule
    return BusConfig(
        source,
        postgres,
        supervisor,
        channels,
        bridges,
        actors,
        metrics,
        node,
        schedules=tuple(schedules.values()),
        entities=entities,
    )


def _parse_entity(kind: str, t: _Table) -> EntityConfig:
    settings = [f.name for f in attrs.fields(KindSpec)[1:]]
    t.no_unknown_keys(("class", *settings))
    try:
        validate_kind(kind, "the kind in [entities.KIND]")
    except ConfigError as exc:
        t.fail(None, str(exc))
    class_path: str = t.get("class", "a string", hint='"package.module:ClassName"')
    if not _CLASS_PATH.match(class_path):
        t.fail("class", f'must look like "package.module:ClassName" (got {_show(class_path)}).')
    cls: type[Entity] = _import_class(t, class_path, Entity, "pgbus.Entity")
    if cls.kind != kind:
        t.fail("class", f"{class_path!r} has kind {cls.kind!r}, not {kind!r}: they must match.")
    given = {name: t.data[name] for name in settings if name in t.data}
    try:
        spec = KindSpec.checked(cls, **given)
    except SettingError as exc:
        t.fail(exc.key, exc.describe(_show))
    except ConfigError as exc:
        t.fail("class", str(exc))
    return EntityConfig(class_path, spec)


def _parse_schedule(t: _Table) -> Schedule:
    """A ``[[schedule]]``, checked by the rules `Bus.schedule` applies."""
    t.no_unknown_keys(("name", "cron", "every", "timezone", "postgres", "payload", "missed"))
    t.get("name", "a string", hint="the schedule's name, unique in the cluster")
    postgres: str = t.get("postgres", "a string", hint="a durable channel name")
    try:
        validate_channel_name(postgres)
    except ChannelNameError as exc:
        t.fail("postgres", f"{postgres!r} {exc.reason}.")
    try:
        return make_schedule(
            t.data["name"],
            postgres,
            cron=t.data.get("cron"),
            every=t.data.get("every"),
            timezone=t.data.get("timezone", "UTC"),
            payload=t.data.get("payload"),
            missed=t.data.get("missed", "skip"),
        )
    except SettingError as exc:
        t.fail(exc.key, exc.describe(_show))
    except PgbusError as exc:  # a payload JSON cannot carry
        t.fail("payload", f"cannot be sent as JSON: {exc}")


def _parse_metrics(root: _Table) -> MetricsConfig | None:
    if "metrics" not in root.data:
        return None
    t = root.table("metrics", "[metrics]")
    t.no_unknown_keys(("listen", "dashboard"))
    listen: str = t.get("listen", "a string", hint='"HOST:PORT", e.g. "127.0.0.1:9464"')
    try:
        parse_listen(listen)
    except ValueError as exc:
        t.fail("listen", f"{exc}.")
    dashboard: bool = t.get("dashboard", "true or false", True)
    return MetricsConfig(listen, dashboard)


_TOP_LEVEL_KEYS = (
    "postgres",
    "supervisor",
    "channels",
    "bridge",
    "actors",
    "metrics",
    "node",
    "schedule",
    "entities",
)
_MISSING: Any = object()
_KINDS: dict[str, tuple[type, ...]] = {
    "a string": (str,),
    "an integer": (int,),
    "a number": (int, float),
    "true or false": (bool,),
    "a table": (dict,),
}


@attrs.frozen
class _Table:
    """One TOML table being checked, and how messages name it."""

    source: str
    where: str
    data: dict[str, Any]

    def fail(self, key: str | None, rule: str) -> NoReturn:
        raise ConfigFileError(self.source, self.where, key, rule)

    def no_unknown_keys(self, allowed: Iterable[str], noun: str = "key") -> None:
        allowed = list(allowed)
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "allowed: " + ", ".join(map(repr, allowed)) + "."
                )
                self.fail(None, f"unknown {noun} {key!r}; {hint}")

    def get(self, key: str, kind: str, default: Any = _MISSING, *, hint: str = "") -> Any:
        """The value at *key*, which must be of *kind* (a key of `_KINDS`); absent: *default*."""
        if key not in self.data:
            if default is _MISSING:
                self.fail(key, f"is required ({hint or kind}).")
            return default
        value = self.data[key]
        if not isinstance(value, _KINDS[kind]) or (
            isinstance(value, bool) and kind != "true or false"
        ):
            self.fail(key, f"must be {hint or kind} (got {_show(value)}).")
        return value

    def one_of(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        """The value at *key*, by the rule the Python API uses (`_rules.check_choice`)."""
        if key not in self.data and default is _MISSING:
            self.fail(key, f"is required (one of {', '.join(map(repr, choices))}).")
        try:
            return check_choice(key, self.data.get(key, default), choices)
        except SettingError as exc:
            self.fail(key, exc.describe(_show))

    def table(self, key: str, example: str) -> _Table:
        value = self.get(key, "a table", {}, hint=f"a table, written {example}")
        return _Table(self.source, f"[{_toml_key(key)}]", value)

    def tables_of(self, key: str, example: str) -> Iterator[tuple[str, _Table]]:
        """The sub-tables of table *key*, e.g. each ``[channels.NAME]``."""
        parent = self.table(key, example)
        for name, value in parent.data.items():
            if not isinstance(value, dict):
                example = example.replace("NAME", _toml_key(name))
                parent.fail(name, f"must be a table, written {example} (got {_show(value)}).")
            table = _Table(self.source, f"[{_toml_key(key)}.{_toml_key(name)}]", value)
            if not name:
                table.fail(None, "the name must not be empty.")
            yield name, table

    def array_of_tables(self, key: str) -> Iterator[_Table]:
        hint = f"an array of tables, each written [[{key}]]"
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.fail(key, f"must be {hint} (got {_show(value)}).")
        for index, item in enumerate(value, start=1):
            where = f"[[{key}]] #{index}"
            if not isinstance(item, dict):
                self.fail(None, f"{where} must be a table (got {_show(item)}).")
            yield _Table(self.source, where, item)


def _parse_postgres(t: _Table) -> PostgresConfig:
    t.no_unknown_keys(("dsn", "application_name", "keepalive", "pool_mode", "pool_size"))
    dsn: str | None = t.get("dsn", "a string", None)
    if dsn is not None:
        try:
            check_dsn(dsn)
        except SettingError as exc:
            t.fail("dsn", exc.rule)
    name: str = t.get("application_name", "a string", APPLICATION_NAME_PREFIX)
    if "\x00" in name:
        t.fail("application_name", f"must not contain NUL characters (got {_show(name)}).")
    if not name.startswith(APPLICATION_NAME_PREFIX):
        t.fail(
            "application_name",
            f'must start with "{APPLICATION_NAME_PREFIX}", so every connection pgbus opens can '
            f"be told apart in pg_stat_activity (got {_show(name)}).",
        )
    size = len(name.encode())
    if size > MAX_APPLICATION_NAME_BYTES:
        t.fail(
            "application_name",
            f"is {size} bytes; PostgreSQL keeps at most {MAX_APPLICATION_NAME_BYTES} "
            f"(got {_show(name)}).",
        )
    try:
        keepalive = check_keepalive(t.data.get("keepalive", DEFAULT_KEEPALIVE))
    except SettingError as exc:
        t.fail("keepalive", exc.describe(_show))
    try:
        pool_mode = check_pool_mode(t.data.get("pool_mode", "session"))
    except SettingError as exc:
        t.fail("pool_mode", exc.describe(_show))
    try:
        pool_size = check_pool_size(t.data.get("pool_size", DEFAULT_POOL_SIZE))
    except SettingError as exc:
        t.fail("pool_size", exc.describe(_show))
    return PostgresConfig(dsn, name, keepalive, pool_mode, pool_size)


def _parse_node(t: _Table) -> NodeConfig:
    t.no_unknown_keys(("name",))
    name: str | None = t.get("name", "a string", None, hint="a node name")
    if name is not None:
        problem = node_name_problem(name)
        if problem is not None:
            t.fail("name", problem)
    return NodeConfig(name)


def _parse_supervisor(t: _Table) -> Supervision:
    t.no_unknown_keys(attrs.fields_dict(Supervision))
    try:
        return Supervision(**t.data)
    except SettingError as exc:
        t.fail(exc.key, exc.describe(_show))


_CAPACITY_RULE = '0, a positive integer or "inf"'


def _parse_channel(name: str, t: _Table) -> ChannelConfig:
    t.no_unknown_keys(("capacity",))
    if "capacity" not in t.data:
        t.fail("capacity", f"is required ({_CAPACITY_RULE}).")
    value = t.data["capacity"]
    if value == "inf":
        return ChannelConfig(name, math.inf)
    try:
        return ChannelConfig(name, validate_capacity(value, f"{t.where} capacity"))
    except CapacityError:
        t.fail("capacity", f"must be {_CAPACITY_RULE} (got {_show(value)}).")


def _parse_bridge(
    index: int,
    t: _Table,
    declared: set[str],
    out_sources: dict[str, int],
    capacities: Mapping[str, Capacity] | None = None,
) -> BridgeConfig:
    t.no_unknown_keys(
        ("postgres", "channel", "direction", "codec", "overflow", "ignore_own", *_DURABLE_KEYS)
    )
    postgres: str = t.get("postgres", "a string", hint="a PostgreSQL channel name")
    try:
        validate_channel_name(postgres)
    except ChannelNameError as exc:
        t.fail("postgres", f"{postgres!r} {exc.reason}.")
    channel = _declared_channel(t, "channel", declared, required=True)
    assert channel is not None
    direction = t.one_of("direction", DIRECTIONS)
    codec = t.one_of("codec", CODECS, "text")
    if direction == "out":
        if channel in out_sources:
            t.fail(
                "channel",
                f'{channel!r} is already the source of "out" bridge #{out_sources[channel]}; '
                "two consumers would split its messages between them, not each get every one.",
            )
        out_sources[channel] = index
        for key in ("overflow", "ignore_own"):
            if key in t.data:
                t.fail(
                    key,
                    'applies only to "in" bridges (Postgres -> Trio); '
                    'remove it from this "out" bridge.',
                )
    durable: bool = t.get("durable", "true or false", False)
    if durable:
        config = _parse_durable(t, direction, (capacities or {}).get(channel, math.inf), channel)
        return BridgeConfig(index, postgres, channel, direction, codec, durable=config)
    for key in _DURABLE_KEYS[1:]:
        if key in t.data:
            t.fail(key, "applies only to durable bridges; add durable = true or remove it.")
    overflow = t.one_of("overflow", OVERFLOW_POLICIES, "block")
    ignore_own: bool = t.get("ignore_own", "true or false", False)
    return BridgeConfig(index, postgres, channel, direction, codec, overflow, ignore_own)


_DURABLE_KEYS = (
    "durable",
    "group",
    "start",
    "max_attempts",
    "retry_after",
    "lease",
    "retention",
    "poll",
    "delay",
)


def _parse_durable(
    t: _Table, direction: str, capacity: Capacity, channel: str
) -> DurableBridgeConfig:
    """The durable keys of a bridge, checked with the validators `Bus.bridge_in` uses."""
    if direction == "out":
        for key in _DURABLE_KEYS[1:]:
            if key in t.data and key != "delay":
                t.fail(
                    key,
                    'applies only to durable "in" bridges (consumers); '
                    'remove it from this "out" bridge.',
                )
        if "delay" not in t.data:
            return DurableBridgeConfig()
        try:
            delay = validate_delay(t.data["delay"])
        except ConfigError:
            t.fail("delay", f"must be a number of seconds >= 0 (got {_show(t.data['delay'])}).")
        return DurableBridgeConfig(delay=delay)
    if "delay" in t.data:
        t.fail(
            "delay",
            'applies only to durable "out" bridges (publishers); remove it from this "in" bridge.',
        )
    for key in ("overflow", "ignore_own"):
        if key in t.data:
            t.fail(key, "does not apply to a durable bridge (it never drops); remove it.")
    if "group" not in t.data:
        t.fail("group", 'is required for a durable "in" bridge (the consumer group it joins).')
    d = DurableBridgeConfig()
    try:
        group = validate_group(t.data["group"], "must be")
    except ConfigError:
        t.fail(
            "group",
            f"must be a non-empty string of at most 63 bytes (got {_show(t.data['group'])}).",
        )
    start = t.one_of("start", START_POSITIONS, d.start)
    max_attempts: int = t.get("max_attempts", "an integer", d.max_attempts, hint="an integer >= 1")
    if max_attempts < 1:
        t.fail("max_attempts", f"must be an integer >= 1 (got {max_attempts}).")
    retention = _durable_seconds(t, "retention", d.retention)
    try:
        validate_retention(retention)
    except ConfigError:
        t.fail("retention", f"must be at least {MIN_RETENTION:g} seconds (got {_show(retention)}).")
    try:
        validate_prefetch(channel, capacity)
    except ConfigError:
        t.fail(
            "channel",
            f'{channel!r} has capacity {_show(capacity)}; a durable "in" bridge claims at '
            "most what its channel holds, so it needs a positive integer capacity.",
        )
    return DurableBridgeConfig(
        group=group,
        start=start,
        max_attempts=max_attempts,
        retry_after=_durable_seconds(t, "retry_after", d.retry_after),
        lease=_durable_seconds(t, "lease", d.lease),
        retention=retention,
        poll=_durable_seconds(t, "poll", 0.0) if "poll" in t.data else None,
    )


def _durable_seconds(t: _Table, key: str, default: float) -> float:
    """A durable duration key, checked by the rule `Bus.bridge_in` applies."""
    if key not in t.data:
        return default
    value = t.data[key]
    try:
        return validate_seconds(key, value)
    except ConfigError:
        t.fail(key, f"must be a number of seconds > 0 (got {_show(value)}).")


def _declared_channel(t: _Table, key: str, declared: set[str], *, required: bool) -> str | None:
    hint = "the name of a channel declared under [channels]"
    name: str | None = t.get(key, "a string", _MISSING if required else None, hint=hint)
    if name is not None and name not in declared:
        close = difflib.get_close_matches(name, sorted(declared), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        t.fail(key, f"{name!r} is not declared under [channels]{hint}")
    return name


_CLASS_PATH = re.compile(r"^[^\W\d]\w*(\.[^\W\d]\w*)*:[^\W\d]\w*(\.[^\W\d]\w*)*$")


def _parse_actor(
    name: str, t: _Table, declared: set[str], out_sources: dict[str, int]
) -> ActorConfig:
    t.no_unknown_keys(("class", "inbox", "restart", "options", "public", "singleton"))
    class_path: str = t.get("class", "a string", hint='"package.module:ClassName"')
    if not _CLASS_PATH.match(class_path):
        t.fail("class", f'must look like "package.module:ClassName" (got {_show(class_path)}).')
    inbox = _declared_channel(t, "inbox", declared, required=False)
    if inbox in out_sources:
        t.fail(
            "inbox",
            f'{inbox!r} is the source of "out" bridge #{out_sources[inbox]}, its only consumer; '
            "the bridge and the actor would split its messages, not each get every one. "
            "Give the actor its own channel.",
        )
    restart = t.one_of("restart", RESTART_KINDS, "permanent")
    singleton: bool = t.get("singleton", "true or false", False)
    public: bool = t.get("public", "true or false", singleton and inbox is not None)
    if public and inbox is None:
        t.fail("public", "needs an inbox: a public actor is asked through it (got true).")
    if singleton and inbox is not None and not public:
        t.fail(
            "public",
            "cannot be false for a singleton with an inbox: the one node running it serves "
            "every node (got false).",
        )
    options: dict[str, Any] = t.get("options", "a table", {}, hint="a table of keyword options")
    actor_class = _import_actor_class(t, class_path)
    try:
        check_actor_options(
            name, actor_class, options, declared, channels_where=" declared under [channels]"
        )
    except ActorOptionsError as exc:
        t.fail(exc.key, exc.rule)
    return ActorConfig(name, class_path, actor_class, inbox, restart, options, public, singleton)


def _import_actor_class(t: _Table, class_path: str) -> type[Actor]:
    cls: type[Actor] = _import_class(t, class_path, Actor, "pgbus.Actor")
    return cls


def _import_class(t: _Table, class_path: str, base: type[Any], base_name: str) -> Any:
    module_name, _, qualname = class_path.partition(":")
    what = f"{class_path!r}:"
    moved = _ready_made_moved(class_path)
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        if moved is not None:
            t.fail("class", f"{class_path!r} is now {moved!r} (the ready-made actors moved).")
        t.fail("class", f"{what} cannot import module {module_name!r}: {exc}.")
    except Exception as exc:
        t.fail("class", f"{what} importing module {module_name!r} raised {_one_line(exc)}.")
    if moved is not None and _same_source(obj, importlib.import_module(f"pgbus.{module_name}")):
        # A checkout's top-level actors/ directory on sys.path: the same file under an old name.
        t.fail("class", f"{class_path!r} is now {moved!r} (the ready-made actors moved).")
    owner = module_name
    for attr in qualname.split("."):
        if not hasattr(obj, attr):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            t.fail("class", f"{what} {owner!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, attr)
        owner = f"{owner}.{attr}"
    if obj is base:
        t.fail(
            "class",
            f"{class_path!r} is {base_name} itself; name a subclass that implements handle().",
        )
    if not isinstance(obj, type):
        t.fail(
            "class",
            f"{class_path!r} is not a subclass of {base_name} (got a {type(obj).__name__}).",
        )
    if not issubclass(obj, base):
        got = f"class {obj.__module__}.{obj.__qualname__}"
        t.fail("class", f"{class_path!r} is not a subclass of {base_name} (got {got}).")
    return obj


def _ready_made_moved(class_path: str) -> str | None:
    """``pgbus.actors.x:Y`` when *class_path* is a ready-made actor's old ``actors.x:Y``."""
    if not class_path.startswith("actors."):
        return None
    module_name, _, qualname = class_path.partition(":")
    new_module = f"pgbus.{module_name}"
    try:
        if importlib.util.find_spec(new_module) is None:
            return None
        obj: object = importlib.import_module(new_module)
    except Exception:  # not one of ours (actors.x.y with no pgbus.actors.x): not moved
        return None
    for attr in qualname.split("."):
        if not hasattr(obj, attr):
            return None
        obj = getattr(obj, attr)
    return f"{new_module}:{qualname}"


def _same_source(module: object, other: object) -> bool:
    files = [getattr(m, "__file__", None) for m in (module, other)]
    if None in files:
        return False
    try:
        return os.path.samefile(*files)  # type: ignore[arg-type]
    except OSError:
        return False


@contextlib.contextmanager
def _importable(*directories: Path) -> Iterator[None]:
    """Put *directories* at the front of ``sys.path`` while the block runs."""
    added = [str(d) for d in directories]
    sys.path[:0] = added
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for entry in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _toml_key(key: str) -> str:
    """*key* as written in a TOML table header: bare when it can be, else quoted."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _show(value: object) -> str:
    """*value* for a message, close to how it is written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, int) and not -(10**30) < value < 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, str) and len(value) > 200:
        return repr(value[:60]) + f" ... ({len(value)} characters)"
    return repr(value)


def _one_line_text(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _one_line(exc: BaseException) -> str:
    text = _one_line_text(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
