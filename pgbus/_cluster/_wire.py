"""
The cluster's wire protocol, declared once: what nodes send each other in NOTIFY payloads.

Five tagged types (the tag is the ``"k"`` key), as tractor's ``msg/types.py`` declares its own:

=========  ====  ===========================================================================
type       tag   keys
=========  ====  ===========================================================================
`Ask`      a     ``i`` id, ``a`` actor, ``r`` the asker's node channel, ``m`` the message
                 (optional: ``tp`` a W3C traceparent, ``ts`` its tracestate)
`Tell`     t     ``i`` id, ``a`` actor, ``m`` the message (optional: ``tp``, ``ts``)
`Reply`    r     ``i`` the ask's id, ``v`` what ``handle`` returned
`Failure`  e     ``i``, ``t`` the remote error's type name, ``e`` its text
`Refusal`  e     ``i``, ``t`` null, ``e`` why the node did not take the request
=========  ====  ===========================================================================

Both ways the JSON is strict (the codec's rules: no NaN or Infinity, no number that overflows a
double, no lone surrogate or NUL, no nesting deeper than the decoder allows). `decode` checks the
shape on receipt and raises `WireError` with the reason: a request whose id or reply channel is
not one a node would send is refused here, before anything reaches an actor.

Ids are what the sender chose: this version sends 63 random bits (`new_id`), so a client that
cannot read a node's traffic cannot guess an ask's id. They stay integers, as earlier releases
sent (counting from 1) and expect back: a node of either release answers the other's asks.
Strings of hex digits are accepted too.

Trace context (`pgbus._tracing`): a request may carry the sender's span as ``tp`` (a W3C
``traceparent``) and ``ts`` (its ``tracestate``), only when the sender traces. Both are optional
and checked strictly on receipt: a malformed one is dropped (the request goes on without it),
never a reason to refuse the request. A node of an earlier release ignores keys it does not know,
and sends none.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import attrs

from .._codec import MAX_CHANNEL_NAME_BYTES, MAX_PAYLOAD_BYTES, decoder, payload_size
from .._errors import CodecError, MessageNotJSONError, MessageTooLargeError
from .._tracing import valid_traceparent, valid_tracestate

NODE_CHANNEL_PREFIX = "pgbus.node."
"""Every node's own channel is this prefix and 16 random hex digits."""
MAX_ERROR_TEXT = 2000
"""A remote error's message is cut to this many characters, so its reply always fits."""
MAX_ACTOR_NAME = 200
"""The longest actor name a request may carry."""

_ID = re.compile(r"[0-9a-f]{1,64}\Z")
_NODE_CHANNEL = re.compile(re.escape(NODE_CHANNEL_PREFIX) + r"[0-9a-f]{1,40}\Z")
_MAX_INT_ID = 2**63 - 1

_json_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_strict_decode = decoder("json")


class WireError(ValueError):
    """A payload that is not a message of this protocol; the text says why (one line)."""


def new_id() -> int:
    """An id no other client can guess: 63 random bits (a positive bigint, as JSON allows)."""
    return secrets.randbits(63) or 1


def new_node_channel() -> str:
    """A node's own channel: the prefix and 64 random bits."""
    return NODE_CHANNEL_PREFIX + secrets.token_hex(8)


def is_node_channel(channel: object) -> bool:
    """Whether *channel* is a channel a node of this protocol listens on."""
    return (
        isinstance(channel, str)
        and len(channel) <= MAX_CHANNEL_NAME_BYTES
        and _NODE_CHANNEL.match(channel) is not None
    )


def dumps(value: object, actor: str, what: str) -> str:
    """*value* as strict JSON, or `MessageNotJSONError` naming *what* and *actor*."""
    try:
        text = _json_encode(value)
        if not text.isascii():
            text.encode()  # a lone surrogate would fail in the driver, after sending began
    except (TypeError, ValueError, RecursionError) as exc:
        raise MessageNotJSONError(actor, what, str(exc) or type(exc).__name__) from None
    return text


