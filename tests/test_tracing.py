"""
OpenTelemetry tracing (``pgbus._tracing``) across real processes.

Three processes of ``tests/fixtures_actors/traced.py``, each with the SDK configured and printing
its finished spans as JSON lines: a client node asks and tells the public actor ``echo`` of
another node and publishes two durable messages that a third process handles. The spans must
form one trace with the right parents; a retried durable message's second ``handle`` is a root
with a link to its publish span. Without ``opentelemetry`` importable, everything still works
and nothing is traced. Nothing sleeps: each wait is for a line a process prints.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
from data import wire_previous
from processes import ROOT, Pgbus, pgbus_env
from test_durable import receive_all

import pgbus
from pgbus import _tracing
from pgbus._cluster._wire import Ask, Tell, decode

if TYPE_CHECKING:
    from conftest import PgHelper

PROGRAM = str(ROOT / "tests" / "fixtures_actors" / "traced.py")
WAIT = 30
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@asynccontextmanager
async def process(
    role: str, dsn: str, channel: str, *, no_otel: bool = False
) -> AsyncIterator[Pgbus]:
    """A process of the fixture program, its output collected; ended on the way out."""
    options = ["--no-otel"] if no_otel else []
    child = await trio.lowlevel.open_process(
        [sys.executable, PROGRAM, role, "--dsn", dsn, "--channel", channel, *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=pgbus_env(),
        cwd=ROOT,
    )
    running = Pgbus(child)
    async with trio.open_nursery() as nursery:
        assert child.stdout is not None
        assert child.stderr is not None
        nursery.start_soon(running._pump, "stdout", child.stdout)
        nursery.start_soon(running._pump, "stderr", child.stderr)
        try:
            yield running
        finally:
            with trio.CancelScope(shield=True):
                if child.returncode is None:
                    child.terminate()
                    with trio.move_on_after(10):
                        await child.wait()
                if child.returncode is None:
                    child.kill()
                    await child.wait()


def records(running: Pgbus, event: str) -> list[dict[str, Any]]:
    found = []
    for line in running.lines["stdout"]:
        if line.startswith("{"):
            record = json.loads(line)
            if record["event"] == event:
                found.append(record)
    return found


def span(spans: list[dict[str, Any]], name: str, **where: Any) -> dict[str, Any]:
    """The one span named *name* whose attributes include *where*."""
    matching = [
        s
        for s in spans
        if s["name"] == name and all(s["attributes"].get(k) == v for k, v in where.items())
    ]
    assert len(matching) == 1, (name, where, spans)
    return matching[0]


async def spans_of(running: Pgbus, count: int) -> list[dict[str, Any]]:
    """Wait until *running* printed *count* spans; all it printed."""
    while len(records(running, "span")) < count:
        await running.expect("stdout", '"event": "span"')
    return records(running, "span")


async def test_a_trace_follows_asks_tells_and_durable_messages_across_processes(
    pg: PgHelper,
) -> None:
    """One trace: the client's asks and publishes are parents of the handle spans elsewhere."""
    channel = f"traced_{secrets.token_hex(4)}"
    with trio.fail_after(WAIT * 2):
        async with (
            process("node", pg.dsn, channel) as node,
            process("consumer", pg.dsn, channel) as consumer,
        ):
            await node.expect("stdout", '"event": "ready"')
            await consumer.expect("stdout", '"event": "ready"')
            async with process("client", pg.dsn, channel) as client:
                await client.expect("stdout", '"event": "done"')
                assert await client.wait(timeout=WAIT) == 0, client.output()
            # node: handle echo (ask, tell); consumer: "first", "bridged", "fail once" twice.
            node_spans = await spans_of(node, 2)
            consumer_spans = await spans_of(consumer, 4)
        client_spans = records(client, "span")

    assert records(client, "tracing") == [{"event": "tracing", "installed": True, "active": True}]
    request = span(client_spans, "request")
    assert request["parent"] is None
    trace_id = request["trace"]
    ask = span(client_spans, "ask echo")
    tell = span(client_spans, "tell echo")
    first, fail_once, bridged = (s for s in client_spans if s["name"] == f"publish {channel}")
    for sent, kind in ((ask, "CLIENT"), (tell, "PRODUCER"), (first, "PRODUCER")):
        assert (sent["trace"], sent["parent"], sent["kind"]) == (trace_id, request["span"], kind)
    assert fail_once["parent"] == request["span"]
    # The bridge's batch: a root of its own (no caller's span reaches the bridge's task).
    assert (bridged["parent"], bridged["kind"]) == (None, "PRODUCER")
    assert bridged["trace"] != trace_id

    # The node that ran echo: each handle is the child of the span that sent its request.
    handled_ask = next(s for s in node_spans if s["kind"] == "SERVER")
    handled_tell = next(s for s in node_spans if s["kind"] == "CONSUMER")
    assert handled_ask["name"] == handled_tell["name"] == "handle echo"
    assert (handled_ask["trace"], handled_ask["parent"]) == (trace_id, ask["span"])
    assert (handled_tell["trace"], handled_tell["parent"]) == (trace_id, tell["span"])

    # The durable consumer: a first attempt is the publish span's child; a retry is a root
    # with a link to it.
    ids = {r["payload"]: r["id"] for r in records(consumer, "handled")}
    handled_first = span(
        consumer_spans, "handle worker", **{"messaging.message.id": str(ids["first"])}
    )
    assert (handled_first["trace"], handled_first["parent"]) == (trace_id, first["span"])
    assert handled_first["kind"] == "CONSUMER"
    assert handled_first["links"] == []
    attempts = {
        s["attributes"]["pgbus.attempt"]: s
        for s in consumer_spans
        if s["attributes"]["messaging.message.id"] == str(ids["fail once"])
    }
    assert sorted(attempts) == [1, 2]
    assert (attempts[1]["trace"], attempts[1]["parent"]) == (trace_id, fail_once["span"])
    assert attempts[1]["status"] == "ERROR"
    retry = attempts[2]
    assert retry["parent"] is None
    assert retry["trace"] != trace_id
    assert retry["links"] == [{"trace": trace_id, "span": fail_once["span"]}]
    assert retry["status"] == "UNSET"
    handled_bridged = span(
        consumer_spans, "handle worker", **{"messaging.message.id": str(ids["bridged"])}
    )
    assert (handled_bridged["trace"], handled_bridged["parent"]) == (
        bridged["trace"],
        bridged["span"],
    )


