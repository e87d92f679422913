"""
The configuration file: every rule refuses a bad file with one exact line naming the file, the
table and key, the rule and the bad value, before anything starts.

Configurations are parsed as ``bus.toml`` with this directory importable, so ``class`` can name
``fixtures_actors.sample:Echo``.
"""

from __future__ import annotations

import math
import re
import sys
import textwrap
from pathlib import Path

import pytest

import pgbus
from pgbus import ConfigError
from pgbus._config import (
    ActorConfig,
    BridgeConfig,
    BusConfig,
    ChannelConfig,
    ConfigFileError,
    PostgresConfig,
    SupervisorConfig,
    load_config,
    parse_config,
)

TESTS = Path(__file__).parent
ORDERS = "[channels.orders]\ncapacity = 10\n"
ECHO = 'class = "fixtures_actors.sample:Echo"\n'


def parse(text: str) -> BusConfig:
    return parse_config(textwrap.dedent(text), "bus.toml", base_dir=TESTS)


def assert_refused(text: str, message: str) -> ConfigError:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$") as info:
        parse(text)
    return info.value


# --- valid files ---------------------------------------------------------------------------------


def test_full_config_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of a file that sets them all arrives in the frozen config."""
    monkeypatch.syspath_prepend(str(TESTS))
    config = load_config(TESTS / "configs" / "full.toml")

    from fixtures_actors.sample import Echo, Sink

    assert config == BusConfig(
        source=str(TESTS / "configs" / "full.toml"),
        postgres=PostgresConfig("postgresql://app:s3cret@db.example:5433/orders", "pgbus-orders"),
        supervisor=SupervisorConfig("rest_for_one", 7, 12.0, 0.5, 8.0, 2.5),
        channels=(
            ChannelConfig("orders", 100),
            ChannelConfig("unbounded", math.inf),
            ChannelConfig("with space", 0),
        ),
        bridges=(
            BridgeConfig(1, "Orders PG", "orders", "in", "json", "drop_oldest", True),
            BridgeConfig(2, "orders_out", "unbounded", "out", "text", "block", False),
        ),
        actors=(
            ActorConfig(
                "echo",
                "fixtures_actors.sample:Echo",
                Echo,
                "orders",
                "transient",
                {"to": "unbounded", "prefix": "> "},
            ),
            ActorConfig("sink", "fixtures_actors.sample:Sink", Sink, None, "permanent", {}),
        ),
    )
    assert isinstance(config.supervisor.within_seconds, float)


def test_empty_file_gives_the_defaults() -> None:
    """An empty file is a bus with embedded PostgreSQL, default supervision and nothing else."""
    assert parse("") == BusConfig(
        "bus.toml",
        PostgresConfig(dsn=None, application_name="pgbus"),
        SupervisorConfig("one_for_one", 3, 5.0, 0.1, 5.0, 5.0),
        (),
        (),
        (),
    )


@pytest.mark.parametrize("written", ['"inf"', "inf"])
def test_inf_capacity_is_unbounded(written: str) -> None:
    """capacity = "inf" (or TOML's own inf) is math.inf."""
    config = parse(f"[channels.log]\ncapacity = {written}\n")
    assert config.channels == (ChannelConfig("log", math.inf),)


def test_actor_options_are_a_read_only_copy() -> None:
    """Changing the options after loading is refused, and nested values are copies."""
    config = parse(
        f"""
        {ORDERS}
        [actors.echo]
        {ECHO}
        options = {{ to = "orders", prefix = "x" }}
        """
    )
    options = config.actors[0].options
    with pytest.raises(TypeError):
        options["to"] = "elsewhere"  # type: ignore[index]
    assert dict(options) == {"to": "orders", "prefix": "x"}


def test_with_dsn_overrides_the_file() -> None:
    """with_dsn() replaces postgres.dsn (None: embedded) and keeps everything else."""
    config = parse('[postgres]\ndsn = "postgresql://a@h/db"\napplication_name = "pgbus-x"\n')
    other = config.with_dsn("postgres://b@elsewhere/db")
    assert other.postgres == PostgresConfig("postgres://b@elsewhere/db", "pgbus-x")
    assert config.postgres.dsn == "postgresql://a@h/db"
    assert other.with_dsn(None).postgres.dsn is None
    assert other.with_dsn("postgresql:///x?host=/tmp").postgres.dsn == "postgresql:///x?host=/tmp"


def test_with_dsn_refuses_a_bad_dsn_without_its_password() -> None:
    """A bad override is named by its origin and its password is redacted."""
    message = (
        "--dsn must be a URI starting with postgresql:// or postgres://, e.g. "
        "'postgresql://user:password@host:5432/dbname?sslmode=require' (got 'mysql://u:***@h/db')."
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        parse("").with_dsn("mysql://u:pw@h/db", origin="--dsn")


def test_summary() -> None:
    """summary() lists channels, bridges and actors, with the DSN's password redacted."""
    config = parse(
        """
        [postgres]
        dsn = "postgresql://app:s3cret@db/orders"

        [channels.orders]
        capacity = 100
        [channels.out]
        capacity = "inf"

        [[bridge]]
        postgres = "orders_pg"
        channel = "orders"
        direction = "in"

        [[bridge]]
        postgres = "events"
        channel = "out"
        direction = "out"
        codec = "json"

        [actors.echo]
        class = "fixtures_actors.sample:Echo"
        inbox = "orders"
        options = { to = "out" }

        [actors.idle]
        class = "fixtures_actors.sample:Sink"
        restart = "temporary"
        """
    )
    assert config.summary() == textwrap.dedent(
        """\
        bus.toml: 2 channels, 2 bridges, 2 actors
        postgres: postgresql://app:***@db/orders (application_name 'pgbus')
        supervisor: one_for_one, at most 3 restarts within 5s
        channel 'orders': capacity 100
        channel 'out': capacity inf
        bridge #1: postgres 'orders_pg' -> channel 'orders' (in, text, overflow block)
        bridge #2: channel 'out' -> postgres 'events' (out, json)
        actor 'echo': fixtures_actors.sample:Echo, inbox 'orders', restart permanent
        actor 'idle': fixtures_actors.sample:Sink, no inbox, restart temporary"""
    )


def test_summary_of_an_empty_file() -> None:
    """An empty file's summary says no PostgreSQL is needed and counts in the singular too."""
    config = parse("[channels.a]\ncapacity = 0\n")
    assert config.summary().splitlines()[:2] == [
        "bus.toml: 1 channel, 0 bridges, 0 actors",
        "postgres: none (nothing here needs PostgreSQL) (application_name 'pgbus')",
    ]


# --- reading the file ----------------------------------------------------------------------------


def test_toml_syntax_error_names_the_line() -> None:
    """tomllib's message, with its line and column, follows the file name."""
    assert_refused(
        "[postgres]\ndsn = 'x'\nabc def = 1\n",
        "bus.toml: invalid TOML: Expected '=' after a key in a key/value pair "
        "(at line 3, column 5)",
    )


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that does not exist is named as given, with the OS's reason."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigFileError, match=r"^bus\.toml: cannot read the file: No such file or directory$"
    ) as info:
        load_config("bus.toml")
    assert (info.value.file, info.value.where, info.value.key) == ("bus.toml", "", None)


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    """A directory is not a readable configuration file."""
    with pytest.raises(ConfigError, match=r"^.*: cannot read the file: Is a directory$"):
        load_config(tmp_path)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    """TOML is UTF-8; other bytes are refused in one line."""
    path = tmp_path / "bus.toml"
    path.write_bytes(b'[postgres]\napplication_name = "pgbus\xff"\n')
    with pytest.raises(ConfigError, match=r"^.*bus\.toml: the file is not valid UTF-8: .*$"):
        load_config(path)


# --- unknown keys and wrong types ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[bridges]\n",
            "bus.toml: unknown top-level key 'bridges'; did you mean 'bridge'?",
        ),
        (
            "[logging]\n",
            "bus.toml: unknown top-level key 'logging'; "
            "allowed: 'postgres', 'supervisor', 'channels', 'bridge', 'actors', 'metrics', 'node', "
            "'schedule', 'entities'.",
        ),
        (
            "[postgres]\ndns = 'postgresql://h/db'\n",
            "bus.toml: [postgres] unknown key 'dns'; did you mean 'dsn'?",
        ),
        (
            "[supervisor]\nmax_restart = 1\n",
            "bus.toml: [supervisor] unknown key 'max_restart'; did you mean 'max_restarts'?",
        ),
        (
            "[channels.orders]\ncapacty = 1\n",
            "bus.toml: [channels.orders] unknown key 'capacty'; did you mean 'capacity'?",
        ),
        (
            f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'orders'\ndirection = 'in'\n"
            "[[bridge]]\npostgres = 'p'\nchannel = 'orders'\ndirektion = 'in'\n",
            "bus.toml: [[bridge]] #2: unknown key 'direktion'; did you mean 'direction'?",
        ),
        (
            f"[actors.echo]\n{ECHO}option = {{}}\n",
            "bus.toml: [actors.echo] unknown key 'option'; did you mean 'options'?",
        ),
        (
            f"[actors.echo]\n{ECHO}zzz = 1\n",
            "bus.toml: [actors.echo] unknown key 'zzz'; "
            "allowed: 'class', 'inbox', 'restart', 'options', 'public', 'singleton'.",
        ),
    ],
)
def test_unknown_keys_are_refused(text: str, message: str) -> None:
    """A key no table knows is refused, with the closest known key when there is one."""
    error = assert_refused(text, message)
    assert isinstance(error, ConfigFileError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('postgres = "x"\n', "bus.toml: postgres must be a table, written [postgres] (got 'x')."),
        (
            "[channels]\norders = 100\n",
            "bus.toml: [channels] orders must be a table, written [channels.orders] (got 100).",
        ),
        (
            "[bridge]\npostgres = 'p'\n",
            "bus.toml: bridge must be an array of tables, each written [[bridge]] (got a table).",
        ),
        ("bridge = [1]\n", "bus.toml: [[bridge]] #1 must be a table (got 1)."),
        (
            "[supervisor]\nmax_restarts = 2.5\n",
            "bus.toml: [supervisor] max_restarts must be an integer >= 0 (got 2.5).",
        ),
        (
            "[supervisor]\nwithin_seconds = true\n",
            "bus.toml: [supervisor] within_seconds must be a number of seconds > 0 (got true).",
        ),
        (
            "[supervisor]\nstrategy = 1\n",
            "bus.toml: [supervisor] strategy must be one of 'one_for_one', 'one_for_all', "
            "'rest_for_one' (got 1).",
        ),
        ("[postgres]\ndsn = 5\n", "bus.toml: [postgres] dsn must be a string (got 5)."),
        (
            f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'orders'\ndirection = 'in'\n"
            "ignore_own = 'yes'\n",
            "bus.toml: [[bridge]] #1: ignore_own must be true or false (got 'yes').",
        ),
        (
            f'[actors.echo]\n{ECHO}options = "to=x"\n',
            "bus.toml: [actors.echo] options must be a table of keyword options (got 'to=x').",
        ),
        (
            '[actors.echo]\nclass = ["fixtures_actors.sample:Echo"]\n',
            'bus.toml: [actors.echo] class must be "package.module:ClassName" (got an array).',
        ),
        (
            "[actors.echo]\nclass = 1979-05-27\n",
            'bus.toml: [actors.echo] class must be "package.module:ClassName" (got 1979-05-27).',
        ),
    ],
)
def test_wrong_types_are_refused(text: str, message: str) -> None:
    """A value of the wrong TOML type is refused, showing the value as TOML writes it."""
    assert_refused(text, message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[channels.orders]\n",
            'bus.toml: [channels.orders] capacity is required (0, a positive integer or "inf").',
        ),
        (
            f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'orders'\n",
            "bus.toml: [[bridge]] #1: direction is required (one of 'in', 'out').",
        ),
        (
            f"{ORDERS}[[bridge]]\nchannel = 'orders'\ndirection = 'in'\n",
            "bus.toml: [[bridge]] #1: postgres is required (a PostgreSQL channel name).",
        ),
        (
            "[[bridge]]\npostgres = 'p'\ndirection = 'in'\n",
            "bus.toml: [[bridge]] #1: channel is required "
            "(the name of a channel declared under [channels]).",
        ),
        (
            "[actors.echo]\n",
            'bus.toml: [actors.echo] class is required ("package.module:ClassName").',
        ),
    ],
)
def test_required_keys(text: str, message: str) -> None:
    """A missing required key is named, with what it should hold."""
    assert_refused(text, message)


