"""
Faults, against a real PostgreSQL, with the real clock: half-open paths, a server-wide idle
timeout, overflow under bursts, signals under load and at random moments of start-up.

Rules: every wait is bounded (`trio.fail_after`); polling is used only where PostgreSQL or the
bus has no event to wait for (it says so where it does); nothing asserts a duration. What the
tests measure (time to detect and resume, counts) is printed, for the record, with ``-s``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import signal
import textwrap
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import trio
import trio.testing
from processes import ROOT, pgbus_env, running
from proxy import open_proxy

import pgbus
from pgbus._config import load_config
from pgbus._run import start_config

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30


def unique(prefix: str = "f") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def until(condition, what: str, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    """Poll *condition* until true (for states nothing signals); fail naming *what*."""
    with trio.move_on_after(timeout):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -- half-open connections -----------------------------------------------------------------------


async def test_half_open_publishing_connection_is_replaced_and_nothing_is_lost(
    pg: PgHelper, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Existing paths stall (no FIN, no RST): the publisher notices, reconnects, republishes."""
    caplog.set_level(logging.WARNING)
    name = unique()
    async with (
        open_proxy(pg_dsn) as proxy,
        pgbus.open_bus(proxy.dsn, keepalive=1.0) as bus,
        pg.listen(name) as received,
    ):
        bus.add_channel("out", math.inf)
        await bus.bridge_out("out", name)
        await bus.send("out", "before")
        with trio.fail_after(WAIT):
            assert (await received.receive())[1] == "before"
        proxy.stall()  # existing connections only: a new one gets through
        started = time.monotonic()
        for i in range(20):
            await bus.send("out", f"m{i}")
        expected = {f"m{i}" for i in range(20)}
        seen: set[str] = set()
        with trio.fail_after(WAIT):
            while not expected <= seen:
                seen.add((await received.receive())[1])
        resumed = time.monotonic() - started
    # At-least-once: "before" comes again if its reply was still unread when the path stalled.
    assert seen - {"before"} == expected
    text = warnings_of(caplog)
    assert "connection 'publish " in text, text
    assert "half-open" in text, text
    print(f"half-open publisher: resumed after {resumed:.2f}s (keepalive 1s)")


