"""
/metrics and /healthz: a running bus scraped over real HTTP (the stdlib client, in a thread),
also while its PostgreSQL is down, and ``pgbus run --metrics`` / ``[metrics]`` end to end.
"""

from __future__ import annotations

import math
import re
import signal
import socket
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from test_cli import closed_port, one_error_line, run_to_completion, running

import pgbus
from pgbus import _metrics
from pgbus._embedded import open_embedded_postgres
from pgbus._metrics import DurableGroupSample, MetricsServer, parse_listen

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30


def unique(prefix: str = "m") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def get(url: str) -> tuple[int, str]:
    """GET *url* with urllib in a worker thread: (status, body), 5xx included."""

    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read().decode()

    return await trio.to_thread.run_sync(fetch)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and label set."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    return scraped.get((name, frozenset(labels.items())))


async def wait_for_status(url: str, status: int) -> str:
    """Poll /healthz until it answers *status*; its body. Bounded by WAIT."""
    with trio.fail_after(WAIT):
        while True:
            got, body = await get(url)
            if got == status:
                return body
            await trio.sleep(0.05)


@asynccontextmanager
async def serving(bus: pgbus.Bus) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(pgbus.serve_metrics, bus, "127.0.0.1:0")
        yield url
        nursery.cancel_scope.cancel()


class Crash(pgbus.Actor):
    async def handle(self, message: object) -> None:
        raise ValueError(f"cannot handle {message!r}")


# -- a running bus -----------------------------------------------------------------------------


async def test_metrics_of_a_running_bus(pg: PgHelper, pg_dsn: str) -> None:
    """Bridge counts, channel fill, actor restarts and the queue usage, as Prometheus reads them."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus, serving(bus) as url:
        bus.add_channel("in", 10)
        bus.add_channel("out", math.inf)
        bus.add_channel("held", 5)
        await bus.bridge_in(name, "in")
        await bus.bridge_out("out", name)
        await bus.send("out", "one")
        await bus.send("out", "two")
        await pg.execute("SELECT pg_notify($1, 'three')", name)
        with trio.fail_after(WAIT):
            for _ in range(3):
                await bus.channel("in").receive()
        await bus.send("held", "waiting")
        status, text = await get(f"{url}/metrics")
    assert status == 200
    scraped = samples(text)
    inbound = {"direction": "in", "channel": name, "bus_channel": "in"}
    outbound = {"direction": "out", "channel": name, "bus_channel": "out"}
    assert value(scraped, "pgbus_messages_total", **inbound) == 3
    assert value(scraped, "pgbus_messages_total", **outbound) == 2
    assert value(scraped, "pgbus_gaps_total", **inbound) == 0
    assert value(scraped, "pgbus_reconnects_total", **inbound) == 0
    assert value(scraped, "pgbus_bridge_connected", **inbound) == 1
    assert value(scraped, "pgbus_bridge_connected", **outbound) == 1
    assert value(scraped, "pgbus_channel_buffered", channel="in") == 0
    assert value(scraped, "pgbus_channel_buffered", channel="held") == 1
    assert value(scraped, "pgbus_channel_capacity", channel="held") == 5
    assert value(scraped, "pgbus_channel_capacity", channel="out") == math.inf
    usage = value(scraped, "pg_notification_queue_usage")
    assert usage is not None
    assert 0 <= usage < 1


async def test_overflow_drops_and_their_gap_are_counted(pg: PgHelper, pg_dsn: str) -> None:
    """drop_newest on a full channel: pgbus_dropped_total counts the drops, gaps_total the Gap."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus, serving(bus) as url:
        bus.add_channel("in", 2)
        await bus.bridge_in(name, "in", overflow="drop_newest")
        await pg.execute("SELECT pg_notify($1, n::text) FROM generate_series(1, 5) AS n", name)
        received: list[object] = []
        with trio.fail_after(WAIT):
            while not any(isinstance(m, pgbus.Gap) for m in received):
                received.append(await bus.channel("in").receive())
        _, text = await get(f"{url}/metrics")
    [gap] = [m for m in received if isinstance(m, pgbus.Gap)]
    scraped = samples(text)
    labels = {"direction": "in", "channel": name, "bus_channel": "in"}
    assert gap.dropped is not None
    assert gap.dropped > 0
    assert value(scraped, "pgbus_dropped_total", **labels) == gap.dropped
    assert value(scraped, "pgbus_gaps_total", **labels) == 1


