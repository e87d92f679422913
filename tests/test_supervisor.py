"""
The supervisor on a bus without PostgreSQL: strategies, restart kinds, intensity, backoff, shutdown.

Every test takes `autojump_clock` as an argument (pytest-trio only uses a clock it is handed
that way, not one from ``usefixtures``): backoff delays and timeouts pass in virtual time.
Tasks are ordered with `trio.testing.wait_all_tasks_blocked`; `trio.sleep` appears only to let
virtual time pass (between failures, past a backoff).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
import trio
import trio.testing

import pgbus


class Member(pgbus.Actor):
    """Records on_start and on_stop in *log*; fails on the message ``"crash"``."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.log = log

    async def on_start(self) -> None:
        self.log.append(("start", self.name))

    async def handle(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError(f"{self.name} was told to crash")
        return message

    async def on_stop(self) -> None:
        self.log.append(("stop", self.name))


class FirstRunEnds(pgbus.Actor):
    """The first incarnation's run() fails or returns (option *how*); later ones keep running."""

    def __init__(self, how: str, starts: list[float]) -> None:
        self.how = how
        self.starts = starts

    async def on_start(self) -> None:
        self.starts.append(trio.current_time())

    async def run(self) -> None:
        if len(self.starts) == 1:
            if self.how == "fail":
                raise RuntimeError("first run fails")
            return
        await trio.sleep_forever()


class AlwaysFails(pgbus.Actor):
    """run() fails at once, every time; records when each incarnation started and stopped."""

    def __init__(
        self, starts: list[float], stops: list[str], enough: trio.Event | None = None
    ) -> None:
        self.starts = starts
        self.stops = stops
        self.enough = enough

    async def on_start(self) -> None:
        self.starts.append(trio.current_time())
        if self.enough is not None and len(self.starts) == 8:
            self.enough.set()

    async def run(self) -> None:
        raise RuntimeError("boom")

    async def on_stop(self) -> None:
        self.stops.append(self.name)


class Busy(pgbus.Actor):
    """Handles each message forever; records its stop in *log*."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.log = log

    async def handle(self, message: Any) -> None:
        await trio.sleep_forever()

    async def on_stop(self) -> None:
        self.log.append(("stop", self.name))


class Sleeper(pgbus.Actor):
    """Has no inbox; its run() waits forever; records its stop in *log*."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.log = log

    async def run(self) -> None:
        await trio.sleep_forever()

    async def on_stop(self) -> None:
        self.log.append(("stop", self.name))


class StuckOnStop(pgbus.Actor):
    """An on_stop that never returns by itself."""

    async def on_stop(self) -> None:
        await trio.sleep_forever()


class SlowStart(pgbus.Actor):
    """An on_start that takes 10 seconds; run() returns once *release* is set."""

    def __init__(self, release: trio.Event) -> None:
        self.release = release

    async def on_start(self) -> None:
        await trio.sleep(10)

    async def run(self) -> None:
        await self.release.wait()


def supervisor_records(caplog: pytest.LogCaptureFixture, level: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pgbus.supervisor" and r.levelname == level]


def actor_table(bus: pgbus.Bus) -> dict[str, tuple[str, int]]:
    return {a.name: (a.state, a.restarts) for a in bus.statistics().actors}


async def spawn_members(bus: pgbus.Bus, log: list[tuple[str, str]], *names: str) -> None:
    for name in names:
        await bus.spawn(Member, name=name, inbox_capacity=1, options={"log": log})


async def crash(bus: pgbus.Bus, name: str) -> None:
    """Make *name* fail, and return once the supervisor waits out its backoff."""
    await bus.send(name, "crash")
    await trio.testing.wait_all_tasks_blocked()


# -- strategies ----------------------------------------------------------------------------------


async def test_one_for_one_restarts_only_the_failed_actor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under one_for_one, only the actor that failed is stopped and started again."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus(strategy="one_for_one") as bus:
        await spawn_members(bus, log, "a", "b", "c")
        del log[:]
        await crash(bus, "b")
        assert actor_table(bus)["b"] == ("restarting", 0)
        assert await bus.ask("b", "ping", timeout=10) == "ping"
        assert log == [("stop", "b"), ("start", "b")]
        assert actor_table(bus) == {
            "a": ("running", 0),
            "b": ("running", 1),
            "c": ("running", 0),
        }


async def test_one_for_all_restarts_everyone_in_start_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under one_for_all, the others are stopped (on_stop runs) and all start again in order."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus(strategy="one_for_all") as bus:
        await spawn_members(bus, log, "a", "b", "c")
        del log[:]
        await crash(bus, "b")
        assert await bus.ask("c", "ping", timeout=10) == "ping"
        assert log == [
            ("stop", "b"),
            ("stop", "c"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
        ]
        assert actor_table(bus) == {
            "a": ("running", 1),
            "b": ("running", 1),
            "c": ("running", 1),
        }


async def test_rest_for_one_restarts_the_failed_and_later_actors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under rest_for_one, the failed actor and those started after it restart, not earlier ones."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus(strategy="rest_for_one") as bus:
        await spawn_members(bus, log, "a", "b", "c", "d")
        del log[:]
        await crash(bus, "b")
        assert await bus.ask("d", "ping", timeout=10) == "ping"
        assert log == [
            ("stop", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert actor_table(bus) == {
            "a": ("running", 0),
            "b": ("running", 1),
            "c": ("running", 1),
            "d": ("running", 1),
        }


async def test_one_for_all_never_restarts_a_temporary_sibling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A running temporary actor stopped because a sibling failed is not started again."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus(strategy="one_for_all") as bus:
        await spawn_members(bus, log, "a")
        await bus.spawn(
            Member, name="temp", inbox_capacity=1, restart="temporary", options={"log": log}
        )
        await spawn_members(bus, log, "c")
        del log[:]
        await crash(bus, "a")
        assert await bus.ask("c", "ping", timeout=10) == "ping"
        assert log == [
            ("stop", "a"),
            ("stop", "c"),
            ("stop", "temp"),
            ("start", "a"),
            ("start", "c"),
        ]
        assert actor_table(bus) == {
            "a": ("running", 1),
            "temp": ("stopped", 0),
            "c": ("running", 1),
        }


# -- restart kinds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "how", "state", "restarts"),
    [
        ("permanent", "fail", "running", 1),
        ("permanent", "return", "running", 1),
        ("transient", "fail", "running", 1),
        ("transient", "return", "stopped", 0),
        ("temporary", "fail", "failed", 0),
        ("temporary", "return", "stopped", 0),
    ],
)
async def test_restart_kind_decides_whether_an_ended_actor_restarts(
    autojump_clock: trio.testing.MockClock, restart: str, how: str, state: str, restarts: int
) -> None:
    """permanent restarts after failing or returning, transient after failing, temporary never."""
    starts: list[float] = []
    async with pgbus.open_bus() as bus:
        await bus.spawn(
            FirstRunEnds, name="x", restart=restart, options={"how": how, "starts": starts}
        )
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(60)  # virtual time: far past any backoff
        (stats,) = bus.statistics().actors
        assert (stats.state, stats.restarts, len(starts)) == (state, restarts, 1 + restarts)
        failure = "RuntimeError('first run fails')" if how == "fail" else None
        assert stats.last_failure == failure
    # Leaving the bus stops what runs; a failed actor stays failed.
    (stats,) = bus.statistics().actors
    assert stats.state == ("failed" if state == "failed" else "stopped")


# -- restart intensity ---------------------------------------------------------------------------


async def test_too_many_restarts_escalate_out_of_open_bus(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An actor failing more than max_restarts times within within_seconds ends the bus."""
    starts: list[float] = []
    stops: list[str] = []
    log: list[tuple[str, str]] = []
    buses: list[pgbus.Bus] = []

    async def run_bus() -> None:
        with trio.fail_after(60):  # a bus that never escalates fails the test, never hangs it
            async with pgbus.open_bus(max_restarts=3, within_seconds=5) as bus:
                buses.append(bus)
                await spawn_members(bus, log, "first")
                await bus.spawn(
                    AlwaysFails, name="crasher", options={"starts": starts, "stops": stops}
                )
                await spawn_members(bus, log, "last")
                await trio.sleep_forever()

    with pytest.raises(pgbus.RestartIntensityError) as caught:
        await run_bus()
    assert str(caught.value) == (
        "actor 'crasher' needed more than 3 restarts within 5s; the supervisor stopped its "
        "actors. Last failure: RuntimeError('boom')"
    )
    assert caught.value.actor == "crasher"
    assert isinstance(caught.value.last_failure, RuntimeError)
    assert len(starts) == 4  # the first start and 3 restarts; the 4th failure escalates
    assert stops == ["crasher"] * 4
    assert log == [("start", "first"), ("start", "last"), ("stop", "last"), ("stop", "first")]
    assert actor_table(buses[0]) == {
        "first": ("stopped", 0),
        "crasher": ("failed", 3),
        "last": ("stopped", 0),
    }
    gave_up = supervisor_records(caplog, "ERROR")[-1]
    assert gave_up.getMessage() == (
        "actor 'crasher': more than 3 restarts within 5s; supervisor gives up"
    )


async def test_failures_spread_wider_than_the_window_never_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Failures further apart than within_seconds are restarted forever, never escalated."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus(max_restarts=3, within_seconds=5) as bus:
        await spawn_members(bus, log, "flaky")
        for _ in range(10):
            with pytest.raises(pgbus.ActorFailedError):
                await bus.ask("flaky", "crash", timeout=10)
            await trio.sleep(6)
        assert await bus.ask("flaky", "still here?", timeout=10) == "still here?"
        assert actor_table(bus) == {"flaky": ("running", 10)}


async def test_max_restarts_zero_escalates_on_the_first_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With max_restarts=0 the first failure ends the bus, without any restart."""
    log: list[tuple[str, str]] = []

    async def run_bus() -> None:
        with trio.fail_after(60):
            async with pgbus.open_bus(max_restarts=0) as bus:
                await spawn_members(bus, log, "only")
                await bus.send("only", "crash")
                await trio.sleep_forever()

    with pytest.raises(pgbus.RestartIntensityError, match=r"^actor 'only' needed more than 0 "):
        await run_bus()
    assert log == [("start", "only"), ("stop", "only")]


# -- backoff -------------------------------------------------------------------------------------


async def test_restarts_back_off_exponentially_up_to_the_maximum(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Restart k waits between half and all of backoff_initial * 2**(k-1), capped at backoff_max."""
    starts: list[float] = []
    stops: list[str] = []
    enough = trio.Event()
    async with pgbus.open_bus(
        backoff_initial=1, backoff_max=8, max_restarts=100, within_seconds=10_000
    ) as bus:
        await bus.spawn(
            AlwaysFails, name="x", options={"starts": starts, "stops": stops, "enough": enough}
        )
        with trio.fail_after(600):
            await enough.wait()
    delays = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(delays) == 7
    for k, delay in enumerate(delays, start=1):
        ceiling = min(8, 1 * 2 ** (k - 1))
        assert ceiling / 2 <= delay <= ceiling, (k, delays)


# -- logging -------------------------------------------------------------------------------------


async def test_each_failure_is_logged_once_with_name_and_traceback(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every failure gives one ERROR record naming the actor, with the exception and traceback."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus(max_restarts=10) as bus:
        await spawn_members(bus, log, "worker")
        for _ in range(3):
            with pytest.raises(pgbus.ActorFailedError):
                await bus.ask("worker", "crash", timeout=10)
        assert await bus.ask("worker", "ping", timeout=10) == "ping"
    errors = supervisor_records(caplog, "ERROR")
    assert [r.getMessage() for r in errors] == [
        "actor 'worker' failed: RuntimeError('worker was told to crash')"
    ] * 3
    for record in errors:
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
        assert record.exc_info[2] is not None  # the traceback


async def test_shutdown_is_never_a_failure(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Leaving the bus stops idle, busy and producing actors without a restart or an error."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus() as bus:
        await spawn_members(bus, log, "idle")
        await bus.spawn(Busy, name="busy", inbox_capacity=1, options={"log": log})
        await bus.send("busy", "work forever")
        await bus.spawn(Sleeper, name="runner", options={"log": log})
        await trio.testing.wait_all_tasks_blocked()
    assert actor_table(bus) == {
        "idle": ("stopped", 0),
        "busy": ("stopped", 0),
        "runner": ("stopped", 0),
    }
    assert all(a.last_failure is None for a in bus.statistics().actors)
    assert log == [("start", "idle"), ("stop", "runner"), ("stop", "busy"), ("stop", "idle")]
    assert supervisor_records(caplog, "ERROR") == []


async def test_cancelling_the_bus_from_outside_is_never_a_failure(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deadline around open_bus stops the actors in order, without restarts or errors."""
    log: list[tuple[str, str]] = []
    with trio.move_on_after(10) as outer:
        async with pgbus.open_bus() as bus:
            await spawn_members(bus, log, "a", "b")
            await bus.spawn(Busy, name="busy", inbox_capacity=1, options={"log": log})
            await bus.send("busy", "work forever")
            await trio.sleep_forever()
    assert outer.cancelled_caught
    assert log == [("start", "a"), ("start", "b"), ("stop", "busy"), ("stop", "b"), ("stop", "a")]
    assert actor_table(bus) == {
        "a": ("stopped", 0),
        "b": ("stopped", 0),
        "busy": ("stopped", 0),
    }
    assert supervisor_records(caplog, "ERROR") == []


# -- graceful shutdown ---------------------------------------------------------------------------


async def test_leaving_the_bus_stops_actors_in_reverse_start_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Leaving open_bus runs every on_stop, last started first."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus() as bus:
        await spawn_members(bus, log, "a", "b", "c")
    assert log == [
        ("start", "a"),
        ("start", "b"),
        ("start", "c"),
        ("stop", "c"),
        ("stop", "b"),
        ("stop", "a"),
    ]


async def test_an_exception_in_the_body_still_stops_actors_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the block raises, actors still stop in reverse order and the error comes out as is."""
    log: list[tuple[str, str]] = []

    async def run_bus() -> None:
        async with pgbus.open_bus() as bus:
            await spawn_members(bus, log, "a", "b", "c")
            raise KeyError("the body failed")

    with pytest.raises(KeyError, match="the body failed"):
        await run_bus()
    assert log[3:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]


async def test_stop_order_survives_a_restart(autojump_clock: trio.testing.MockClock) -> None:
    """An actor restarted by one_for_one keeps its place in the stop order."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus() as bus:
        await spawn_members(bus, log, "a", "b", "c")
        await crash(bus, "a")
        assert await bus.ask("a", "ping", timeout=10) == "ping"
        del log[:]
    assert log == [("stop", "c"), ("stop", "b"), ("stop", "a")]


async def test_hanging_on_stop_is_abandoned_after_stop_timeout(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hanging on_stop is abandoned after stop_timeout with a warning; the others still stop."""
    log: list[tuple[str, str]] = []
    async with pgbus.open_bus(stop_timeout=2) as bus:
        await spawn_members(bus, log, "first")
        await bus.spawn(StuckOnStop, name="stuck")
        leaving = trio.current_time()
    assert trio.current_time() - leaving == 2
    assert log[-1] == ("stop", "first")
    assert [r.getMessage() for r in supervisor_records(caplog, "WARNING")] == [
        "actor 'stuck': on_stop did not finish in time; abandoned"
    ]
    assert actor_table(bus) == {"first": ("stopped", 0), "stuck": ("stopped", 0)}


async def test_cancelling_the_bus_interrupts_an_on_start_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A deadline around open_bus is honoured while spawn() waits for a slow on_start."""
    release = trio.Event()

    async def release_after(seconds: float) -> None:
        # Without this, a spawn() that never returns would hang the test instead of failing it.
        await trio.sleep(seconds)
        release.set()

    async with trio.open_nursery() as watchdog:
        watchdog.start_soon(release_after, 100)
        begin = trio.current_time()
        with trio.move_on_after(1) as outer:
            async with pgbus.open_bus() as bus:
                await bus.spawn(SlowStart, name="slow", options={"release": release})
                await trio.sleep_forever()
        elapsed = trio.current_time() - begin
        watchdog.cancel_scope.cancel()
    assert outer.cancelled_caught
    assert elapsed < 100, "spawn() was stuck until the actor's run() returned by itself"
    assert elapsed == 1
    assert [a.state for a in bus.statistics().actors] in ([], ["stopped"])


async def test_a_spawn_after_the_bus_was_cancelled_starts_the_actor_and_stops_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A spawn() reached while shielded after a cancellation hit the bus still works."""
    # What `pgbus run` does when a signal comes while bridge_in's LISTEN (shielded) is in
    # flight: the next line of start_config spawns the actors.
    log: list[tuple[str, str]] = []
    with trio.CancelScope() as outer:
        async with pgbus.open_bus() as bus:
            outer.cancel()
            with trio.CancelScope(shield=True):
                await trio.testing.wait_all_tasks_blocked()  # every task of the bus saw it
                await spawn_members(bus, log, "late")
    assert log == [("start", "late"), ("stop", "late")]
    assert actor_table(bus) == {"late": ("stopped", 0)}


async def test_an_on_stop_that_spawns_is_refused_and_the_bus_still_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A spawn from on_stop (the bus is stopping its actors) is refused in one line; no hang."""
    refused: list[str] = []

    class Late(pgbus.Actor):
        async def run(self) -> None:
            await trio.sleep_forever()

    class Spawner(pgbus.Actor):
        async def on_stop(self) -> None:
            try:
                await self.bus.spawn(Late, name="late")
            except pgbus.PgbusError as exc:
                refused.append(str(exc))

    with trio.fail_after(60):
        async with pgbus.open_bus(stop_timeout=5) as bus:
            await bus.spawn(Spawner, name="spawner", inbox_capacity=1)
    assert refused == ["actor 'late' was not started: the bus is stopping its actors."]
    assert actor_table(bus) == {"spawner": ("stopped", 0)}
