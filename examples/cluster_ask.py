"""Ask the public greeter of examples/cluster.toml, wherever it runs (PGBUS_DSN: its server)."""

import os
import sys

import trio

import pgbus


async def main(names: list[str]) -> None:
    async with pgbus.open_bus(os.environ["PGBUS_DSN"]) as bus:
        for name in names:
            print(await bus.ask("greeter", name, timeout=10))


trio.run(main, sys.argv[1:] or ["Ada"])
