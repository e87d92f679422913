"""
The signals that stop pgbus's commands, and those that arrive before a command listens for them.

When the process is ``python -m pgbus`` or the ``pgbus`` script, `remember_early_signals` runs
as the package's first statement: from then on a stop signal is only noted, never raised into
whatever runs (an import, a lock's callback), and a command that starts listening for signals
acts on one noted before. Imported as a library, pgbus never touches signal handlers.
"""

from __future__ import annotations

import os
import signal
from types import FrameType, ModuleType

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

early: list[int] = []
"""Stop signals received before a command listened for them, in order."""

_ignored: set[int] | None = None
"""Stop signals whose handler was SIG_IGN when pgbus started (``nohup`` ignores SIGHUP)."""


def stop_signals() -> tuple[signal.Signals, ...]:
    """
    The signals that stop a command: SIGINT, SIGTERM and SIGHUP, less those the process was
    started ignoring (a daemon started with ``nohup`` keeps ignoring SIGHUP).
    """
    ignored = _ignored
    if ignored is None:
        ignored = {s for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_IGN}
    return tuple(s for s in STOP_SIGNALS if s not in ignored)


def started_as_the_command(sys: ModuleType) -> bool:
    """Whether this process is ``python [options] -m pgbus ...`` or the ``pgbus`` script."""
    argv: list[str] = list(getattr(sys, "orig_argv", []))
    if "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["pgbus"]:
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "pgbus"


def _remember(signum: int, _frame: FrameType | None) -> None:
    early.append(signum)


def remember_early_signals() -> None:
    """Note stop signals instead of acting on them (the default would kill or raise)."""
    global _ignored
    _ignored = {s for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_IGN}
    for stop_signal in stop_signals():
        signal.signal(stop_signal, _remember)


def ignore_stop_signals() -> None:
    """For the very end: a signal must not kill the interpreter while it tears itself down."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
