"""Supervision: restart strategies, restart kinds, restart intensity and backoff."""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from ._actor import Actor
from ._errors import PgbusError, RestartIntensityError, SettingError
from ._rules import check_choice, check_count, check_seconds

if TYPE_CHECKING:
    from ._bus import Bus
    from ._channel import Channel

log = logging.getLogger("pgbus.supervisor")

STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_KINDS: tuple[str, ...] = ("permanent", "transient", "temporary")


@attrs.frozen
class Supervision:
    """
    How the bus's supervisor restarts failed actors; also the schema of ``[supervisor]``.

    Every value is checked here, for ``open_bus`` and the TOML loader alike.

    Raises:
        SettingError: (a `ConfigError`) naming the key, the rule and the bad value.
    """

    strategy: str = "one_for_one"
    """``one_for_one``: restart the failed actor; ``one_for_all``: restart every actor;
    ``rest_for_one``: restart the failed actor and those started after it."""
    max_restarts: int = 3
    """More restarts than this within `within_seconds` and the supervisor gives up (escalates)."""
    within_seconds: float = 5.0
    backoff_initial: float = 0.1
    """Delay before the first restart; it doubles with each restart inside the window."""
    backoff_max: float = 5.0
    stop_timeout: float = 5.0
    """How long an actor's ``on_stop`` may take before it is abandoned."""

    def __attrs_post_init__(self) -> None:
        check_choice("strategy", self.strategy, STRATEGIES)
        check_count("max_restarts", self.max_restarts)
        for name in ("within_seconds", "backoff_initial", "backoff_max", "stop_timeout"):
            # Stored as float: 5 in a file or a call means 5.0 seconds.
            object.__setattr__(self, name, check_seconds(name, getattr(self, name)))
        if self.backoff_initial > self.backoff_max:
            raise SettingError(
                "backoff_initial",
                f"must not exceed backoff_max (got {self.backoff_initial:g} > "
                f"{self.backoff_max:g}).",
            )


@attrs.frozen
class ActorStatistics:
    """A snapshot of one supervised actor."""

    name: str
    state: str
    """``starting``, ``running``, ``restarting``, ``stopping``, ``stopped`` or ``failed``."""
    restarts: int
    inbox: str | None
    last_failure: str | None


@attrs.define(eq=False)
class ActorSpec:
    """Everything needed to (re)create one actor."""

    name: str
    factory: Callable[[], Actor]
    inbox: Channel | None
    restart: str


@attrs.define(eq=False)
class _Child:
    spec: ActorSpec
    state: str = "starting"
    restarts: int = 0
    last_failure: BaseException | None = None
    stop_requested: bool = False
    scope: trio.CancelScope | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        return not self.done.is_set()


