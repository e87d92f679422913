"""
The PostgreSQL adapter: the only module that imports asyncpg and trio_asyncio.

asyncpg runs on the trio-asyncio loop the bus opens; everything here is called from Trio. Driver
errors are translated once, here, into `DatabaseUnavailableError` (the connection is gone or
cannot be made) — the rest of pgbus never sees an asyncpg exception type.
"""

from __future__ import annotations

import asyncio
import logging
import select
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import trio
import trio_asyncio

from ._dsn import describe_dsn
from ._errors import DatabaseError, DatabaseUnavailableError

log = logging.getLogger("pgbus.bridge")

DRIVE_SOCKETS = True
"""Read plain sockets from the waiting Trio task (see `Connection`); off: trio-asyncio reads."""

LISTEN_READ_SIZE = 8192
"""Bytes per read on a listening connection: about 250 small notifications."""

NotificationSink = Callable[[int, str, str], None]
"""Called synchronously, in Trio context, for each notification: ``sink(pid, channel, payload)``."""

# Errors that mean "this connection is gone, or none can be made right now": retry them.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a query sent just as the server ended the session
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.PostgresConnectionError,
)
# Errors that no amount of retrying fixes.
_FATAL_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
)

_RETRYABLE_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    *_CONNECTION_ERRORS,
    asyncpg.PostgresError,
)


class _ListenerProtocolConnection(asyncpg.Connection):
    """
    An asyncpg connection that hands notifications straight to a sink.

    asyncpg's own path schedules one loop callback per notification (``add_listener``); under
    trio-asyncio each is a unit of Trio work. Here the protocol's parser calls the sink directly,
    while it is still inside the socket read that produced the notification.
    """

    _pgbus_on_lost: Callable[[], None] | None = None

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        """Without a sink, notifications are dropped (this connection never LISTENs)."""

    def _set_sink(self, sink: NotificationSink) -> None:
        # An instance attribute shadows the method: the parser calls the sink itself, one
        # Python call per notification instead of two.
        self._process_notification = sink  # type: ignore[method-assign,assignment]

    def _cleanup(self) -> None:
        super()._cleanup()  # type: ignore[misc]
        on_lost = self._pgbus_on_lost
        if on_lost is not None:
            self._pgbus_on_lost = None
            on_lost()


