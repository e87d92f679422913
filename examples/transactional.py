"""
Publishing inside a database transaction: delivered at COMMIT, never after ROLLBACK.

Each order is inserted and announced in one transaction. Order 2 rolls back: its row is gone
and its message is never delivered, so the next message to arrive is order 3's.
"""

import os

import trio

import pgbus


class Abort(Exception):
    """Raised to roll a transaction back."""


async def place_order(bus: pgbus.Bus, order: int, *, commit: bool) -> None:
    async with bus.transaction() as tx:
        await tx.execute("INSERT INTO pgbus_example_orders (id) VALUES ($1)", order)
        await tx.publish("pgbus_example_orders", f"order {order} placed")
        if not commit:
            raise Abort  # leaving the block with an exception rolls back


async def main() -> None:
    dsn = os.environ.get("PGBUS_DSN")  # else an embedded PostgreSQL, just for this program
    async with pgbus.open_bus(dsn, embedded=dsn is None) as bus:
        async with bus.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS pgbus_example_orders (id int)")
            await tx.execute("TRUNCATE pgbus_example_orders")
        events = bus.add_channel("events", capacity=10)
        await bus.bridge_in("pgbus_example_orders", "events")
        with trio.fail_after(10):
            for order, commit in ((1, True), (2, False), (3, True)):
                try:
                    await place_order(bus, order, commit=commit)
                except Abort:
                    print(f"order {order}: rolled back")
                    continue
                print(f"order {order}: committed")
                # The next message to arrive is this order's: order 2's never comes.
                print(f"  received: {(await events.receive()).payload}")
        async with bus.transaction() as tx:
            rows = await tx.fetch("SELECT id FROM pgbus_example_orders ORDER BY id")
            await tx.execute("DROP TABLE pgbus_example_orders")
        print(f"rows in the table: {[row['id'] for row in rows]}")


trio.run(main)
