"""
The dashboard's data loop (`Dashboard`) and its HTTP endpoints (`DashboardApp`).

One `Dashboard` reads the database for every viewer: at most once per ``refresh`` seconds, on a
connection of its own (never one of the bus's), and only while somebody looks (a page open, or
``/status.json`` asked within the last `IDLE_AFTER` seconds); then it closes its connection.
Every wait on the database is bounded by `REFRESH_TIMEOUT`; a failure is shown on the page,
never raised into the bus.

Endpoints: ``/`` (the page), ``/dashboard.css``, ``/dashboard.js`` (shipped in
``pgbus/_dashboard/static``), ``/status.json`` (the latest snapshot) and ``/events`` (server-sent
events: one snapshot per refresh). With actions allowed (``pgbus dashboard --allow-actions``),
``POST /actions/dead-letters`` retries or purges dead letters, given the token.
"""

from __future__ import annotations

import datetime
import hmac
import json
import logging
import math
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio

from .._dsn import describe_dsn, redact_dsn
from .._errors import ConfigError, MetricsUnavailableError, PgbusError
from . import DEFAULT_REFRESH
from ._data import local_overview, message_counts, rates_between, read_overview

if TYPE_CHECKING:
    from .._bus import Bus
    from .._pg import Connection, Database

log = logging.getLogger("pgbus.dashboard")


MIN_REFRESH, MAX_REFRESH = 0.2, 60.0
"""The bounds of ``refresh`` (``pgbus dashboard --refresh``)."""

REFRESH_TIMEOUT = 5.0
"""How long one read of the database (connecting included) may take; past it, it is abandoned."""

IDLE_AFTER = 30.0
"""Seconds after the last ``/status.json`` request (with no page open) before reading stops."""

ACTIONS = ("retry", "purge")


def check_refresh(seconds: float) -> float:
    """
    *seconds*, if it is a valid refresh interval.

    Raises:
        ValueError: naming the bounds and the value.
    """
    if not (MIN_REFRESH <= seconds <= MAX_REFRESH) or math.isnan(seconds):
        raise ValueError(
            f"must be between {MIN_REFRESH:g} and {MAX_REFRESH:g} seconds (got {seconds:g})"
        )
    return seconds


