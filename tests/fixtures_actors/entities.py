"""
A keyed-actor node for the entity chaos tests.

``python tests/fixtures_actors/entities.py --dsn DSN --node NAME --kind KIND [--keepalive S]
[--passivate-after S]`` opens a bus as node NAME, hosts a `Counter` of kind KIND and runs until
SIGTERM, printing JSON lines on stdout: ``{"event": "ready", ...}`` once the kind is hosted, and
``{"event": "handling", ...}`` when a message asks it to sleep inside its handler, and on SIGUSR1
``{"event": "memory", "blocks": ...}``: the interpreter's allocated blocks, after a collection.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from typing import Any

import trio

import pgbus


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Counter(pgbus.Entity):
    """
    Counts its messages and checks their order: a message ``{"seq": s}`` must follow ``s - 1``
    (the key's first is 1); one that does not (lost, repeated or out of order) is counted in
    ``state["bad"]``, with the first such pair kept in ``state["first_bad"]``. ``{"sleep": t}``
    sleeps *t* seconds in the handler first (after saying ``handling``). The reply names the node.
    """

    async def handle(self, message: Any) -> Any:
        if "sleep" in message:
            say("handling", key=self.key, node=self.bus.node)
            await trio.sleep(message["sleep"])
        state = self.state
        seq = message.get("seq")
        if seq is not None:
            last = state.get("last", 0)
            if seq != last + 1:
                state["bad"] = state.get("bad", 0) + 1
                state.setdefault("first_bad", [last, seq])
            state["last"] = seq
        state["n"] = state.get("n", 0) + 1
        return {"node": self.bus.node, "n": state["n"]}


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"{args.node} %(name)s %(levelname)s %(message)s"
    )
    kind = type("Counter", (Counter,), {"kind": args.kind})
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        async with pgbus.open_bus(args.dsn, node=args.node, keepalive=args.keepalive) as bus:
            await bus.host(kind, passivate_after=args.passivate_after, retry_after=0.1)
            say("ready", node=bus.node, pid=os.getpid())
            async for signum in signals:
                if signum != signal.SIGUSR1:
                    break
                gc.collect()
                say("memory", node=bus.node, blocks=sys.getallocatedblocks())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--keepalive", type=float, default=1.0)
    parser.add_argument("--passivate-after", type=float, default=60.0)
    trio.run(main, parser.parse_args())
    sys.exit(0)
