"""``python -m pgbus`` and the ``pgbus`` script: no signal is lost or fatal from the start."""

import sys

from ._signals import ignore_stop_signals, remember_early_signals


def run() -> None:
    """Note early signals, then import and run the command line (which acts on them)."""
    remember_early_signals()
    from ._cli import main  # after the handlers, on purpose: importing takes a while

    status = main()
    ignore_stop_signals()
    sys.exit(status)


if __name__ == "__main__":
    run()