class Dashboard:
    """
    What the dashboard shows, refreshed for all viewers at once.

    *database* is where the cluster is read from (None: a bus without PostgreSQL, shown without
    a cluster); *bus*, when the bus itself serves the page, adds its own channels, bridges (with
    rates) and actors. `run` is the loop; `current` and `stream` are for viewers.
    """

    def __init__(
        self,
        database: Database | None,
        *,
        where: str,
        bus: Bus | None = None,
        refresh: float = DEFAULT_REFRESH,
        actions_token: str | None = None,
    ) -> None:
        self.where = where
        self.refresh = check_refresh(refresh)
        self.actions_token = actions_token
        """Set (``--allow-actions``): dead letters may be retried and purged with this token."""
        self._database = database
        self._bus = bus
        self._connection: Connection | None = None
        self._snapshot: dict[str, Any] | None = None
        self._taken_at = -math.inf
        self._serial = 0
        self._changed = trio.Event()
        self._demand = trio.Event()
        self._viewers = 0
        self._wanted_until = -math.inf
        self._counts: dict[tuple[str, str, str], int] | None = None
        self._counted_at = 0.0
        self._cluster: dict[str, Any] | None = None
        self._lock = trio.Lock()

    @classmethod
    def of_bus(cls, bus: Bus, *, refresh: float = DEFAULT_REFRESH) -> Dashboard:
        """The dashboard a bus serves: its cluster, read on a connection of its own, and itself."""
        if bus.dsn is None:
            return cls(None, where="no PostgreSQL", bus=bus, refresh=refresh)
        return cls(bus._database(), where=describe_dsn(bus.dsn), bus=bus, refresh=refresh)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh while somebody looks, until cancelled; closes its connection on the way out."""
        task_status.started()
        try:
            while True:
                if not self._wanted():
                    await self._release()
                    self._counts = None  # rates start again from the next look
                    await self._demand.wait()
                self._demand = trio.Event()
                await self.refresh_now()
                await trio.sleep(self.refresh)
        finally:
            await self._release()

    def _wanted(self) -> bool:
        return self._viewers > 0 or trio.current_time() < self._wanted_until

    def _want(self) -> None:
        self._wanted_until = trio.current_time() + IDLE_AFTER
        self._demand.set()

    async def current(self) -> dict[str, Any]:
        """The latest snapshot, waiting (bounded) for a fresh one if nobody was looking."""
        self._want()
        if trio.current_time() - self._taken_at > 2 * self.refresh:
            with trio.move_on_after(REFRESH_TIMEOUT + self.refresh):
                await self._changed.wait()
        return self._snapshot or self._empty("the first read of the database is not done yet")

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        """The current snapshot, then each new one, for as long as the caller iterates."""
        self._viewers += 1
        self._want()
        try:
            yield await self.current()
            while True:
                await self._changed.wait()
                assert self._snapshot is not None
                yield self._snapshot
        finally:
            self._viewers -= 1

    async def refresh_now(self) -> None:
        """Read everything once (bounded by `REFRESH_TIMEOUT`) and tell the viewers."""
        async with self._lock:
            error = None
            if self._database is not None:
                try:
                    self._cluster = await self._read_cluster()
                except PgbusError as exc:
                    error = redact_dsn(str(exc))
                    log.debug("dashboard: %s", error)
            self._serial += 1
            self._snapshot = self._make_snapshot(error)
            self._taken_at = trio.current_time()
            self._changed.set()
            self._changed = trio.Event()

    async def _read_cluster(self) -> dict[str, Any]:
        with trio.move_on_after(REFRESH_TIMEOUT):
            try:
                return await read_overview(await self._connected())
            except PgbusError:
                self._abort()
                raise
        self._abort()
        raise _NoAnswer(f"PostgreSQL at {self.where} did not answer within {REFRESH_TIMEOUT:g}s")

    async def _connected(self) -> Connection:
        assert self._database is not None
        if self._connection is None or self._connection.closed:
            self._abort()
            self._connection = await self._database.connect("dashboard", timeout=REFRESH_TIMEOUT)
        return self._connection

    def _abort(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()

    async def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()  # shielded and bounded

    def _make_snapshot(self, error: str | None) -> dict[str, Any]:
        snapshot = self._empty(error)
        snapshot["cluster"] = self._cluster
        snapshot["stale"] = error is not None and self._cluster is not None
        if self._bus is not None:
            stats = self._bus.statistics()
            now = trio.current_time()
            counts = message_counts(stats)
            rates = (
                rates_between(self._counts, counts, now - self._counted_at)
                if self._counts is not None
                else {}
            )
            self._counts, self._counted_at = counts, now
            snapshot["local"] = local_overview(stats, rates, self._bus.node)
        return snapshot

    def _empty(self, error: str | None) -> dict[str, Any]:
        return {
            "serial": self._serial,
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "where": self.where,
            "refresh": self.refresh,
            "error": error,
            "stale": False,
            "cluster": None,
            "local": None,
            "actions": self.actions_token is not None,
        }

    async def act(self, action: str, channel: str, group: str, ids: list[int] | None) -> int:
        """Retry or purge dead letters of (*channel*, *group*) (*ids*, or all); how many."""
        from .._durable._admin import purge_dead_letters, retry_dead_letters

        function = retry_dead_letters if action == "retry" else purge_dead_letters
        async with self._lock:
            with trio.move_on_after(REFRESH_TIMEOUT):
                try:
                    count = await function(await self._connected(), channel, group, ids)
                except PgbusError:
                    self._abort()
                    raise
                log.info(
                    "dashboard: %s %d dead letter(s) of %r group %r", action, count, channel, group
                )
                return count
            self._abort()
        raise _NoAnswer(f"PostgreSQL at {self.where} did not answer within {REFRESH_TIMEOUT:g}s")


class _NoAnswer(PgbusError):
    """A read of the database took longer than `REFRESH_TIMEOUT`."""


async def serve_dashboard(
    dsn: str,
    listen: str,
    *,
    refresh: float = DEFAULT_REFRESH,
    actions_token: str | None = None,
    application_name: str = "pgbus",
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Serve the dashboard of the cluster at *dsn* on *listen* (``"HOST:PORT"``), without a bus,
    until cancelled (``pgbus dashboard``); ``task_status.started`` gets the page's URL.

    The address is taken and the database reached once before anything is served, so a taken
    port or a wrong DSN fails at once; later failures of the database are shown on the page.

    Raises:
        ConfigError: *listen* is not ``"HOST:PORT"``.
        MetricsUnavailableError: the ``metrics`` extra (hypercorn) is missing, or *listen*
            cannot be bound.
        DatabaseUnavailableError: the database cannot be reached at start.
    """
    from .._metrics import listen_socket, parse_listen, serve_asgi
    from .._pg import open_database

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"dashboard listen {exc}.") from None
    try:
        import hypercorn.trio  # noqa: F401
    except ImportError as exc:
        raise MetricsUnavailableError(
            f"the dashboard needs the 'metrics' extra: pip install 'pgbus[metrics]' ({exc})."
        ) from None
    sock = listen_socket(host, port, "dashboard")
    try:
        async with open_database(dsn, application_name) as database:
            dashboard = Dashboard(
                database, where=describe_dsn(dsn), refresh=refresh, actions_token=actions_token
            )
            with trio.move_on_after(REFRESH_TIMEOUT):
                await dashboard._connected()
            if dashboard._connection is None:
                raise _NoAnswer(
                    f"PostgreSQL at {describe_dsn(dsn)} did not answer within {REFRESH_TIMEOUT:g}s"
                )
            async with trio.open_nursery() as nursery:
                await nursery.start(dashboard.run)
                url = await nursery.start(serve_asgi, DashboardApp(dashboard), sock)
                task_status.started(f"{url}/")
    finally:
        sock.close()  # nothing, once hypercorn has taken it over


