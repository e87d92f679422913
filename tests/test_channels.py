"""
Named channels on a bus without PostgreSQL: capacity, back-pressure, fan-out and errors.

Tasks are ordered with `trio.testing.wait_all_tasks_blocked`, never with sleeps.
"""

from __future__ import annotations

import math
import re

import pytest
import trio
import trio.testing

import pgbus


async def test_rendezvous_send_nowait_needs_a_waiting_receiver() -> None:
    """At capacity 0, send_nowait raises WouldBlock unless a receiver is already waiting."""
    async with pgbus.open_bus() as bus:
        channel = bus.add_channel("x", 0)
        with pytest.raises(trio.WouldBlock):
            bus.send_nowait("x", "lost?")
        assert channel.statistics().buffered == 0

        received: list[object] = []
        async with trio.open_nursery() as nursery:

            async def receive_one() -> None:
                received.append(await channel.receive())

            nursery.start_soon(receive_one)
            await trio.testing.wait_all_tasks_blocked()
            assert channel.statistics().receivers_waiting == 1
            bus.send_nowait("x", "handed over")
        assert received == ["handed over"]


async def test_rendezvous_send_completes_when_a_receiver_takes_it() -> None:
    """At capacity 0, send waits for a receiver and returns once the message is taken."""
    async with pgbus.open_bus() as bus:
        channel = bus.add_channel("x", 0)
        sent = trio.Event()
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await bus.send("x", "hello")
                sent.set()

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            assert channel.statistics().senders_waiting == 1
            assert channel.statistics().buffered == 0

            assert await channel.receive() == "hello"
            await sent.wait()
        assert channel.statistics().senders_waiting == 0


async def test_bounded_channel_blocks_a_sender_while_full() -> None:
    """A sender waits on a full bounded channel and goes on once one message is received."""
    async with pgbus.open_bus() as bus:
        channel = bus.add_channel("x", 2)
        bus.send_nowait("x", 1)
        bus.send_nowait("x", 2)
        with pytest.raises(trio.WouldBlock):
            bus.send_nowait("x", 3)

        sent = trio.Event()
        async with trio.open_nursery() as nursery:

            async def send_third() -> None:
                await bus.send("x", 3)
                sent.set()

            nursery.start_soon(send_third)
            await trio.testing.wait_all_tasks_blocked()
            stats = channel.statistics()
            assert (stats.buffered, stats.senders_waiting) == (2, 1)
            assert not sent.is_set()

            assert await channel.receive() == 1
            await sent.wait()
        stats = channel.statistics()
        assert (stats.buffered, stats.senders_waiting) == (2, 0)
        assert [channel.receive_nowait(), channel.receive_nowait()] == [2, 3]


async def test_unbounded_channel_never_blocks() -> None:
    """At capacity math.inf, 10,000 send_nowait calls all succeed and keep their order."""
    async with pgbus.open_bus() as bus:
        channel = bus.add_channel("x", math.inf)
        for i in range(10_000):
            bus.send_nowait("x", i)
        assert channel.statistics().buffered == 10_000
        assert [channel.receive_nowait() for _ in range(10_000)] == list(range(10_000))


@pytest.mark.parametrize(
    "capacity",
    [-1, 2.5, True, False, "10", "inf", None, float("nan"), -math.inf, 1.0],
    ids=repr,
)
async def test_invalid_capacity_is_refused(capacity: object) -> None:
    """A capacity that is not 0, a positive int or math.inf is refused, naming channel and value."""
    expected = (
        f"channel 'x': capacity must be 0, a positive integer or math.inf (got {capacity!r})."
    )
    async with pgbus.open_bus() as bus:
        with pytest.raises(pgbus.CapacityError, match=f"^{re.escape(expected)}$"):
            bus.add_channel("x", capacity)  # type: ignore[arg-type]
        assert "x" not in bus.channels


def test_capacity_error_message_for_minus_one() -> None:
    """The refusal of -1 reads exactly as documented, also on a Channel made directly."""
    with pytest.raises(pgbus.CapacityError) as caught:
        pgbus.Channel("x", -1)
    assert str(caught.value) == (
        "channel 'x': capacity must be 0, a positive integer or math.inf (got -1)."
    )
    assert isinstance(caught.value, pgbus.ConfigError)