# --- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "2.5", "true", '"10"', '"infinity"', "-inf", "nan"])
def test_bad_capacities_are_refused(value: str) -> None:
    """Only 0, a positive integer or "inf" is a capacity; nothing is guessed."""
    shown = {'"10"': "'10'", '"infinity"': "'infinity'"}.get(value, value)
    assert_refused(
        f"[channels.orders]\ncapacity = {value}\n",
        f'bus.toml: [channels.orders] capacity must be 0, a positive integer or "inf" '
        f"(got {shown}).",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[supervisor]\nstrategy = 'one_for_none'\n",
            "bus.toml: [supervisor] strategy must be one of 'one_for_one', 'one_for_all', "
            "'rest_for_one' (got 'one_for_none').",
        ),
        (
            f"[actors.echo]\n{ECHO}restart = 'always'\noptions = {{ to = 'x' }}\n",
            "bus.toml: [actors.echo] restart must be one of 'permanent', 'transient', "
            "'temporary' (got 'always').",
        ),
        (
            f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'orders'\ndirection = 'both'\n",
            "bus.toml: [[bridge]] #1: direction must be one of 'in', 'out' (got 'both').",
        ),
        (
            f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'orders'\ndirection = 'in'\n"
            "codec = 'msgpack'\n",
            "bus.toml: [[bridge]] #1: codec must be one of 'text', 'json' (got 'msgpack').",
        ),
        (
            f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'orders'\ndirection = 'in'\n"
            "overflow = 'drop'\n",
            "bus.toml: [[bridge]] #1: overflow must be one of 'block', 'drop_newest', "
            "'drop_oldest' (got 'drop').",
        ),
    ],
)
def test_choices_are_listed(text: str, message: str) -> None:
    """strategy, restart, direction, codec and overflow list their allowed values."""
    assert_refused(text, message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[supervisor]\nmax_restarts = -1\n",
            "bus.toml: [supervisor] max_restarts must be an integer >= 0 (got -1).",
        ),
        (
            "[supervisor]\nwithin_seconds = 0\n",
            "bus.toml: [supervisor] within_seconds must be a number of seconds > 0 (got 0).",
        ),
        (
            "[supervisor]\nstop_timeout = inf\n",
            "bus.toml: [supervisor] stop_timeout must be a number of seconds > 0 (got inf).",
        ),
        (
            "[supervisor]\nbackoff_initial = -0.5\n",
            "bus.toml: [supervisor] backoff_initial must be a number of seconds > 0 (got -0.5).",
        ),
        (
            "[supervisor]\nbackoff_initial = 10\nbackoff_max = 2\n",
            "bus.toml: [supervisor] backoff_initial must not exceed backoff_max (got 10 > 2).",
        ),
    ],
)
def test_supervisor_numbers(text: str, message: str) -> None:
    """Restart counts are >= 0, durations > 0 and finite, backoff_initial <= backoff_max."""
    assert_refused(text, message)


