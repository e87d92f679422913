"""
The dashboard: driven in a real headless Chromium (Debian's ``chromium`` package, through
Playwright in a process of its own: ``tests/browser.py``), and over plain HTTP.

Rules: a real bus on the session's PostgreSQL serves the page; every wait is for something the
page or the server shows, bounded (`UPDATE_WAIT` for what must follow a change within a refresh
or two, `WAIT` for what needs a bus to start); nothing sleeps. Playwright never downloads a
browser here: it launches ``$PGBUS_TEST_CHROMIUM``, else ``chromium`` on the PATH.

``PGBUS_DASHBOARD_SCREENSHOT=docs/_static/dashboard.png`` saves the page the first test sees
(how the documentation's picture is made).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
from conftest import require_system_tool
from processes import pgbus_env, run_to_completion, running
from test_cli import closed_port, one_error_line

import pgbus
from pgbus._config import MetricsConfig, load_config
from pgbus._dashboard import serve_dashboard
from pgbus._dsn import describe_dsn
from pgbus._embedded import open_embedded_postgres

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30
"""Seconds for what needs a bus or a browser to start."""
UPDATE_WAIT = 2.0
"""Seconds within which the page must follow a change (the issue's bound; refresh is 1 s)."""
KEEPALIVE = 1.0

CHROMIUM = os.environ.get("PGBUS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Browser:
    """
    A headless Chromium page, driven by ``tests/browser.py`` in a process of its own (its
    asyncio loop must not meet this process's trio-asyncio): `do` runs one of its commands.
    """

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        assert process.stdin is not None
        assert process.stdout is not None
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._pending = b""

    async def _line(self) -> bytes:
        while b"\n" not in self._pending:
            chunk = await self._stdout.receive_some()
            if not chunk:
                raise AssertionError("the browser process ended")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    async def answer(self) -> Any:
        reply = json.loads(await self._line())
        if "error" in reply:
            raise AssertionError(f"in the browser: {reply['error']}")
        return reply["ok"]

    async def do(self, command: str, *args: Any) -> Any:
        """Run *command* (a function of ``tests/browser.py``) with *args*; its result."""
        await self._stdin.send_all(json.dumps({"do": command, "args": args}).encode() + b"\n")
        return await self.answer()


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A browser page; the process is ended on the way out."""
    require_system_tool(CHROMIUM, "chromium")
    process = await trio.lowlevel.open_process(
        [sys.executable, str(Path(__file__).parent / "browser.py"), CHROMIUM],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        browser = Browser(process)
        with trio.fail_after(WAIT):
            await browser.answer()  # started: Chromium's version
        yield browser
    finally:
        with trio.CancelScope(shield=True):
            assert process.stdin is not None
            await process.stdin.aclose()  # the browser closes at the end of its input
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


class Echo(pgbus.Actor):
    async def handle(self, message: object) -> object:
        return message


class Fails(pgbus.Actor):
    async def handle(self, message: object) -> None:
        raise ValueError("no good")


@asynccontextmanager
async def a_busy_bus(dsn: str) -> AsyncIterator[tuple[pgbus.Bus, dict[str, str]]]:
    """
    A node with a public actor, a singleton, an inbound and an outbound bridge, and a durable
    group whose one message became a dead letter; the names it used.
    """
    names = {
        "node": unique("dash-a"),
        "echo": unique("echo"),
        "singleton": unique("lonely"),
        "durable": unique("jobs"),
        "orders": unique("orders"),
        "replies": unique("replies"),
    }
    async with pgbus.open_bus(dsn, node=names["node"], keepalive=KEEPALIVE) as bus:
        await bus.spawn(Echo, name=names["echo"], inbox_capacity=10, public=True)
        await bus.spawn(Echo, name=names["singleton"], inbox_capacity=10, singleton=True)
        bus.add_channel("jobs", 5)
        await bus.bridge_in(names["durable"], "jobs", durable=True, group="g", max_attempts=1)
        await bus.spawn(Fails, name="fails", inbox="jobs")
        bus.add_channel("orders", 10)
        await bus.bridge_in(names["orders"], "orders")
        bus.add_channel("replies", 10)
        await bus.bridge_out("replies", names["replies"])
        await bus.notify(names["durable"], "poison", durable=True)
        yield bus, names


@asynccontextmanager
async def another_node(dsn: str) -> AsyncIterator[tuple[str, trio.CancelScope]]:
    """A second node (its own bus) with a public actor; cancel the scope to stop it."""
    name = unique("dash-b")
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                async with pgbus.open_bus(dsn, node=name, keepalive=KEEPALIVE) as other:
                    await other.spawn(Echo, name=unique("other"), inbox_capacity=10, public=True)
                    task_status.started()
                    await trio.sleep_forever()

        await nursery.start(serve)
        yield name, scope
        scope.cancel()


async def get(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """GET (or POST *data*) with urllib in a worker thread: (status, body), 4xx/5xx included."""

    def fetch() -> tuple[int, str]:
        request = urllib.request.Request(url, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read().decode()

    return await trio.to_thread.run_sync(fetch)


async def test_the_page_shows_the_cluster_and_follows_it_live(pg: PgHelper) -> None:
    """Nodes, actors, singleton, durable group, dead letter shown; publishes, a stop, no server."""
    async with (
        a_busy_bus(pg.dsn) as (bus, names),
        trio.open_nursery() as nursery,
        another_node(pg.dsn) as (other, stop_other),
        chromium() as browser,
    ):
        server = trio.CancelScope()

        async def serve_page(task_status: trio.TaskStatus[str]) -> None:
            with server:
                await pgbus.serve_metrics(bus, "127.0.0.1:0", task_status=task_status)

        url = await nursery.start(serve_page)
        await browser.do("goto", f"{url}/", WAIT)
        await browser.do("expect_text", "#live", "live", WAIT)
        node = names["node"]
        await browser.do("expect_row", "nodes", node, [names["echo"], names["orders"]], WAIT)
        await browser.do("expect_row", "nodes", other, [], WAIT)
        await browser.do("expect_row", "singletons", names["singleton"], [node], WAIT)
        group = f"{names['durable']}/g"
        await browser.do("expect_cell", "durable", group, 5, "1", WAIT)  # dead letters
        letter = await browser.do("row_text", "dead-letters", names["durable"], WAIT)
        assert "ValueError: no good" in letter
        bridge = f"in/{names['orders']}/orders"
        await browser.do("expect_row", "bridges", bridge, ["connected"], WAIT)

        await pg.execute(
            "SELECT pg_notify($1, n::text) FROM generate_series(1, 3) AS n", names["orders"]
        )
        for n in range(3):
            await bus.send("replies", f"reply {n}")
        messages_column = 4
        await browser.do("expect_cell", "bridges", bridge, messages_column, "3", UPDATE_WAIT)
        outbound = f"out/{names['replies']}/replies"
        await browser.do("expect_cell", "bridges", outbound, messages_column, "3", UPDATE_WAIT)
        if shot := os.environ.get("PGBUS_DASHBOARD_SCREENSHOT"):
            await browser.do("screenshot", shot)

        stop_other.cancel()  # the second node's bus closes: its session ends
        await browser.do("expect_no_row", "nodes", other, UPDATE_WAIT)

        server.cancel()  # the page says so when its server is gone
        await browser.do("expect_text", "#live", "disconnected", UPDATE_WAIT)
        nursery.cancel_scope.cancel()
    await pg.wait_for_no_backends()


async def page_shows(url: str, cluster: dict[str, Any], within: float) -> bool:
    """Whether /status.json's "cluster" is *cluster* at some point in the next *within* s."""
    with trio.move_on_after(within):
        while True:
            _, body = await get(f"{url}/status.json")
            if json.loads(body)["cluster"] == cluster:
                return True
            await trio.sleep(0.05)
    return False


async def test_status_json_and_the_page_read_the_same(pg: PgHelper) -> None:
    """``pgbus status --json`` prints what /status.json has under "cluster", dead letter too."""
    async with a_busy_bus(pg.dsn) as (bus, names), trio.open_nursery() as nursery:
        url = await nursery.start(pgbus.serve_metrics, bus, "127.0.0.1:0")
        with trio.fail_after(WAIT):
            while True:  # until the dead letter is written and the singleton held
                status, body = await get(f"{url}/status.json")
                assert status == 200
                cluster = json.loads(body)["cluster"]
                held = [s for s in cluster["singletons"] if s["name"] == names["singleton"]]
                if cluster["dead_letters"] and held and held[0]["holder"]:
                    break
                await trio.sleep(0.05)
        with trio.fail_after(WAIT):
            while True:  # a group's seen_at moves on: until one page catches up with the command
                printed = await run_to_completion("status", "--json", "--dsn", pg.dsn)
                assert printed.returncode == 0, printed.stderr
                cluster = json.loads(printed.stdout)
                if await page_shows(url, cluster, within=3.0):
                    break
        [letter] = [d for d in cluster["dead_letters"] if d["channel"] == names["durable"]]
        assert (letter["group"], letter["attempts"], letter["error"]) == (
            "g",
            1,
            "ValueError: no good",
        )
        text = await run_to_completion("status", "--dsn", pg.dsn)
        assert (
            f"dead letter {letter['id']} of {names['durable']!r} group 'g' after 1 attempt(s): "
            "ValueError: no good"
        ) in text.stdout.decode().splitlines()
        nursery.cancel_scope.cancel()


async def test_the_bus_reads_for_the_page_on_its_own_connection_only_when_asked(
    pg: PgHelper,
) -> None:
    """No viewer, no dashboard connection; 20 viewers: one, named pgbus:dashboard; read-only."""
    async with pgbus.open_bus(pg.dsn) as bus, trio.open_nursery() as nursery:
        url = await nursery.start(pgbus.serve_metrics, bus, "127.0.0.1:0")
        status, page = await get(f"{url}/")
        assert status == 200
        assert '<script src="dashboard.js"' in page
        names = [r["application_name"] for r in await pg.backends()]
        assert "pgbus:dashboard" not in names
        serials = set()

        async def view() -> None:
            status, body = await get(f"{url}/status.json")
            assert status == 200
            serials.add(json.loads(body)["serial"])

        async with trio.open_nursery() as viewers:
            for _ in range(20):
                viewers.start_soon(view)
        assert len(serials) <= 2, serials  # 20 viewers at once: one read (two at a boundary)
        names = [r["application_name"] for r in await pg.backends()]
        assert names.count("pgbus:dashboard") == 1
        refused = await get(f"{url}/actions/dead-letters", data=b"{}")
        assert refused == (
            403,
            "forbidden: the dashboard is read-only (start it with --allow-actions)\n",
        )
        assert (await get(f"{url}/status.json", data=b"{}"))[0] == 405
        nursery.cancel_scope.cancel()
    await pg.wait_for_no_backends()


async def test_a_bridge_rate_is_messages_per_second_between_two_refreshes(pg: PgHelper) -> None:
    """20 notifications: one snapshot shows a rate above 0 for the bridge; counts are exact."""
    channel = unique("rated")
    async with pgbus.open_bus(pg.dsn) as bus, trio.open_nursery() as nursery:
        bus.add_channel("in", 100)
        await bus.bridge_in(channel, "in")
        url = await nursery.start(pgbus.serve_metrics, bus, "127.0.0.1:0")
        await get(f"{url}/status.json")  # the refreshes begin: the next ones count from here
        await pg.execute("SELECT pg_notify($1, n::text) FROM generate_series(1, 20) AS n", channel)
        rates = []
        with trio.fail_after(WAIT):
            while not rates or rates[-1][0] < 20 or not any(rate for _, rate in rates):
                await trio.sleep(0.05)
                _, body = await get(f"{url}/status.json")
                [bridge] = [
                    b for b in json.loads(body)["local"]["bridges"] if b["postgres"] == channel
                ]
                rates.append((bridge["messages"], bridge["rate"]))
        # counted over at least one refresh interval (1 s): never more than 20 a second
        assert all(rate is None or 0 <= rate <= 20 for _, rate in rates), rates
        nursery.cancel_scope.cancel()


async def test_the_dashboard_can_be_left_out(pg: PgHelper, tmp_path: Path) -> None:
    """[metrics] dashboard = false (serve_metrics(dashboard=False)): / is 404; a bad value: 2."""
    config = tmp_path / "bus.toml"
    config.write_text('[metrics]\nlisten = "127.0.0.1:0"\ndashboard = false\n')
    assert load_config(str(config)).metrics == MetricsConfig("127.0.0.1:0", dashboard=False)
    config.write_text('[metrics]\nlisten = "127.0.0.1:0"\ndashboard = "no"\n')
    with pytest.raises(pgbus.ConfigError, match=r"\[metrics\] dashboard must be true or false"):
        load_config(str(config))
    async with pgbus.open_bus(pg.dsn) as bus, trio.open_nursery() as nursery:
        url = await nursery.start(partial(pgbus.serve_metrics, bus, "127.0.0.1:0", dashboard=False))
        assert await get(f"{url}/") == (404, "not found: try /metrics or /healthz\n")
        nursery.cancel_scope.cancel()


async def test_a_dead_letter_is_purged_from_the_page_only_with_the_token(pg: PgHelper) -> None:
    """serve_dashboard with a token: a wrong token is refused on the page; the right one purges."""
    async with a_busy_bus(pg.dsn) as (_bus, names), trio.open_nursery() as nursery:
        url = await nursery.start(
            partial(serve_dashboard, pg.dsn, "127.0.0.1:0", actions_token="let-me")
        )
        async with chromium() as browser:
            await browser.do("goto", url, WAIT)
            letter = await browser.do("row_text", "dead-letters", names["durable"], WAIT)
            assert "ValueError: no good" in letter
            await browser.do("click_in_row", "dead-letters", names["durable"], "purge", "no", WAIT)
            await browser.do(
                "expect_text", "#notice", "forbidden: a valid token is needed", UPDATE_WAIT
            )
            group = f"{names['durable']}/g"
            await browser.do("expect_cell", "durable", group, 5, "1", UPDATE_WAIT)
            await browser.do(
                "click_in_row", "dead-letters", names["durable"], "purge", "let-me", WAIT
            )
            await browser.do("expect_text", "#notice", "purge: 1 dead letter(s)", UPDATE_WAIT)
            await browser.do("expect_cell", "durable", group, 5, "0", UPDATE_WAIT)
            await browser.do("expect_no_row_with", "dead-letters", names["durable"], UPDATE_WAIT)
        nursery.cancel_scope.cancel()
    await pg.wait_for_no_backends()


async def test_the_page_says_when_the_database_is_down_and_keeps_the_last_data() -> None:
    """Server stopped: error named (no password), the last cluster kept as stale; back: clear."""
    async with open_embedded_postgres() as server, trio.open_nursery() as nursery:
        secret = "pw-" + uuid.uuid4().hex
        url = await nursery.start(serve_dashboard, with_password(server.dsn, secret), "127.0.0.1:0")
        _, body = await get(f"{url}status.json")
        before = json.loads(body)
        assert (before["error"], before["stale"]) == (None, False)
        await server.stop_server(mode="immediate")
        with trio.fail_after(WAIT):
            while True:
                down = json.loads((await get(f"{url}status.json"))[1])
                if down["error"]:
                    break
                await trio.sleep(0.05)
        assert f"PostgreSQL at {describe_dsn(server.dsn)}" in down["error"], down["error"]
        assert secret not in json.dumps(down)
        assert down["stale"] is True
        assert down["cluster"] == before["cluster"]
        await server.start_server()
        with trio.fail_after(WAIT):
            while True:
                back = json.loads((await get(f"{url}status.json"))[1])
                if back["error"] is None:
                    break
                await trio.sleep(0.05)
        assert back["stale"] is False
        nursery.cancel_scope.cancel()


def with_password(dsn: str, password: str) -> str:
    """*dsn* (a URI) with *password* added to its user (the test server trusts; it is unused)."""
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user or 'postgres'}:{password}@{host}"))


async def test_the_dashboard_command_serves_without_a_bus_and_acts_with_the_token(
    pg: PgHelper,
) -> None:
    """pgbus dashboard: the cluster, no password anywhere, actions only with the token, exit 0."""
    secret = "pw-" + uuid.uuid4().hex
    dsn = with_password(pg.dsn, secret)
    async with a_busy_bus(pg.dsn) as (_bus, names):
        env = pgbus_env(PGBUS_DSN=dsn, PGBUS_DASHBOARD_TOKEN="let-me")
        args = ("dashboard", "--listen", "127.0.0.1:0", "--allow-actions", "--refresh", "0.5")
        async with running(*args, env=env) as dashboard:
            line = await dashboard.expect("stderr", "dashboard of ")
            url = line.split(" on ")[1].split(" ")[0].rstrip("/")
            assert secret not in line
            with trio.fail_after(WAIT):
                while True:
                    _, body = await get(f"{url}/status.json")
                    snapshot = json.loads(body)
                    letters = [
                        d
                        for d in snapshot["cluster"]["dead_letters"]
                        if d["channel"] == names["durable"]
                    ]
                    if letters:
                        break
                    await trio.sleep(0.05)
            assert snapshot["local"] is None
            assert snapshot["actions"] is True
            assert names["node"] in [n["name"] for n in snapshot["cluster"]["nodes"]]
            assert secret not in body
            assert secret not in (await get(f"{url}/"))[1]
            action = json.dumps(
                {
                    "action": "retry",
                    "channel": names["durable"],
                    "group": "g",
                    "ids": [letters[0]["id"]],
                }
            ).encode()
            refused = await get(f"{url}/actions/dead-letters", data=action)
            assert refused[0] == 403
            wrong = await get(
                f"{url}/actions/dead-letters", data=action, headers={"Authorization": "Bearer no"}
            )
            assert wrong[0] == 403
            done = await get(
                f"{url}/actions/dead-letters",
                data=action,
                headers={"Authorization": "Bearer let-me", "Content-Type": "application/json"},
            )
            assert done == (200, json.dumps({"action": "retry", "count": 1}, separators=(",", ":")))
            assert await dashboard.stop(signal.SIGTERM, timeout=10) == 0
            assert secret not in dashboard.output()
    await pg.wait_for_no_backends()


async def test_the_dashboard_command_fails_in_one_line() -> None:
    """Unreachable database: exit 1, one line, no password; a bad --refresh or --listen: 2."""
    secret = "pw-" + uuid.uuid4().hex
    dsn = f"postgresql://postgres:{secret}@127.0.0.1:{closed_port()}/postgres"
    result = await run_to_completion("dashboard", "--dsn", dsn, "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    line = one_error_line(result.stderr.decode())
    assert secret not in line
    assert f"127.0.0.1:{dsn.rsplit(':', 1)[1].split('/')[0]}" in line
    result = await run_to_completion("dashboard", "--dsn", dsn, "--refresh", "0")
    assert result.returncode == 2
    assert "--refresh: must be between 0.2 and 60 seconds (got 0)" in result.stderr.decode()
    result = await run_to_completion("dashboard", "--dsn", dsn, "--listen", "localhost")
    assert result.returncode == 2
    assert one_error_line(result.stderr.decode()) == (
        'pgbus: error: dashboard listen must be "HOST:PORT", e.g. "127.0.0.1:9464" or '
        "\"[::1]:9464\", port 0..65535 (got 'localhost')."
    )


async def test_the_dashboard_command_takes_dsn_and_name_from_config(
    pg: PgHelper, tmp_path: Path
) -> None:
    """--config: its [postgres] dsn and application_name (the connection is NAME:dashboard)."""
    name = unique("pgbus-ops")
    config = tmp_path / "bus.toml"
    config.write_text(f'[postgres]\ndsn = "{pg.dsn}"\napplication_name = "{name}"\n')
    args = ("dashboard", "--config", str(config), "--listen", "127.0.0.1:0")
    async with running(*args) as dashboard:
        line = await dashboard.expect("stderr", "dashboard of ")
        url = line.split(" on ")[1].split(" ")[0]
        status, _ = await get(f"{url}status.json")
        assert status == 200
        names = [r["application_name"] for r in await pg.backends()]
        assert f"{name}:dashboard" in names
        assert await dashboard.stop(signal.SIGINT, timeout=10) == 0
    await pg.wait_for_no_backends()


class Counter(pgbus.Entity):
    """A keyed actor counting its messages (its kind is set per test: kinds are cluster-wide)."""

    async def handle(self, message: object) -> int:
        self.state["n"] = self.state.get("n", 0) + 1
        return int(self.state["n"])


async def test_the_page_shows_each_keyed_actor_kind_with_its_nodes(pg: PgHelper) -> None:
    """A hosted kind: keys, waiting, dead, its node's activations and shards; this bus's counts."""
    kind = unique("counter")
    hosted = type("Hosted", (Counter,), {"kind": kind})
    node = unique("dash-e")
    async with (
        pgbus.open_bus(pg.dsn, node=node, keepalive=KEEPALIVE) as bus,
        trio.open_nursery() as nursery,
        chromium() as browser,
    ):
        await bus.host(hosted)
        for key in ("a", "b", "c"):
            assert await bus.entity(kind, key).ask("hello", timeout=WAIT) == 1
        url = await nursery.start(pgbus.serve_metrics, bus, "127.0.0.1:0")
        await browser.do("goto", f"{url}/", WAIT)
        await browser.do("expect_row", "entities", kind, [node, "3 active · 256 shards"], WAIT)
        await browser.do("expect_cell", "entities", kind, 2, "3", WAIT)  # keys
        await browser.do("expect_cell", "entities", kind, 3, "0", WAIT)  # waiting
        await browser.do("expect_cell", "entities", kind, 4, "0", WAIT)  # dead
        await browser.do("expect_cell", "hosted", kind, 2, "256", WAIT)  # this bus: shards
        await browser.do("expect_cell", "hosted", kind, 4, "3", WAIT)  # handled
        await bus.entity(kind, "d").tell("hello")
        await browser.do("expect_cell", "entities", kind, 2, "4", WAIT)
        await browser.do("expect_cell", "hosted", kind, 4, "4", WAIT)
        nursery.cancel_scope.cancel()
    await pg.wait_for_no_backends()
