"""
Prometheus metrics on ``/metrics`` and a health check on ``/healthz``, served from the bus's Trio
nursery (``pip install 'pgbus[metrics]'``).

The HTTP server is hypercorn's Trio worker (`hypercorn.trio.serve`, the Trio-native ASGI server
of the Quart project); the exposition format, content negotiation and compression are
prometheus-client's (`prometheus_client.make_asgi_app`). Nothing here touches the message path:
a custom collector reads `Bus.statistics` when Prometheus scrapes, and only then is
``pg_notification_queue_usage()`` asked of the server (bounded by `QUEUE_USAGE_TIMEOUT`).

Both libraries are imported only when a server starts, so ``pgbus`` itself never needs them;
the one module-level rule they do not need, `parse_listen`, is shared by the TOML loader and the
command line.

Durable channels (``_durable/_support.py``) feed their lag, in-flight and dead letters through
`add_durable_source`: a function of the bus returning `DurableGroupSample` objects, called at
scrape time.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._errors import ConfigError, MetricsUnavailableError, PgbusError

if TYPE_CHECKING:
    from ._bus import Bus, BusStatistics

log = logging.getLogger("pgbus.metrics")


class _WithoutBanner(logging.Filter):
    """Drop hypercorn's "Running on ... (CTRL + C to quit)": pgbus says where itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on ")


_http_log = logging.getLogger("pgbus.metrics.http")
_http_log.addFilter(_WithoutBanner())

DEFAULT_LISTEN = "127.0.0.1:9464"
"""The address the README suggests (Prometheus's registry of exporter ports lists 9464)."""

QUEUE_USAGE_TIMEOUT = 2.0
"""How long a scrape waits for ``pg_notification_queue_usage()``; past it the sample is left out."""

SOURCE_TIMEOUT = 2.0
"""How long a scrape waits for each durable source; past it its samples are left out."""

_LISTEN_RULE = 'must be "HOST:PORT", e.g. "127.0.0.1:9464" or "[::1]:9464", port 0..65535'


def parse_listen(text: str) -> tuple[str, int]:
    """
    ``"HOST:PORT"`` (IPv6 in brackets: ``"[::1]:9464"``) as ``(host, port)``; port 0 picks one.

    Raises:
        ValueError: saying the rule and the value, for the caller to prefix with where it was.
    """
    host, colon, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: the port is ambiguous
    if not (colon and host and port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{_LISTEN_RULE} (got {text!r})")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{_LISTEN_RULE} (got {text!r})")
    return host, port


# -- what is exported --------------------------------------------------------------------------


@attrs.frozen
class DurableGroupSample:
    """One durable channel's consumer group, as a durable source reports it at scrape time."""

    channel: str
    group: str
    lag: int
    """Messages stored for the group and not yet acknowledged by it."""
    dead_letters: int
    """Messages the group gave up on (moved to dead letters), currently stored."""
    in_flight: int = 0
    """Messages the group's members have claimed and not yet acknowledged (or due for retry)."""


DurableSource = Callable[["Bus"], Awaitable[Iterable[DurableGroupSample]]]
_durable_sources: list[DurableSource] = []


def add_durable_source(source: DurableSource) -> None:
    """
    Have every scrape call ``await source(bus)`` and export what it returns as
    ``pgbus_durable_lag{channel,group}``, ``pgbus_durable_in_flight{channel,group}`` and
    ``pgbus_dead_letters{channel,group}``.

    For ``_durable/_support.py`` to call once, at import. A source that raises or takes longer than
    `SOURCE_TIMEOUT` leaves its samples out of that scrape (logged at debug level); it never
    fails the scrape. Adding the same source twice does nothing.
    """
    if source not in _durable_sources:
        _durable_sources.append(source)


@attrs.frozen
class ScrapeData:
    """What one scrape exports: the bus's statistics plus what needs a round trip."""

    statistics: BusStatistics
    queue_usage: float | None
    durable: tuple[DurableGroupSample, ...]


async def gather(bus: Bus) -> ScrapeData:
    """Read everything a scrape exports; each round trip is bounded, none can fail it."""
    queue_usage: float | None = None
    with trio.move_on_after(QUEUE_USAGE_TIMEOUT):
        try:
            queue_usage = await _queue_usage(bus)
        except PgbusError as exc:
            log.debug("scrape: pg_notification_queue_usage() unavailable: %s", exc)
    durable: list[DurableGroupSample] = []
    for source in list(_durable_sources):
        with trio.move_on_after(SOURCE_TIMEOUT):
            try:
                durable.extend(await source(bus))
            except Exception as exc:
                log.debug("scrape: durable source %r failed: %s", source, exc)
    return ScrapeData(bus.statistics(), queue_usage, tuple(durable))


