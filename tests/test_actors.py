"""
Actors on a bus without PostgreSQL: hooks, sending, one message at a time, options, ask, restarts.

Tasks are ordered with `trio.testing.wait_all_tasks_blocked`; timing uses `autojump_clock`.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing

import pgbus


class Recorder(pgbus.Actor):
    """Appends every hook call to *log*; raises on the message ``"crash"``."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    async def on_start(self) -> None:
        self.log.append(("on_start", self.name))

    async def handle(self, message: Any) -> Any:
        self.log.append(("handle", self.name, message))
        if message == "crash":
            raise RuntimeError(f"{self.name} was told to crash")
        return f"reply to {message}"

    async def on_stop(self) -> None:
        self.log.append(("on_stop", self.name))


class Forwarder(pgbus.Actor):
    """Sends each message, tagged, to the channel named by option *to*."""

    def __init__(self, to: str) -> None:
        self.to = to

    async def handle(self, message: Any) -> None:
        await self.bus.send(self.to, ("forwarded", message))


class Slow(pgbus.Actor):
    """Takes *seconds* per message and records how many handle calls overlap."""

    def __init__(self, seconds: float, seen: dict[str, Any]) -> None:
        self.seconds = seconds
        self.seen = seen

    async def handle(self, message: Any) -> Any:
        self.seen["active"] += 1
        self.seen["most_active"] = max(self.seen["most_active"], self.seen["active"])
        try:
            await trio.sleep(self.seconds)
        finally:
            self.seen["active"] -= 1
        self.seen["handled"].append((message, trio.current_time()))
        return message


class Counter(pgbus.Actor):
    """Counts messages in instance state; each instance gets a serial number from *serials*."""

    def __init__(self, serials: itertools.count[int], log: list[Any]) -> None:
        self.serial = next(serials)
        self.count = 0
        self.log = log

    async def handle(self, message: Any) -> int:
        self.count += 1
        self.log.append((self.serial, message))
        if message == "crash":
            raise ValueError(f"bad message {message!r}")
        return self.count


class Greeter(pgbus.Actor):
    """Needs option *greeting*; *punctuation* is optional."""

    def __init__(self, greeting: str, punctuation: str = "!") -> None:
        self.greeting = greeting
        self.punctuation = punctuation

    async def handle(self, message: Any) -> str:
        return f"{self.greeting}, {message}{self.punctuation}"


class Producer(pgbus.Actor):
    """Has no inbox: its own run() sends *count* numbers to channel *to*, then waits."""

    def __init__(self, to: str, count: int) -> None:
        self.to = to
        self.count = count

    async def run(self) -> None:
        for i in range(self.count):
            await self.bus.send(self.to, i)
        await trio.sleep_forever()


class NeverReplies(pgbus.Actor):
    """Never finishes handling a message."""

    async def handle(self, message: Any) -> None:
        await trio.sleep_forever()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pgbus.supervisor" and r.levelname == "ERROR"
    ]


# -- hooks and messages ------------------------------------------------------------------------


async def test_hooks_run_in_order() -> None:
    """on_start runs before the first message, handle once per message in order, on_stop last."""
    log: list[Any] = []
    async with pgbus.open_bus() as bus:
        await bus.spawn(Recorder, name="rec", inbox_capacity=10, options={"log": log})
        assert log == [("on_start", "rec")]
        await bus.send("rec", "a")
        await bus.send("rec", "b")
        await trio.testing.wait_all_tasks_blocked()
        assert log[-1] == ("handle", "rec", "b")
    assert log == [
        ("on_start", "rec"),
        ("handle", "rec", "a"),
        ("handle", "rec", "b"),
        ("on_stop", "rec"),
    ]


async def test_actor_sends_to_another_actors_inbox() -> None:
    """An actor's self.bus.send reaches the inbox of the actor named by the channel."""
    log: list[Any] = []
    async with pgbus.open_bus() as bus:
        await bus.spawn(Recorder, name="sink", inbox_capacity=10, options={"log": log})
        await bus.spawn(Forwarder, name="fwd", inbox_capacity=10, options={"to": "sink"})
        for message in (1, 2, 3):
            await bus.send("fwd", message)
        await trio.testing.wait_all_tasks_blocked()
        assert [entry[2] for entry in log if entry[0] == "handle"] == [
            ("forwarded", 1),
            ("forwarded", 2),
            ("forwarded", 3),
        ]


