"""
The PostgreSQL adapter: the only module that imports asyncpg and trio_asyncio.

asyncpg runs on the trio-asyncio loop the bus opens; everything here is called from Trio. Driver
errors are translated once, here, into `DatabaseUnavailableError` (the connection is gone or
cannot be made) and `DatabaseError` (the server refused a statement): the rest of pgbus never
sees an asyncpg exception type, and no asyncpg object leaves this module.

The driver seam (see `Connection`): pgbus reads each plain socket from the Trio task waiting for
it, drives asyncpg's statement coroutines from that task, and has the protocol's parser call the
listening connection's sink directly. Each of these relies on asyncpg internals, so each is
checked when a connection is made (`_fast_paths`) and, if a hook is missing or misbehaves, that
connection takes asyncpg's public path instead, with one warning per bus.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import random
import select
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import trio
import trio_asyncio

from ._codec import quote_ident
from ._dsn import DEFAULT_POOL_SIZE, describe_dsn
from ._errors import DatabaseError, DatabaseUnavailableError, PoolExhaustedError

GRANTS_HINT = (
    "the role lacks pgbus's grants: print them with `pgbus grants ROLE` and have the owner of "
    "schema pgbus run them"
)
"""Added to every permission refusal (SQLSTATE 42501) one of pgbus's statements gets."""

log = logging.getLogger("pgbus.bridge")

DRIVE_SOCKETS = True
"""Read plain sockets from the waiting Trio task (see `Connection`); off: trio-asyncio reads."""

LISTEN_READ_SIZE = 8192
"""Bytes per read on a listening connection: about 250 small notifications."""

POOL_IDLE_MAX = 4
"""Idle connections `Database.borrow` keeps for reuse."""

POOL_WAIT = 30.0
"""Seconds a call may wait for a connection of the pool before `PoolExhaustedError`."""

# The task holding one of the pool's slots: a call it makes meanwhile (a durable notify inside
# its transaction) borrows without waiting for a second slot, so a full pool cannot deadlock.
_SLOT_HOLDER: contextvars.ContextVar[object] = contextvars.ContextVar("pgbus_pool_slot")

ENV_LOCK_TIMEOUT = "PGBUS_LOCK_TIMEOUT"
"""Environment variable: the seconds a command waits for a lock (default 10)."""

NotificationSink = Callable[[int, str, str], None]
"""Called synchronously, in Trio context, for each notification: ``sink(pid, channel, payload)``."""

# Errors that mean "this connection is gone, or none can be made right now": retry them.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InternalClientError,  # e.g. a query sent just as the server ended the session
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.PostgresConnectionError,
)
# While connecting, everything else (a bad password, an unknown database, role or setting, a
# DSN asyncpg refuses) is fatal: no amount of retrying fixes it.
_FATAL_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.ClientConfigurationError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    ValueError,
    TypeError,
)

# pgbus's own sessions must not be ended by a server-wide idle timeout (PostgreSQL 14+). Set after
# connecting, never as a startup parameter: a pooler (PgBouncer) refuses startup parameters it
# does not know. On the fast path this statement is also the seam's check (`_set_up`).
# It also reads the backend's real pid: behind a pooler (PgBouncer) the pid the startup sent is
# the pooler's own invention, and pids are what self-echo filtering, the probe of a silent
# statement and the cluster's check of who replied rely on.
_SESSION_SETUP = "SELECT set_config('idle_session_timeout', '0', false), pg_backend_pid()"
_SESSION_SETUP_RESULT = "0"
_PID_ONLY = "SELECT 1, pg_backend_pid()"

COMMAND_LOCK_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "pgbus_command_lock_timeout", default=None
)
"""Set by the command line around a command: every lock wait of that command's statements is
bounded by it (``lock_timeout``), and the error names the backend that held the lock."""

_PROBE = """
SELECT a.state, a.wait_event,
       (SELECT string_agg(format('backend %s (role %s, application_name %L)',
                                 b.pid, b.usename, b.application_name), ', ')
          FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(a.pid))) AS blockers
  FROM pg_stat_activity a WHERE a.pid = $1
"""