async def _queue_usage(bus: Bus) -> float | None:
    if bus.dsn is None:
        return None
    async with bus.transaction() as tx:
        return float(await tx.fetchval("SELECT pg_notification_queue_usage()"))


def metric_families(data: ScrapeData) -> Iterator[Any]:
    """The Prometheus metric families of *data* (prometheus-client objects)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    stats = data.statistics
    bridge_labels = ["direction", "channel", "bus_channel"]
    messages = CounterMetricFamily(
        "pgbus_messages",
        "Messages a bridge delivered (in) or published (out); channel is the Postgres channel.",
        labels=bridge_labels,
    )
    dropped = CounterMetricFamily(
        "pgbus_dropped", "Notifications an overflow policy dropped.", labels=bridge_labels
    )
    rejected = CounterMetricFamily(
        "pgbus_rejected",
        "Messages a codec refused: malformed JSON in, oversized or unencodable out.",
        labels=bridge_labels,
    )
    gaps = CounterMetricFamily(
        "pgbus_gaps", "pgbus.Gap markers queued in an inbound stream.", labels=bridge_labels
    )
    reconnects = CounterMetricFamily(
        "pgbus_reconnects", "Times a bridge's connection was replaced.", labels=bridge_labels
    )
    connected = GaugeMetricFamily(
        "pgbus_bridge_connected", "1 while the bridge has a connection.", labels=bridge_labels
    )
    for b in stats.bridges:
        labels = [b.direction, b.postgres, b.channel]
        messages.add_metric(labels, b.messages)
        rejected.add_metric(labels, b.rejected)
        if b.direction == "in":  # only inbound streams drop and carry gap markers
            dropped.add_metric(labels, b.dropped)
            gaps.add_metric(labels, b.gaps)
        reconnects.add_metric(labels, b.reconnects)
        connected.add_metric(labels, 1 if b.connected else 0)
    yield from (messages, dropped, rejected, gaps, reconnects, connected)

    buffered = GaugeMetricFamily(
        "pgbus_channel_buffered", "Messages waiting in a bus channel.", labels=["channel"]
    )
    capacity = GaugeMetricFamily(
        "pgbus_channel_capacity", "A bus channel's capacity (+Inf: unbounded).", labels=["channel"]
    )
    for c in stats.channels:
        buffered.add_metric([c.name], c.buffered)
        capacity.add_metric([c.name], math.inf if c.capacity == math.inf else c.capacity)
    yield from (buffered, capacity)

    restarts = CounterMetricFamily(
        "pgbus_actor_restarts", "Times the supervisor restarted an actor.", labels=["actor"]
    )
    state = GaugeMetricFamily(
        "pgbus_actor_state", "1 for the state each actor is in.", labels=["actor", "state"]
    )
    for a in stats.actors:
        restarts.add_metric([a.name], a.restarts)
        state.add_metric([a.name, a.state], 1)
    yield from (restarts, state)

    if stats.cluster is not None:
        node = [stats.cluster.node]
        junk = CounterMetricFamily(
            "pgbus_cluster_junk",
            "Payloads on this node's channel that are not messages of the cluster's protocol, "
            "or replies from a backend that is not the serving node's: ignored.",
            labels=["node"],
        )
        junk.add_metric(node, stats.cluster.junk)
        refused = CounterMetricFamily(
            "pgbus_cluster_refused",
            "Requests this node refused: an actor it does not run, or beyond an actor's overflow.",
            labels=["node"],
        )
        refused.add_metric(node, stats.cluster.refused)
        asks = CounterMetricFamily(
            "pgbus_cluster_asks",
            "Asks this node sent to actors on other nodes, by outcome (replied, failed, "
            "unavailable, timeout).",
            labels=["node", "outcome"],
        )
        outcomes = dict.fromkeys(("replied", "failed", "unavailable", "timeout"), 0)
        for outcome, count in (outcomes | dict(stats.cluster.asks)).items():
            asks.add_metric([stats.cluster.node, outcome], count)
        changes = CounterMetricFamily(
            "pgbus_cluster_singleton_changes",
            "Singletons this node started or stopped holding.",
            labels=["node"],
        )
        changes.add_metric(node, stats.cluster.singleton_changes)
        yield from (junk, refused, asks, changes)

    usage = GaugeMetricFamily(
        "pg_notification_queue_usage",
        "Fraction (0..1) of PostgreSQL's notification queue in use, asked at scrape time.",
    )
    if data.queue_usage is not None:
        usage.add_metric([], data.queue_usage)
    yield usage

    lag = GaugeMetricFamily(
        "pgbus_durable_lag",
        "Durable messages stored for a group and not yet acknowledged.",
        labels=["channel", "group"],
    )
    dead = GaugeMetricFamily(
        "pgbus_dead_letters",
        "Durable messages a group gave up on, currently stored.",
        labels=["channel", "group"],
    )
    in_flight = GaugeMetricFamily(
        "pgbus_durable_in_flight",
        "Durable messages a group's members claimed and have not acknowledged yet.",
        labels=["channel", "group"],
    )
    for sample in data.durable:
        lag.add_metric([sample.channel, sample.group], sample.lag)
        dead.add_metric([sample.channel, sample.group], sample.dead_letters)
        in_flight.add_metric([sample.channel, sample.group], sample.in_flight)
    yield from (lag, dead, in_flight)


# -- health ------------------------------------------------------------------------------------


def health_problems(stats: BusStatistics, *, starting: bool = False) -> list[str]:
    """Why the bus is not healthy, one phrase each; empty when it is."""
    problems = ["starting: bridges and actors are not all started yet"] if starting else []
    for b in stats.bridges:
        if not b.connected:
            arrow = (
                f"{b.postgres!r} -> {b.channel!r}"
                if b.direction == "in"
                else (f"{b.channel!r} -> {b.postgres!r}")
            )
            problems.append(f"bridge {b.direction} {arrow} is not connected to PostgreSQL")
    problems += [
        f"actor {a.name!r} failed: {a.last_failure}" for a in stats.actors if a.state == "failed"
    ]
    return problems


# -- the server --------------------------------------------------------------------------------


class MetricsServer:
    """
    The ``/metrics`` and ``/healthz`` endpoints of one bus, and its dashboard on ``/`` (unless
    *dashboard* is false: see `pgbus._dashboard`). Any other path is 404.

    `bind` takes the address (call it early, so a taken port fails before anything starts);
    `serve` serves a bus until cancelled. While `starting` is true, ``/healthz`` says 503 (``pgbus
    run`` sets it until the config's bridges and actors are started). `close` releases an address
    `serve` never took over.
    """

    def __init__(self, listen: str, *, starting: bool = False, dashboard: bool = True) -> None:
        try:
            self.host, self.port = parse_listen(listen)
        except ValueError as exc:
            raise ConfigError(f"metrics listen {exc}.") from None
        self.starting = starting
        self.dashboard = dashboard
        """Whether ``/`` serves the dashboard (`pgbus._dashboard`) too."""
        self.bus: Bus | None = None
        self._socket: socket.socket | None = None
        self._data: ScrapeData | None = None

    def bind(self) -> None:
        """
        Take the address now (blocking: a host name is resolved). Does nothing if bound.

        Raises:
            MetricsUnavailableError: the ``metrics`` extra is not installed, or the address
                cannot be bound (taken, or not this machine's).
        """
        if self._socket is not None:
            return
        _import_extra()
        self._socket = listen_socket(self.host, self.port, "metrics")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self._socket.getsockname()[1] if self._socket is not None else self.port
        return f"{host}:{port}"

    def close(self) -> None:
        """Release the address if `serve` has not taken it over (idempotent)."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    async def serve(
        self, bus: Bus, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """
        Serve *bus* until cancelled; ``task_status.started`` gets the base URL, e.g.
        ``http://127.0.0.1:9464``. Binds first if `bind` was not called.

        Cancellation closes the listening socket and every open HTTP connection (within half a
        second: requests still running then are cancelled).

        Raises:
            MetricsUnavailableError: as `bind` does, before anything is served.
        """
        self.bind()
        self.bus = bus
        sock, self._socket = self._socket, None
        assert sock is not None
        dashboard = None
        if self.dashboard:
            from ._dashboard import Dashboard

            dashboard = Dashboard.of_bus(bus)
        app = _App(self, _prometheus_app(self), dashboard)
        async with trio.open_nursery() as nursery:
            if dashboard is not None:
                await nursery.start(dashboard.run)
            url = await nursery.start(serve_asgi, app, sock)
            task_status.started(url)

    async def refresh(self) -> None:
        """Gather what the next scrape exports (called by the ``/metrics`` handler)."""
        assert self.bus is not None
        self._data = await gather(self.bus)

    def health(self) -> tuple[int, str]:
        """``(200, "ok")`` or ``(503, the reasons, one per line)``."""
        if self.bus is None:
            return 503, "starting: the bus is not open yet"
        problems = health_problems(self.bus.statistics(), starting=self.starting)
        if problems:
            return 503, "\n".join(problems)
        return 200, "ok"

    def _scrape_data(self) -> ScrapeData:
        if self._data is not None:
            return self._data
        assert self.bus is not None
        return ScrapeData(self.bus.statistics(), None, ())


async def serve_metrics(
    bus: Bus,
    listen: str = DEFAULT_LISTEN,
    *,
    dashboard: bool = True,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Serve *bus*'s Prometheus metrics on ``/metrics`` and its health on ``/healthz`` at *listen*
    (``"HOST:PORT"``; port 0 picks a free one) until cancelled. Start it in a nursery inside the
    ``open_bus`` block: ``url = await nursery.start(pgbus.serve_metrics, bus, "127.0.0.1:9464")``
    gives the base URL once it is listening.

    ``/healthz`` answers 200 ``ok`` while every bridge is connected and no actor has failed,
    else 503 with one reason per line. ``/`` is a read-only live dashboard of the cluster and of
    this bus (the same data as ``pgbus status --json``, plus this bus's channels, bridges with
    their rates, and actors), unless *dashboard* is false. Needs ``pip install 'pgbus[metrics]'``.

    Raises:
        MetricsUnavailableError: the extra is not installed, or *listen* cannot be bound.
        ConfigError: *listen* is not ``"HOST:PORT"``.
    """
    await MetricsServer(listen, dashboard=dashboard).serve(bus, task_status=task_status)


def listen_socket(host: str, port: int, what: str) -> socket.socket:
    """
    A listening TCP socket bound to (*host*, *port*) (blocking: a host name is resolved).

    Raises:
        MetricsUnavailableError: the address cannot be bound (taken, or not this machine's),
            said as ``"<what>: cannot listen on HOST:PORT: <reason>."``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise MetricsUnavailableError(
            f"{what}: cannot listen on {address}: {exc.strerror or exc}."
        ) from None
    return sock


def socket_address(sock: socket.socket) -> str:
    """``HOST:PORT`` of a bound socket (IPv6 in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_asgi(
    app: Any, sock: socket.socket, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """
    Serve the ASGI *app* with hypercorn's Trio worker on the listening *sock* (which hypercorn
    takes over and closes) until cancelled; ``task_status.started`` gets the base URL.

    Cancellation closes every open HTTP connection within half a second (requests still
    running then, such as an event stream, are cancelled).
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    url = f"http://{socket_address(sock)}"
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) it from here
    config.accesslog = None
    config.errorlog = _http_log
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, app, config)
        task_status.started(url)


def _import_extra() -> None:
    try:
        import hypercorn.trio  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MetricsUnavailableError(
            f"metrics need the 'metrics' extra: pip install 'pgbus[metrics]' ({exc})."
        ) from None


def _prometheus_app(server: MetricsServer) -> Any:
    from prometheus_client import make_asgi_app
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(server))
    return make_asgi_app(registry)


class _Collector:
    """prometheus-client's collector protocol over what `MetricsServer.refresh` gathered."""

    def __init__(self, server: MetricsServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Any]:
        yield from metric_families(self._server._scrape_data())


class _App:
    """The ASGI application: /metrics (prometheus-client), /healthz, and lifespan events."""

    def __init__(self, server: MetricsServer, metrics_app: Any, dashboard: Any = None) -> None:
        from ._dashboard import DashboardApp

        self._server = server
        self._metrics_app = metrics_app
        self._dashboard = DashboardApp(dashboard) if dashboard is not None else None
        self._scrape_lock = trio.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            async with self._scrape_lock:  # concurrent scrapes share no half-gathered data
                await self._server.refresh()
                await self._metrics_app(scope, receive, send)
        elif path == "/healthz":
            status, text = self._server.health()
            await _respond(receive, send, status, text)
        elif self._dashboard is None or not await self._dashboard.handle(scope, receive, send):
            where = "/metrics or /healthz" if self._dashboard is None else "/, /metrics or /healthz"
            await _respond(receive, send, 404, f"not found: try {where}")


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(receive: Any, send: Any, status: int, text: str) -> None:
    await receive()
    body = (text + "\n").encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