def test_max_restarts_zero_is_allowed() -> None:
    """max_restarts = 0 means no restart at all, which is a valid choice."""
    assert parse("[supervisor]\nmax_restarts = 0\n").supervisor.max_restarts == 0


def bridge(postgres: str) -> str:
    return f"{ORDERS}[[bridge]]\npostgres = {postgres}\nchannel = 'orders'\ndirection = 'in'\n"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            '"' + "x" * 64 + '"',
            f"bus.toml: [[bridge]] #1: postgres {'x' * 64!r} is 64 bytes; PostgreSQL allows "
            "at most 63 (LISTEN would silently truncate it).",
        ),
        (
            '"' + "é" * 32 + '"',
            f"bus.toml: [[bridge]] #1: postgres {'é' * 32!r} is 64 bytes; PostgreSQL allows "
            "at most 63 (LISTEN would silently truncate it).",
        ),
        ('""', "bus.toml: [[bridge]] #1: postgres '' must not be empty."),
        (
            '"a\\u0000b"',
            "bus.toml: [[bridge]] #1: postgres 'a\\x00b' must not contain NUL characters.",
        ),
    ],
)
def test_postgres_channel_names(name: str, message: str) -> None:
    """A Postgres channel name is 1..63 bytes of UTF-8 without NUL, as PostgreSQL needs."""
    assert_refused(bridge(name), message)


