"""Bridges between PostgreSQL channels and Trio channels."""

from __future__ import annotations

DIRECTIONS: tuple[str, ...] = ("in", "out")
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_newest", "drop_oldest")
