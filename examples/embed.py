"""Embedding pgbus in a Trio program: an actor, bridges both ways, a few round trips."""

import os

import trio

import pgbus


class Greeter(pgbus.Actor):
    async def handle(self, message: pgbus.Notification) -> None:
        await self.send("greetings", f"hello, {message.payload}")


async def main() -> None:
    dsn = os.environ.get("PGBUS_DSN")  # else an embedded PostgreSQL, just for this program
    async with pgbus.open_bus(dsn, embedded=dsn is None) as bus:
        for name in ("names", "greetings", "replies"):
            bus.add_channel(name, capacity=10)
        await bus.bridge_in("embed_names", "names")  # Postgres -> Trio
        await bus.bridge_out("greetings", "embed_greetings")  # Trio -> Postgres
        await bus.bridge_in("embed_greetings", "replies")
        await bus.spawn(Greeter, name="greeter", inbox="names")
        for name in ("Ada", "Grace", "Barbara"):
            await bus.notify("embed_names", name)
        with trio.fail_after(10):
            for _ in range(3):
                reply = await bus.channel("replies").receive()
                print(f"{reply.payload} (from backend {reply.pid})")


trio.run(main)
