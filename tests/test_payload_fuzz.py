"""
Generated payloads (any unicode, any JSON value) through the codecs and through real bridges.

Each payload is relayed intact, or refused with exactly one `CodecError` / `PayloadTooLargeError`
line (counted in the bridge's ``rejected``), and never kills the bus. The bridge tests run on a
real PostgreSQL: out of the bus with one codec, back in with both.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgbus
from pgbus._codec import decoder, encode

WAIT = 10
REFUSALS = (pgbus.CodecError, pgbus.PayloadTooLargeError)

# Any code point, surrogates and NUL included (hypothesis leaves surrogates out by default).
any_char = st.characters(codec=None, exclude_categories=())
any_text = st.text(any_char, max_size=60) | st.text(any_char, min_size=3990, max_size=4100)
# What PostgreSQL can hand over: text without NUL and without surrogates.
pg_text = st.text(st.characters(exclude_characters="\x00"), max_size=60)


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e308, -1e308, 5e-324, -0.0, math.inf, -math.inf, math.nan]
)
scalars = st.none() | st.booleans() | st.integers() | floats | any_text
trees = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)
# Nesting well under Python's recursion limit, or far over it (up to what fits in 7999 bytes).
depths = st.integers(0, 200) | st.integers(2000, 3999)
json_values = trees | depths.map(nested)


def one_line(error: BaseException) -> None:
    text = str(error)
    assert text
    assert "\n" not in text


# --- the codecs alone -----------------------------------------------------------------------


@given(any_text)
def test_any_text_is_relayed_intact_or_refused_in_one_line(text: str) -> None:
    """Text is sent byte for byte, or refused with one CodecError/PayloadTooLargeError."""
    try:
        payload = encode("c", text, "text")
    except REFUSALS as exc:
        one_line(exc)
        return
    assert decoder("text")("c", payload) == text


@given(json_values)
def test_any_json_value_is_relayed_intact_or_refused_in_one_line(value: Any) -> None:
    """decode(encode(x)) == x, or one CodecError/PayloadTooLargeError, never another exception."""
    try:
        payload = encode("c", value, "json")
    except REFUSALS as exc:
        one_line(exc)
        return
    assert decoder("json")("c", payload) == value


json_ish = st.one_of(
    pg_text,
    trees.map(lambda v: json.dumps(v, ensure_ascii=False)),
    trees.map(lambda v: json.dumps(v, ensure_ascii=True)),
    depths.map(lambda depth: "[" * depth + "]" * depth),
    st.builds(lambda a, b: a + b, st.sampled_from(["[", "{", '"', "-", "1e", '"\\u']), pg_text),
)


@given(json_ish)
def test_any_text_from_postgres_decodes_to_what_can_be_sent_again(text: str) -> None:
    """What the json decoder accepts, the json encoder can send on (size aside)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return  # PostgreSQL never hands over a lone surrogate character (only escapes of one)
    try:
        value = decoder("json")("c", text)
    except pgbus.CodecError as exc:
        one_line(exc)
        return
    try:
        again = encode("c", value, "json")
    except pgbus.PayloadTooLargeError:  # "1e5" is written 100000.0
        return
    assert decoder("json")("c", again) == value


