"""
The PostgreSQL server itself goes away and comes back: the bus waits and resumes.

This needs a server the test may stop, so it always uses a private embedded PostgreSQL 18,
whatever ``PGBUS_TEST_DSN`` says.
"""

from __future__ import annotations

import logging
import math
import os
import signal

import trio

import pgbus
from pgbus._embedded import open_embedded_postgres

WAIT = 30


async def test_bus_survives_a_server_restart_and_marks_the_gap(caplog) -> None:
    """Stop PostgreSQL, start it again: the bus keeps running, reconnects, and says so in-band."""
    caplog.set_level(logging.WARNING)
    async with open_embedded_postgres() as server, pgbus.open_bus(server.dsn) as bus:
        bus.add_channel("in", math.inf)
        bus.add_channel("out", math.inf)
        await bus.bridge_in("restart", "in")
        await bus.bridge_out("out", "restart")
        await bus.send("out", "before")
        with trio.fail_after(WAIT):
            assert (await bus.channel("in").receive()).payload == "before"  # type: ignore[attr-defined]

        await server.stop_server(mode="immediate")
        await bus.send("out", "while down")  # queued; published once the server is back
        await server.start_server()

        with trio.fail_after(WAIT):
            gap = await bus.channel("in").receive()
        assert gap == pgbus.Gap(channel="restart", reason="reconnect", dropped=None)
        await bus.send("out", "after")
        with trio.fail_after(WAIT):
            payloads = [getattr(await bus.channel("in").receive(), "payload", None)]
            while payloads[-1] != "after":
                payloads.append(getattr(await bus.channel("in").receive(), "payload", None))
        # "while down" is republished after the reconnect; whether the listener was back by then
        # is a race nobody can win (NOTIFY is at-most-once), which is what the Gap announces.
        assert payloads in (["after"], ["while down", "after"])
        assert await bus.listening_channels() == {"restart"}
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "lost; reconnecting" in warnings


async def test_half_open_listening_connection_is_detected_by_the_keepalive() -> None:
    """A backend that stops answering (SIGSTOP: the socket stays open) is replaced, with a Gap."""
    async with open_embedded_postgres() as server, pgbus.open_bus(server.dsn, keepalive=0.5) as bus:
        bus.add_channel("in", math.inf)
        await bus.bridge_in("half open", "in")
        [old] = list(bus.own_pids)
        os.kill(old, signal.SIGSTOP)
        try:
            with trio.fail_after(WAIT):
                gap = await bus.channel("in").receive()
        finally:
            os.kill(old, signal.SIGCONT)
        assert gap == pgbus.Gap(channel="half open", reason="reconnect", dropped=None)
        assert old not in bus.own_pids
        await bus.notify("half open", "still flowing")
        with trio.fail_after(WAIT):
            message = await bus.channel("in").receive()
        assert message.payload == "still flowing"  # type: ignore[attr-defined]
