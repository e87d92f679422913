"""
The signals that stop pgbus's commands, and those that arrive before a command listens for them.

When the process is ``python -m pgbus`` or the ``pgbus`` script, `remember_early_signals` runs
as the package's first statement: from then on a stop signal is only noted, never raised into
whatever runs (an import, a lock's callback), and a command that starts listening for signals
acts on one noted before. Imported as a library, pgbus never touches signal handlers.
"""

from __future__ import annotations

# The C module, not `signal`: importing `signal` (or `typing`) takes milliseconds in which a
# Ctrl-C would still end `python -m pgbus` with a KeyboardInterrupt traceback, before the
# handlers are in place. `signal` is imported once they are.
import _signal  # type: ignore[import-not-found]
import os
from types import FrameType, ModuleType  # loaded by the interpreter already

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    import signal

_STOP_SIGNUMS: tuple[int, ...] = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)

early: list[int] = []
"""Stop signals received before a command listened for them, in order."""

_ignored: set[int] | None = None
"""Stop signals whose handler was SIG_IGN when pgbus started (``nohup`` ignores SIGHUP)."""


def stop_signals() -> tuple[signal.Signals, ...]:
    """
    The signals that stop a command: SIGINT, SIGTERM and SIGHUP, less those the process was
    started ignoring (a daemon started with ``nohup`` keeps ignoring SIGHUP).
    """
    import signal

    ignored = _ignored
    if ignored is None:
        ignored = _ignored_now()
    return tuple(signal.Signals(s) for s in _STOP_SIGNUMS if s not in ignored)


def _ignored_now() -> set[int]:
    return {s for s in _STOP_SIGNUMS if _signal.getsignal(s) == _signal.SIG_IGN}


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
    _ignored = _ignored_now()
    for signum in _STOP_SIGNUMS:
        if signum not in _ignored:
            _signal.signal(signum, _remember)


def ignore_stop_signals() -> None:
    """For the very end: a signal must not kill the interpreter while it tears itself down."""
    for signum in _STOP_SIGNUMS:
        _signal.signal(signum, _signal.SIG_IGN)