async def test_healthz_is_503_naming_a_failed_actor(pg_dsn: str) -> None:
    """A temporary actor that crashed stays failed: /healthz says 503 and why; /metrics too."""
    async with pgbus.open_bus(pg_dsn) as bus, serving(bus) as url:
        assert await get(f"{url}/healthz") == (200, "ok\n")
        await bus.spawn(Crash, name="crash", inbox_capacity=1, restart="temporary")
        await bus.send("crash", "x")
        body = await wait_for_status(f"{url}/healthz", 503)
        status, text = await get(f"{url}/metrics")
    assert body == "actor 'crash' failed: ValueError(\"cannot handle 'x'\")\n"
    assert status == 200
    assert value(samples(text), "pgbus_actor_state", actor="crash", state="failed") == 1


async def test_restarts_are_counted(pg_dsn: str) -> None:
    """pgbus_actor_restarts_total follows the supervisor's restarts."""
    restarted = trio.Event()
    starts: list[int] = []

    class CrashThenRun(Crash):
        async def on_start(self) -> None:
            starts.append(1)
            if len(starts) == 2:
                restarted.set()

    async with pgbus.open_bus(pg_dsn, backoff_initial=0.01) as bus, serving(bus) as url:
        await bus.spawn(CrashThenRun, name="crash", inbox_capacity=1)
        await bus.send("crash", "x")
        with trio.fail_after(WAIT):
            await restarted.wait()
        _, text = await get(f"{url}/metrics")
    assert value(samples(text), "pgbus_actor_restarts_total", actor="crash") == 1


async def test_unknown_path_is_404(pg_dsn: str) -> None:
    """Only /metrics, /healthz and the dashboard's paths exist."""
    async with pgbus.open_bus(pg_dsn) as bus, serving(bus) as url:
        assert await get(f"{url}/nope") == (404, "not found: try /, /metrics or /healthz\n")


async def test_while_the_database_is_down() -> None:
    """Server stopped: /healthz 503 naming the bridges, /metrics still answers; back: 200."""
    async with open_embedded_postgres() as server, pgbus.open_bus(server.dsn) as bus:
        bus.add_channel("in", math.inf)
        await bus.bridge_in("orders", "in")
        async with serving(bus) as url:
            assert await get(f"{url}/healthz") == (200, "ok\n")
            await server.stop_server(mode="immediate")
            body = await wait_for_status(f"{url}/healthz", 503)
            status, text = await get(f"{url}/metrics")
            await server.start_server()
            assert await wait_for_status(f"{url}/healthz", 200) == "ok\n"
            _, after = await get(f"{url}/metrics")
    assert body == "bridge in 'orders' -> 'in' is not connected to PostgreSQL\n"
    assert status == 200
    down = samples(text)
    labels = {"direction": "in", "channel": "orders", "bus_channel": "in"}
    assert value(down, "pgbus_bridge_connected", **labels) == 0
    assert value(down, "pg_notification_queue_usage") is None  # left out, not made up
    back = samples(after)
    assert value(back, "pgbus_bridge_connected", **labels) == 1
    assert value(back, "pgbus_reconnects_total", **labels) == 1
    assert value(back, "pgbus_gaps_total", **labels) == 1
    assert value(back, "pg_notification_queue_usage") is not None