def test_postgres_channel_name_is_kept_exactly() -> None:
    """63 bytes, capitals and spaces are kept as written."""
    name = "Mixed Case " + "y" * 52
    config = parse(bridge(f'"{name}"'))
    assert config.bridges[0].postgres == name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'orders'\ndirection = 'in'\n"
            "[[bridge]]\npostgres = 'p'\nchannel = 'nope'\ndirection = 'in'\n",
            "bus.toml: [[bridge]] #2: channel 'nope' is not declared under [channels].",
        ),
        (
            f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'order'\ndirection = 'in'\n",
            "bus.toml: [[bridge]] #1: channel 'order' is not declared under [channels]; "
            "did you mean 'orders'?",
        ),
        (
            f"{ORDERS}[actors.echo]\n{ECHO}inbox = 'nope'\n",
            "bus.toml: [actors.echo] inbox 'nope' is not declared under [channels].",
        ),
    ],
)
def test_channels_must_be_declared(text: str, message: str) -> None:
    """A bridge's channel and an actor's inbox name a channel declared under [channels]."""
    assert_refused(text, message)


def test_one_out_bridge_per_channel() -> None:
    """Two "out" bridges on one channel would split its messages, so the second is refused."""
    assert_refused(
        f"""
        {ORDERS}
        [[bridge]]
        postgres = "a"
        channel = "orders"
        direction = "out"

        [[bridge]]
        postgres = "b"
        channel = "orders"
        direction = "in"

        [[bridge]]
        postgres = "c"
        channel = "orders"
        direction = "out"
        """,
        "bus.toml: [[bridge]] #3: channel 'orders' is already the source of \"out\" bridge #1; "
        "two consumers would split its messages between them, not each get every one.",
    )


