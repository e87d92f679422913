"""
Test helpers for code built on pgbus: a real PostgreSQL for every test run, never a mock.

This module is a pytest plugin, registered by installing pgbus (entry point ``pytest11``,
name ``pgbus``; ``-p no:pgbus`` turns it off). Its fixtures, for a user's tests as they are:

- ``pgbus_dsn`` (session): the DSN of a real PostgreSQL, chosen as below.
- ``pgbus_bus`` (function, async: a Trio test, e.g. with ``trio_mode = true``): an open
  `pgbus.Bus` on that PostgreSQL, closed after the test (every connection it opened closed).

For example::

    async def test_notify_comes_back(pgbus_bus: pgbus.Bus) -> None:
        pgbus_bus.add_channel("orders", 10)
        await pgbus_bus.bridge_in("orders", "orders")
        await pgbus_bus.notify("orders", "hello")
        with trio.fail_after(10):
            assert (await pgbus_bus.channel("orders").receive()).payload == "hello"

Or make a DSN fixture of your own name and scope, in a ``conftest.py``::

    from pgbus.testing import postgres_dsn_fixture

    pg_dsn = postgres_dsn_fixture()  # a session-scoped fixture named "pg_dsn"

    async def test_something(pg_dsn: str) -> None:
        async with pgbus.open_bus(dsn=pg_dsn) as bus:
            ...

Where the server comes from, first match wins:

1. ``PGBUS_TEST_DSN``: a ``postgresql://`` URI of a server you run. Each session gets its own
   scratch database on it (``pgbus_test_<time>_<random>``, dropped at the end), so parallel runs
   sharing one server never see each other's notifications or connections.
2. ``PGBUS_TEST_BACKEND=docker``: a ``postgres:18`` container started with testcontainers.
3. Otherwise: an embedded PostgreSQL 18 (``pip install 'pgbus[embedded]'``), no setup at all.

Nothing is skipped for want of a database: when the chosen source cannot provide one, the fixture
raises `pgbus.PgbusError` saying why and what to change.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import re
import secrets
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest

from ._bus import Bus, open_bus
from ._dsn import describe_dsn, redact_dsn
from ._embedded import embedded_postgres_sync
from ._errors import PgbusError

__all__ = [
    "DOCKER_IMAGE",
    "ENV_BACKEND",
    "ENV_DSN",
    "HELPER_APPLICATION_NAME",
    "SCRATCH_DATABASE_PREFIX",
    "pgbus_bus",
    "pgbus_dsn",
    "postgres_dsn",
    "postgres_dsn_fixture",
]

ENV_DSN = "PGBUS_TEST_DSN"
"""Environment variable naming an existing server to test against."""

ENV_BACKEND = "PGBUS_TEST_BACKEND"
"""Environment variable choosing the server when `ENV_DSN` is unset: ``embedded`` or ``docker``."""

DOCKER_IMAGE = "postgres:18"

HELPER_APPLICATION_NAME = "testhelper"
"""``application_name`` of the helpers' own connections; it does not start with ``pgbus``, so
tests counting pgbus's connections in ``pg_stat_activity`` do not see them."""

SCRATCH_DATABASE_PREFIX = "pgbus_test_"
_STALE_AFTER_SECONDS = 6 * 3600  # no test session runs that long
_CONNECT_TIMEOUT = 10.0

FixtureScope = Literal["session", "package", "module", "class", "function"]
_T = TypeVar("_T")


@contextlib.contextmanager
def postgres_dsn(*, isolate: bool = True) -> Iterator[str]:
    """
    Provide a DSN to a real PostgreSQL for the duration of the block (blocking; not for Trio code).

    The source is chosen from the environment as the module docstring says. With *isolate* (the
    default) a server given by ``PGBUS_TEST_DSN`` gets a scratch database, created here and dropped
    (with any connection left on it) on exit; ``isolate=False`` uses that DSN as it is. Servers
    started here (embedded, docker) are the session's alone, so they are never isolated further.

    Raises:
        PgbusError: if the chosen source cannot provide a working server.
    """
    dsn = os.environ.get(ENV_DSN, "").strip()
    if dsn:
        if not isolate:
            yield dsn
            return
        with _scratch_database(dsn) as scratch_dsn:
            yield scratch_dsn
        return
    backend = os.environ.get(ENV_BACKEND, "").strip().lower() or "embedded"
    if backend == "docker":
        with _docker_postgres() as docker_dsn:
            yield docker_dsn
    elif backend == "embedded":
        with embedded_postgres_sync() as server:
            yield server.dsn
    else:
        raise PgbusError(
            f"{ENV_BACKEND} must be 'embedded' or 'docker' (got {backend!r}); "
            f"or set {ENV_DSN} to a postgresql:// URI."
        )


def postgres_dsn_fixture(
    *, name: str = "pg_dsn", scope: FixtureScope = "session", isolate: bool = True
) -> Any:
    """
    Make a pytest fixture that yields the DSN of `postgres_dsn`; assign it in a ``conftest.py``.

    The fixture is synchronous on purpose: pytest-trio runs async fixtures per test, while one
    server (or scratch database) for the whole session keeps the suite fast.
    """

    def fixture() -> Iterator[str]:
        with postgres_dsn(isolate=isolate) as dsn:
            yield dsn

    fixture.__name__ = name
    fixture.__doc__ = "DSN of a real PostgreSQL (see pgbus.testing)."
    return pytest.fixture(scope=scope, name=name)(fixture)