# -- HTTP ----------------------------------------------------------------------------------------

_STATIC = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/index.html": ("index.html", b"text/html; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
}

_SECURITY_HEADERS = [
    # Everything comes from this server; nothing inline, no frames.
    (
        b"content-security-policy",
        b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

MAX_ACTION_BODY = 64 * 1024


def _static_file(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


class DashboardApp:
    """
    The dashboard's HTTP endpoints over one `Dashboard`, as an ASGI application (`__call__`) or
    as part of another (`handle` says whether it took the request).
    """

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self._files = {path: (_static_file(name), kind) for path, (name, kind) in _STATIC.items()}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from .._metrics import _lifespan

        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http" and not await self.handle(scope, receive, send):
            await _respond(send, 404, b"not found: try /\n", b"text/plain; charset=utf-8")

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> bool:
        """Answer the request if its path is the dashboard's; False (nothing sent) if not."""
        path, method = scope["path"], scope["method"]
        if path == "/actions/dead-letters":
            await self._action(scope, receive, send)
            return True
        if path not in self._files and path not in ("/status.json", "/events"):
            return False
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed: the dashboard is read-only\n")
            return True
        if path in self._files:
            body, kind = self._files[path]
            await _respond(send, 200, body, kind)
        elif path == "/status.json":
            snapshot = await self.dashboard.current()
            await _respond(send, 200, _json(snapshot), b"application/json")
        else:
            await self._events(receive, send)
        return True

    async def _events(self, receive: Any, send: Any) -> None:
        headers = [
            *_SECURITY_HEADERS,
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"x-accel-buffering", b"no"),  # a proxy in front must not hold the events back
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        retry = f"retry: {round(self.dashboard.refresh * 1000)}\n\n".encode()
        await send({"type": "http.response.body", "body": retry, "more_body": True})
        async with trio.open_nursery() as nursery:

            async def until_disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_disconnected)
            async for snapshot in self.dashboard.stream():
                event = b"data: " + _json(snapshot) + b"\n\n"
                await send({"type": "http.response.body", "body": event, "more_body": True})

    async def _action(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        token = self.dashboard.actions_token
        if token is None:
            refusal = b"forbidden: the dashboard is read-only (start it with --allow-actions)\n"
            await _respond(send, 403, refusal)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, b"Bearer " + token.encode()):
            await _respond(send, 403, b"forbidden: a valid token is needed for actions\n")
            return
        if scope["method"] != "POST":
            await _respond(send, 405, b"method not allowed: POST an action\n")
            return
        request = _action_request(await _read_body(receive))
        if request is None:
            await _respond(
                send,
                400,
                b'bad request: send {"action": "retry"|"purge", "channel": ..., "group": ...,'
                b' "ids": [...] (optional)}\n',
            )
            return
        action, channel, group, ids = request
        try:
            count = await self.dashboard.act(action, channel, group, ids)
        except PgbusError as exc:
            await _respond(send, 503, _json({"error": redact_dsn(str(exc))}), b"application/json")
            return
        await self.dashboard.refresh_now()
        await _respond(send, 200, _json({"action": action, "count": count}), b"application/json")


async def _read_body(receive: Any) -> bytes | None:
    """The request's body; None if the client left or it is over `MAX_ACTION_BODY`."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        body += chunk
        if len(body) > MAX_ACTION_BODY:
            return None
        if not message.get("more_body"):
            return body


def _action_request(body: bytes | None) -> tuple[str, str, str, list[int] | None] | None:
    """``(action, channel, group, ids)`` from an action's JSON body; None if it is not one."""
    try:
        request = json.loads(body) if body is not None else None
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    action, channel, group = request.get("action"), request.get("channel"), request.get("group")
    ids = request.get("ids")
    if action not in ACTIONS or not isinstance(channel, str) or not isinstance(group, str):
        return None
    if ids is not None and not (isinstance(ids, list) and all(type(i) is int for i in ids)):
        return None
    return action, channel, group, ids


def _json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


async def _respond(
    send: Any, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8"
) -> None:
    headers = [
        *_SECURITY_HEADERS,
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
