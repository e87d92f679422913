"""
The signals that stop pgbus's commands, and those that arrive before a command listens for them.

``python -m pgbus`` (and the ``pgbus`` script) call `remember_early_signals` first thing: from
then on a stop signal is only noted, never raised into whatever runs (an import, a lock's
callback), and a command that starts listening for signals acts on one noted before.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

early: list[int] = []
"""Stop signals received before a command listened for them, in order."""


def _remember(signum: int, _frame: FrameType | None) -> None:
    early.append(signum)


def remember_early_signals() -> None:
    """Note stop signals instead of acting on them (the default would kill or raise)."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _remember)


def ignore_stop_signals() -> None:
    """For the very end: a signal must not kill the interpreter while it tears itself down."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