@pytest.mark.parametrize("capacity", [0, 1, 100, math.inf])
async def test_valid_capacity_is_kept(capacity: float) -> None:
    """0, positive integers and math.inf are accepted and reported as given."""
    async with pgbus.open_bus() as bus:
        channel = bus.add_channel("x", capacity)
        assert channel.capacity == capacity
        assert bus.statistics().channels[0].capacity == capacity


async def test_duplicate_channel_name_is_refused() -> None:
    """A second channel with a taken name is refused and the first one is left as it was."""
    async with pgbus.open_bus() as bus:
        first = bus.add_channel("orders", 1)
        with pytest.raises(
            pgbus.DuplicateNameError, match=r"^channel 'orders' already exists on this bus\.$"
        ):
            bus.add_channel("orders", 5)
        assert bus.channel("orders") is first
        assert first.capacity == 1


async def test_unknown_channel_is_refused() -> None:
    """Sending to, or looking up, a channel that was never added raises UnknownChannelError."""
    message = r"^no channel named 'nope' on this bus; add it with bus\.add_channel\(\)\.$"
    async with pgbus.open_bus() as bus:
        with pytest.raises(pgbus.UnknownChannelError, match=message):
            await bus.send("nope", 1)
        with pytest.raises(pgbus.UnknownChannelError, match=message):
            bus.send_nowait("nope", 1)
        with pytest.raises(pgbus.UnknownChannelError, match=message):
            bus.channel("nope")


async def test_each_waiting_receiver_gets_exactly_one_message() -> None:
    """Three receivers waiting on clones of one channel each get exactly one of three messages."""
    async with pgbus.open_bus() as bus:
        channel = bus.add_channel("x", 0)
        got: dict[int, list[object]] = {0: [], 1: [], 2: []}

        async def receive_one(index: int, receiver: trio.MemoryReceiveChannel[object]) -> None:
            async with receiver:
                got[index].append(await receiver.receive())

        async with trio.open_nursery() as nursery:
            for index in got:
                nursery.start_soon(receive_one, index, channel.receiver())
            await trio.testing.wait_all_tasks_blocked()
            assert channel.statistics().receivers_waiting == 3
            for message in ("a", "b", "c"):
                bus.send_nowait("x", message)
        assert sorted(len(messages) for messages in got.values()) == [1, 1, 1]
        assert sorted(m for messages in got.values() for m in messages) == ["a", "b", "c"]


async def test_several_senders_and_receivers_lose_and_duplicate_nothing() -> None:
    """With 3 sender and 3 receiver clones, each message reaches exactly one receiver, in order."""
    channel = pgbus.Channel("x", 4)
    got: list[list[tuple[int, int]]] = [[], [], []]

    async def produce(who: int, sender: trio.MemorySendChannel[object]) -> None:
        async with sender:
            for i in range(200):
                await sender.send((who, i))

    async def consume(index: int, receiver: trio.MemoryReceiveChannel[object]) -> None:
        async with receiver:
            async for message in receiver:
                got[index].append(message)  # type: ignore[arg-type]
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for index in range(3):
            nursery.start_soon(consume, index, channel.receiver())
        for who in range(3):
            nursery.start_soon(produce, who, channel.sender())
        # The receivers see end-of-channel once every sender clone and the original are closed.
        channel.close()

    everything = sorted(m for messages in got for m in messages)
    assert everything == sorted((who, i) for who in range(3) for i in range(200))
    for messages in got:
        for who in range(3):
            from_one_sender = [i for w, i in messages if w == who]
            assert from_one_sender == sorted(from_one_sender)


async def test_statistics_show_buffered_and_capacity_per_channel() -> None:
    """bus.statistics().channels lists every channel with its capacity and buffered count."""
    async with pgbus.open_bus() as bus:
        bus.add_channel("bounded", 3)
        bus.add_channel("rendezvous", 0)
        bus.add_channel("unbounded", math.inf)
        bus.send_nowait("bounded", "a")
        bus.send_nowait("bounded", "b")
        for i in range(5):
            await bus.send("unbounded", i)

        assert bus.statistics().channels == (
            pgbus.ChannelStatistics("bounded", 3, 2, 0, 0),
            pgbus.ChannelStatistics("rendezvous", 0, 0, 0, 0),
            pgbus.ChannelStatistics("unbounded", math.inf, 5, 0, 0),
        )
        assert bus.channel("bounded").receive_nowait() == "a"
        assert bus.statistics().channels[0].buffered == 1