async def test_handle_never_overlaps_itself(autojump_clock: trio.testing.MockClock) -> None:
    """Messages are handled one at a time, even when handle awaits, each one after the other."""
    seen: dict[str, Any] = {"active": 0, "most_active": 0, "handled": []}
    async with pgbus.open_bus() as bus:
        await bus.spawn(Slow, name="slow", inbox_capacity=10, options={"seconds": 1, "seen": seen})
        start = trio.current_time()
        for message in range(5):
            await bus.send("slow", message)
        assert await bus.ask("slow", "last", timeout=60) == "last"
    assert seen["most_active"] == 1
    assert [(m, t - start) for m, t in seen["handled"]] == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
        (4, 5),
        ("last", 6),
    ]


async def test_options_are_constructor_keyword_arguments() -> None:
    """options={...} reach the actor class as keyword arguments, defaults kept for the rest."""
    async with pgbus.open_bus() as bus:
        await bus.spawn(Greeter, name="hi", inbox_capacity=1, options={"greeting": "Hello"})
        await bus.spawn(
            Greeter,
            name="hey",
            inbox_capacity=1,
            options={"greeting": "Hey", "punctuation": "?"},
        )
        assert await bus.ask("hi", "Ada", timeout=5) == "Hello, Ada!"
        assert await bus.ask("hey", "Bob", timeout=5) == "Hey, Bob?"


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"greeting": "Hi", "bogus": 1}, "got an unexpected keyword argument 'bogus'"),
        ({}, "missing a required argument: 'greeting'"),
        (None, "missing a required argument: 'greeting'"),
    ],
)
async def test_spawn_with_wrong_options_names_the_actor(
    options: dict[str, Any] | None, problem: str
) -> None:
    """Options that do not fit the class raise ConfigError naming the actor; nothing starts."""
    async with pgbus.open_bus() as bus:
        with pytest.raises(pgbus.ConfigError) as caught:
            await bus.spawn(Greeter, name="greeter", inbox_capacity=1, options=options)
        assert str(caught.value) == (
            f"actor 'greeter': options do not fit Greeter(greeting, punctuation='!'): {problem}."
        )
        assert bus.statistics().actors == ()
        assert "greeter" not in bus.channels


async def test_spawn_refuses_what_is_not_an_actor_class() -> None:
    """Spawning something other than a pgbus.Actor subclass raises ConfigError naming the actor."""
    async with pgbus.open_bus() as bus:
        with pytest.raises(
            pgbus.ConfigError,
            match=r"^actor 'x': <class 'object'> is not a pgbus\.Actor subclass\.$",
        ):
            await bus.spawn(object, name="x")  # type: ignore[arg-type]


async def test_spawn_refuses_an_unknown_restart_kind() -> None:
    """A restart kind other than permanent, transient or temporary is refused by name."""
    async with pgbus.open_bus() as bus:
        with pytest.raises(
            pgbus.ConfigError,
            match=(
                r"^actor 'x': restart must be one of 'permanent', 'transient', 'temporary' "
                r"\(got 'sometimes'\)\.$"
            ),
        ):
            await bus.spawn(NeverReplies, name="x", restart="sometimes")


async def test_spawn_refuses_a_duplicate_actor_name() -> None:
    """A second actor with a taken name is refused."""
    log: list[Any] = []
    async with pgbus.open_bus() as bus:
        await bus.spawn(Recorder, name="rec", options={"log": log})
        with pytest.raises(
            pgbus.DuplicateNameError, match=r"^actor 'rec' already exists on this bus\.$"
        ):
            await bus.spawn(Recorder, name="rec", options={"log": log})
        assert log == [("on_start", "rec")]


async def test_spawn_refuses_an_unknown_inbox() -> None:
    """An inbox that names no channel raises UnknownChannelError."""
    async with pgbus.open_bus() as bus:
        with pytest.raises(pgbus.UnknownChannelError, match=r"^no channel named 'nope'"):
            await bus.spawn(NeverReplies, name="x", inbox="nope")