async def test_a_proxy_that_stalls_every_connection_is_waited_out(
    pg: PgHelper, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every path stalls, new ones too: the bus keeps trying; once paths work, all flows again."""
    caplog.set_level(logging.WARNING)
    name = unique()
    async with (
        open_proxy(pg_dsn) as proxy,
        pgbus.open_bus(proxy.dsn, keepalive=1.0) as bus,
        pg.listen(name) as received,
    ):
        bus.add_channel("out", math.inf)
        bus.add_channel("in", math.inf)
        await bus.bridge_out("out", name)
        await bus.bridge_in(name, "in")
        await bus.send("out", "before")
        with trio.fail_after(WAIT):
            assert (await received.receive())[1] == "before"
            assert (await bus.channel("in").receive()).payload == "before"
        proxy.stall(new=True)
        await bus.send("out", "during")
        # Nothing signals "the bus has noticed": watch what it reports.
        await until(
            lambda: not any(b.connected for b in bus.statistics().bridges), "both bridges down"
        )
        proxy.resume_new()
        with trio.fail_after(WAIT):
            assert (await received.receive())[1] == "during"
            gap = await bus.channel("in").receive()
        assert gap == pgbus.Gap(channel=name, reason="reconnect", dropped=None)
        await bus.send("out", "after")
        with trio.fail_after(WAIT):
            later = [(await bus.channel("in").receive()).payload]
            while later[-1] != "after":
                later.append((await bus.channel("in").receive()).payload)
        assert later in (["after"], ["during", "after"])
    assert "did not answer a keepalive" in warnings_of(caplog) or "half-open" in warnings_of(caplog)


async def test_a_long_query_that_the_server_is_running_is_not_aborted(pg_dsn: str) -> None:
    """The guard asks the server before giving up: a statement still running is left alone."""
    async with pgbus.open_bus(pg_dsn, keepalive=0.4) as bus, bus.transaction() as tx:
        assert await tx.fetchval("SELECT 1 FROM pg_sleep(1.0)") == 1


async def test_a_stopped_backend_fails_the_statement_within_keepalive(
    pg: PgHelper, pg_dsn: str
) -> None:
    """A backend that stops answering (SIGSTOP) fails the statement; it does not hang."""
    async with pgbus.open_bus(pg_dsn, keepalive=0.5) as bus:
        async with bus.transaction() as tx:
            pid = await tx.fetchval("SELECT pg_backend_pid()")
        os.kill(pid, signal.SIGSTOP)
        try:
            with (
                trio.fail_after(WAIT),
                pytest.raises(pgbus.DatabaseUnavailableError, match="half-open"),
            ):
                async with bus.transaction() as tx:
                    await tx.fetchval("SELECT 1")
        finally:
            os.kill(pid, signal.SIGCONT)
    await pg.wait_for_no_backends()


async def test_a_listener_that_receives_nothing_says_so(
    pg: PgHelper, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a proxy that carries no notifications (transaction pooling), one clear error."""
    caplog.set_level(logging.WARNING)
    async with open_proxy(pg_dsn) as proxy:
        proxy.drop_notifications = True
        async with pgbus.open_bus(proxy.dsn, keepalive=0.5) as bus:
            bus.add_channel("in", 10)
            with trio.move_on_after(1.5):  # bridge_in waits for a listener that receives
                await bus.bridge_in(unique(), "in")
            await until(lambda: "receives no notifications" in warnings_of(caplog), "the error")
    [line] = {
        r.getMessage() for r in caplog.records if "receives no notifications" in r.getMessage()
    }
    assert "transaction-pooling proxy" in line
    assert "session pooling" in line


# -- backends killed under steady load ----------------------------------------------------------


def check_stream(stream: list[object], sent: int) -> tuple[int, int, int]:
    """
    Every id 1..*sent* was received, or lies inside a reported Gap (after the last id received
    before the Gap, before the first after it). Returns (lost, duplicates, gaps).
    """
    received: list[int] = []
    gap_after: list[int] = []  # for each Gap: how many ids had been received before it
    for item in stream:
        if isinstance(item, pgbus.Gap):
            gap_after.append(len(received))
        else:
            received.append(int(item.payload))  # type: ignore[attr-defined]
    seen = set(received)
    duplicates = len(received) - len(seen)
    missing = sorted(set(range(1, sent + 1)) - seen)
    for lost in missing:
        before = max((i for i in seen if i < lost), default=0)
        after = min((i for i in seen if i > lost), default=sent + 1)
        explained = any(
            (k == 0 or received[k - 1] <= before) and (k == len(received) or received[k] >= after)
            for k in gap_after
        )
        assert explained, f"id {lost} is missing and no Gap marks its place"
    return len(missing), duplicates, len(gap_after)


async def relay_under_kills(pg: PgHelper, pg_dsn: str, *, seconds: float, kills: int) -> None:
    """Steady traffic with unique ids while the listening backend is killed about *kills* times."""
    name = unique()
    stream: list[object] = []
    killed: list[float] = []
    resumed: list[float] = []
    async with pgbus.open_bus(pg_dsn, keepalive=2) as bus:
        bus.add_channel("in", math.inf)
        await bus.bridge_in(name, "in")
        sent = 0
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                async for item in bus.channel("in").receiver():
                    if isinstance(item, pgbus.Gap):
                        resumed.append(trio.current_time())
                    stream.append(item)

            nursery.start_soon(consume)
            deadline = trio.current_time() + seconds
            kill_every = seconds / (kills + 1)
            next_kill = trio.current_time() + kill_every
            while trio.current_time() < deadline:  # traffic goes on while the listener is down
                sent += 1
                await pg.execute("SELECT pg_notify($1, $2)", name, str(sent))
                if trio.current_time() >= next_kill and len(resumed) == len(killed):
                    next_kill += kill_every * random.uniform(0.5, 1.5)
                    killed.append(trio.current_time())
                    await pg.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'pgbus:listen' AND datname = current_database()"
                    )
            await until(lambda: len(resumed) == len(killed), "the Gap after the last kill")
            await pg.execute("SELECT pg_notify($1, 'end')", name)
            await until(lambda: getattr(stream[-1], "payload", None) == "end", "the last message")
            nursery.cancel_scope.cancel()
    lost, duplicates, gaps = check_stream(stream[:-1], sent)
    assert gaps == len(killed)
    assert duplicates == 0
    times = sorted(r - k for k, r in zip(killed, resumed, strict=True))
    print(
        f"{sent} sent, {len(killed)} kills: lost {lost} (each inside a Gap), {duplicates} "
        f"duplicates; resumed p50 {times[len(times) // 2] * 1000:.0f} ms, "
        f"max {times[-1] * 1000:.0f} ms"
    )


