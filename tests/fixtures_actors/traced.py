"""
A process of the tracing tests (``tests/test_tracing.py``), printing JSON lines on stdout.

``python tests/fixtures_actors/traced.py ROLE --dsn DSN --channel DURABLE [--no-otel]``

- ``node``: a node running the public actor ``echo``, until SIGTERM;
- ``consumer``: a member of group ``g`` of the durable channel, its actor ``worker`` failing the
  first attempt of the payload ``"fail once"``, until SIGTERM;
- ``client``: a node that, inside its own span ``request``, asks and tells ``echo``, publishes
  ``"first"`` and ``"fail once"`` to the durable channel, and sends ``"bridged"`` through a
  durable outbound bridge to it, then exits.

Each process configures the OpenTelemetry SDK with an exporter that prints every finished span as
``{"event": "span", ...}``. With ``--no-otel`` the ``opentelemetry`` package cannot be imported at
all (``sys.modules`` blocks it before pgbus is imported) and no SDK is configured.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

ROLES = ("node", "consumer", "client")


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def configure_tracing() -> Any:
    """The SDK with an exporter printing each finished span as a JSON line; the tracer."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class JsonLines(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                context = span.get_span_context()
                assert context is not None
                say(
                    "span",
                    name=span.name,
                    kind=span.kind.name,
                    trace=f"{context.trace_id:032x}",
                    span=f"{context.span_id:016x}",
                    parent=None if span.parent is None else f"{span.parent.span_id:016x}",
                    parent_trace=None if span.parent is None else f"{span.parent.trace_id:032x}",
                    links=[
                        {
                            "trace": f"{link.context.trace_id:032x}",
                            "span": f"{link.context.span_id:016x}",
                        }
                        for link in span.links
                    ],
                    status=span.status.status_code.name,
                    attributes=dict(span.attributes or {}),
                )
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    trace.set_tracer_provider(provider)
    return trace.get_tracer("tests")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--no-otel", action="store_true")
    args = parser.parse_args()
    if args.no_otel:
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]  # import fails
        tracer = None
    else:
        tracer = configure_tracing()

    import trio

    import pgbus
    from pgbus import _tracing

    say("tracing", installed=_tracing.installed, active=_tracing.active())

    class Echo(pgbus.Actor):
        async def handle(self, message: Any) -> Any:
            if isinstance(message, dict) and "tell" in message:
                say("told", message=message)
            return {"echo": message}

    class Worker(pgbus.Actor):
        async def handle(self, message: pgbus.DurableMessage) -> None:
            say("handled", payload=message.payload, attempt=message.attempt, id=message.id)
            if message.payload == "fail once" and message.attempt == 1:
                raise RuntimeError("the first attempt fails")

    async def serve(bus: pgbus.Bus) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            say("ready")
            async for _ in signals:
                break

    async def run() -> None:
        if args.role == "node":
            async with pgbus.open_bus(args.dsn, node="traced-node", keepalive=1.0) as bus:
                await bus.spawn(Echo, name="echo", inbox_capacity=10, public=True)
                await serve(bus)
        elif args.role == "consumer":
            async with pgbus.open_bus(args.dsn) as bus:
                bus.add_channel("work", 10)
                await bus.bridge_in(args.channel, "work", durable=True, group="g", retry_after=0.05)
                await bus.spawn(Worker, name="worker", inbox="work")
                await serve(bus)
        else:
            async with pgbus.open_bus(args.dsn, node="traced-client", keepalive=1.0) as bus:
                bus.add_channel("out", 10)
                await bus.bridge_out("out", args.channel, durable=True)
                if tracer is None:
                    await client(bus)
                else:
                    with tracer.start_as_current_span("request"):
                        await client(bus)
            say("done")

    async def client(bus: pgbus.Bus) -> None:
        with trio.fail_after(30):
            reply = await bus.ask("echo", {"n": 1}, timeout=30)
            say("replied", reply=reply)
            await bus.tell("echo", {"tell": 2})
            await bus.notify(args.channel, "first", durable=True)
            await bus.notify(args.channel, "fail once", durable=True)
            await bus.send("out", "bridged")  # stored by the bridge's task, in its own span

    trio.run(run)


if __name__ == "__main__":
    main()
