"""A test module of your own, using pgbus's pytest plugin (`pip install 'pgbus[testing]'`)."""

import trio

import pgbus


class Doubler(pgbus.Actor):
    async def handle(self, message: int) -> int:
        return message * 2


async def test_a_notification_comes_back(pgbus_bus: pgbus.Bus) -> None:
    """pgbus_bus is an open bus on a real PostgreSQL; what is sent to a channel comes back."""
    pgbus_bus.add_channel("orders", 10)
    await pgbus_bus.bridge_in("orders", "orders")
    await pgbus_bus.notify("orders", "order 42")
    with trio.fail_after(10):
        notification = await pgbus_bus.channel("orders").receive()
    assert notification.payload == "order 42"


async def test_ask_returns_what_handle_returns(pgbus_bus: pgbus.Bus) -> None:
    """A caller of ask() gets the return value of handle()."""
    await pgbus_bus.spawn(Doubler, name="doubler", inbox_capacity=1)
    assert await pgbus_bus.ask("doubler", 21, timeout=10) == 42


def test_the_dsn_is_a_real_postgresql(pgbus_dsn: str) -> None:
    """pgbus_dsn is a postgresql:// URI (a scratch database when PGBUS_TEST_DSN is set)."""
    assert pgbus_dsn.startswith("postgresql://")