def test_out_bridge_channel_is_not_an_inbox() -> None:
    """An actor's inbox cannot also feed an "out" bridge, which must be its only consumer."""
    assert_refused(
        f"""
        {ORDERS}
        [[bridge]]
        postgres = "a"
        channel = "orders"
        direction = "out"

        [actors.echo]
        {ECHO}
        inbox = "orders"
        options = {{ to = "orders" }}
        """,
        "bus.toml: [actors.echo] inbox 'orders' is the source of \"out\" bridge #1, its only "
        "consumer; the bridge and the actor would split its messages, not each get every one. "
        "Give the actor its own channel.",
    )


def test_in_bridge_channel_can_be_an_inbox() -> None:
    """An "in" bridge produces into a channel that an actor consumes: the usual set-up."""
    config = parse(
        f"""
        {bridge('"p"')}
        [actors.echo]
        {ECHO}
        inbox = "orders"
        options = {{ to = "orders" }}
        """
    )
    assert config.actors[0].inbox == config.bridges[0].channel == "orders"


@pytest.mark.parametrize(("key", "value"), [("overflow", '"drop_newest"'), ("ignore_own", "true")])
def test_in_only_keys_are_refused_on_out_bridges(key: str, value: str) -> None:
    """overflow and ignore_own mean nothing on an "out" bridge, so they are refused there."""
    assert_refused(
        f"{ORDERS}[[bridge]]\npostgres = 'p'\nchannel = 'orders'\ndirection = 'out'\n"
        f"{key} = {value}\n",
        f'bus.toml: [[bridge]] #1: {key} applies only to "in" bridges (Postgres -> Trio); '
        'remove it from this "out" bridge.',
    )


# --- actor classes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        (
            "fixtures_actors.sample.Echo",
            "must look like \"package.module:ClassName\" (got 'fixtures_actors.sample.Echo').",
        ),
        (
            "fixtures_actors.sample:",
            "must look like \"package.module:ClassName\" (got 'fixtures_actors.sample:').",
        ),
        (
            "fixtures_actors.nothere:Echo",
            "'fixtures_actors.nothere:Echo': cannot import module 'fixtures_actors.nothere': "
            "No module named 'fixtures_actors.nothere'.",
        ),
        (
            "fixtures_actors.broken:Echo",
            "'fixtures_actors.broken:Echo': importing module 'fixtures_actors.broken' raised "
            "RuntimeError: boom second line.",
        ),
        (
            "fixtures_actors.sample:Ecko",
            "'fixtures_actors.sample:Ecko': 'fixtures_actors.sample' has no attribute 'Ecko'; "
            "did you mean 'Echo'?",
        ),
        (
            "fixtures_actors.sample:Echo.Inner",
            "'fixtures_actors.sample:Echo.Inner': 'fixtures_actors.sample.Echo' has no "
            "attribute 'Inner'.",
        ),
        (
            "fixtures_actors.sample:NotAnActor",
            "'fixtures_actors.sample:NotAnActor' is not a subclass of pgbus.Actor "
            "(got class fixtures_actors.sample.NotAnActor).",
        ),
        (
            "fixtures_actors.sample:not_a_class",
            "'fixtures_actors.sample:not_a_class' is not a subclass of pgbus.Actor "
            "(got a function).",
        ),
        (
            "pgbus:Actor",
            "'pgbus:Actor' is pgbus.Actor itself; name a subclass that implements handle().",
        ),
    ],
)
def test_actor_class_is_checked(class_path: str, message: str) -> None:
    """class names an importable pgbus.Actor subclass; failures are one line, no traceback."""
    assert_refused(f'[actors.a]\nclass = "{class_path}"\n', f"bus.toml: [actors.a] class {message}")


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ("{ to = 'x', tto = 'y' }", "got an unexpected keyword argument 'tto'"),
        ("{ prefix = 'y' }", "missing a required argument: 'to'"),
    ],
)
def test_options_must_fit_the_constructor(options: str, problem: str) -> None:
    """options bind to the class's constructor; the TypeError's text says what is wrong."""
    assert_refused(
        f"[actors.echo]\n{ECHO}options = {options}\n",
        f"bus.toml: [actors.echo] options do not fit Echo(to, prefix=''): {problem}.",
    )