class Supervisor:
    """
    Runs the bus's actors and restarts them when they fail.

    Each actor runs in a shielded cancel scope of its own, so that however the bus is left, actors
    are stopped one by one, in reverse start order, by `stop_all` — never all at once by a stray
    cancellation. A stop asked for by the supervisor is never a failure and never restarts anyone.
    """

    def __init__(self, bus: Bus, policy: Supervision) -> None:
        self._bus = bus
        self.policy = policy
        self._children: list[_Child] = []  # start order
        self._restart_times: deque[float] = deque()
        self._events_send, self._events = trio.open_memory_channel[
            tuple[_Child, BaseException | None]
        ](math.inf)
        self._nursery: trio.Nursery | None = None
        # Shielded: a cancellation from outside (a signal, a deadline around open_bus) must not
        # end the supervisor, and close its nursery, while the bus may still start an actor
        # (a spawn() that was in a shielded LISTEN when it came). Only stop_all ends it.
        self._loop_scope = trio.CancelScope(shield=True)
        self._stop_deadline = math.inf  # while shutting down: when on_stop must be done
        self._stopping = False  # stop_all has begun: no new actor

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """
        Supervise until `stop_all` or until restart intensity is exceeded (then raise).

        A cancellation from outside does not stop it: however the bus is left, its shutdown
        calls `stop_all`, and until then `start` works (as the bus's services, the supervisor
        is stopped when the bus says so, not by a stray cancellation).
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                with self._loop_scope:
                    await self._supervise()
            except RestartIntensityError:
                with trio.CancelScope(shield=True):
                    await self.stop_all()
                raise

    async def start(self, spec: ActorSpec) -> None:
        """
        Start a new actor after the others; returns once its ``on_start`` has run.

        Raises:
            PgbusError: the bus is stopping its actors (an ``on_stop`` that spawns): the new
                actor would outlive the shutdown that no longer waits for it.
        """
        if self._nursery is None:
            raise RuntimeError("the supervisor is not running")
        if self._stopping:
            raise PgbusError(
                f"actor {spec.name!r} was not started: the bus is stopping its actors."
            )
        child = _Child(spec)
        self._children.append(child)
        try:
            await self._nursery.start(self._incarnate, child)
        except BaseException:
            # The nursery was closing, or the start was cancelled before the actor ran: nobody
            # will ever set `done` but us, and a child that never ran has nothing to stop.
            if child.state == "starting":
                self._children.remove(child)
                child.done.set()
            raise

    async def stop_all(self, *, deadline: float = math.inf) -> None:
        """
        Stop restarting, then stop every actor in reverse start order. With *deadline* (for a
        shutdown), each ``on_stop`` gets at most until then (and never more than stop_timeout).
        """
        self._loop_scope.cancel()
        self._stopping = True
        self._stop_deadline = deadline
        for child in reversed(self._children):
            await self._stop(child)

    async def stop_producers(self) -> None:
        """Stop the actors without an inbox (they only produce), in reverse start order."""
        for child in reversed(self._children):
            if child.spec.inbox is None:
                await self._stop(child)

    def idle(self) -> bool:
        """True when no running actor has a message waiting or in hand (each waits on its inbox)."""
        consumers: dict[int, tuple[Channel, int]] = {}
        for child in self._children:
            inbox = child.spec.inbox
            if inbox is not None and child.alive:
                _, count = consumers.get(id(inbox), (inbox, 0))
                consumers[id(inbox)] = (inbox, count + 1)
        for inbox, count in consumers.values():
            stats = inbox.statistics()
            if stats.buffered or stats.senders_waiting or stats.receivers_waiting < count:
                return False
        return True

    def unhandled(self) -> list[tuple[str, str, int]]:
        """``(channel, actor, messages)`` for every inbox that still holds messages."""
        left: dict[str, tuple[str, str, int]] = {}
        for child in self._children:
            inbox = child.spec.inbox
            if inbox is not None and inbox.name not in left:
                stats = inbox.statistics()
                count = stats.buffered + stats.senders_waiting
                if count:
                    left[inbox.name] = (inbox.name, child.name, count)
        return list(left.values())

    def statistics(self) -> list[ActorStatistics]:
        return [
            ActorStatistics(
                name=c.name,
                state=c.state,
                restarts=c.restarts,
                inbox=c.spec.inbox.name if c.spec.inbox is not None else None,
                last_failure=repr(c.last_failure) if c.last_failure is not None else None,
            )
            for c in self._children
        ]

    async def remove(self, name: str) -> None:
        """Stop the actor *name* (``on_stop`` runs) and forget it: `find` no longer sees it."""
        for child in self._children:
            if child.name == name:
                await self._stop(child)
                self._children.remove(child)
                return

    def find(self, name: str) -> ActorSpec | None:
        for child in self._children:
            if child.name == name:
                return child.spec
        return None

    # -- one incarnation of an actor ---------------------------------------------------------

    async def _incarnate(
        self, child: _Child, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        child.done = trio.Event()
        child.stop_requested = False
        child.state = "starting"
        failure: BaseException | None = None
        started = False
        try:
            # Cancellable while starting (whoever awaits spawn() may give up); shielded once
            # running, so that only stop_all() stops it, in order.
            with trio.CancelScope() as scope:
                child.scope = scope
                actor: Actor | None = None
                try:
                    actor = child.spec.factory()
                    actor.bus = self._bus
                    actor.name = child.name
                    actor.inbox = child.spec.inbox
                    await actor.on_start()
                    await trio.lowlevel.checkpoint_if_cancelled()
                    scope.shield = True
                    child.state = "running"
                    task_status.started()
                    started = True
                    await actor.run()
                except Exception as exc:
                    failure = exc
                    log.error("actor %r failed: %r", child.name, exc, exc_info=exc)
                finally:
                    if actor is not None:
                        await self._call_on_stop(child, actor)
            if not started:
                task_status.started()
        except BaseException:
            # Cancelled before it started: its spawn() was abandoned; never restart it.
            child.stop_requested = True
            child.state = "stopped"
            raise
        finally:
            child.scope = None
            child.last_failure = failure if failure is not None else child.last_failure
            child.done.set()
            self._events_send.send_nowait((child, failure))

    async def _call_on_stop(self, child: _Child, actor: Actor) -> None:
        with trio.CancelScope(shield=True) as scope:
            floor = trio.current_time() + 0.25  # on_stop always gets a moment
            scope.deadline = min(
                trio.current_time() + self.policy.stop_timeout, max(self._stop_deadline, floor)
            )
            try:
                await actor.on_stop()
            except Exception as exc:
                log.error("actor %r failed in on_stop: %r", child.name, exc, exc_info=exc)
        if scope.cancelled_caught:
            log.warning("actor %r: on_stop did not finish in time; abandoned", child.name)

    async def _stop(self, child: _Child) -> None:
        child.stop_requested = True
        if child.alive:
            child.state = "stopping"
            if child.scope is not None:
                child.scope.cancel()
            await child.done.wait()
        if child.state != "failed":
            child.state = "stopped"

    # -- the decisions -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        async for child, failure in self._events:
            if child.stop_requested or child.alive:
                continue  # we stopped it ourselves (or it is already back)
            if not _should_restart(child.spec.restart, failure):
                child.state = "failed" if failure is not None else "stopped"
                continue
            self._count_restart(child, failure)
            group = self._restart_group(child)
            for other in reversed(group):
                if other is not child:
                    await self._stop(other)
            # A temporary actor is never restarted, even when a sibling's failure stopped it.
            group = [m for m in group if m is child or m.spec.restart != "temporary"]
            for member in group:
                member.state = "restarting"
            await trio.sleep(self._backoff())
            for member in group:
                member.restarts += 1
                await self._nursery_start(member)

    async def _nursery_start(self, child: _Child) -> None:
        assert self._nursery is not None
        await self._nursery.start(self._incarnate, child)

    def _restart_group(self, failed: _Child) -> list[_Child]:
        """The actors to restart, in start order (temporary ones that stopped stay stopped)."""
        strategy = self.policy.strategy
        if strategy == "one_for_one":
            return [failed]
        if strategy == "one_for_all":
            candidates = self._children
        else:  # rest_for_one
            candidates = self._children[self._children.index(failed) :]
        return [c for c in candidates if c is failed or c.alive or c.spec.restart != "temporary"]

    def _count_restart(self, child: _Child, failure: BaseException | None) -> None:
        now = trio.current_time()
        window = self.policy.within_seconds
        times = self._restart_times
        while times and times[0] <= now - window:
            times.popleft()
        if len(times) >= self.policy.max_restarts:
            child.state = "failed"
            log.error(
                "actor %r: more than %d restarts within %gs; supervisor gives up",
                child.name,
                self.policy.max_restarts,
                window,
            )
            raise RestartIntensityError(child.name, self.policy.max_restarts, window, failure)
        times.append(now)

    def _backoff(self) -> float:
        """Exponential in the restarts inside the window, with jitter so restarts don't align."""
        recent = len(self._restart_times)
        delay = min(self.policy.backoff_max, self.policy.backoff_initial * 2 ** (recent - 1))
        return random.uniform(delay / 2, delay)


def _should_restart(kind: str, failure: BaseException | None) -> bool:
    if kind == "permanent":
        return True
    if kind == "transient":
        return failure is not None
    return False