class Connection:
    """
    One PostgreSQL connection, used from Trio.

    Its socket is read by the Trio task that is waiting for it, not by trio-asyncio's reader
    task: after sending a statement, the caller waits for the socket itself and hands what
    arrives to asyncpg's parser, then carries on as soon as the reply is parsed. That saves,
    per reply, the hops through trio-asyncio's callback queue and a task switch or two, which
    is most of a statement's latency here. A listening connection is read by the listener task
    the same way, so notifications are parsed and delivered inside that task.
    """

    def __init__(self, raw: Any, loop: Any, purpose: str) -> None:
        self._raw = raw
        self._loop = loop
        self.purpose = purpose
        self.pid: int = raw.get_server_pid()
        self._transport = raw._transport
        self._nudge: trio.Event | None = None
        read_ready: Any = getattr(self._transport, "_read_ready", None)
        socket = self._transport.get_extra_info("socket")
        # Plain TCP and unix sockets only. An SSL transport decrypts in its own protocol, so
        # trio-asyncio keeps reading those sockets, and waits go through its callback queue.
        self.driven = DRIVE_SOCKETS and read_ready is not None and socket is not None
        if self.driven:
            self._socket = getattr(socket, "_sock", socket)
            self._read_ready: Callable[[], None] = read_ready
            self._transport.pause_reading()  # from now on nobody else reads this socket

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing (an EOF was read, or it was aborted)."""
        return bool(self._raw.is_closed()) or self._transport.is_closing()

    # -- reading the socket ------------------------------------------------------------------

    async def receive(self) -> None:
        """
        Wait for the server and hand what it sent to asyncpg's parser (which calls the sink).

        On a connection trio-asyncio reads (SSL), the sink has already run by then: this waits
        until `nudge` says there is work for the caller.
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
        if not self.driven and not self.closed:
            self._transport.pause_reading()

    def release_reading(self) -> None:
        if not self.driven and not self.closed:
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

    async def _wait(self, future: asyncio.Future[Any], pump: bool) -> None:
        if pump and self.driven and not self.closed:
            while not future.done():
                if self.closed:  # EOF read: asyncio completes the future from its loop
                    break
                await trio.lowlevel.wait_readable(self._socket)
                self._read_ready()
        if not future.done():
            await _wait_for_callback(future)

    async def _call(self, method: Any, *args: Any, pump: bool = True, **kwargs: Any) -> Any:
        """
        Run an asyncpg statement method, driving its coroutine from this Trio task.

        With *pump* (the default) this task reads the socket until the reply is parsed; without
        it, another task is reading (the listener's), and completion comes by callback.
        Cancellation aborts the connection: a statement cut off halfway leaves the protocol in
        an unknown state, and the owners of connections reconnect anyway.
        """
        coroutine = method(*args, **kwargs)
        try:
            future = coroutine.send(None)
            while True:
                await self._wait(_as_future(future), pump)
                future = coroutine.send(None)
        except StopIteration as done:
            return done.value
        except _CONNECTION_ERRORS as exc:
            # Any other asyncpg.PostgresError is about the statement; the connection is fine.
            # In doubt, drop the socket: a connection in an unknown state is never reused.
            self._raw.terminate()
            raise DatabaseUnavailableError(self.purpose, _describe(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseError(exc.sqlstate or "?????", _first_line(exc)) from exc
        except asyncio.CancelledError:
            # The wait was cancelled from Trio (the future was cancelled in its abort), and
            # asyncpg gave up: surface Trio's Cancelled, not asyncio's.
            self._raw.terminate()
            await trio.lowlevel.checkpoint()
            raise DatabaseUnavailableError(self.purpose, "statement cancelled") from None
        except BaseException:
            coroutine.close()
            self._raw.terminate()
            raise

    async def execute(self, sql: str, *args: Any, pump: bool = True) -> str:
        return str(await self._call(self._raw.execute, sql, *args, pump=pump))

    async def fetch(self, sql: str, *args: Any, pump: bool = True) -> list[Any]:
        return list(await self._call(self._raw.fetch, sql, *args, pump=pump))

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._call(self._raw.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._call(self._raw.fetchval, sql, *args)

    def transaction(self) -> Any:
        """An asyncpg transaction object; drive it with `run` (start/commit/rollback)."""
        return self._raw.transaction()

    async def run(self, coroutine_function: Any, *args: Any) -> Any:
        """Run an asyncpg coroutine function belonging to this connection."""
        return await self._call(coroutine_function, *args)

    def abort(self) -> None:
        """Drop the socket at once: for a connection already known to be broken."""
        self._raw.terminate()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close gracefully (the server sees a Terminate); abort if that takes over *timeout*."""
        if self.closed:
            self._raw.terminate()
            return
        with trio.CancelScope(shield=True):
            # asyncpg's close waits for the server to hang up: let the loop read the socket.
            if self.driven or not self._transport.is_reading():
                self._transport.resume_reading()
            try:
                await trio_asyncio.aio_as_trio(self._raw.close, loop=self._loop)(timeout=timeout)
            except Exception:
                self._raw.terminate()


def _as_future(awaited: object) -> asyncio.Future[Any]:
    """What an asyncpg coroutine yielded: always a Future for the statement paths pgbus uses."""
    if not isinstance(awaited, asyncio.Future):
        raise TypeError(f"asyncpg awaited {awaited!r}, which pgbus cannot drive")
    awaited._asyncio_future_blocking = False  # what an asyncio Task does before waiting
    return awaited


async def _wait_for_callback(future: asyncio.Future[Any]) -> None:
    """Wait for *future* to be completed by the asyncio loop (trio-asyncio's callback queue)."""
    task = trio.lowlevel.current_task()
    future.add_done_callback(lambda _: trio.lowlevel.reschedule(task))

    def abort(_: Any) -> trio.lowlevel.Abort:
        future.cancel()
        return trio.lowlevel.Abort.FAILED  # resumed by the done callback, as always

    await trio.lowlevel.wait_task_rescheduled(abort)


class Database:
    """Opens pgbus's connections to one PostgreSQL and remembers their backend pids."""

    def __init__(self, dsn: str, application_name: str, loop: Any) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.where = describe_dsn(dsn)
        self._loop = loop
        self.own_pids: set[int] = set()
        """Backend pids of every connection this bus opened (for self-echo filtering)."""

    async def connect(
        self,
        purpose: str,
        *,
        sink: NotificationSink | None = None,
        on_lost: Callable[[], None] | None = None,
        timeout: float = 10.0,
    ) -> Connection:
        """
        Open one connection named ``<application_name>:<purpose>`` in pg_stat_activity.

        With *sink*, notifications go straight to it (see `_ListenerProtocolConnection`);
        *on_lost* is called once if the connection breaks.

        Raises:
            DatabaseUnavailableError: the server cannot be reached (``fatal`` is set when retrying
                cannot help: bad password, unknown database or role).
        """
        name = f"{self.application_name}:{purpose}"[:63]
        try:
            raw = await trio_asyncio.aio_as_trio(asyncpg.connect, loop=self._loop)(
                self.dsn,
                timeout=timeout,
                server_settings={"application_name": name},
                connection_class=_ListenerProtocolConnection,
            )
        except _FATAL_CONNECT_ERRORS as exc:
            raise DatabaseUnavailableError(self.where, _describe(exc), fatal=True) from None
        except _RETRYABLE_CONNECT_ERRORS as exc:
            raise DatabaseUnavailableError(self.where, _describe(exc)) from None
        if sink is not None:
            raw._set_sink(sink)
            # Read a listening socket in small bites (asyncio's default is 256 KiB, thousands of
            # notifications): between two reads the consumers get to run, so a burst flows into
            # bounded channels directly instead of spilling into the listener's backlog.
            raw._transport.max_size = LISTEN_READ_SIZE
        raw._pgbus_on_lost = on_lost
        connection = Connection(raw, self._loop, purpose)
        self.own_pids.add(connection.pid)
        return connection

    @asynccontextmanager
    async def connection(self, purpose: str) -> AsyncIterator[Connection]:
        """A connection for the duration of a block, closed (never left behind) on exit."""
        connection = await self.connect(purpose)
        try:
            yield connection
        finally:
            self.own_pids.discard(connection.pid)
            await connection.aclose()

    async def publish(self, connection: Connection, channel: str, payloads: Sequence[str]) -> None:
        """Send *payloads* to *channel* in order, in one statement, hence one transaction."""
        if len(payloads) == 1:
            await connection.execute("SELECT pg_notify($1, $2)", channel, payloads[0])
        else:
            await connection.execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", channel, payloads
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _describe(exc: BaseException) -> str:
    text = _first_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@asynccontextmanager
async def open_database(dsn: str, application_name: str) -> AsyncIterator[Database]:
    """Run a trio-asyncio loop for asyncpg for the duration of the block."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        yield Database(dsn, application_name, loop)


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
    if len(payloads) == 1:
        await connection.execute("SELECT pg_notify($1, $2)", channels[0], payloads[0])
    else:
        await connection.execute(
            "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
            channels,
            payloads,
        )
