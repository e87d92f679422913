"""What crosses the wire: channel names, payload codecs and PostgreSQL's size limits."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

from ._errors import ChannelNameError, CodecError, PayloadTooLargeError

MAX_CHANNEL_NAME_BYTES = 63
"""NAMEDATALEN - 1: ``pg_notify`` refuses longer names and ``LISTEN`` silently truncates them."""

MAX_PAYLOAD_BYTES = 7999
"""NOTIFY payloads must be shorter than 8000 bytes in the server encoding."""

CodecName = Literal["text", "json"]
CODECS: tuple[str, ...] = ("text", "json")


def validate_channel_name(name: object) -> str:
    """
    Return *name* if PostgreSQL will use it exactly as given, else raise `ChannelNameError`.

    Names are case-sensitive and may contain spaces; they must be 1..63 bytes of UTF-8 without
    NUL characters.
    """
    if not isinstance(name, str):
        raise ChannelNameError(repr(name), "must be a string")
    if not name:
        raise ChannelNameError(name, "must not be empty")
    if "\x00" in name:
        raise ChannelNameError(name, "must not contain NUL characters")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ChannelNameError(name, "must be valid UTF-8 (it holds a lone surrogate)") from None
    if size > MAX_CHANNEL_NAME_BYTES:
        raise ChannelNameError(
            name,
            f"is {size} bytes; PostgreSQL allows at most {MAX_CHANNEL_NAME_BYTES} "
            "(LISTEN would silently truncate it)",
        )
    return name


def quote_ident(name: str) -> str:
    """Quote *name* as an SQL identifier, so LISTEN and UNLISTEN use it exactly as given."""
    return '"' + name.replace('"', '""') + '"'


def payload_size(payload: str) -> int:
    """
    The payload's size in bytes in the server encoding (pgbus connects with UTF-8).

    Raises:
        UnicodeEncodeError: *payload* holds a lone surrogate; `check_payload` turns that into
            a `CodecError`.
    """
    # ASCII-only strings are their own UTF-8 length; skip the encode for them.
    return len(payload) if payload.isascii() else len(payload.encode())


def check_payload(
    channel: str, payload: str, codec: str = "text", limit: int = MAX_PAYLOAD_BYTES
) -> str:
    """
    Return *payload*, or raise if PostgreSQL would refuse it.

    *limit* is NOTIFY's (the default) or a durable channel's (see ``pgbus._durable``).

    Raises:
        PayloadTooLargeError: more than *limit* bytes in UTF-8 (8000 or more for NOTIFY).
        CodecError: a lone surrogate (not UTF-8) or a NUL character, which PostgreSQL text
            cannot hold.
    """
    try:
        size = payload_size(payload)
    except UnicodeEncodeError as exc:
        raise CodecError(channel, codec, _lone_surrogate(payload, exc.start)) from None
    if size > limit:
        raise PayloadTooLargeError(channel, size, limit, durable=limit != MAX_PAYLOAD_BYTES)
    if "\x00" in payload:
        raise CodecError(
            channel, codec, "payload contains a NUL character, which PostgreSQL refuses"
        )
    return payload


def _lone_surrogate(text: str, index: int) -> str:
    return (
        f"payload holds a lone surrogate (U+{ord(text[index]):04X} at index {index}), "
        "which is not valid UTF-8 and which PostgreSQL refuses"
    )


class _Refused(ValueError):
    """Raised from inside the JSON decoder's hooks for what PostgreSQL's jsonb refuses."""


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"payload holds {name}, which is not JSON and which PostgreSQL's jsonb refuses")


def _finite_float(text: str) -> float:
    value = float(text)
    if value - value != 0:  # inf - inf is nan; finite - itself is 0
        raise _Refused(
            f"payload holds the number {_shorten(text)}, too large for a double "
            "(it would become Infinity, which PostgreSQL's jsonb refuses)"
        )
    return value


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# allow_nan=False: NaN and +-Infinity are not JSON, and jsonb refuses them.
_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_json_decode = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode
# The escapes that decode to what jsonb refuses: a surrogate half (alone, it is not UTF-8) or NUL.
# Raw text from PostgreSQL can hold neither, so only payloads holding such an escape are walked.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")
# In JSON text a backslash appears only in an escape: an odd run of them before u0000 is one.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_NESTED_TOO_DEEPLY = "payload is nested too deeply for Python's JSON decoder"


def _encode_text(channel: str, message: object) -> str:
    if type(message) is not str:
        raise CodecError(
            channel, "text", f"payload must be str (got {type(message).__name__}); use codec 'json'"
        )
    return message


def _encode_json(channel: str, message: object) -> str:
    try:
        text = _json_encoder.encode(message)
    except RecursionError:
        raise CodecError(channel, "json", _NESTED_TOO_DEEPLY) from None
    except ValueError as exc:
        detail = str(exc)
        if "Out of range float" in detail:
            detail = "NaN and Infinity are not JSON, and PostgreSQL's jsonb refuses them"
        raise CodecError(channel, "json", f"cannot encode payload as JSON: {detail}") from None
    except Exception as exc:  # TypeError, or whatever a dict or list subclass raises
        raise CodecError(
            channel, "json", f"cannot encode payload as JSON: {_one_line(exc)}"
        ) from None
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise CodecError(channel, "json", _lone_surrogate(text, exc.start)) from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise CodecError(
            channel, "json", "payload holds a NUL character, which PostgreSQL's jsonb refuses"
        )
    return text


def _decode_json(channel: str, payload: str) -> Any:
    try:
        value = _json_decode(payload)
    except _Refused as exc:
        raise CodecError(channel, "json", str(exc)) from None
    except RecursionError:
        raise CodecError(channel, "json", _NESTED_TOO_DEEPLY) from None
    except ValueError as exc:
        raise CodecError(channel, "json", f"payload is not valid JSON ({exc})") from None
    if "\\u" in payload and _SUSPECT_ESCAPE.search(payload):
        problem = _jsonb_string_problem(value)
        if problem is not None:
            raise CodecError(channel, "json", problem)
    return value


def _jsonb_string_problem(value: Any) -> str | None:
    """What makes a string (or key) in the decoded *value* one jsonb refuses, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: Iterable[str] = (item,)
        elif isinstance(item, dict):
            strings = item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in strings:
            if "\x00" in text:
                return "payload holds \\u0000 (NUL), which PostgreSQL's jsonb refuses"
            try:
                text.encode()
            except UnicodeEncodeError as exc:
                return _lone_surrogate(text, exc.start).replace("payload", "payload string", 1)
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode_text(channel: str, payload: str) -> Any:
    return payload


Encoder = Callable[[str, object], str]
Decoder = Callable[[str, str], Any]


def encoder(codec: str) -> Encoder:
    """The encoder for *codec*: ``encoder(codec)(channel, message) -> str``; raises CodecError."""
    return _encode_json if _checked(codec) == "json" else _encode_text


def decoder(codec: str) -> Decoder:
    """The decoder for *codec*: ``decoder(codec)(channel, payload)``, raising `CodecError`."""
    return _decode_json if _checked(codec) == "json" else _decode_text


def encode(channel: str, message: object, codec: str, limit: int = MAX_PAYLOAD_BYTES) -> str:
    """Encode *message* for *channel* and check its size: what every send path does."""
    return check_payload(channel, encoder(codec)(channel, message), codec, limit)


def _checked(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(map(repr, CODECS))} (got {codec!r})")
    return codec