# --- through real bridges, both ways --------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def _relay(dsn: str, texts: list[str], values: list[Any]) -> None:
    """
    Send *texts* out through a text bridge and *values* through a json bridge; each Postgres
    channel is bridged back in with both codecs. Then a plain message on each, which must
    arrive: the bus lives on. Checks every payload arrived intact or was refused and counted.
    """
    pg_text_name, pg_json_name = f"fz_t_{uuid.uuid4().hex[:8]}", f"fz_j_{uuid.uuid4().hex[:8]}"
    handler = _Lines()
    logging.getLogger("pgbus").addHandler(handler)
    try:
        async with pgbus.open_bus(dsn) as bus:
            for name in (
                "text_out",
                "json_out",
                "t_as_text",
                "t_as_json",
                "j_as_text",
                "j_as_json",
            ):
                bus.add_channel(name, math.inf)
            await bus.bridge_in(pg_text_name, "t_as_text", codec="text")
            await bus.bridge_in(pg_text_name, "t_as_json", codec="json")
            await bus.bridge_in(pg_json_name, "j_as_text", codec="text")
            await bus.bridge_in(pg_json_name, "j_as_json", codec="json")
            await bus.bridge_out("text_out", pg_text_name, codec="text")
            await bus.bridge_out("json_out", pg_json_name, codec="json")
            end = f"end {uuid.uuid4().hex}"
            for text in texts:
                await bus.send("text_out", text)
            for value in values:
                await bus.send("json_out", value)
            await bus.send("text_out", json.dumps(end))
            await bus.send("json_out", end)
            received = {}
            with trio.fail_after(WAIT):
                for name, last in [
                    ("t_as_text", json.dumps(end)),
                    ("t_as_json", end),
                    ("j_as_text", json.dumps(end)),
                    ("j_as_json", end),
                ]:
                    received[name] = []
                    while True:
                        message = await bus.channel(name).receive()
                        assert type(message) is pgbus.Notification, message
                        if message.payload == last:
                            break
                        received[name].append(message.payload)
            stats = {(b.channel, b.direction): b for b in bus.statistics().bridges}
    finally:
        logging.getLogger("pgbus").removeHandler(handler)

    sent_texts = [t for t in texts if _encodes(t, "text")]
    sent_json = [encode("c", v, "json") for v in values if _encodes(v, "json")]
    assert stats["text_out", "out"].rejected == len(texts) - len(sent_texts)
    assert stats["json_out", "out"].rejected == len(values) - len(sent_json)
    assert received["t_as_text"] == sent_texts
    assert received["j_as_text"] == sent_json
    decodable_texts = [t for t in sent_texts if _decodes(t)]
    assert received["t_as_json"] == [decoder("json")("c", t) for t in decodable_texts]
    assert received["j_as_json"] == [v for v in values if _encodes(v, "json")]
    assert stats["t_as_json", "in"].rejected == len(sent_texts) - len(decodable_texts)
    assert stats["j_as_json", "in"].rejected == 0
    rejected = sum(s.rejected for s in stats.values())
    assert len(handler.lines) == rejected, handler.lines
    assert all("\n" not in line for line in handler.lines)


def _encodes(message: object, codec: str) -> bool:
    try:
        encode("c", message, codec)
    except REFUSALS:
        return False
    return True


def _decodes(text: str) -> bool:
    try:
        decoder("json")("c", text)
    except pgbus.CodecError:
        return False
    return True


bridge_texts = any_text | json_ish


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    texts=st.lists(bridge_texts, max_size=6),
    values=st.lists(json_values, max_size=6),
)
def test_generated_payloads_through_real_bridges_both_ways(
    pg_dsn: str, texts: list[str], values: list[Any]
) -> None:
    """Every payload arrives intact or is refused in one counted line; the bus lives on."""
    trio.run(_relay, pg_dsn, texts, values)


# --- the failures found by hand, kept as examples -------------------------------------------


async def test_a_lone_surrogate_sent_to_a_json_bridge_is_refused_and_the_bus_lives(
    pg, pg_dsn, caplog
) -> None:
    """A str with a lone surrogate on a json out bridge is one error line, not a dead bus."""
    name = f"fz_{uuid.uuid4().hex[:8]}"
    async with pg.listen(name) as listener, pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("out", 10)
        await bus.bridge_out("out", name, codec="json")
        await bus.send("out", {"bad": "\ud800"})
        await bus.send("out", {"good": 1})
        with trio.fail_after(WAIT):
            assert (await listener.receive())[1] == '{"good":1}'
        [stats] = bus.statistics().bridges
    assert stats.rejected == 1
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "(json codec): payload holds a lone surrogate (U+D800" in line


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ("[" * 3000 + "]" * 3000, "payload is nested too deeply for Python's JSON decoder"),
        ('{"a": "\\ud800"}', "payload string holds a lone surrogate (U+D800 at index 0)"),
        ("[NaN]", "payload holds NaN, which is not JSON"),
        ('"\\u0000"', "payload holds \\u0000 (NUL)"),
        ("1e400", "payload holds the number 1e400, too large for a double"),
    ],
)
async def test_json_the_codec_cannot_relay_is_refused_at_the_inbound_bridge(
    pg, pg_dsn, caplog, payload: str, problem: str
) -> None:
    """Refused in one line and counted; the listening connection is fine (no Gap, no reconnect)."""
    name = f"fz_{uuid.uuid4().hex[:8]}"
    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 10)
        await bus.bridge_in(name, "in", codec="json")
        await pg.execute("SELECT pg_notify($1, $2)", name, payload)
        await pg.execute("SELECT pg_notify($1, $2)", name, '{"after": 1}')
        with trio.fail_after(WAIT):
            message = await bus.channel("in").receive()
        assert message == pgbus.Notification(name, {"after": 1}, message.pid)
        [stats] = bus.statistics().bridges
    assert (stats.messages, stats.rejected, stats.reconnects) == (1, 1, 0)
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"channel {name!r} (json codec): {problem}" in line
