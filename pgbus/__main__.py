"""``python -m pgbus`` and the ``pgbus`` script: quiet on a signal from the first moment."""

import signal
import sys


def _stop_before_the_bus_runs(signum: int, _frame: object) -> None:
    # Until the bus installs its own handlers, nothing runs that needs a graceful stop.
    raise SystemExit(0)


def run() -> None:
    """Install the early signal handlers, then import and run the command line."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, _stop_before_the_bus_runs)
    from ._cli import main  # after the handlers, on purpose: importing takes a while

    status = main()
    # Done: a signal now must not kill the interpreter while it tears itself down.
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    run()
