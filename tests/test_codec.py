"""
Codecs and payload rules: what crosses the wire, checked against a real PostgreSQL's ``jsonb``.

The JSON codec is strict both ways: it emits only JSON that PostgreSQL's ``jsonb`` accepts, and
refuses, with one `CodecError` naming the channel and what, anything it could not relay intact.
"""

from __future__ import annotations

import json
import re

import pytest

import pgbus
from pgbus._codec import check_payload, decoder, encode, encoder


def deep(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


def refused(message: str) -> pytest.RaisesExc[pgbus.CodecError]:
    return pytest.raises(pgbus.CodecError, match="^" + re.escape(message) + "$")


# --- encoding -------------------------------------------------------------------------------


def test_json_is_compact_and_keeps_non_ascii() -> None:
    """The json codec emits compact JSON with non-ASCII characters as they are."""
    assert encode("c", {"name": "Zoë", "n": [1, 2.5, None, True]}, "json") == (
        '{"name":"Zoë","n":[1,2.5,null,true]}'
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), [1, float("nan")]])
def test_json_refuses_nan_and_infinity(value: object) -> None:
    """NaN and Infinity are not JSON: jsonb would refuse them, so the codec does first."""
    with refused(
        "channel 'c' (json codec): cannot encode payload as JSON: NaN and Infinity are not "
        "JSON, and PostgreSQL's jsonb refuses them"
    ):
        encode("c", value, "json")


@pytest.mark.parametrize("value", ["\ud800", ["ok", "a\udfffb"], {"\udc00": 1}])
def test_json_refuses_a_lone_surrogate(value: object) -> None:
    """A str holding a lone surrogate is refused with a CodecError, never UnicodeEncodeError."""
    expected = r"^channel 'c' \(json codec\): payload holds a lone surrogate"
    with pytest.raises(pgbus.CodecError, match=expected):
        encode("c", value, "json")


@pytest.mark.parametrize("value", ["\x00", {"k\x00": 1}, ["a", "b\x00c"]])
def test_json_refuses_nul(value: object) -> None:
    """NUL would be written \\u0000, which jsonb refuses."""
    with refused(
        "channel 'c' (json codec): payload holds a NUL character, which PostgreSQL's jsonb refuses"
    ):
        encode("c", value, "json")


def test_json_keeps_a_literal_backslash_u0000() -> None:
    """The six characters \\u0000 in a string are not a NUL, and pass."""
    text = encode("c", "a\\u0000b", "json")
    assert text == '"a\\\\u0000b"'
    assert decoder("json")("c", text) == "a\\u0000b"


def test_json_refuses_nesting_deeper_than_python_allows() -> None:
    """Nesting the encoder cannot handle is one CodecError, not a RecursionError."""
    with refused(
        "channel 'c' (json codec): payload is nested too deeply for Python's JSON decoder"
    ):
        encoder("json")("c", deep(100_000))


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (object(), "TypeError: Object of type object is not JSON serializable"),
        ({(1, 2): 3}, "TypeError: keys must be str, int, float, bool or None, not tuple"),
        (10**5000, "Exceeds the limit (4300 digits) for integer string conversion; use "),
    ],
    ids=["object", "tuple-key", "huge-int"],
)
def test_json_refuses_what_it_cannot_encode(value: object, detail: str) -> None:
    """Anything else the encoder cannot write is one CodecError naming why."""
    with pytest.raises(pgbus.CodecError) as caught:
        encode("c", value, "json")
    assert str(caught.value).startswith(
        "channel 'c' (json codec): cannot encode payload as JSON: " + detail
    )


def test_json_refuses_a_circular_value() -> None:
    """A list that holds itself is one CodecError."""
    value: list[object] = []
    value.append(value)
    with refused(
        "channel 'c' (json codec): cannot encode payload as JSON: Circular reference detected"
    ):
        encode("c", value, "json")


