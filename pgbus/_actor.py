"""The Actor base class and the loop that feeds it its inbox."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import outcome
import trio

from . import _tracing
from ._durable._rules import DurableMessage
from ._errors import ActorOptionsError

if TYPE_CHECKING:
    from ._bus import Bus
    from ._channel import Channel

log = logging.getLogger("pgbus.durable")

# How many queued messages an actor handles before it yields to the scheduler. Draining without a
# checkpoint per message is what makes a burst cheap; the bound keeps other tasks fair.
DRAIN_BATCH = 256


class Actor:
    """
    Subclass this and implement `handle`. One instance handles one message at a time.

    The bus creates a fresh instance for every (re)start, passing the actor's ``options`` as
    keyword arguments to the constructor, then sets `bus` and `name`. Hooks, in order:
    `on_start` (before the first message), `run` (by default: `handle` each inbox message),
    `on_stop` (always, shielded from cancellation and bounded by the bus's ``stop_timeout``).

    An exception from any hook is a failure: it is logged with the actor's name and traceback,
    and the supervisor restarts the actor according to its restart kind. Messages still queued
    in the inbox wait for the next instance.
    """

    bus: Bus
    """The bus this actor runs on: send to any channel with ``await self.bus.send(name, msg)``."""
    name: str
    """The actor's name on the bus; stable across restarts."""
    inbox: Channel | None
    """The channel this actor consumes, or None for an actor that only produces."""
    channel_options: ClassVar[tuple[str, ...]] = ()
    """
    The constructor's options whose values name bus channels (``Heartbeat``'s ``to``).
    ``pgbus check`` and `Bus.spawn` make sure each names a channel that exists.
    """
    needs_database: ClassVar[bool] = False
    """
    True for an actor that talks to PostgreSQL itself (``self.bus.transaction()``), as
    ``TableChanges`` does: ``pgbus run`` then starts an embedded PostgreSQL for a config without
    a DSN even when nothing else in it (bridges, ``[node]``, public or singleton actors) needs one.
    """

    async def on_start(self) -> None:
        """Called once per (re)start, before any message is handled."""

    async def handle(self, message: Any) -> Any:
        """
        Handle one *message* from the inbox. The return value is the reply to `Bus.ask`.

        The default refuses messages: an actor with an inbox must implement this.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement handle(message)")

    async def on_stop(self) -> None:
        """Called once per stop, after a failure too, shielded and bounded in time."""

    async def send(self, channel: str, message: object) -> None:
        """Send *message* to the bus channel named *channel*, waiting while it is full."""
        await self.bus.send(channel, message)

    async def run(self) -> None:
        """
        The actor's main loop: by default, handle inbox messages until the inbox closes.

        Override it for an actor that produces rather than consumes (see
        ``pgbus.actors.heartbeat``).
        An actor without an inbox and without its own `run` simply waits to be stopped.
        """
        if self.inbox is None:
            await trio.sleep_forever()
        await consume(self, self.inbox)


class ReplyTo(Protocol):
    """Where a reply goes: a memory channel of capacity 1, or a remote asker (`_cluster`)."""

    def send_nowait(self, value: outcome.Outcome[Any], /) -> None: ...


class _NoReply:
    """Where the answer to a traced tell goes: nowhere (see `Request`)."""

    __slots__ = ()

    def send_nowait(self, value: outcome.Outcome[Any], /) -> None:
        pass


NO_REPLY = _NoReply()


class Request:
    """
    An `ask` in flight: the message and where the reply goes (capacity 1, never blocks).

    *trace*, when not None, is the context of a request from another node (`_tracing.incoming`):
    its ``handle`` then runs in a span. A tell from another node that carries one comes as a
    Request too, answered into `NO_REPLY`.
    """

    __slots__ = ("message", "reply", "trace")

    def __init__(
        self, message: object, reply: ReplyTo, trace: _tracing.Incoming | None = None
    ) -> None:
        self.message = message
        self.reply = reply
        self.trace = trace

    def answer(self, result: outcome.Outcome[Any]) -> None:
        # A late reply finds the asker gone (its end closed) and is dropped, never blocking.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self.reply.send_nowait(result)


async def consume(actor: Actor, inbox: Channel) -> None:
    """Feed *actor* its inbox, one message at a time, draining without per-message scheduling."""
    handle = actor.handle
    receive_nowait = inbox.receive_nowait
    budget = DRAIN_BATCH
    while True:
        try:
            message = receive_nowait()
        except trio.WouldBlock:
            try:
                message = await inbox.receive()
            except trio.EndOfChannel:
                return
            budget = DRAIN_BATCH
        else:
            budget -= 1
            if not budget:
                await trio.lowlevel.checkpoint()
                budget = DRAIN_BATCH
        kind = type(message)
        if kind is Request:
            await _answer(handle, message)
        elif kind is DurableMessage:
            await _handle_durable(actor, handle, message)
        else:
            await handle(message)


async def _answer(handle: Any, request: Request) -> None:
    if request.trace is not None:
        await _answer_traced(handle, request, request.trace)
        return
    try:
        result = await handle(request.message)
    except Exception as exc:
        request.answer(outcome.Error(exc))
        raise
    request.answer(outcome.Value(result))


async def _answer_traced(handle: Any, request: Request, trace: _tracing.Incoming) -> None:
    with _tracing.handling(trace):
        try:
            result = await handle(request.message)
        except Exception as exc:
            request.answer(outcome.Error(exc))
            raise
        request.answer(outcome.Value(result))


async def _handle_durable(actor: Actor, handle: Any, message: DurableMessage) -> None:
    """
    Handle a durable message: returning acknowledges it, raising schedules its retry.

    A failure here is the message's, not the actor's: it is logged with the traceback and
    retried per the bridge's policy (then dead-lettered), and the actor keeps running.
    A cancelled handle neither acknowledges nor fails: the bridge gives the message back.
    A message whose lease was lost while it waited (the process was frozen past its lease, and
    another member has it now) is not handled here again.
    """
    if not message._receipt.holds(message):
        return
    try:
        if message._trace is None:
            await handle(message)
        else:
            with _tracing.handling_durable(actor.name, message):
                await handle(message)
    except Exception as exc:
        message._receipt.failed(message, exc)
        log.error(
            "actor %r: durable message %d of %r failed (attempt %d)",
            actor.name,
            message.id,
            message.channel,
            message.attempt,
            exc_info=True,
        )
        return
    message._receipt.handled(message)


def check_actor_options(
    name: str,
    actor_class: type[Actor],
    options: Mapping[str, Any],
    channels: Collection[str] | None = None,
    *,
    channels_where: str = "",
) -> Actor:
    """
    Check *options* against *actor_class* and return a first instance built with them.

    The options must bind to the constructor's signature; the constructor must accept them
    (constructors stay free of side effects, so building one early is harmless); and, when
    *channels* is given, each option the class names in `Actor.channel_options` (given, or a
    string default) must name one of *channels* (*channels_where* completes "is not a channel",
    e.g. ``" declared under [channels]"``). The TOML loader and `Bus.spawn` both call this, so
    a bad option fails before any task starts, never as a restart loop.

    Raises:
        ActorOptionsError: with ``key`` (``"options"`` or ``"options.to"``) and ``rule``.
    """
    cls = actor_class.__name__
    try:
        signature: inspect.Signature | None = inspect.signature(actor_class)
    except (TypeError, ValueError):  # no introspectable signature: the constructor will tell
        signature = None
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as exc:
            shown = signature.replace(
                parameters=[
                    p.replace(annotation=inspect.Parameter.empty)
                    for p in signature.parameters.values()
                ],
                return_annotation=inspect.Signature.empty,
            )
            raise ActorOptionsError(name, "options", f"do not fit {cls}{shown}: {exc}.") from None
    try:
        first = actor_class(**options)
    except Exception as exc:
        raise ActorOptionsError(name, "options", f"are refused by {cls}: {exc}") from None
    if channels is not None:
        for option in actor_class.channel_options:
            value = options.get(option, _default_of(signature, option))
            if isinstance(value, str) and value not in channels:
                close = difflib.get_close_matches(value, sorted(channels), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "."
                raise ActorOptionsError(
                    name, f"options.{option}", f"{value!r} is not a channel{channels_where}{hint}"
                )
    return first


def _default_of(signature: inspect.Signature | None, option: str) -> object:
    parameter = None if signature is None else signature.parameters.get(option)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default
