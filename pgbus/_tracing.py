"""
OpenTelemetry tracing (design section 11): the only module that imports ``opentelemetry``.

What is traced, when the ``opentelemetry-api`` package is installed (``pip install
pgbus[tracing]``) and an SDK's tracer provider is configured:

- a cluster ask or tell: ``ask {actor}`` (CLIENT) or ``tell {actor}`` (PRODUCER) on the asking
  node, its context sent in the request (W3C ``traceparent`` and ``tracestate``, see `_wire`);
  ``handle {actor}`` (SERVER or CONSUMER) around the remote actor's ``handle``, its child;
- a durable message: ``publish {channel}`` (PRODUCER) when it is stored, its ``traceparent``
  stored with it (column ``pgbus.messages.traceparent``); ``handle {actor}`` (CONSUMER) around
  the actor's ``handle``: on the first attempt a child of the publish span, on each retry a new
  root span with a link to it (so a retried message does not grow one trace without end).

- a keyed actor's message: ``tell {kind}`` (PRODUCER) or ``ask {kind}`` (CLIENT) when it is
  stored, its ``traceparent`` stored with it (``pgbus.entity_mail.traceparent``), and
  ``handle {kind}`` (CONSUMER) around ``handle``, parented as a durable message's; the tells a
  handler queues carry the handle span's context.

NOTIFY bridges carry no context: their payload format is the user's, byte for byte. Nothing in
one process is traced by pgbus (channels, local asks): the caller's span covers it.

Without the package every function here returns at its first line (one global's check), and
with it but no SDK configured (the API's proxy or no-op provider) nothing is started and no
context is read from the database. Errors never come from here: a malformed context is ignored.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError:  # the optional extra is not installed: every function is a no-op
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ._durable._rules import DurableMessage

installed = trace is not None
"""Whether ``opentelemetry-api`` could be imported."""

MAX_TRACESTATE = 512
"""The longest ``tracestate`` carried (W3C: a vendor may cut it at 512 characters)."""

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_TRACESTATE = re.compile(r"[\x20-\x7e]*\Z")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def valid_traceparent(value: object) -> str | None:
    """*value* if it is a W3C ``traceparent`` a receiver may use, else None (never raises)."""
    if type(value) is not str or len(value) > 512:
        return None
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, span_id, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return value


def valid_tracestate(value: object) -> str | None:
    """*value* if it can be a W3C ``tracestate`` (printable ASCII, at most 512), else None."""
    if type(value) is not str or not value or len(value) > MAX_TRACESTATE:
        return None
    return value if _TRACESTATE.match(value) is not None else None


class _Nothing:
    """The context manager of every function here when nothing is traced: gives None."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


NOTHING: Any = _Nothing()


class _State:
    provider: object = None
    tracer: Any = None
    unset_until = -math.inf  # no SDK was configured: not asked again before this time


RECHECK_UNSET = 1.0
"""Seconds between asks while no SDK is configured: the API's answer reads the environment, too
costly once per message. A provider configured after the bus started counts within this."""


def _tracer() -> Any:
    """The tracer of the configured SDK, or None when only the API is there (no provider)."""
    if _State.tracer is None:
        now = time.monotonic()
        if now < _State.unset_until:
            return None
        _State.unset_until = now + RECHECK_UNSET
    provider = trace.get_tracer_provider()
    if provider is not _State.provider:
        _State.provider = provider
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            _State.tracer = None
        else:
            from . import __version__

            _State.tracer = provider.get_tracer("pgbus", __version__)
    return _State.tracer


def active() -> bool:
    """Whether spans are made: the API is installed and an SDK's provider is configured."""
    if trace is None:
        return False
    return _tracer() is not None


def _attributes(operation: str, destination: str, **more: Any) -> dict[str, Any]:
    return {
        "messaging.system": "pgbus",
        "messaging.operation.type": operation,
        "messaging.destination.name": destination,
        **{key: value for key, value in more.items() if value is not None},
    }