async def test_spawn_with_inbox_capacity_creates_a_channel_named_after_the_actor() -> None:
    """inbox_capacity=N makes a channel with the actor's name and capacity N as its inbox."""
    log: list[Any] = []
    async with pgbus.open_bus() as bus:
        await bus.spawn(Recorder, name="worker", inbox_capacity=5, options={"log": log})
        assert bus.channel("worker").capacity == 5
        assert bus.statistics().actors[0].inbox == "worker"
        await bus.send("worker", "job")
        await trio.testing.wait_all_tasks_blocked()
        assert ("handle", "worker", "job") in log


async def test_spawn_on_a_declared_channel() -> None:
    """inbox='name' makes an existing channel the actor's inbox."""
    log: list[Any] = []
    async with pgbus.open_bus() as bus:
        bus.add_channel("jobs", 2)
        await bus.spawn(Recorder, name="worker", inbox="jobs", options={"log": log})
        assert "worker" not in bus.channels
        await bus.send("jobs", "job")
        await trio.testing.wait_all_tasks_blocked()
        assert ("handle", "worker", "job") in log


async def test_spawn_refuses_inbox_and_inbox_capacity_together() -> None:
    """Giving both inbox and inbox_capacity is a ConfigError naming the actor."""
    async with pgbus.open_bus() as bus:
        bus.add_channel("jobs", 2)
        with pytest.raises(
            pgbus.ConfigError, match=r"^actor 'w': give inbox or inbox_capacity, not both\.$"
        ):
            await bus.spawn(NeverReplies, name="w", inbox="jobs", inbox_capacity=2)


async def test_spawn_with_inbox_capacity_refuses_a_taken_channel_name() -> None:
    """inbox_capacity cannot create the actor's channel when that name is already a channel."""
    async with pgbus.open_bus() as bus:
        bus.add_channel("w", 2)
        with pytest.raises(pgbus.DuplicateNameError, match=r"^channel 'w' already exists"):
            await bus.spawn(NeverReplies, name="w", inbox_capacity=2)


async def test_actor_without_inbox_runs_its_own_run() -> None:
    """An actor with no inbox and its own run() produces messages, and cannot be asked."""
    async with pgbus.open_bus() as bus:
        out = bus.add_channel("numbers", 10)
        await bus.spawn(Producer, name="producer", options={"to": "numbers", "count": 3})
        await trio.testing.wait_all_tasks_blocked()
        assert [out.receive_nowait() for _ in range(3)] == [0, 1, 2]
        (stats,) = bus.statistics().actors
        assert (stats.name, stats.inbox, stats.state) == ("producer", None, "running")
        with pytest.raises(
            pgbus.ConfigError, match=r"^actor 'producer' has no inbox, so it cannot be asked\.$"
        ):
            await bus.ask("producer", "hello?", timeout=1)


# -- ask -----------------------------------------------------------------------------------------


async def test_ask_returns_what_handle_returned() -> None:
    """ask() sends the message through the inbox and returns handle's return value."""
    log: list[Any] = []
    async with pgbus.open_bus() as bus:
        await bus.spawn(Recorder, name="rec", inbox_capacity=0, options={"log": log})
        assert await bus.ask("rec", "question", timeout=5) == "reply to question"
        assert log[-1] == ("handle", "rec", "question")


async def test_ask_times_out_when_actor_never_replies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """ask() gives up after *timeout* seconds if no reply comes."""
    async with pgbus.open_bus() as bus:
        await bus.spawn(NeverReplies, name="sink", inbox_capacity=0)
        start = trio.current_time()
        with pytest.raises(pgbus.AskTimeoutError, match=r"^actor 'sink' did not reply within 30s$"):
            await bus.ask("sink", "ping", timeout=30)
        assert trio.current_time() - start == 30


