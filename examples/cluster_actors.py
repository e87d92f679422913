"""The actors of examples/cluster.toml: a public greeter and a singleton clock."""

from __future__ import annotations

import json
from typing import Any

import trio

import pgbus


class Greeter(pgbus.Actor):
    """Public: any process of the cluster may ask it; the reply says which node answered."""

    async def handle(self, message: Any) -> str:
        return f"hello, {message}, from node {self.bus.node}"


class Clock(pgbus.Actor):
    """A singleton: ticks every *every* seconds on whichever node holds it, and on no other."""

    def __init__(self, every: float = 1.0) -> None:
        if not every > 0:
            raise ValueError(f"every must be > 0 (got {every!r})")
        self.every = every

    async def run(self) -> None:
        tick = 0
        while True:
            tick += 1
            print(json.dumps({"clock": tick, "node": self.bus.node}), flush=True)
            await trio.sleep(self.every)
