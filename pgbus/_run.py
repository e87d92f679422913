"""
Running a whole bus from a checked `BusConfig`, until SIGINT or SIGTERM: what ``pgbus run`` does.

Kept apart from the command line so that it can be called from Python (and tested) directly;
`pgbus._cli` only parses arguments, prints and chooses exit codes.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable

import trio

from . import _signals
from ._bus import Bus, BusStatistics, open_bus
from ._config import BusConfig
from ._dsn import describe_dsn, redact_dsn
from ._metrics import MetricsServer

log = logging.getLogger("pgbus")


async def run_config(
    config: BusConfig,
    *,
    stats_every: float | None = None,
    report: Callable[[str], None],
    stop_signals: Iterable[signal.Signals] | None = None,
) -> None:
    """
    Start everything *config* declares and run until one of *stop_signals* arrives.

    A signal at any moment — while an embedded PostgreSQL starts, while the bridges wait for an
    unreachable server, or while running — leaves the bus cleanly: inbound bridges stop, actors
    stop in reverse start order (each ``on_stop`` runs), outbound channels are flushed, every
    connection is closed and an embedded server is stopped. Then this returns normally. Further
    signals during that shutdown are only reported (it is bounded by ``stop_timeout``).

    Without a DSN in *config* an embedded PostgreSQL is started for the run, and *report* is
    given one line saying so with a DSN ``psql`` can use. *report* also gets the line saying the
    bus is running. With *stats_every*, one status line is logged every that many seconds.

    Must be called from the main thread (it installs signal handlers).

    Raises:
        RestartIntensityError: the supervisor gave up on an actor.
        DatabaseUnavailableError: a failure retrying cannot fix (bad password, unknown database).
        PgbusError: an embedded PostgreSQL could not start, or another failure of the bus.
    """
    if stop_signals is None:
        stop_signals = _signals.stop_signals()
    with trio.open_signal_receiver(*stop_signals) as signals:
        async with trio.open_nursery() as nursery:
            stop = trio.CancelScope()
            opened: list[Bus] = []  # the bus, once open: a second signal hurries its shutdown
            nursery.start_soon(
                _stop_on_signal, signals, stop, config.supervisor.stop_timeout, opened
            )
            if _signals.early:  # one came before these handlers were in place
                log.info("%s received: stopping", signal.Signals(_signals.early[0]).name)
                stop.cancel()
            with stop:
                await _run_bus(config, stats_every=stats_every, report=report, opened=opened)
            nursery.cancel_scope.cancel()


async def _stop_on_signal(
    signals: AsyncIterator[int], stop: trio.CancelScope, stop_timeout: float, opened: list[Bus]
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not stop.cancel_called:
            log.info(
                "%s received: stopping (actors get up to %gs to empty their inboxes; "
                "a second signal stops without waiting)",
                name,
                stop_timeout,
            )
            stop.cancel()
        elif opened and not opened[0].hurried:
            log.warning(
                "%s received again: stopping now, without waiting for actors to empty their "
                "inboxes (what they hold is counted)",
                name,
            )
            opened[0].hurry()
        else:
            log.warning("%s received: already stopping, please wait", name)


async def _run_bus(
    config: BusConfig,
    *,
    stats_every: float | None,
    report: Callable[[str], None],
    opened: list[Bus] | None = None,
) -> None:
    metrics = None
    if config.metrics is not None:
        metrics = MetricsServer(
            config.metrics.listen, starting=True, dashboard=config.metrics.dashboard
        )
        metrics.bind()  # before anything starts: a taken port is one line and exit 2, at once
    try:
        await _run_bus_serving(
            config, metrics, stats_every=stats_every, report=report, opened=opened
        )
    finally:
        if metrics is not None:
            metrics.close()


async def _run_bus_serving(
    config: BusConfig,
    metrics: MetricsServer | None,
    *,
    stats_every: float | None,
    report: Callable[[str], None],
    opened: list[Bus] | None = None,
) -> None:
    pg = config.postgres
    embedded = pg.dsn is None and config.needs_database
    if embedded:
        log.info("starting an embedded PostgreSQL for this run")
    elif pg.dsn is None:
        log.info("nothing in this config needs PostgreSQL: running without a server")
    async with (
        open_bus(
            pg.dsn,
            embedded=embedded,
            application_name=pg.application_name,
            supervision=config.supervisor,
            keepalive=pg.keepalive,
            pool_mode=pg.pool_mode,
            pool_size=pg.pool_size,
            node=config.node.name if config.node is not None and config.node.name else None,
        ) as bus,
        trio.open_nursery() as services,
    ):
        if opened is not None:
            opened.append(bus)
        if metrics is not None:
            # Served from the start: /healthz says 503 "starting" while bridges wait for a server.
            url = await services.start(metrics.serve, bus)
            dashboard = f", dashboard on {url}/" if metrics.dashboard else ""
            report(f"metrics on {url}/metrics, health on {url}/healthz{dashboard}")
        if embedded and bus.dsn is not None:
            version = await _server_version(bus)
            report(
                f"embedded PostgreSQL {version} for this run; "
                f"connect with: psql '{redact_dsn(bus.dsn)}'"
            )
        elif bus.dsn is not None:
            log.info("using PostgreSQL at %s", describe_dsn(bus.dsn))
        if stats_every is not None:
            # From the start: while the server cannot be reached, the lines say so.
            services.start_soon(_log_statistics, bus, stats_every)
        if config.node is not None and bus.node is None:
            await bus._join_cluster()  # [node] without a name: "<hostname>:<pid>"
        await start_config(bus, config)
        if metrics is not None:
            metrics.starting = False
        report("running; stop with Ctrl-C (SIGINT) or SIGTERM")
        await trio.sleep_forever()


async def _log_statistics(bus: Bus, every: float) -> None:
    while True:
        await trio.sleep(every)
        log.info("%s", format_statistics(bus.statistics()))


async def start_config(bus: Bus, config: BusConfig) -> None:
    """
    Add *config*'s channels, bridges and actors to *bus*, in an order that cannot lose or block.

    Returns once every bridge is connected (waiting for the server if need be) and every actor's
    ``on_start`` has run.
    """
    for channel in config.channels:
        bus.add_channel(channel.name, channel.capacity)
    # Inbound bridges before any actor runs: LISTEN is active before an actor can publish
    # anything, so a reply to what an actor sends from on_start is never missed. Meanwhile
    # notifications wait in the bounded channels (or in PostgreSQL, with overflow "block").
    for bridge in config.bridges:
        if bridge.direction == "in" and bridge.durable is not None:
            d = bridge.durable
            await bus.bridge_in(
                bridge.postgres,
                bridge.channel,
                codec=bridge.codec,
                durable=True,
                group=d.group,
                start=d.start,
                max_attempts=d.max_attempts,
                retry_after=d.retry_after,
                lease=d.lease,
                retention=d.retention,
                poll=d.poll,
            )
        elif bridge.direction == "in":
            await bus.bridge_in(
                bridge.postgres,
                bridge.channel,
                codec=bridge.codec,
                overflow=bridge.overflow,
                ignore_own=bridge.ignore_own,
            )
    # Outbound bridges next: each is its channel's only consumer. spawn() waits for on_start,
    # so an actor whose on_start sends to a full (or capacity-0) outbound channel would wait
    # forever if the bridge came after it.
    for bridge in config.bridges:
        if bridge.direction == "out":
            await bus.bridge_out(
                bridge.channel,
                bridge.postgres,
                codec=bridge.codec,
                durable=bridge.durable is not None,
                delay=bridge.durable.delay if bridge.durable is not None else None,
            )
    for entity in config.entities:
        spec = entity.spec
        await bus.host(
            spec.cls,
            passivate_after=spec.passivate_after,
            max_attempts=spec.max_attempts,
            retry_after=spec.retry_after,
            concurrency=spec.concurrency,
            batch=spec.batch,
        )
    for schedule in config.schedules:
        await bus.schedule(
            schedule.name,
            schedule.postgres,
            cron=schedule.cron,
            every=schedule.every,
            timezone=schedule.timezone,
            payload=schedule.payload,
            missed=schedule.missed,
        )
    # Actors last, in file order: that order is what rest_for_one restarts and what shutdown
    # reverses.
    for actor in config.actors:
        await bus.spawn(
            actor.actor_class,
            name=actor.name,
            inbox=actor.inbox,
            restart=actor.restart,
            options=actor.options,
            public=actor.public and not actor.singleton,
            singleton=actor.singleton,
        )


async def _server_version(bus: Bus) -> str:
    """The server's version, e.g. ``"18.6"`` (one short query on a pooled connection)."""
    async with bus.transaction() as tx:
        return str(await tx.fetchval("SELECT current_setting('server_version')"))


def format_statistics(stats: BusStatistics) -> str:
    """One status line: messages per bridge, restarts per actor, what channels hold."""
    parts: list[str] = []
    for b in stats.bridges:
        if b.direction == "in":
            part = f"in {b.postgres!r} -> {b.channel!r}: {b.messages}"
        else:
            part = f"out {b.channel!r} -> {b.postgres!r}: {b.messages}"
        extras = [
            f"{count} {what}"
            for count, what in (
                (b.dropped, "dropped"),
                (b.rejected, "rejected"),
                (b.reconnects, "reconnects"),
            )
            if count
        ]
        parts.append(part + (f" ({', '.join(extras)})" if extras else ""))
    for a in stats.actors:
        restarts = f"{a.restarts} restart{'' if a.restarts == 1 else 's'}"
        parts.append(f"actor {a.name!r} {a.state}, {restarts}")
    for c in stats.channels:
        if c.buffered:
            capacity = "inf" if c.capacity == float("inf") else f"{c.capacity:g}"
            parts.append(f"channel {c.name!r} holds {c.buffered}/{capacity}")
    state = "" if stats.connected else "not connected to PostgreSQL (retrying); "
    return "stats: " + state + ("; ".join(parts) if parts else "nothing running")