async def test_durable_sources_are_exported_and_cannot_fail_a_scrape(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a durable source returns is exported; a source that raises is left out."""
    monkeypatch.setattr(_metrics, "_durable_sources", [])

    async def groups(bus: pgbus.Bus) -> Iterable[DurableGroupSample]:
        return [DurableGroupSample("jobs", "workers", lag=7, dead_letters=2)]

    async def broken(bus: pgbus.Bus) -> Iterable[DurableGroupSample]:
        raise RuntimeError("table missing")

    _metrics.add_durable_source(broken)
    _metrics.add_durable_source(groups)
    _metrics.add_durable_source(groups)
    async with pgbus.open_bus(pg_dsn) as bus, serving(bus) as url:
        status, text = await get(f"{url}/metrics")
    assert status == 200
    scraped = samples(text)
    assert value(scraped, "pgbus_durable_lag", channel="jobs", group="workers") == 7
    assert value(scraped, "pgbus_dead_letters", channel="jobs", group="workers") == 2
    assert len([k for k in scraped if k[0] == "pgbus_durable_lag"]) == 1


async def test_a_taken_port_is_refused_before_serving(pg_dsn: str) -> None:
    """serve_metrics on an address in use raises MetricsUnavailableError, saying which."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with pgbus.open_bus(pg_dsn) as bus:
            with pytest.raises(pgbus.MetricsUnavailableError) as info:
                await pgbus.serve_metrics(bus, f"127.0.0.1:{port}")
    assert str(info.value) == f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use."


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without hypercorn installed, binding says which extra to install."""
    monkeypatch.setitem(sys.modules, "hypercorn.trio", None)
    server = MetricsServer("127.0.0.1:0")
    with pytest.raises(pgbus.MetricsUnavailableError, match=r"pip install 'pgbus\[metrics\]'"):
        server.bind()


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9464", ("::1", 9464)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen(text: str, parsed: tuple[str, int]) -> None:
    """HOST:PORT, IPv6 in brackets."""
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["9464", ":9464", "host:", "host:http", "h:65536", "::1:9464"])
def test_parse_listen_refuses(text: str) -> None:
    """Anything else is refused with the rule and the value."""
    with pytest.raises(ValueError, match=r'^must be "HOST:PORT", .* \(got .*\)$'):
        parse_listen(text)


# -- pgbus run ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, dsn: str, metrics: str = "") -> Path:
    path = tmp_path / "bus.toml"
    path.write_text(
        f'[postgres]\ndsn = "{dsn}"\n\n{metrics}'
        "[channels.in]\ncapacity = 10\n\n"
        '[[bridge]]\npostgres = "metrics test"\nchannel = "in"\ndirection = "in"\n\n'
        '[actors.printer]\nclass = "pgbus.actors.printer:Printer"\ninbox = "in"\n'
    )
    return path


async def test_run_serves_metrics_from_the_config(pg: PgHelper, tmp_path: Path) -> None:
    """[metrics] listen: the URL is printed; /healthz is 200 and /metrics counts deliveries."""
    config = write_config(tmp_path, pg.dsn, '[metrics]\nlisten = "127.0.0.1:0"\n\n')
    async with running("run", str(config)) as bus:
        line = await bus.expect("stderr", "pgbus: metrics on ")
        url = line.split(" ")[3].removesuffix("/metrics,")
        assert line.endswith(f", dashboard on {url}/")
        await bus.expect("stderr", "running; stop with Ctrl-C")
        assert (await get(f"{url}/"))[0] == 200
        await pg.execute("SELECT pg_notify('metrics test', 'hello')")
        await bus.expect("stdout", "hello")
        assert await get(f"{url}/healthz") == (200, "ok\n")
        _, text = await get(f"{url}/metrics")
        assert await bus.stop(signal.SIGTERM) == 0
    labels = {"direction": "in", "channel": "metrics test", "bus_channel": "in"}
    assert value(samples(text), "pgbus_messages_total", **labels) == 1


async def test_run_says_starting_while_the_server_is_unreachable(tmp_path: Path) -> None:
    """--metrics: while bridges wait for PostgreSQL, /healthz is 503 "starting"; SIGTERM: 0."""
    config = write_config(tmp_path, f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres")
    async with running("run", str(config), "--metrics", "127.0.0.1:0") as bus:
        line = await bus.expect("stderr", "pgbus: metrics on ")
        url = line.split(" ")[3].removesuffix("/metrics,")
        status, body = await get(f"{url}/healthz")
        assert await bus.stop(signal.SIGTERM) == 0
    assert (status, body) == (503, "starting: bridges and actors are not all started yet\n")


async def test_run_with_a_taken_port_exits_2_with_one_line(tmp_path: Path) -> None:
    """--metrics on a port in use: one line, exit 2, before anything connects."""
    config = write_config(tmp_path, f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_to_completion(
            "run", str(config), "--metrics", f"127.0.0.1:{port}", "--log-level", "warning"
        )
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert "Traceback" not in result.stderr.decode()
    assert lines[-1] == (
        f"pgbus: error: metrics: cannot listen on 127.0.0.1:{port}: Address already in use."
    )
    assert not any(line.startswith("pgbus: error") for line in lines[:-1])


async def test_run_refuses_a_bad_metrics_option(tmp_path: Path) -> None:
    """--metrics nonsense: one line naming the option and the rule, exit 2."""
    config = write_config(tmp_path, "postgresql://postgres@127.0.0.1:5432/postgres")
    result = await run_to_completion("run", str(config), "--metrics", "9464")
    assert result.returncode == 2
    assert one_error_line(result.stderr.decode()) == (
        'pgbus: error: --metrics must be "HOST:PORT", e.g. "127.0.0.1:9464" or "[::1]:9464", '
        "port 0..65535 (got '9464')."
    )


async def test_check_refuses_a_bad_listen_key(tmp_path: Path) -> None:
    """[metrics] listen = "nope": the file, table, key and rule in one line."""
    config = write_config(tmp_path, "postgresql://h/db", '[metrics]\nlisten = "nope"\n\n')
    result = await run_to_completion("check", str(config))
    assert result.returncode == 2
    assert one_error_line(result.stderr.decode()) == (
        f'pgbus: error: {config}: [metrics] listen must be "HOST:PORT", e.g. "127.0.0.1:9464" '
        "or \"[::1]:9464\", port 0..65535 (got 'nope')."
    )


def documented_series() -> set[str]:
    """Every metric the README's "Metrics and health" section names."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`((?:pgbus|pg)_[a-z_]+)[{`]", section))
    assert len(names) >= 18, names
    return names


class Echo(pgbus.Actor):
    async def handle(self, message: object) -> object:
        return message


class Fails(pgbus.Actor):
    async def handle(self, message: object) -> None:
        raise ValueError(f"no good: {message!r}")


async def test_every_documented_series_has_samples_on_a_real_bus(pg: PgHelper, pg_dsn: str) -> None:
    """A node with bridges both ways, a durable group with a dead letter, an actor, a singleton
    and an ask to another node: /metrics has a sample of every series the README names."""
    channel = unique("every")
    async with (
        pgbus.open_bus(pg_dsn, node=unique("serving"), keepalive=1.0) as other,
        pgbus.open_bus(pg_dsn, node=unique("scraped"), keepalive=1.0) as bus,
    ):
        await other.spawn(Echo, name=f"{channel}-echo", inbox_capacity=5, public=True)
        await bus.spawn(Echo, name=f"{channel}-one", inbox_capacity=5, singleton=True)
        for name in ("in", "out", "durable"):
            bus.add_channel(name, capacity=5)
        await bus.bridge_in(channel, "in", overflow="drop_newest")
        await bus.bridge_out("out", channel)
        await bus.bridge_in(f"{channel}-d", "durable", durable=True, group="g", max_attempts=1)
        await bus.spawn(Fails, name="fails", inbox="durable")
        await bus.notify(f"{channel}-d", "poison", durable=True)
        await bus.send("out", "hello")
        assert await bus.ask(f"{channel}-echo", 1, timeout=WAIT) == 1
        async with serving(bus) as url:
            with trio.fail_after(WAIT):
                while True:
                    _, text = await get(f"{url}/metrics")
                    names = {s[0] for s in samples(text)}
                    dead = value(
                        samples(text), "pgbus_dead_letters", channel=f"{channel}-d", group="g"
                    )
                    if dead == 1:
                        break
                    await trio.sleep(0.05)  # the failure is written with the next claim
    missing = {
        name
        for name in documented_series()
        if name not in names
        and f"{name}_total" not in names
        and name.removesuffix("_total") + "_total" not in names
    }
    assert missing == set(), f"documented but never sampled: {sorted(missing)}"