async def test_backend_kills_under_steady_load_lose_only_what_gaps_announce(
    pg: PgHelper, pg_dsn: str
) -> None:
    """Ten kills of the listening backend under load: every missing id sits inside a Gap."""
    await relay_under_kills(pg, pg_dsn, seconds=4, kills=10)


@pytest.mark.soak
async def test_soak_relayed_traffic_while_backends_are_killed_at_random(
    pg: PgHelper, pg_dsn: str
) -> None:
    """Minutes of traffic, kills at random (run with ``-m soak``; PGBUS_SOAK_SECONDS)."""
    seconds = float(os.environ.get("PGBUS_SOAK_SECONDS", "180"))
    await relay_under_kills(pg, pg_dsn, seconds=seconds, kills=int(seconds / 3))


# -- a server-wide idle timeout ------------------------------------------------------------------


async def test_a_server_wide_idle_session_timeout_does_not_churn_the_bus(
    pg: PgHelper, pg_dsn: str
) -> None:
    """pgbus's own sessions opt out of idle_session_timeout: idle, nothing reconnects."""
    database = await pg.fetchval("SELECT current_database()")
    quoted = '"' + database.replace('"', '""') + '"'
    await pg.execute(f"ALTER DATABASE {quoted} SET idle_session_timeout = '300ms'")
    try:
        name = unique()
        async with pgbus.open_bus(pg_dsn, keepalive=10) as bus:
            bus.add_channel("in", 10)
            bus.add_channel("out", 10)
            await bus.bridge_in(name, "in")
            await bus.bridge_out("out", name)
            await trio.sleep(1.0)  # idle for a while: the timeout is what is being tested
            await bus.send("out", "still here")
            with trio.fail_after(WAIT):
                message = await bus.channel("in").receive()
            assert message == pgbus.Notification(name, "still here", message.pid)
            assert {b.reconnects for b in bus.statistics().bridges} == {0}
    finally:
        await pg.execute(f"ALTER DATABASE {quoted} RESET idle_session_timeout")


# -- overflow under bursts -----------------------------------------------------------------------


async def test_a_drop_leaves_its_gap_without_waiting_for_more_traffic(
    pg: PgHelper, pg_dsn: str
) -> None:
    """The last drops of a burst are reported as soon as the consumer makes room."""
    name = unique()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 2)
        await bus.bridge_in(name, "in", overflow="drop_newest")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 100) AS i", name)
        await until(lambda: bus.statistics().bridges[0].dropped == 98, "98 drops")
        with trio.fail_after(WAIT):
            stream = [await bus.channel("in").receive() for _ in range(3)]
    assert [getattr(m, "payload", None) for m in stream[:2]] == ["1", "2"]
    assert stream[2] == pgbus.Gap(channel=name, reason="overflow", dropped=98)


@pytest.mark.parametrize("overflow", ["block", "drop_newest", "drop_oldest"])
async def test_each_overflow_policy_accounts_for_every_message_of_a_burst(
    pg: PgHelper, pg_dsn: str, overflow: str
) -> None:
    """A burst of 20,000 into a channel of 50 with a slow consumer: delivered + dropped = sent."""
    name = unique()
    sent = 20_000
    process = psutil.Process()
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 50)
        await bus.bridge_in(name, "in", overflow=overflow)
        before = process.memory_info().rss
        await pg.execute(
            "SELECT pg_notify($1, i::text) FROM generate_series(1, $2::int) AS i", name, sent
        )
        delivered: list[int] = []
        dropped = 0
        peak = before
        with trio.fail_after(WAIT * 2):
            while len(delivered) + dropped < sent:
                message = await bus.channel("in").receive()
                if isinstance(message, pgbus.Gap):
                    dropped += message.dropped or 0
                else:
                    delivered.append(int(message.payload))
                if len(delivered) % 100 == 0:
                    await trio.sleep(0.001)  # a slow consumer
                    peak = max(peak, process.memory_info().rss)
        stats = bus.statistics().bridges[0]
    assert delivered == sorted(delivered)  # order kept
    assert len(delivered) + dropped == sent
    assert stats.dropped == dropped
    if overflow == "block":
        assert delivered == list(range(1, sent + 1))
    growth = (peak - before) / 2**20
    assert growth < 50, f"RSS grew by {growth:.1f} MB during the burst"
    print(f"{overflow}: {len(delivered)} delivered, {dropped} dropped, RSS +{growth:.1f} MB")