def test_class_next_to_the_config_file_is_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module beside the config file imports, whatever the current directory."""
    module = "pgbus_test_config_beside"
    (tmp_path / f"{module}.py").write_text(
        "import pgbus\n\nclass Shout(pgbus.Actor):\n    pass\n", encoding="utf-8"
    )
    (tmp_path / "bus.toml").write_text(f'[actors.shout]\nclass = "{module}:Shout"\n')
    monkeypatch.chdir(TESTS)
    monkeypatch.delitem(sys.modules, module, raising=False)
    path_before = list(sys.path)
    try:
        config = load_config(tmp_path / "bus.toml")
        assert config.actors[0].actor_class.__name__ == "Shout"
        assert sys.path == path_before
    finally:
        sys.modules.pop(module, None)


def test_class_in_the_current_directory_is_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module in the current directory imports, even for a config given as a string."""
    module = "pgbus_test_config_cwd"
    (tmp_path / f"{module}.py").write_text(
        "import pgbus\n\nclass Quiet(pgbus.Actor):\n    pass\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    try:
        config = parse_config(f'[actors.q]\nclass = "{module}:Quiet"\n')
        assert config.actors[0].class_path == f"{module}:Quiet"
    finally:
        sys.modules.pop(module, None)


# --- [postgres] ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('"myapp"', "'myapp'"),
        ('""', "''"),
        ('"PGBUS"', "'PGBUS'"),
    ],
)
def test_application_name_starts_with_pgbus(value: str, shown: str) -> None:
    """Every connection's application_name starts with "pgbus"."""
    assert_refused(
        f"[postgres]\napplication_name = {value}\n",
        'bus.toml: [postgres] application_name must start with "pgbus", so every connection '
        f"pgbus opens can be told apart in pg_stat_activity (got {shown}).",
    )


def test_application_name_fits_postgres() -> None:
    """PostgreSQL keeps at most 63 bytes of application_name, so longer ones are refused."""
    name = "pgbus-" + "é" * 29
    assert_refused(
        f'[postgres]\napplication_name = "{name}"\n',
        f"bus.toml: [postgres] application_name is 64 bytes; PostgreSQL keeps at most 63 "
        f"(got {name!r}).",
    )


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[channels.""]\ncapacity = 1\n',
            'bus.toml: [channels.""] the name must not be empty.',
        ),
        (
            f'[actors.""]\n{ECHO}',
            'bus.toml: [actors.""] the name must not be empty.',
        ),
    ],
)
def test_names_are_not_empty(text: str, message: str) -> None:
    """Channel and actor names, taken from TOML keys, must not be empty."""
    assert_refused(text, message)


def test_quoted_table_names_are_shown_quoted() -> None:
    """A table name that needs quotes in TOML is shown with them."""
    assert_refused(
        '[channels."my orders"]\ncapacity = -1\n',
        'bus.toml: [channels."my orders"] capacity must be 0, a positive integer or "inf" '
        "(got -1).",
    )


# --- keepalive -----------------------------------------------------------------------------------


def test_keepalive_defaults_to_ten_seconds_and_can_be_set() -> None:
    """[postgres] keepalive is a number of seconds; the default is open_bus's."""
    assert parse("").postgres.keepalive == 10.0
    config = parse("[postgres]\nkeepalive = 2\n")
    assert config.postgres.keepalive == 2.0
    assert "(application_name 'pgbus', keepalive 2s)" in config.summary()
    assert parse("[postgres]\nkeepalive = 0.25\n").postgres.keepalive == 0.25


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0", "0"),
        ("-1.5", "-1.5"),
        ("inf", "inf"),
        ("nan", "nan"),
        ('"10"', "'10'"),
        ("true", "true"),
        ("1" + "0" * 400, "an integer of 401 digits"),
    ],
)
def test_keepalive_must_be_positive_seconds(value: str, shown: str) -> None:
    """A keepalive that is not a finite number > 0 is one line naming the key."""
    assert_refused(
        f"[postgres]\nkeepalive = {value}\n",
        f"bus.toml: [postgres] keepalive must be a number of seconds > 0 (got {shown}).",
    )


