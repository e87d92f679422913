"""What crosses the wire: channel names, payload codecs and PostgreSQL's size limits."""

from __future__ import annotations

import json
from collections.abc import Callable
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
    size = len(name.encode())
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
    """The payload's size in bytes in the server encoding (pgbus connects with UTF-8)."""
    # ASCII-only strings are their own UTF-8 length; skip the encode for them.
    return len(payload) if payload.isascii() else len(payload.encode())


def check_payload(channel: str, payload: str, limit: int = MAX_PAYLOAD_BYTES) -> str:
    """
    Return *payload*, or raise if PostgreSQL would refuse it.

    *limit* is NOTIFY's (the default) or a durable channel's (see ``pgbus._durable``).

    Raises:
        PayloadTooLargeError: more than *limit* bytes in UTF-8 (8000 or more for NOTIFY).
        CodecError: a NUL character, which PostgreSQL text cannot hold.
    """
    size = payload_size(payload)
    if size > limit:
        raise PayloadTooLargeError(channel, size, limit, durable=limit != MAX_PAYLOAD_BYTES)
    if "\x00" in payload:
        raise CodecError(
            channel, "text", "payload contains a NUL character, which PostgreSQL refuses"
        )
    return payload


_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_json_decode = json.JSONDecoder().decode


def _encode_text(channel: str, message: object) -> str:
    if type(message) is not str:
        raise CodecError(
            channel, "text", f"payload must be str (got {type(message).__name__}); use codec 'json'"
        )
    return message


def _encode_json(channel: str, message: object) -> str:
    try:
        return _json_encoder.encode(message)
    except (TypeError, ValueError) as exc:
        raise CodecError(channel, "json", f"cannot encode payload as JSON: {exc}") from None


def _decode_json(channel: str, payload: str) -> Any:
    try:
        return _json_decode(payload)
    except ValueError as exc:
        raise CodecError(channel, "json", f"payload is not valid JSON ({exc})") from None


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
    return check_payload(channel, encoder(codec)(channel, message), limit)


def _checked(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(map(repr, CODECS))} (got {codec!r})")
    return codec