async def test_a_full_block_channel_is_named_while_it_holds_the_socket(
    pg: PgHelper, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody reads a full "block" channel: a warning says which one, and for how long."""
    caplog.set_level(logging.WARNING)
    name = unique()
    async with pgbus.open_bus(pg_dsn, keepalive=0.5) as bus:
        bus.add_channel("held", 2)
        await bus.bridge_in(name, "held")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 100) AS i", name)
        await until(lambda: "has been full for" in warnings_of(caplog), "the warning")
    assert re.search(
        rf"inbound channel 'held' \(from Postgres channel '{name}'\) has been full for \d+s",
        warnings_of(caplog),
    )


# -- signals -------------------------------------------------------------------------------------


def bus_config(tmp_path: Path, dsn: str, channel: str, *, delay: float, stop_timeout: float) -> str:
    config = tmp_path / "bus.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [postgres]
            dsn = "{dsn}"
            [supervisor]
            stop_timeout = {stop_timeout}
            [channels.in]
            capacity = 100
            [[bridge]]
            postgres = "{channel}"
            channel = "in"
            direction = "in"
            [actors.slow]
            class = "fixtures_actors.sample:SlowPrinter"
            inbox = "in"
            options = {{ delay = {delay} }}
            """
        )
    )
    return str(config)


def printed(lines: list[str]) -> list[int]:
    return [int(line) for line in lines if line.isdigit()]


async def test_sigterm_lets_actors_handle_what_their_inboxes_hold(
    pg: PgHelper, pg_dsn: str, tmp_path: Path
) -> None:
    """20,000 notifications in, SIGTERM: what was read is handled, in order, and exit 0."""
    name = unique()
    config = bus_config(tmp_path, pg_dsn, name, delay=0.001, stop_timeout=10)
    env = pgbus_env(PYTHONPATH=str(ROOT / "tests"))
    async with running("run", config, env=env) as bus:
        await bus.expect("stderr", "running;")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 20000) AS i", name)
        await bus.expect("stdout", "200")
        at_signal = len(printed(bus.lines["stdout"]))
        assert await bus.stop(signal.SIGTERM, timeout=15) == 0
    handled = printed(bus.lines["stdout"])
    assert handled == list(range(1, len(handled) + 1))  # nothing skipped, in order
    assert len(handled) > at_signal  # the inbox was drained after the signal
    assert "messages left" not in "\n".join(bus.lines["stderr"])
    await pg.wait_for_no_backends()
    print(f"SIGTERM: {at_signal} handled before the signal, {len(handled)} in all")


async def test_sigterm_past_stop_timeout_says_what_was_left(
    pg: PgHelper, pg_dsn: str, tmp_path: Path
) -> None:
    """An actor too slow for stop_timeout: exit 0 anyway, and one line counts what was left."""
    name = unique()
    config = bus_config(tmp_path, pg_dsn, name, delay=0.05, stop_timeout=0.3)
    env = pgbus_env(PYTHONPATH=str(ROOT / "tests"))
    async with running("run", config, env=env) as bus:
        await bus.expect("stderr", "running;")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 500) AS i", name)
        await bus.expect("stdout", "3")
        assert await bus.stop(signal.SIGTERM, timeout=5) == 0
    line = await bus.expect("stderr", "messages left")
    assert re.search(r"messages left: \d+ unhandled in 'in' \(actor 'slow'\)", line), line
    await pg.wait_for_no_backends()


async def test_a_second_signal_cuts_a_slow_shutdown_short(
    pg: PgHelper, pg_dsn: str, tmp_path: Path
) -> None:
    """stop_timeout 60 s and a slow actor: the second Ctrl-C stops now, counting what was left."""
    name = unique()
    config = bus_config(tmp_path, pg_dsn, name, delay=0.05, stop_timeout=60)
    env = pgbus_env(PYTHONPATH=str(ROOT / "tests"))
    async with running("run", config, env=env) as bus:
        await bus.expect("stderr", "running;")
        await pg.execute("SELECT pg_notify($1, i::text) FROM generate_series(1, 500) AS i", name)
        await bus.expect("stdout", "3")
        bus.process.send_signal(signal.SIGINT)
        await bus.expect("stderr", "SIGINT received: stopping")
        assert await bus.stop(signal.SIGINT, timeout=10) == 0  # well before the 60 s
    line = await bus.expect("stderr", "messages left")
    assert re.search(r"messages left: \d+ unhandled in 'in' \(actor 'slow'\)", line), line
    assert "received again: stopping now" in bus.output()
    await pg.wait_for_no_backends()