def test_json_wraps_whatever_a_subclass_raises() -> None:
    """A dict subclass whose items() fails still gives a CodecError."""

    class Broken(dict[str, int]):
        def items(self):  # type: ignore[no-untyped-def,override]
            raise KeyError("gone")

    with refused("channel 'c' (json codec): cannot encode payload as JSON: KeyError: 'gone'"):
        encode("c", Broken(a=1), "json")


# --- text payloads --------------------------------------------------------------------------


def test_text_refuses_a_lone_surrogate() -> None:
    """check_payload refuses a lone surrogate with a CodecError, not UnicodeEncodeError."""
    with refused(
        "channel 'c' (text codec): payload holds a lone surrogate (U+D800 at index 2), which is "
        "not valid UTF-8 and which PostgreSQL refuses"
    ):
        check_payload("c", "ab\ud800")
    with pytest.raises(pgbus.CodecError):
        encode("c", "\udcff", "text")


def test_text_refuses_nul_and_oversized_payloads() -> None:
    """NUL and 8000 bytes are refused; 7999 bytes pass."""
    with refused(
        "channel 'c' (text codec): payload contains a NUL character, which PostgreSQL refuses"
    ):
        encode("c", "a\x00", "text")
    assert encode("c", "é" * 3999 + "a", "text") == "é" * 3999 + "a"
    with pytest.raises(pgbus.PayloadTooLargeError, match="is 8000 bytes once encoded"):
        encode("c", "é" * 4000, "text")


def test_text_refuses_what_is_not_a_str() -> None:
    """The text codec sends str only, and says which codec to use instead."""
    with refused("channel 'c' (text codec): payload must be str (got dict); use codec 'json'"):
        encode("c", {"a": 1}, "text")


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ('"\\ud800"', "payload string holds a lone surrogate (U+D800 at index 0)"),
        ('{"a": ["x", "y\\uDC00"]}', "payload string holds a lone surrogate (U+DC00 at index 1)"),
        ('{"\\udbff": 1}', "payload string holds a lone surrogate (U+DBFF at index 0)"),
        ('"\\u0000"', "payload holds \\u0000 (NUL), which PostgreSQL's jsonb refuses"),
        ('{"k\\u0000": 1}', "payload holds \\u0000 (NUL), which PostgreSQL's jsonb refuses"),
        ("NaN", "payload holds NaN, which is not JSON"),
        ("[1, Infinity]", "payload holds Infinity, which is not JSON"),
        ('{"x": -Infinity}', "payload holds -Infinity, which is not JSON"),
        ("1e400", "payload holds the number 1e400, too large for a double"),
        ("[-1.5e999]", "payload holds the number -1.5e999, too large for a double"),
        ("[" * 5000 + "]" * 5000, "payload is nested too deeply for Python's JSON decoder"),
        ("not json {", "payload is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        ("1" * 5000, "payload is not valid JSON (Exceeds the limit (4300 digits)"),
    ],
)
def test_json_decoder_refuses_what_it_cannot_relay(payload: str, detail: str) -> None:
    """Valid-looking JSON that jsonb (or Python) cannot hold is one CodecError."""
    with pytest.raises(pgbus.CodecError) as caught:
        decoder("json")("c", payload)
    assert str(caught.value).startswith(f"channel 'c' (json codec): {detail}")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        ('"\\ud83d\\ude00"', "😀"),  # a surrogate pair is one character
        ('"\\\\ud800"', "\\ud800"),  # an escaped backslash, then text
        ('"\\\\u0000"', "\\u0000"),
        ("1e308", 1e308),
        ("1e-400", 0.0),
        ('{"a": [1, 2.5, "ü"]}', {"a": [1, 2.5, "ü"]}),
    ],
)
def test_json_decoder_accepts_what_only_looks_suspect(payload: str, value: object) -> None:
    """Surrogate pairs, escaped backslashes and large finite numbers decode as they are."""
    assert decoder("json")("c", payload) == value


def test_the_text_decoder_passes_payloads_through() -> None:
    """The text codec hands payloads on byte for byte."""
    assert decoder("text")("c", '"\\ud800" NaN') == '"\\ud800" NaN'