async def test_without_opentelemetry_everything_works_and_nothing_is_traced(
    pg: PgHelper,
) -> None:
    """A client that cannot import opentelemetry asks, tells and publishes; nothing carries a
    context, so the traced receivers start a root span for each."""
    channel = f"untraced_{secrets.token_hex(4)}"
    with trio.fail_after(WAIT * 2):
        async with (
            process("node", pg.dsn, channel) as node,
            process("consumer", pg.dsn, channel) as consumer,
        ):
            await node.expect("stdout", '"event": "ready"')
            await consumer.expect("stdout", '"event": "ready"')
            async with process("client", pg.dsn, channel, no_otel=True) as client:
                await client.expect("stdout", '"event": "done"')
                assert await client.wait(timeout=WAIT) == 0, client.output()
            node_spans = await spans_of(node, 2)
            consumer_spans = await spans_of(consumer, 4)

    assert records(client, "tracing") == [{"event": "tracing", "installed": False, "active": False}]
    assert records(client, "replied") == [{"event": "replied", "reply": {"echo": {"n": 1}}}]
    assert records(client, "span") == []
    assert [r["message"] for r in records(node, "told")] == [{"tell": 2}]
    assert sorted(r["payload"] for r in records(consumer, "handled")) == [
        "bridged",
        "fail once",
        "fail once",
        "first",
    ]
    for handled in node_spans + consumer_spans:
        assert (handled["parent"], handled["links"]) == (None, []), handled