async def test_a_stop_while_start_up_waits_for_a_listen_ends_start_up_cleanly(
    pg: PgHelper, pg_dsn: str, tmp_path: Path
) -> None:
    """A signal while `pgbus run` waits for a bridge's LISTEN: the actors' start is cancelled."""
    # The moment of a failure seen once in CI, made certain: a LISTEN is shielded (so the
    # server is never left in doubt), so the stop shows only at start_config's next step, the
    # spawn, after every other task of the bus (the supervisor's too) has been cancelled.
    async with open_proxy(pg_dsn) as proxy, trio.open_nursery() as nursery:
        config = load_config(bus_config(tmp_path, proxy.dsn, unique(), delay=0, stop_timeout=2))
        with trio.CancelScope() as stop:
            async with pgbus.open_bus(
                proxy.dsn, keepalive=1.0, supervision=config.supervisor
            ) as bus:
                bus.add_channel("other", 1)
                await bus.bridge_in(unique(), "other")  # the listening connection is up
                proxy.stall()  # no reply to its next LISTEN (given up after keepalive)

                async def stop_once_the_listen_waits() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    stop.cancel()  # what run_config does on SIGINT

                nursery.start_soon(stop_once_the_listen_waits)
                await start_config(bus, config)
    assert stop.cancelled_caught
    assert [(a.name, a.state) for a in bus.statistics().actors] in ([], [("slow", "stopped")])
    await pg.wait_for_no_backends()


PACKAGE_FOLDER = str(Path(pgbus.__file__).resolve().parent) + "/"


def _before_the_handlers(stderr: str) -> bool:
    """A KeyboardInterrupt raised while pgbus's first lines ran, before its handlers were in."""
    lines = stderr.strip().splitlines()
    if not lines or lines[-1].strip() != "KeyboardInterrupt":
        return False
    frames = [line for line in lines if PACKAGE_FOLDER in line]
    first_lines = (f"{PACKAGE_FOLDER}__init__.py", f"{PACKAGE_FOLDER}_signals.py")
    return all(any(name in line for name in first_lines) for line in frames)


def _fault_runs() -> int:
    return int(os.environ.get("PGBUS_FAULT_RUNS", "24"))


async def test_signals_at_random_moments_never_hang_or_print_a_traceback(
    pg: PgHelper, pg_dsn: str, tmp_path: Path
) -> None:
    """SIGINT/SIGTERM/SIGHUP at random moments of start-up and shutdown: a clean exit, always."""
    name = unique()
    config = bus_config(tmp_path, pg_dsn, name, delay=0.0, stop_timeout=2)
    env = pgbus_env(PYTHONPATH=str(ROOT / "tests"))
    rng = random.Random(int(os.environ.get("PGBUS_FAULT_SEED", "0")) or None)
    outcomes: dict[str, int] = {}
    for _ in range(_fault_runs()):
        first = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
        async with running("run", config, env=env) as bus:
            await trio.sleep(rng.uniform(0, 1.2))  # a random moment: that is the test
            bus.process.send_signal(first)
            if rng.random() < 0.3:  # a second signal while it shuts down
                await trio.sleep(rng.uniform(0, 0.2))
                if bus.process.returncode is None:
                    bus.process.send_signal(rng.choice([signal.SIGINT, signal.SIGTERM]))
            status = await bus.wait(timeout=15)
        stderr = "\n".join(bus.lines["stderr"])
        # A frame of pgbus's own code (its package folder, wherever the checkout is: a clone
        # named "pgbus" puts "/pgbus/" in every path), or a line pgbus printed.
        ours = PACKAGE_FOLDER in stderr or any(
            line.startswith("pgbus") for line in bus.lines["stderr"]
        )
        if status != 0 or "Traceback" in stderr:
            # Only a signal that came while the interpreter itself was starting, before pgbus's
            # handlers were in place, may end it otherwise: that traceback has no pgbus frame,
            # or only frames of the package's first lines, which install the handlers.
            assert not ours or _before_the_handlers(stderr), (first.name, status, stderr)
        key = f"{first.name} -> {status}"
        outcomes[key] = outcomes.get(key, 0) + 1
    await pg.wait_for_no_backends()
    print(f"signals at random moments: {outcomes}")