def _fail(span: Any, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def _carrier(span: Any) -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


# -- cluster asks and tells ------------------------------------------------------------------


def sending(operation: str, actor: str, node: str) -> Any:
    """
    A context manager around sending a cluster request: *operation* is ``"ask"`` (a CLIENT span,
    ended with the reply) or ``"tell"`` (a PRODUCER span, ended once queued). It gives the
    ``(traceparent, tracestate)`` to send, or None when nothing is traced.
    """
    if trace is None:
        return NOTHING
    tracer = _tracer()
    if tracer is None:
        return NOTHING
    return _sending(tracer, operation, actor, node)


@contextmanager
def _sending(
    tracer: Any, operation: str, actor: str, node: str
) -> Iterator[tuple[str | None, str | None]]:
    kind = SpanKind.CLIENT if operation == "ask" else SpanKind.PRODUCER
    attributes = _attributes("send", actor, **{"pgbus.node": node})
    with tracer.start_as_current_span(
        f"{operation} {actor}",
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        carrier = _carrier(span)
        try:
            yield (
                valid_traceparent(carrier.get("traceparent")),
                valid_tracestate(carrier.get("tracestate")),
            )
        except Exception as exc:
            _fail(span, exc)
            raise


class Incoming:
    """A request received with tracing on: what its ``handle`` span is named and parented to."""

    __slots__ = ("actor", "kind", "parent")

    def __init__(self, actor: str, kind: Any, parent: Any) -> None:
        self.actor = actor
        self.kind = kind
        self.parent = parent


def incoming(operation: str, actor: str, traceparent: str | None, tracestate: str | None) -> Any:
    """
    What the actor loop needs to trace the ``handle`` of a request received from another node
    (*operation* ``"ask"`` or ``"tell"``), or None when nothing is traced. A request without a
    context (from a node that traces nothing, or an older one) gets a root span.
    """
    if trace is None:
        return None
    if _tracer() is None:
        return None
    carrier = {}
    if traceparent is not None:
        carrier["traceparent"] = traceparent
        if tracestate is not None:
            carrier["tracestate"] = tracestate
    kind = SpanKind.SERVER if operation == "ask" else SpanKind.CONSUMER
    return Incoming(actor, kind, propagate.extract(carrier, context=Context()))


@contextmanager
def handling(request: Incoming) -> Iterator[None]:
    """The ``handle {actor}`` span of a request from another node, current while it runs."""
    tracer = _tracer()
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(
        f"handle {request.actor}",
        context=request.parent,
        kind=request.kind,
        attributes=_attributes("process", request.actor),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except Exception as exc:
            _fail(span, exc)
            raise


# -- durable channels --------------------------------------------------------------------------


def publishing(channel: str, count: int, *, root: bool = False) -> Any:
    """
    A context manager around storing *count* messages in the durable channel *channel*: a
    ``publish {channel}`` span (PRODUCER, child of the current span, or a root with *root*:
    a bridge's task has no caller). It gives the ``traceparent`` to store with them, or None
    when nothing is traced.
    """
    if trace is None:
        return NOTHING
    tracer = _tracer()
    if tracer is None:
        return NOTHING
    return _publishing(tracer, channel, count, root)


@contextmanager
def _publishing(tracer: Any, channel: str, count: int, root: bool) -> Iterator[str | None]:
    attributes = _attributes(
        "send", channel, **{"messaging.batch.message_count": count if count > 1 else None}
    )
    context = Context() if root else None
    with _stored_span(tracer, f"publish {channel}", SpanKind.PRODUCER, attributes, context) as tp:
        yield tp


@contextmanager
def _stored_span(
    tracer: Any, name: str, kind: Any, attributes: dict[str, Any], context: Any = None
) -> Iterator[str | None]:
    """A span around storing messages; gives the ``traceparent`` to store with them."""
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield valid_traceparent(_carrier(span).get("traceparent"))
        except Exception as exc:
            _fail(span, exc)
            raise


@contextmanager
def handling_durable(actor: str, message: DurableMessage) -> Iterator[None]:
    """
    The ``handle {actor}`` span of a durable *message*: on the first attempt a child of its
    publish span; on a retry a new root with a link to the publish span.
    """
    attributes = {
        "messaging.message.id": str(message.id),
        "messaging.consumer.group.name": message.group,
        "pgbus.actor": actor,
        "pgbus.attempt": message.attempt,
    }
    with _handling_stored(
        f"handle {actor}", message.channel, message._trace, message.attempt, attributes
    ):
        yield


def handling_entity(kind: str, key: str, id: int, traceparent: str | None, attempt: int) -> Any:
    """
    The ``handle {kind}`` span of a keyed actor's message (as `handling_durable`: a child of
    the span that stored it on the first attempt, a linked root on a retry), or nothing.
    """
    if trace is None or _tracer() is None:
        return NOTHING
    attributes = {"messaging.message.id": str(id), "pgbus.key": key, "pgbus.attempt": attempt}
    return _handling_stored(f"handle {kind}", kind, traceparent, attempt, attributes)


def storing_entity(operation: str, kind: str) -> Any:
    """
    Around storing a message for a keyed actor of *kind* (*operation* ``"tell"``, a PRODUCER
    span, or ``"ask"``, CLIENT, ended with the reply): gives the ``traceparent`` to store with
    it, or None when nothing is traced.
    """
    if trace is None:
        return NOTHING
    tracer = _tracer()
    if tracer is None:
        return NOTHING
    return _storing_entity(tracer, operation, kind)


@contextmanager
def _storing_entity(tracer: Any, operation: str, kind: str) -> Iterator[str | None]:
    span_kind = SpanKind.CLIENT if operation == "ask" else SpanKind.PRODUCER
    with _stored_span(tracer, f"{operation} {kind}", span_kind, _attributes("send", kind)) as tp:
        yield tp


def current_traceparent() -> str | None:
    """The current span's ``traceparent`` (a handler's outgoing tells carry it), or None."""
    if trace is None or _tracer() is None:
        return None
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    return valid_traceparent(_carrier(span).get("traceparent"))


@contextmanager
def _handling_stored(
    name: str, destination: str, stored: str | None, attempt: int, more: dict[str, Any]
) -> Iterator[None]:
    tracer = _tracer()
    if tracer is None:
        yield
        return
    traceparent = valid_traceparent(stored)
    published = (
        Context()
        if traceparent is None
        else propagate.extract({"traceparent": traceparent}, context=Context())
    )
    links = []
    parent = published
    if attempt > 1:
        parent = Context()  # a root: each attempt is a trace of its own
        publish = trace.get_current_span(published).get_span_context()
        if publish.is_valid:
            links.append(Link(publish, {"pgbus.link": "publish"}))
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=_attributes("process", destination, **more),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except Exception as exc:
            _fail(span, exc)
            raise
