"""
Small validators the TOML loader and the Python API share, so a rule is written once.

Each raises `SettingError` with the setting's ``key``, the bare rule and the bad ``value``, so
that the loader can say ``bus.toml: [supervisor] within_seconds must be ... (got 0)`` and the
Python API ``within_seconds must be ... (got 0)`` from the same check. No driver, no Trio.
"""

from __future__ import annotations

import math

from ._errors import SettingError

SECONDS_RULE = "must be a number of seconds > 0"


def check_seconds(key: str, value: object) -> float:
    """*value* as float seconds if it is a finite number > 0 (not a bool), else `SettingError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingError(key, SECONDS_RULE, value=value)
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any double
        raise SettingError(key, SECONDS_RULE, value=value) from None
    if not 0 < seconds < math.inf:
        raise SettingError(key, SECONDS_RULE, value=value)
    return seconds


def check_count(key: str, value: object) -> int:
    """*value* if it is an integer >= 0 (not a bool), else `SettingError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SettingError(key, "must be an integer >= 0", value=value)
    return value


def check_choice(key: str, value: object, allowed: tuple[str, ...]) -> str:
    """*value* if it is one of *allowed*, else `SettingError` listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise SettingError(key, f"must be one of {', '.join(map(repr, allowed))}", value=value)
    return value