async def test_open_bus_follows_the_same_keepalive_rule() -> None:
    """open_bus(keepalive=...) refuses what the file refuses, in the same words."""
    with pytest.raises(
        ConfigError, match=r"^keepalive must be a number of seconds > 0 \(got 0\)\.$"
    ):
        async with pgbus.open_bus(keepalive=0):
            pass


# --- pool_size -----------------------------------------------------------------------------------


def test_pool_size_defaults_to_ten_and_can_be_set() -> None:
    """[postgres] pool_size bounds the bus's pooled connections; the default is open_bus's."""
    assert parse("").postgres.pool_size == 10
    config = parse("[postgres]\npool_size = 3\n")
    assert config.postgres.pool_size == 3
    assert "(application_name 'pgbus', pool_size 3)" in config.summary()


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "0"), ("-1", "-1"), ("1001", "1001"), ("2.5", "2.5"), ('"4"', "'4'"), ("true", "true")],
)
def test_pool_size_must_be_a_small_positive_integer(value: str, shown: str) -> None:
    assert_refused(
        f"[postgres]\npool_size = {value}\n",
        f"bus.toml: [postgres] pool_size must be an integer from 1 to 1000 (got {shown}).",
    )


async def test_open_bus_follows_the_same_pool_size_rule() -> None:
    with pytest.raises(
        ConfigError, match=r"^pool_size must be an integer from 1 to 1000 \(got 0\)\.$"
    ):
        async with pgbus.open_bus(pool_size=0):
            pass


# --- options that name channels ------------------------------------------------------------------

TICKS = "[channels.ticks]\ncapacity = 10\n"


@pytest.mark.parametrize(
    ("class_path", "options"),
    [
        ("pgbus.actors.heartbeat:Heartbeat", "{ to = 'tick', every = 1.0 }"),
        ("pgbus.actors.relay:Relay", "{ to = 'tick' }"),
        ("pgbus.actors.table_changes:TableChanges", "{ to = 'tick', table = 'orders' }"),
    ],
)
def test_ready_made_actors_name_their_channel_options(class_path: str, options: str) -> None:
    """Heartbeat, Relay and TableChanges declare `to`: check refuses an undeclared channel."""
    assert_refused(
        f'{TICKS}[actors.a]\nclass = "{class_path}"\noptions = {options}\n',
        "bus.toml: [actors.a] options.to 'tick' is not a channel declared under [channels]; "
        "did you mean 'ticks'?",
    )


def test_a_declared_channel_option_passes() -> None:
    """An option naming a declared channel is accepted as written."""
    config = parse(
        f'{TICKS}[actors.a]\nclass = "pgbus.actors.heartbeat:Heartbeat"\n'
        'options = { to = "ticks" }\n'
    )
    assert config.actors[0].options == {"to": "ticks"}


def test_a_channel_option_left_at_its_default_is_checked_too() -> None:
    """A default value in the constructor names a channel as much as a given one."""
    assert_refused(
        f'{TICKS}[actors.f]\nclass = "fixtures_actors.sample:Fanout"\n'
        'options = { to = "ticks" }\n',
        "bus.toml: [actors.f] options.audit 'audit' is not a channel declared under [channels].",
    )
    parse(
        f"{TICKS}[channels.audit]\ncapacity = 1\n"
        '[actors.f]\nclass = "fixtures_actors.sample:Fanout"\noptions = { to = "ticks" }\n'
    )


def test_check_actor_options_is_the_rule_spawn_and_the_file_share() -> None:
    """check_actor_options binds, builds a first instance and checks channel options."""
    from fixtures_actors.sample import Echo, Fanout

    from pgbus._actor import check_actor_options
    from pgbus._errors import ActorOptionsError

    first = check_actor_options("f", Fanout, {"to": "a"}, {"a", "audit"})
    assert (type(first), first.to, first.audit) == (Fanout, "a", "audit")
    assert check_actor_options("f", Fanout, {"to": "nope"}).to == "nope"  # no channels: no check
    with pytest.raises(ActorOptionsError) as caught:
        check_actor_options("f", Fanout, {"to": "audi"}, {"a", "audit"})
    assert (caught.value.actor, caught.value.key) == ("f", "options.to")
    assert str(caught.value) == (
        "actor 'f': options.to 'audi' is not a channel; did you mean 'audit'?"
    )
    with pytest.raises(ActorOptionsError, match=r"^actor 'e': options do not fit Echo\(to, "):
        check_actor_options("e", Echo, {"too": 1})