class Backoff:
    """Capped exponential backoff with full jitter; the first retry is immediate."""

    def __init__(self, initial: float = 0.05, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._last_warned = -math.inf

    def ceiling(self) -> float:
        """The longest the current step may wait: doubling from *initial*, capped."""
        if self.failures <= 1:
            return 0.0
        exponent = min(self.failures - 2, 64)  # 2 ** 64 * initial is past any cap
        return min(self.maximum, self.initial * 2.0**exponent)

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(0, self.ceiling())

    def should_warn(self) -> bool:
        """
        Whether this failure deserves a warning: each step while the ceiling still grows, then
        one per *maximum* seconds (so a server that stays down is said every few seconds, not
        at every retry).
        """
        now = trio.current_time()
        if self.ceiling() < self.maximum or now - self._last_warned >= self.maximum:
            self._last_warned = now
            return True
        return False

    def reset(self) -> None:
        self.failures = 0
        self._last_warned = -math.inf


class _ListenerProtocolConnection(asyncpg.Connection):
    """
    An asyncpg connection that can hand notifications straight to a sink.

    asyncpg's own path schedules one loop callback per notification (``add_listener``); under
    trio-asyncio each is a unit of Trio work. Here the protocol's parser calls the sink directly,
    while it is still inside the socket read that produced the notification.
    """

    def _set_sink(self, sink: NotificationSink) -> None:
        # An instance attribute shadows asyncpg's method: the parser calls the sink itself, one
        # Python call per notification, and no loop callback per notification. Without a sink
        # (the public path), asyncpg's own method hands them to add_listener's callbacks.
        self._process_notification = sink


class _Unanswered(Exception):
    """A statement got no reply and the server says its backend is not working on it."""


class Statement:
    """A statement `Connection.start` began; `Connection.finish` reads its reply."""

    __slots__ = ("awaited", "coroutine", "error", "task")

    def __init__(self, coroutine: Any, awaited: Any, error: BaseException | None, task: Any):
        self.coroutine = coroutine
        self.awaited = awaited  # what its coroutine waits for (the driven path)
        self.error = error  # what its first step raised (StopIteration: it is done)
        self.task = task  # the asyncio Task running it (the public path)

    def first(self) -> Any:
        """What the coroutine waits for after its first step; raises what that step raised."""
        if self.error is not None:
            raise self.error
        return self.awaited


class Connection:
    """
    One PostgreSQL connection, used from Trio, every wait on it bounded.

    Its socket is read by the Trio task that is waiting for it, not by trio-asyncio's reader
    task: after sending a statement, the caller waits for the socket itself and hands what
    arrives to asyncpg's parser, then carries on as soon as the reply is parsed. That saves,
    per reply, the hops through trio-asyncio's callback queue and a task switch or two, which
    is most of a statement's latency here. A listening connection is read by the listener task
    the same way, so notifications are parsed and delivered inside that task.

    The guard: a statement whose reply has not started within half of the bus's ``keepalive``
    is checked from a separate connection: if the server's backend is not running it (idle,
    stuck writing to a peer that does not read, or gone), the connection is half-open or lost;
    it is aborted and the statement raises `DatabaseUnavailableError`. A long query that the
    server is still running is left alone.
    """

    def __init__(self, raw: Any, db: Database, purpose: str, *, fast: bool) -> None:
        self._raw = raw
        self._db = db
        self._loop = db.loop
        self.purpose = purpose
        self.pid: int = raw.get_server_pid()
        self._transport: Any = getattr(raw, "_transport", None)
        self._nudge: trio.Event | None = None
        self._blockers: str | None = None
        """Who blocked the running statement when it was last looked at (see `_check_working`)."""
        self.driven = False
        """True when this task-driven path reads the socket (plain TCP or unix socket)."""
        self.driven_statements = fast
        """True when statements run from the calling task, not as asyncio Tasks."""
        self.fast_notifications = fast
        """True when the parser hands notifications straight to the sink."""
        self._plain_listeners: dict[str, Any] = {}
        protocol = getattr(raw, "_protocol", None)
        self._waiter_callback: Any = (
            getattr(protocol, "_on_waiter_completed", None) if fast else None
        )
        if fast and self._transport is not None:
            read_ready: Any = getattr(self._transport, "_read_ready", None)
            sock = self._transport.get_extra_info("socket")
            # Plain TCP and unix sockets only. An SSL transport decrypts in its own protocol, so
            # trio-asyncio keeps reading those sockets, and waits go through its callback queue.
            raw_socket = getattr(sock, "_sock", sock)
            self.driven = (
                DRIVE_SOCKETS
                and read_ready is not None
                and isinstance(raw_socket, socket.socket)
                and raw._transport.get_extra_info("sslcontext") is None
            )
            if self.driven:
                self._socket = raw_socket
                self._read_ready: Callable[[], None] = read_ready
                self._transport.pause_reading()  # from now on nobody else reads this socket
        db.own_pids.add(self.pid)

    @property
    def where(self) -> str:
        return self._db.where

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing (an EOF was read, or it was aborted)."""
        if self._raw.is_closed():
            return True
        return self._transport is not None and bool(self._transport.is_closing())

    # -- reading the socket ------------------------------------------------------------------

    async def receive(self) -> None:
        """
        Wait for the server and hand what it sent to asyncpg's parser (which calls the sink).

        On a connection trio-asyncio reads (SSL, or the public path), the sink has already run
        by then: this waits until `nudge` says there is work for the caller.
        """
        if self.driven:
            await trio.lowlevel.wait_readable(self._socket)
            self._read_ready()
        else:
            self._nudge = nudge = trio.Event()
            await nudge.wait()

    def nudge(self) -> None:
        """Wake a `receive` on a connection that trio-asyncio reads."""
        if self._nudge is not None:
            self._nudge.set()

    def hold_reading(self) -> None:
        """Read nothing more until `release_reading` (a driven socket is only read in receive)."""
        if not self.driven and self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def release_reading(self) -> None:
        if not self.driven and self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def poll(self) -> bool:
        """Read whatever is already there without waiting; False if the connection is gone."""
        if self.closed:
            return False
        if self.driven:
            readable, _, _ = select.select([self._socket], [], [], 0)
            if readable:
                self._read_ready()  # an EOF, or the server's farewell, marks it closed
        return not self.closed

    # -- statements --------------------------------------------------------------------------

    async def _wait(self, future: asyncio.Future[Any], pump: bool) -> None:
        silence = self._db.silence
        if pump and self.driven:
            while not future.done() and not self.closed:
                with trio.move_on_after(silence) as quiet:
                    await trio.lowlevel.wait_readable(self._socket)
                if quiet.cancelled_caught:
                    await self._check_working()
                    continue
                self._read_ready()
        if future.done():
            return
        # Completed from the asyncio loop (trio-asyncio's callback queue). Without *pump*,
        # another task reads this socket and may hold it on purpose (back-pressure): that
        # owner bounds the wait, so no silence check here.
        done = trio.Event()
        future.add_done_callback(lambda _: done.set())
        while not done.is_set():
            with trio.move_on_after(silence if pump else math.inf) as quiet:
                await done.wait()
            if quiet.cancelled_caught:
                await self._check_working()

    async def _check_working(self) -> None:
        if self._db.transaction_pooling:
            return  # the backend running it is the pooler's choice: nothing to ask about
        working, self._blockers = await self._db.probe_backend(self.pid)
        if not working:
            raise _Unanswered

    def start(self, method: Any, *args: Any) -> Statement:
        """
        Begin an asyncpg statement method from this synchronous call; `finish` reads its reply.

        On the task-driven path the statement is written to the server before this returns,
        so a sender can start it and leave its reply to another task (see `OutboundBridge`).
        Errors are raised by `finish`, translated like every statement's.
        """
        coroutine = method(*args)
        if not self.driven_statements:
            return Statement(coroutine, None, None, self._loop.create_task(coroutine))
        try:
            return Statement(coroutine, coroutine.send(None), None, None)
        except BaseException as exc:  # StopIteration too: finish returns its value
            return Statement(coroutine, None, exc, None)

    async def finish(self, statement: Statement, *, pump: bool = True) -> Any:
        """
        Wait for *statement*'s reply, driving its coroutine from this Trio task.

        With *pump* (the default) this task reads the socket until the reply is parsed; without
        it, another task is reading (the listener's), and completion comes by callback.
        Cancellation aborts the connection: a statement cut off halfway leaves the protocol in
        an unknown state, and the owners of connections reconnect anyway.
        """
        coroutine = statement.coroutine
        try:
            task = statement.task
            if task is not None:
                try:
                    await self._wait(task, pump)
                except BaseException:
                    task.cancel()
                    raise
                return task.result()
            awaited = statement.first()
            while True:
                if awaited is None:  # a bare yield (asyncio.sleep(0)): just reschedule
                    await trio.lowlevel.checkpoint()
                else:
                    future = _as_future(awaited)
                    if self._waiter_callback is not None:
                        # asyncpg's protocol schedules this on the loop when the reply
                        # completes the future; it only matters for asyncio cancellation
                        # (a cancelled statement here aborts the connection instead), and
                        # each run would wake trio-asyncio's loop task: one task switch
                        # per statement, on the latency path.
                        future.remove_done_callback(self._waiter_callback)
                    await self._wait(future, pump)
                awaited = coroutine.send(None)
        except StopIteration as done:
            return done.value
        except _Unanswered:
            coroutine.close()
            self.abort()
            raise self._unavailable(
                f"no answer within {self._db.silence:g}s and its backend is not working on it "
                "(a half-open connection?)"
            ) from None
        except _CONNECTION_ERRORS as exc:
            # Any other asyncpg.PostgresError is about the statement; the connection is fine.
            # In doubt, drop the socket: a connection in an unknown state is never reused.
            self.abort()
            raise DatabaseUnavailableError(
                self.where, _describe(exc), purpose=self.purpose
            ) from exc
        except asyncpg.LockNotAvailableError as exc:
            raise self._lock_wait_error(exc) from exc
        except asyncpg.InsufficientPrivilegeError as exc:
            raise DatabaseError("42501", f"{_first_line(exc)}; {GRANTS_HINT}") from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseError(exc.sqlstate or "?????", _first_line(exc)) from exc
        except asyncpg.InterfaceError as exc:
            self.abort()
            raise DatabaseUnavailableError(
                self.where, _describe(exc), purpose=self.purpose
            ) from exc
        except asyncio.CancelledError:
            # The wait was cancelled from Trio (the future was cancelled in its abort), and
            # asyncpg gave up: surface Trio's Cancelled, not asyncio's.
            self.abort()
            await trio.lowlevel.checkpoint()
            raise self._unavailable("statement cancelled") from None
        except BaseException:
            coroutine.close()
            self.abort()
            raise

    def _lock_wait_error(self, exc: asyncpg.PostgresError) -> DatabaseError:
        """A lock wait that ``lock_timeout`` ended, naming the backend that held the lock."""
        blockers, self._blockers = self._blockers, None
        if self._db.lock_timeout is None or "lock timeout" not in str(exc):
            return DatabaseError(exc.sqlstate or "55P03", _first_line(exc))
        holder = f"held by {blockers}" if blockers else "whose holder has let go since"
        return DatabaseError(
            "55P03",
            f"gave up after waiting {self._db.lock_timeout:g}s for a lock {holder} "
            f"(lock_timeout; {ENV_LOCK_TIMEOUT} sets it)",
        )

    async def _call(self, method: Any, *args: Any, pump: bool = True) -> Any:
        """Run an asyncpg statement method: `start` it, then `finish` it from this task."""
        return await self.finish(self.start(method, *args), pump=pump)

    def _unavailable(self, cause: str) -> DatabaseUnavailableError:
        return DatabaseUnavailableError(self.where, cause, purpose=self.purpose)

    async def execute(self, sql: str, *args: Any, pump: bool = True) -> str:
        """Run *sql*; returns the command tag. Raises `DatabaseError` if the server refuses."""
        return str(await self.finish(self.start_execute(sql, *args), pump=pump))

    def start_execute(self, sql: str, *args: Any) -> Statement:
        """`execute`, begun from a synchronous call: see `start`."""
        return self.start(self._raw.execute, sql, *args)

    async def fetch(self, sql: str, *args: Any, pump: bool = True) -> list[Any]:
        """Run *sql* and return its rows (each indexable by position and column name)."""
        return list(await self._call(self._raw.fetch, sql, *args, pump=pump))

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """Run *sql* and return its first row, or None."""
        return await self._call(self._raw.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """Run *sql* and return the first column of its first row, or None."""
        return await self._call(self._raw.fetchval, sql, *args)

    async def listen(self, channels: Sequence[str], *, pump: bool = True) -> None:
        """LISTEN on each of *channels* (exact names, quoted), in one round trip if possible."""
        if not channels:
            return
        if self.fast_notifications:
            sql = "; ".join(f"LISTEN {quote_ident(name)}" for name in channels)
            await self.execute(sql, pump=pump)
            return
        for name in channels:
            if name not in self._plain_listeners:
                self._plain_listeners[name] = callback = self._plain_callback
                await self._call(self._raw.add_listener, name, callback, pump=pump)

    async def unlisten(self, channel: str, *, pump: bool = True) -> None:
        """UNLISTEN *channel*."""
        if self.fast_notifications:
            await self.execute(f"UNLISTEN {quote_ident(channel)}", pump=pump)
            return
        callback = self._plain_listeners.pop(channel, None)
        if callback is not None:
            await self._call(self._raw.remove_listener, channel, callback, pump=pump)

    def _plain_callback(self, _connection: Any, pid: int, channel: str, payload: str) -> None:
        self._sink(pid, channel, payload)

    _sink: NotificationSink

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """
        A transaction for the block: COMMIT when it ends normally, ROLLBACK on an exception or
        a cancellation (shielded, bounded by the guard; a connection in doubt is aborted).
        """
        await self.execute("BEGIN")
        try:
            yield
        except BaseException:
            with trio.CancelScope(shield=True):
                if not self.closed:
                    try:
                        await self.execute("ROLLBACK")
                    except (DatabaseUnavailableError, DatabaseError):
                        self.abort()
            raise
        await self.execute("COMMIT")

    def abort(self) -> None:
        """Drop the socket at once: for a connection already known to be broken."""
        self._db.own_pids.discard(self.pid)
        self._raw.terminate()

    async def aclose(self) -> None:
        """Close gracefully (the server sees a Terminate); abort if that takes too long."""
        self._db.own_pids.discard(self.pid)
        if self.closed:
            self._raw.terminate()
            return
        with trio.CancelScope(shield=True):
            # asyncpg's close waits for the server to hang up: let the loop read the socket.
            if self._transport is not None and (self.driven or not self._transport.is_reading()):
                self._transport.resume_reading()
            try:
                close = trio_asyncio.aio_as_trio(self._raw.close, loop=self._loop)
                await close(timeout=min(2.0, self._db.silence))
            except Exception:
                self._raw.terminate()


def _as_future(awaited: object) -> asyncio.Future[Any]:
    """What an asyncpg coroutine yielded: a Future for the statement paths pgbus uses."""
    if not isinstance(awaited, asyncio.Future):
        raise _SeamError(f"asyncpg awaited {awaited!r}, which pgbus cannot drive")
    awaited._asyncio_future_blocking = False  # what an asyncio Task does before waiting
    return awaited


class _SeamError(Exception):
    """A hook of the driver seam misbehaved."""


def _fast_path_problem(raw: Any) -> str | None:
    """Why the hooks pgbus relies on are missing on this asyncpg connection, or None."""
    if "_process_notification" not in vars(asyncpg.Connection):
        return "asyncpg.Connection._process_notification is gone"
    transport = getattr(raw, "_transport", None)
    if transport is None:
        return "the connection has no _transport"
    for name in ("pause_reading", "resume_reading", "is_reading", "get_extra_info"):
        if not callable(getattr(transport, name, None)):
            return f"the transport has no {name}()"
    if not hasattr(transport, "max_size"):
        return "the transport has no max_size"
    return None


class Database:
    """
    Opens pgbus's connections to one PostgreSQL, remembers their backend pids, and keeps a
    small pool of idle connections for one-off statements and transactions.
    """

    def __init__(
        self,
        dsn: str,
        application_name: str,
        loop: Any,
        keepalive: float,
        *,
        transaction_pooling: bool = False,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        """The most connections `borrow(limited=True)` callers hold at once."""
        self._slots = trio.Semaphore(pool_size)
        self.transaction_pooling = transaction_pooling
        """Behind a transaction-pooling proxy: each statement may run on another server session,
        so no prepared statement is kept and no session setting is made."""
        self.application_name = application_name
        self.where = describe_dsn(dsn)
        self.loop = loop
        self.keepalive = keepalive
        self.silence = keepalive / 2
        """How long a statement may go unanswered before the server is asked about it."""
        self.own_pids: set[int] = set()
        """Backend pids of every connection this bus has open (for self-echo filtering)."""
        self._idle: list[Connection] = []
        self._fast = True
        self._session_setup = not transaction_pooling
        self.lock_timeout = COMMAND_LOCK_TIMEOUT.get()
        """Seconds a statement may wait for a lock (commands only; None: as the server says)."""
        if self.lock_timeout is not None:
            # Look at a waiting statement before its lock wait ends, to name who blocks it.
            self.silence = min(self.silence, self.lock_timeout / 2)
        """False once the server refused `_SESSION_SETUP` (or is older than 14)."""

    async def connect(
        self,
        purpose: str,
        *,
        sink: NotificationSink | None = None,
        on_lost: Callable[[Connection], None] | None = None,
        timeout: float | None = None,
    ) -> Connection:
        """
        Open one connection named ``<application_name>:<purpose>`` in pg_stat_activity.

        With *sink*, notifications go straight to it; ``on_lost(connection)`` is called once
        when the connection breaks or is closed (from the loop, soon after). Waits at most
        *timeout* seconds (default: ``keepalive``).

        Raises:
            DatabaseUnavailableError: the server cannot be reached (``fatal`` is set when retrying
                cannot help: bad password, unknown database, role or setting, a refused DSN).
        """
        name = f"{self.application_name}:{purpose}"[:63]
        raw = await self._open(name, self.keepalive if timeout is None else timeout)
        fast = self._fast
        if fast:
            problem = _fast_path_problem(raw)
            if problem is not None:
                self._fall_back(problem)
                fast = False
        connection = Connection(raw, self, purpose, fast=fast)
        if on_lost is not None:
            raw.add_termination_listener(lambda _raw: on_lost(connection))
        if sink is not None:
            connection._sink = sink
            if fast:
                raw._set_sink(sink)
                # Read a listening socket in small bites (asyncio's default is 256 KiB,
                # thousands of notifications): between two reads the consumers get to run, so a
                # burst flows into bounded channels directly instead of spilling into a backlog.
                raw._transport.max_size = LISTEN_READ_SIZE
        if not await self._set_up(connection):
            connection.abort()
            return await self.connect(purpose, sink=sink, on_lost=on_lost, timeout=timeout)
        if self.lock_timeout is not None:
            milliseconds = str(max(1, round(self.lock_timeout * 1000)))
            await connection.fetchval("SELECT set_config('lock_timeout', $1, false)", milliseconds)
        return connection

    async def _open(self, name: str, timeout: float) -> Any:
        connect = trio_asyncio.aio_as_trio(asyncpg.connect, loop=self.loop)
        try:
            raw = await connect(
                self.dsn,
                timeout=timeout,
                server_settings={"application_name": name},
                connection_class=_ListenerProtocolConnection,
                # Behind a transaction pooler a named prepared statement would be looked for on
                # another server session: unnamed statements only.
                statement_cache_size=0 if self.transaction_pooling else 100,
            )
        except _CONNECTION_ERRORS as exc:
            raise DatabaseUnavailableError(self.where, _describe(exc)) from None
        except _FATAL_CONNECT_ERRORS as exc:
            raise DatabaseUnavailableError(self.where, _describe(exc), fatal=True) from None
        if raw.get_server_version() < (14,):
            self._session_setup = False  # no idle_session_timeout to opt out of
        return raw

    async def _set_up(self, connection: Connection) -> bool:
        """
        Apply pgbus's session settings in one statement, which on the fast path is also the check
        that a statement driven from Trio works: False (fall back) when that check fails.

        A server or pooler that refuses the setting gets one warning; the connection is used
        without it (and so are later ones).
        """
        if self.transaction_pooling and not connection.driven_statements:
            return True  # no session to set up, and each statement may run on another backend
        sql, expected = (
            (_SESSION_SETUP, _SESSION_SETUP_RESULT) if self._session_setup else (_PID_ONLY, 1)
        )
        try:
            value, pid = await connection.fetchrow(sql)
        except DatabaseError as exc:
            if not self._session_setup:
                raise
            self._session_setup = False
            log.warning(
                "%s refuses SET idle_session_timeout = 0 (%s); pgbus's idle connections are "
                "not protected from a server-wide idle_session_timeout",
                self.where,
                exc,
            )
            return await self._set_up(connection)
        except (_SeamError, RuntimeError, TypeError, AttributeError) as exc:
            if not connection.driven_statements:
                raise
            self._fall_back(f"driving a statement failed: {exc!r}")
            return False
        if value != expected:
            self._fall_back(f"a statement driven from Trio returned {value!r}")
            return False
        if pid != connection.pid and not self.transaction_pooling:
            self.own_pids.discard(connection.pid)
            connection.pid = pid
            self.own_pids.add(pid)
        return True

    def _fall_back(self, problem: str) -> None:
        if self._fast:
            self._fast = False
            log.warning(
                "pgbus's fast path does not fit this asyncpg %s (%s); using asyncpg's public "
                "API instead (slower). Please report it.",
                asyncpg.__version__,
                problem,
            )

    @property
    def fast(self) -> bool:
        """False once a hook of the driver seam failed its check (see the module's docstring)."""
        return self._fast

    async def probe_backend(self, pid: int) -> tuple[bool, str | None]:
        """
        Whether backend *pid* is running a statement (asked on a fresh connection, bounded by
        half of ``keepalive``), and which backends block it, if any (``backend 12 (role r,
        application_name 'a')``). Not working when it is idle, writing to a client that does not
        read, gone, or when the server cannot be asked: a statement waiting on it gets no reply.
        """
        try:
            with trio.fail_after(self.silence):
                raw = await self._open(f"{self.application_name}:probe"[:63], self.silence)
                try:
                    row = await trio_asyncio.aio_as_trio(raw.fetchrow, loop=self.loop)(_PROBE, pid)
                finally:
                    raw.terminate()
        except Exception:  # whatever stops us asking also stops the statement's reply
            return False, None
        if row is None:
            return False, None
        working = row["state"] == "active" and row["wait_event"] != "ClientWrite"
        return working, row["blockers"]

    async def backend_is_working(self, pid: int) -> bool:
        """`probe_backend`'s first half."""
        working, _blockers = await self.probe_backend(pid)
        return working

    @asynccontextmanager
    async def connection(self, purpose: str) -> AsyncIterator[Connection]:
        """A connection for the duration of a block, closed (never left behind) on exit."""
        connection = await self.connect(purpose)
        try:
            yield connection
        finally:
            await connection.aclose()

    @asynccontextmanager
    async def borrow(self, *, limited: bool = False) -> AsyncIterator[Connection]:
        """
        A connection from the pool; one left in doubt is closed, never reused. *limited* (the
        bus's calls on behalf of its user): at most `pool_size` such borrowers at once, the
        others wait, at most `POOL_WAIT` seconds (then `PoolExhaustedError`); a task already
        holding a slot does not wait again. Without (pgbus's services, a few each): no wait.
        """
        task = trio.lowlevel.current_task()
        if not limited or _SLOT_HOLDER.get(None) is task:
            async with self._connection_from_pool() as connection:
                yield connection
            return
        with trio.move_on_after(POOL_WAIT) as waiting:
            await self._slots.acquire()
        if waiting.cancelled_caught:
            raise PoolExhaustedError(self.where, self.pool_size, POOL_WAIT)
        token = _SLOT_HOLDER.set(task)
        try:
            async with self._connection_from_pool() as connection:
                yield connection
        finally:
            _SLOT_HOLDER.reset(token)
            self._slots.release()

    @asynccontextmanager
    async def _connection_from_pool(self) -> AsyncIterator[Connection]:
        connection = None
        while self._idle and connection is None:
            candidate = self._idle.pop()
            if candidate.poll():  # the server may have ended it while it sat idle
                connection = candidate
            else:
                candidate.abort()
        if connection is None:
            connection = await self.connect("pool")
        reusable = False
        try:
            yield connection
            reusable = not connection.closed
        finally:
            if reusable and len(self._idle) < POOL_IDLE_MAX:
                self._idle.append(connection)
            else:
                with trio.CancelScope(shield=True):
                    await connection.aclose()

    async def close_idle(self) -> None:
        """Close the pool's idle connections."""
        while self._idle:
            await self._idle.pop().aclose()

    async def publish(self, connection: Connection, channel: str, payloads: Sequence[str]) -> None:
        """Send *payloads* to *channel* in order, in one statement, hence one transaction."""
        await connection.finish(self.start_publish(connection, channel, payloads))

    def start_publish(
        self, connection: Connection, channel: str, payloads: Sequence[str]
    ) -> Statement:
        """`publish`, begun from a synchronous call (`Connection.start`); finish it there."""
        if len(payloads) == 1:
            return start_publish_each(connection, (channel,), payloads)
        return connection.start_execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", channel, payloads
        )


async def connect_with_retry(
    db: Database, purpose: str, backoff: Backoff, **kwargs: Any
) -> Connection:
    """Connect, retrying with *backoff* while the server is unreachable; fatal errors raise."""
    while True:
        try:
            connection = await db.connect(purpose, **kwargs)
        except DatabaseUnavailableError as exc:
            if exc.fatal:
                raise
            delay = backoff.next_delay()
            level = logging.WARNING if backoff.should_warn() else logging.DEBUG
            log.log(level, "%s: %s; %s", purpose, exc, retrying_in(delay, backoff.failures))
            await trio.sleep(delay)
            continue
        if backoff.failures:
            log.warning("%s: connected to %s again", purpose, db.where)
        backoff.reset()
        return connection


def retrying_in(delay: float, failures: int) -> str:
    """``retrying now`` or ``retrying in 0.31s``, and how many attempts failed so far."""
    when = "retrying now" if delay < 0.005 else f"retrying in {delay:.2f}s"
    return f"{when} ({failures} failed attempt{'' if failures == 1 else 's'})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _describe(exc: BaseException) -> str:
    text = _first_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@asynccontextmanager
async def open_database(
    dsn: str,
    application_name: str,
    *,
    keepalive: float = 10.0,
    transaction_pooling: bool = False,
    pool_size: int = DEFAULT_POOL_SIZE,
) -> AsyncIterator[Database]:
    """Run a trio-asyncio loop for asyncpg for the duration of the block."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        database = Database(
            dsn,
            application_name,
            loop,
            keepalive,
            transaction_pooling=transaction_pooling,
            pool_size=pool_size,
        )
        try:
            yield database
        finally:
            with trio.CancelScope(shield=True):
                await database.close_idle()


def _log_asyncio_error(loop: Any, context: dict[str, Any]) -> None:
    """
    Log what asyncio reports about stray futures, instead of failing the bus.

    trio-asyncio's default handler re-raises these into its nursery, which would take the whole
    bus down because, say, a connection attempt was cancelled while the server was answering.
    Every error that matters reaches pgbus through the call that awaited it.
    """
    log.debug("asyncio: %s: %r", context.get("message"), context.get("exception"))


async def publish_each(
    connection: Connection, channels: Sequence[str], payloads: Sequence[str]
) -> None:
    """
    Send ``payloads[i]`` to ``channels[i]`` for every i, in order, in one statement (so one
    transaction: the caller keeps (channel, payload) pairs distinct, or PostgreSQL merges them).
    """
    await connection.finish(start_publish_each(connection, channels, payloads))


def start_publish_each(
    connection: Connection, channels: Sequence[str], payloads: Sequence[str]
) -> Statement:
    """`publish_each`, begun from a synchronous call (`Connection.start`); finish it there."""
    if len(payloads) == 1:
        return connection.start_execute("SELECT pg_notify($1, $2)", channels[0], payloads[0])
    return connection.start_execute(
        "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
        channels,
        payloads,
    )


class AdminError(Exception):
    """`run_admin` could not connect or run its job; *cause* is one line."""

    def __init__(self, cause: str) -> None:
        self.cause = cause
        super().__init__(cause)


def run_admin(
    dsn: str, job: Callable[[Any], Awaitable[None]], *, application_name: str, timeout: float
) -> None:
    """
    Run ``await job(connection)`` on a fresh connection, on a new asyncio loop in this thread
    (for `pgbus.testing`'s scratch databases: no Trio involved). The connection offers
    ``execute(sql)`` and ``fetch(sql)``; it is closed afterwards.

    Raises:
        AdminError: the server could not be reached, or refused a statement.
    """

    async def main() -> None:
        connection = await asyncpg.connect(
            dsn, timeout=timeout, server_settings={"application_name": application_name}
        )
        try:
            await job(connection)
        finally:
            await connection.close(timeout=timeout)

    try:
        asyncio.run(main())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise AdminError(_first_line(exc) or type(exc).__name__) from exc
