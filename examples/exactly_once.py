"""
Exactly-once effects: the acknowledgement commits in the handler's own transaction.

Five payments arrive on a durable channel. The actor records each one with
``bus.transaction(ack=message)``: the row and the acknowledgement commit together or not at
all. Payment 3 fails on its first attempt (after inserting its row, which rolls back with it)
and is retried; in the end every payment has exactly one row.
"""

import os

import trio

import pgbus


class RecordPayment(pgbus.Actor):
    def __init__(self, done: trio.Event) -> None:
        self.done = done

    async def handle(self, message: pgbus.DurableMessage) -> None:
        async with self.bus.transaction(ack=message) as tx:
            await tx.execute("INSERT INTO pgbus_example_payments (id) VALUES ($1)", message.payload)
            if message.payload == 3 and message.attempt == 1:
                print("payment 3: attempt 1 failed, rolled back")
                raise RuntimeError("card network timeout")  # retried after retry_after
            count = await tx.fetchval("SELECT count(*) FROM pgbus_example_payments")
        print(f"payment {message.payload}: recorded (attempt {message.attempt})")
        if count == 5:
            self.done.set()


async def main() -> None:
    dsn = os.environ.get("PGBUS_DSN")  # else an embedded PostgreSQL, just for this program
    async with pgbus.open_bus(dsn, embedded=dsn is None) as bus:
        async with bus.transaction() as tx:
            await tx.execute("DROP TABLE IF EXISTS pgbus_example_payments")
            await tx.execute("CREATE TABLE pgbus_example_payments (id int)")
        bus.add_channel("payments", capacity=10)
        await bus.bridge_in(
            "example_payments", "payments", durable=True, group="ledger", codec="json",
            retry_after=0.1,
        )  # fmt: skip
        done = trio.Event()
        await bus.spawn(RecordPayment, name="ledger", inbox="payments", options={"done": done})
        for payment in range(1, 6):
            await bus.notify("example_payments", payment, codec="json", durable=True)
        with trio.fail_after(20):
            await done.wait()
        async with bus.transaction() as tx:
            rows = await tx.fetch("SELECT id FROM pgbus_example_payments ORDER BY id")
            await tx.execute("DROP TABLE pgbus_example_payments")
        print(f"rows: {[row['id'] for row in rows]}")


trio.run(main)
