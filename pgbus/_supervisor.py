"""Supervision: restart strategies, restart kinds, restart intensity and backoff."""

from __future__ import annotations

STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_KINDS: tuple[str, ...] = ("permanent", "transient", "temporary")