# --- against PostgreSQL's jsonb -------------------------------------------------------------

EMITTED = [
    {"name": "Zoë", "n": [1, 2.5, None, True, False]},
    "😀 ✓ \t\n\u2028 \x7f \x01",
    "a\\u0000b",
    1e308,
    -5e-324,
    10**4000,
    2**63,
    0.1,
    deep(500),
    {"": {"": []}},
]


@pytest.mark.parametrize("value", EMITTED, ids=range(len(EMITTED)))
async def test_what_the_encoder_emits_jsonb_accepts(pg, value: object) -> None:
    """PostgreSQL's jsonb accepts what the json codec emits, and means the same value."""
    text = encode("c", value, "json")
    assert await pg.fetchval("SELECT $1::jsonb IS NOT NULL", text)
    back = decoder("json")("c", await pg.fetchval("SELECT $1::jsonb::text", text))
    # jsonb keeps numbers as numeric: 1e308 comes back written as an integer.
    assert float(back) == value if isinstance(value, float) else back == value


@pytest.mark.parametrize(
    "text",
    ['"\\ud800"', '"\\udfff"', '"\\u0000"', '{"a\\u0000": 1}', "NaN", "Infinity", "-Infinity"],
)
async def test_what_the_decoder_refuses_jsonb_refuses_too(pg, text: str) -> None:
    """The refusals are jsonb's own: the decoder refuses exactly what jsonb would."""
    with pytest.raises(pgbus.CodecError):
        decoder("json")("c", text)
    with pytest.raises(Exception, match=r"(?i)invalid input syntax|unsupported unicode|surrogate"):
        await pg.fetchval("SELECT $1::jsonb", text)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "\ud800", "\x00"])
async def test_what_the_encoder_refuses_jsonb_refuses_too(pg, value: object) -> None:
    """Had the encoder written it (as plain json.dumps does), jsonb would have refused it."""
    with pytest.raises(pgbus.CodecError):
        encode("c", value, "json")
    with pytest.raises(Exception, match=r"(?i)invalid input syntax|unsupported unicode|surrogate"):
        await pg.fetchval("SELECT $1::jsonb", json.dumps(value))


# --- channel names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["orders", "Mixed Case", 'quo"te', "ü" * 31, "a" * 63])
def test_channel_names_postgresql_keeps_exactly_pass(name: str) -> None:
    """Case, spaces, quotes and up to 63 bytes of UTF-8 are kept as written."""
    assert pgbus.validate_channel_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("a\x00b", "must not contain NUL characters"),
        ("a" * 64, "is 64 bytes; PostgreSQL allows at most 63 (LISTEN would silently truncate it)"),
        ("ü" * 32, "is 64 bytes; PostgreSQL allows at most 63 (LISTEN would silently truncate it)"),
        ("x\ud800", "must be valid UTF-8 (it holds a lone surrogate)"),
    ],
)
def test_channel_names_postgresql_would_change_are_refused(name: str, reason: str) -> None:
    """A name PostgreSQL would refuse or truncate is one ChannelNameError with the reason."""
    with pytest.raises(pgbus.ChannelNameError) as caught:
        pgbus.validate_channel_name(name)
    assert caught.value.reason == reason


def test_a_channel_name_must_be_a_string() -> None:
    """Anything but a str is refused."""
    with pytest.raises(pgbus.ChannelNameError, match="must be a string"):
        pgbus.validate_channel_name(b"orders")


async def test_quote_ident_keeps_a_name_exact_in_postgresql(pg) -> None:
    """LISTEN on a quoted name listens on exactly that name, quotes and case included."""
    from pgbus._codec import quote_ident

    name = 'Odd "Name" ✓'
    await pg.execute(f"LISTEN {quote_ident(name)}")
    try:
        assert await pg.fetchval("SELECT pg_listening_channels()") == name
    finally:
        await pg.execute(f"UNLISTEN {quote_ident(name)}")