# --- warnings ------------------------------------------------------------------------------------


def bridge_in(postgres: str, channel: str, overflow: str = "block") -> str:
    return (
        f'[[bridge]]\npostgres = "{postgres}"\nchannel = "{channel}"\ndirection = "in"\n'
        f'overflow = "{overflow}"\n'
    )


def test_an_inbound_channel_nothing_consumes_is_a_warning() -> None:
    """A channel only an inbound bridge touches fills up and stalls the bus: check says so."""
    config = parse(f"{ORDERS}{bridge_in('orders_pg', 'orders')}")
    expected = (
        "channel 'orders' is fed by [[bridge]] #1 but nothing consumes it; once full it stops "
        'every inbound bridge of the bus (overflow "block")'
    )
    assert config.warnings() == (expected,)
    assert config.summary().splitlines()[-1] == f"warning: {expected}"


def test_the_warning_names_what_happens_when_full() -> None:
    """With a drop policy the notifications are dropped; with capacity inf memory grows."""
    config = parse(
        f'{ORDERS}[channels.all]\ncapacity = "inf"\n'
        + bridge_in("a", "orders", "drop_newest")
        + bridge_in("b", "all")
        + bridge_in("c", "orders", "drop_oldest")
    )
    assert config.warnings() == (
        "channel 'orders' is fed by [[bridge]] #1, #3 but nothing consumes it; once full, its "
        'notifications are dropped (overflow "drop_newest" and "drop_oldest")',
        "channel 'all' is fed by [[bridge]] #2 but nothing consumes it; it grows without bound "
        '(capacity "inf")',
    )


@pytest.mark.parametrize(
    "consumer",
    [
        '[actors.sink]\nclass = "fixtures_actors.sample:Sink"\ninbox = "orders"\n',
        '[[bridge]]\npostgres = "again"\nchannel = "orders"\ndirection = "out"\n',
        '[channels.x]\ncapacity = 1\n[actors.relay]\nclass = "pgbus.actors.relay:Relay"\n'
        'inbox = "x"\noptions = { to = "orders" }\n',
    ],
    ids=["inbox", "out bridge", "channel option"],
)
def test_a_consumed_inbound_channel_is_no_warning(consumer: str) -> None:
    """An actor's inbox, an out bridge or an actor option naming the channel all count."""
    config = parse(f"{ORDERS}{bridge_in('orders_pg', 'orders')}{consumer}")
    assert config.warnings() == ()
    assert "warning" not in config.summary()


def test_check_prints_the_warning_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The warning is part of check's summary; the exit status stays 0."""
    from pgbus._cli import main

    path = tmp_path / "bus.toml"
    path.write_text(f"{ORDERS}{bridge_in('orders_pg', 'orders')}", encoding="utf-8")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("warning: channel 'orders' is fed by [[bridge]] #1")


# --- one set of rules for the file and the Python API ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "toml", "python"),
    [
        ("strategy", '"all"', "all"),
        ("max_restarts", "-1", -1),
        ("max_restarts", "2.5", 2.5),
        ("within_seconds", "nan", math.nan),
        ("within_seconds", "0", 0),
        ("backoff_max", "inf", math.inf),
        ("stop_timeout", "1" + "0" * 400, 10**400),
        ("stop_timeout", '"5"', "5"),
    ],
)
def test_supervision_is_the_schema_of_the_supervisor_table(
    key: str, toml: str, python: object
) -> None:
    """[supervisor] and pgbus.Supervision refuse the same values with the same rule."""
    with pytest.raises(pgbus.ConfigError) as in_python:
        pgbus.Supervision(**{key: python})  # type: ignore[arg-type]
    with pytest.raises(ConfigFileError) as in_file:
        parse(f"[supervisor]\n{key} = {toml}\n")
    rule = str(in_python.value).removeprefix(f"{key} ").split(" (got ")[0]
    assert str(in_file.value).startswith(f"bus.toml: [supervisor] {key} {rule} (got ")


def test_supervision_keeps_seconds_as_floats() -> None:
    """5 seconds written as an integer is 5.0, in the file and in Python."""
    assert pgbus.Supervision(within_seconds=5).within_seconds == 5.0
    assert isinstance(parse("[supervisor]\nwithin_seconds = 5\n").supervisor.within_seconds, float)
    assert SupervisorConfig is pgbus.Supervision