def checked_size(payload: str, actor: str, what: str) -> str:
    """*payload* if one NOTIFY can carry it, else `MessageTooLargeError`."""
    size = payload_size(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise MessageTooLargeError(actor, what, size, MAX_PAYLOAD_BYTES)
    return payload


Id = str | int


@attrs.frozen
class Ask:
    """A request that wants an answer on *reply_to* (the asker's node channel)."""

    id: Id
    actor: str
    reply_to: str
    message: Any
    traceparent: str | None = None
    """The asking span's W3C context, when the asker traces (`pgbus._tracing`)."""
    tracestate: str | None = None

    def encode(self) -> str:
        body = dumps(self.message, self.actor, "the message")
        return checked_size(
            f'{{"k":"a","i":{_json_encode(self.id)},"a":{_json_encode(self.actor)},'
            f'"r":{_json_encode(self.reply_to)},"m":{body}'
            f"{_trace_keys(self.traceparent, self.tracestate)}}}",
            self.actor,
            "the request",
        )


@attrs.frozen
class Tell:
    """A message for an actor; nobody answers."""

    id: Id
    actor: str
    message: Any
    traceparent: str | None = None
    """The telling span's W3C context, when the sender traces (`pgbus._tracing`)."""
    tracestate: str | None = None

    def encode(self) -> str:
        body = dumps(self.message, self.actor, "the message")
        return checked_size(
            f'{{"k":"t","i":{_json_encode(self.id)},"a":{_json_encode(self.actor)},"m":{body}'
            f"{_trace_keys(self.traceparent, self.tracestate)}}}",
            self.actor,
            "the message",
        )


def _trace_keys(traceparent: str | None, tracestate: str | None) -> str:
    if traceparent is None:
        return ""
    if tracestate is None:
        return f',"tp":{_json_encode(traceparent)}'
    return f',"tp":{_json_encode(traceparent)},"ts":{_json_encode(tracestate)}'


@attrs.frozen
class Reply:
    """What the asked actor's ``handle`` returned."""

    id: Id
    value: Any

    def encode(self, actor: str) -> str:
        body = dumps(self.value, actor, "the reply")
        payload = f'{{"k":"r","i":{_json_encode(self.id)},"v":{body}}}'
        return checked_size(payload, actor, "the reply")


@attrs.frozen
class Failure:
    """The asked actor's ``handle`` raised: the error's type name and text."""

    id: Id
    type_name: str
    text: str

    @classmethod
    def of(cls, id: Id, error: BaseException) -> Failure:
        return cls(id, type(error).__name__, str(error)[:MAX_ERROR_TEXT])

    def encode(self) -> str:
        return _json_encode({"k": "e", "i": self.id, "t": self.type_name, "e": self._text()})

    def _text(self) -> str:
        # A lone surrogate in an exception's text must not make the reply unsendable.
        return self.text.encode("utf-8", "replace").decode()


@attrs.frozen
class Refusal:
    """The node did not take the request (it does not run the actor, or it is full)."""

    id: Id
    reason: str

    def encode(self) -> str:
        return _json_encode({"k": "e", "i": self.id, "t": None, "e": self.reason})


Message = Ask | Tell | Reply | Failure | Refusal


def decode(payload: str) -> Message:
    """
    The message *payload* holds, checked: strict JSON, a known tag, every key of the right type.

    Raises:
        WireError: anything else, with the reason in one line.
    """
    try:
        data = _strict_decode("", payload)
    except CodecError as exc:
        raise WireError(exc.detail) from None
    if type(data) is not dict:
        raise WireError(f"not a JSON object (got {type(data).__name__})")
    kind = data.get("k")
    id = data.get("i")
    if not (
        (type(id) is int and 0 <= id <= _MAX_INT_ID)
        or (type(id) is str and _ID.match(id) is not None)
    ):
        raise WireError(f"an id must be a positive integer or hex digits (got {_short(id)})")
    if kind == "r" or kind == "e":
        if kind == "r":
            if "v" not in data:
                raise WireError("a reply without a value ('v')")
            return Reply(id, data["v"])
        type_name, text = data.get("t"), data.get("e")
        if not isinstance(text, str) or not (type_name is None or isinstance(type_name, str)):
            raise WireError("an error reply's 't' must be a string or null and 'e' a string")
        return Refusal(id, text) if type_name is None else Failure(id, type_name, text)
    if kind != "a" and kind != "t":
        raise WireError(f"unknown kind {_short(kind)}")
    actor = data.get("a")
    if not isinstance(actor, str) or not actor or len(actor) > MAX_ACTOR_NAME:
        raise WireError(f"a request's actor must be a name (got {_short(actor)})")
    if "m" not in data:
        raise WireError("a request without a message ('m')")
    # Optional, and never a reason to refuse: a malformed context is dropped.
    traceparent = tracestate = None
    if "tp" in data:
        traceparent = valid_traceparent(data["tp"])
        if traceparent is not None:
            tracestate = valid_tracestate(data.get("ts"))
    if kind == "t":
        return Tell(id, actor, data["m"], traceparent, tracestate)
    reply_to = data.get("r")
    if not is_node_channel(reply_to):
        raise WireError(f"an ask's reply channel must be a node's channel (got {_short(reply_to)})")
    assert isinstance(reply_to, str)
    return Ask(id, actor, reply_to, data["m"], traceparent, tracestate)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
