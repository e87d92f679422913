"""
Process B of W8: the side that is asked. ``python -m bench.peers.ask_server STACK --dsn DSN
--channel NAME --application-name NAME`` serves until SIGTERM (or stdin closes), after printing
``ready`` on stdout once it can be asked.

- ``asyncpg`` (also ``asyncpg-uvloop``): the reference's server, as a competent asyncio user writes
  request/reply over NOTIFY. Requests arrive on ``<channel>_req`` as JSON ``{"id", "reply_to",
  "msg"}``; each is answered by a task of its own on a pool of 10 connections with
  ``pg_notify(reply_to, {"id", "result"})``.
- ``pgbus``: a node with one public actor, ``echo``, as the README shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

import attrs

POOL_SIZE = 10


@attrs.frozen
class ServerArgs:
    stack: str
    dsn: str
    channel: str
    application_name: str


def parse(argv: Sequence[str] | None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.ask_server")
    parser.add_argument("stack", choices=("asyncpg", "asyncpg-uvloop", "pgbus"))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--application-name", required=True)
    ns = parser.parse_args(argv)
    return ServerArgs(ns.stack, ns.dsn, ns.channel, ns.application_name)


def ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


# -- asyncpg on asyncio ---------------------------------------------------------------------------


async def serve_asyncpg(args: ServerArgs) -> None:
    import asyncpg

    settings = {"application_name": args.application_name}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task[None]] = set()
    async with asyncpg.create_pool(
        args.dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, server_settings=settings
    ) as pool:
        listener = await asyncpg.connect(args.dsn, server_settings=settings)
        try:

            async def respond(payload: str) -> None:
                request = json.loads(payload)
                reply = json.dumps({"id": request["id"], "result": request["msg"]})
                await pool.execute("SELECT pg_notify($1, $2)", request["reply_to"], reply)

            def on_request(_conn: object, _pid: int, _channel: str, payload: Any) -> None:
                task = asyncio.create_task(respond(payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            await listener.add_listener(f"{args.channel}_req", on_request)
            ready()
            await stop.wait()
        finally:
            await listener.close()
            for task in list(tasks):
                task.cancel()


# -- pgbus ----------------------------------------------------------------------------------------


def serve_pgbus(args: ServerArgs) -> None:
    import trio

    import pgbus

    class Echo(pgbus.Actor):
        async def handle(self, message: Any) -> Any:
            return message

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with pgbus.open_bus(
                args.dsn, node=f"{args.channel}-b", application_name=args.application_name
            ) as bus:
                await bus.spawn(Echo, name=f"{args.channel}_echo", inbox_capacity=1000, public=True)
                ready()
                async for _ in signals:
                    break

    trio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.stack == "pgbus":
        serve_pgbus(args)
    elif args.stack == "asyncpg-uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_asyncpg(args))
    else:
        asyncio.run(serve_asyncpg(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