# --- a scratch database on an existing server --------------------------------------------------


@contextlib.contextmanager
def _scratch_database(dsn: str) -> Iterator[str]:
    name = f"{SCRATCH_DATABASE_PREFIX}{int(time.time())}_{secrets.token_hex(4)}"
    scratch_dsn = _with_database(dsn, name)

    async def create(connection: Any) -> None:
        await _drop_stale_databases(connection)
        await connection.execute(f'CREATE DATABASE "{name}"')

    async def drop(connection: Any) -> None:
        # FORCE (PostgreSQL 13+) ends connections a failed test left behind.
        force = " WITH (FORCE)" if connection.get_server_version().major >= 13 else ""
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}"{force}')

    _run_admin(dsn, create, "cannot create a scratch database on")
    try:
        yield scratch_dsn
    finally:
        _run_admin(dsn, drop, "cannot drop the scratch database on")


async def _drop_stale_databases(connection: Any) -> None:
    """Drop scratch databases that runs killed before their cleanup left behind (six hours old)."""
    names = await connection.fetch(
        "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", SCRATCH_DATABASE_PREFIX
    )
    for (name,) in names:
        created = re.fullmatch(rf"{SCRATCH_DATABASE_PREFIX}(\d+)_[0-9a-f]+", name)
        if created and time.time() - int(created.group(1)) > _STALE_AFTER_SECONDS:
            with contextlib.suppress(Exception):  # still in use, or not ours to drop
                await connection.execute(f'DROP DATABASE IF EXISTS "{name}"')


def _with_database(dsn: str, database: str) -> str:
    """*dsn* pointing at *database* instead; only URIs, the only form the driver accepts."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise PgbusError(
            f"{ENV_DSN} must be a postgresql:// URI (got {redact_dsn(dsn)!r}); "
            "pgbus's driver does not read key=value strings."
        )
    query = [
        (key, value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
        if key not in ("dbname", "database")
    ]
    return urlunsplit(parts._replace(path="/" + quote(database), query=urlencode(query, safe="/")))


def _run_admin(dsn: str, job: Callable[[Any], Awaitable[None]], failure: str) -> None:
    """
    Run *job* on a fresh connection to *dsn*, on asyncio in a thread of its own.

    A thread of its own: this may be called while a Trio or asyncio loop runs in this one.
    """
    from ._pg import AdminError, run_admin

    try:
        _run_in_thread(
            lambda: run_admin(
                dsn, job, application_name=HELPER_APPLICATION_NAME, timeout=_CONNECT_TIMEOUT
            )
        )
    except AdminError as exc:
        raise PgbusError(
            f"{ENV_DSN}: {failure} {describe_dsn(dsn)}: {redact_dsn(exc.cause)}"
        ) from exc


def _run_in_thread(function: Callable[[], _T]) -> _T:
    results: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(function())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="pgbus-testing-admin")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


# --- docker ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _docker_postgres() -> Iterator[str]:
    try:
        with warnings.catch_warnings():
            # docker and testcontainers warn about their own deprecations on import.
            warnings.simplefilter("ignore", DeprecationWarning)
            PostgresContainer = _import_postgres_container()
    except ImportError:
        raise PgbusError(
            f"{ENV_BACKEND}=docker needs testcontainers: pip install 'testcontainers[postgres]' "
            f"(or unset {ENV_BACKEND} to use embedded PostgreSQL)."
        ) from None
    with contextlib.ExitStack() as stack:
        cause = ""
        with warnings.catch_warnings():
            # docker-py does not close the socket of a failed connection to the engine; it is
            # garbage once the error is handled, so let it go without a ResourceWarning.
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                # Entering the container removes it again if it fails to become ready.
                container = stack.enter_context(PostgresContainer(DOCKER_IMAGE, driver=None))
                url = container.get_connection_url()
            except Exception as exc:
                cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if cause:
                gc.collect()
        if cause:
            # Raised outside the except block: chaining would keep the leaked socket alive.
            raise PgbusError(
                f"{ENV_BACKEND}=docker: cannot start a {DOCKER_IMAGE} container: {cause}. "
                f"Is Docker running? Unset {ENV_BACKEND} to use embedded PostgreSQL instead."
            )
        # The driver wants a plain postgresql:// URI, not SQLAlchemy's postgresql+driver://.
        yield re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def _import_postgres_container() -> Any:
    # testcontainers 4.x moved it to .community; the old path still works but warns.
    try:
        return importlib.import_module("testcontainers.community.postgres").PostgresContainer
    except ImportError:
        return importlib.import_module("testcontainers.postgres").PostgresContainer


# --- the pytest plugin's fixtures ---------------------------------------------------------------

pgbus_dsn = postgres_dsn_fixture(name="pgbus_dsn", scope="session")
"""Fixture: the DSN of a real PostgreSQL for the session (a scratch database on ``PGBUS_TEST_DSN``,
else a server of its own)."""


@pytest.fixture(name="pgbus_bus")
async def pgbus_bus(pgbus_dsn: str) -> AsyncIterator[Bus]:
    """Fixture: an open `pgbus.Bus` on ``pgbus_dsn``, for one Trio test; closed after it."""
    async with open_bus(pgbus_dsn) as bus:
        yield bus