def test_without_opentelemetry_no_span_code_runs() -> None:
    """With the import blocked, pgbus imports, and every tracing function returns at once."""
    code = """
import sys
sys.modules["opentelemetry"] = None
import pgbus
from pgbus import _tracing
assert not _tracing.installed and not _tracing.active()
assert _tracing.sending("ask", "a", "n") is _tracing.NOTHING
assert _tracing.publishing("c", 1) is _tracing.NOTHING
assert _tracing.incoming("ask", "a", None, None) is None
with _tracing.NOTHING as context:
    assert context is None
assert not any(name.startswith("opentelemetry") and sys.modules[name] for name in sys.modules)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_without_an_sdk_nothing_is_started() -> None:
    """The API alone (no tracer provider configured, in a fresh interpreter): no span, no
    context to send or store."""
    code = f"""
from pgbus import _tracing
assert _tracing.installed and not _tracing.active()
assert _tracing.sending("tell", "a", "n") is _tracing.NOTHING
assert _tracing.publishing("c", 3) is _tracing.NOTHING
assert _tracing.incoming("tell", "a", {TRACEPARENT!r}, None) is None
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


async def test_without_an_sdk_a_consumer_reads_no_context(pg_dsn: str, pg: PgHelper) -> None:
    """No tracer provider here: the message is stored without a context and none is read."""
    assert not _tracing.active()
    channel = f"nosdk_{secrets.token_hex(4)}"
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(channel, "in", durable=True, group="g")
        await bus.notify(channel, "hello", durable=True)
        (message,) = await receive_all(bus.channel("in"), 1)
        stored = await pg.fetchval(
            "SELECT traceparent FROM pgbus.messages WHERE id = $1", message.id
        )
        bus.ack(message)
    assert (message.payload, stored, message._trace) == ("hello", None, None)


# -- the wire: the context is optional and checked strictly -------------------------------------


def test_requests_carry_their_context_and_decode_without_one() -> None:
    """tp and ts go out only when set; a request without them (an older node's) decodes."""
    ask = Ask(7, "echo", "pgbus.node.00ff", {"x": 1}, TRACEPARENT, "k=v")
    assert decode(ask.encode()) == ask
    tell = Tell(8, "echo", [1], TRACEPARENT)
    assert decode(tell.encode()) == tell
    plain = Ask(9, "echo", "pgbus.node.00ff", None)
    assert '"tp"' not in plain.encode()
    assert decode('{"k":"t","i":3,"a":"echo","m":1}') == Tell(3, "echo", 1)


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        "nonsense",
        7,
        None,
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # 00 has no more
        TRACEPARENT + "\n",
    ],
)
def test_a_malformed_context_is_dropped_and_the_request_goes_on(traceparent: object) -> None:
    """A bad tp (and the ts that came with it) is ignored, never a reason to refuse."""
    payload = json.dumps(
        {
            "k": "a",
            "i": 5,
            "a": "echo",
            "r": "pgbus.node.0a",
            "m": "hi",
            "tp": traceparent,
            "ts": "k=v",
        }
    )
    assert decode(payload) == Ask(5, "echo", "pgbus.node.0a", "hi")


def test_a_malformed_tracestate_alone_is_dropped() -> None:
    """A good tp keeps its place when the ts beside it is not one."""
    for tracestate in ("", "x" * 513, "k=\u00e9", 3):
        payload = json.dumps(
            {"k": "t", "i": 5, "a": "echo", "m": 1, "tp": TRACEPARENT, "ts": tracestate}
        )
        assert decode(payload) == Tell(5, "echo", 1, TRACEPARENT)
    assert _tracing.valid_traceparent("01-" + TRACEPARENT[3:] + "-future") is not None


def test_a_node_of_the_previous_release_takes_traced_requests() -> None:
    """The previous release's decoder ignores tp and ts, and its requests decode here."""
    ask = Ask(7, "echo", "pgbus.node.00ff", {"x": 1}, TRACEPARENT, "k=v")
    assert wire_previous.decode(ask.encode()) == wire_previous.Ask(
        7, "echo", "pgbus.node.00ff", {"x": 1}
    )
    tell = Tell(8, "echo", [1], TRACEPARENT)
    assert wire_previous.decode(tell.encode()) == wire_previous.Tell(8, "echo", [1])
    old = wire_previous.Ask(9, "echo", "pgbus.node.00ff", "hi").encode()
    assert decode(old) == Ask(9, "echo", "pgbus.node.00ff", "hi")