async def test_ask_timeout_counts_the_wait_for_room_in_the_inbox(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """ask() times out too when the actor is too busy to even take the request."""
    async with pgbus.open_bus() as bus:
        await bus.spawn(NeverReplies, name="busy", inbox_capacity=0)
        await bus.send("busy", "occupies it forever")
        with pytest.raises(
            pgbus.AskTimeoutError, match=r"^actor 'busy' did not reply within 2\.5s$"
        ):
            await bus.ask("busy", "ping", timeout=2.5)
        assert bus.channel("busy").statistics().senders_waiting == 0


async def test_late_reply_does_not_block_the_actor(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """After an ask timed out, the actor finishes that message and handles the next one."""
    seen: dict[str, Any] = {"active": 0, "most_active": 0, "handled": []}
    async with pgbus.open_bus() as bus:
        await bus.spawn(Slow, name="sink", inbox_capacity=1, options={"seconds": 60, "seen": seen})
        start = trio.current_time()
        with pytest.raises(pgbus.AskTimeoutError):
            await bus.ask("sink", "first", timeout=30)
        assert await bus.ask("sink", "second", timeout=300) == "second"
        assert [(m, t - start) for m, t in seen["handled"]] == [("first", 60), ("second", 120)]
        assert bus.statistics().actors[0].restarts == 0
    assert errors_logged(caplog) == []


async def test_ask_on_failing_handle_raises_actor_failed_and_restarts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When handle raises, ask() raises ActorFailedError from it and the actor is restarted."""
    log: list[Any] = []
    async with pgbus.open_bus() as bus:
        await bus.spawn(
            Counter,
            name="calc",
            inbox_capacity=1,
            options={
                "serials": itertools.count(1),
                "log": log,
            },
        )
        with pytest.raises(pgbus.ActorFailedError) as caught:
            await bus.ask("calc", "crash", timeout=5)
        assert str(caught.value) == (
            "actor 'calc' failed while handling the request: ValueError(\"bad message 'crash'\")"
        )
        assert caught.value.actor == "calc"
        assert isinstance(caught.value.__cause__, ValueError)
        assert caught.value.error is caught.value.__cause__

        # The same name reaches the restarted instance.
        assert await bus.ask("calc", "add", timeout=5) == 1
        (stats,) = bus.statistics().actors
        assert (stats.state, stats.restarts) == ("running", 1)
        assert stats.last_failure == "ValueError(\"bad message 'crash'\")"
    assert log == [(1, "crash"), (2, "add")]


async def test_ask_unknown_actor_raises() -> None:
    """ask() on a name no actor has raises UnknownActorError."""
    async with pgbus.open_bus() as bus:
        bus.add_channel("ghost", 1)  # a channel of that name is not an actor
        with pytest.raises(
            pgbus.UnknownActorError, match=r"^no actor named 'ghost' on this bus\.$"
        ):
            await bus.ask("ghost", "boo", timeout=1)
        assert bus.channel("ghost").statistics().buffered == 0


# -- the inbox across restarts -------------------------------------------------------------------


async def test_queued_messages_survive_a_crash_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Messages queued behind a crashing one are handled, in order, by the restarted instance."""
    log: list[Any] = []
    async with pgbus.open_bus() as bus:
        await bus.spawn(
            Counter,
            name="worker",
            inbox_capacity=10,
            options={
                "serials": itertools.count(1),
                "log": log,
            },
        )
        for message in ("a", "crash", "b", "c", "d"):
            bus.send_nowait("worker", message)
        assert await bus.ask("worker", "e", timeout=5) == 4
    assert log == [(1, "a"), (1, "crash"), (2, "b"), (2, "c"), (2, "d"), (2, "e")]


async def test_each_restart_makes_a_fresh_instance(autojump_clock: trio.testing.MockClock) -> None:
    """State kept on the instance starts over after every restart."""
    log: list[Any] = []
    async with pgbus.open_bus(max_restarts=10) as bus:
        await bus.spawn(
            Counter,
            name="counter",
            inbox_capacity=0,
            options={
                "serials": itertools.count(1),
                "log": log,
            },
        )
        assert [await bus.ask("counter", "tick", timeout=5) for _ in range(3)] == [1, 2, 3]
        for _ in range(2):
            with pytest.raises(pgbus.ActorFailedError):
                await bus.ask("counter", "crash", timeout=5)
            assert await bus.ask("counter", "tick", timeout=5) == 1
        assert bus.statistics().actors[0].restarts == 2
    assert log == [
        (1, "tick"),
        (1, "tick"),
        (1, "tick"),
        (1, "crash"),
        (2, "tick"),
        (2, "crash"),
        (3, "tick"),
    ]
