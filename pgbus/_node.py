"""
The node-name rule, free of the driver: the TOML loader (``[node] name``) and ``open_bus(node=...)``
both use it.
"""

from __future__ import annotations

import os
import socket

from ._errors import ConfigError

MAX_NODE_NAME = 128
"""Characters in a node name, at most."""


def node_name_problem(name: object) -> str | None:
    """What is wrong with *name* as a node name (the rest of a sentence), or None."""
    if not isinstance(name, str) or not name.strip() or not name.isprintable():
        return f"must be a non-empty string of printable characters (got {name!r})."
    if len(name) > MAX_NODE_NAME:
        return f"must be at most {MAX_NODE_NAME} characters (got {len(name)})."
    return None


def validate_node_name(name: object) -> str:
    """The node-name rule, shared by ``open_bus(node=...)`` and ``[node] name``."""
    problem = node_name_problem(name)
    if problem is not None:
        raise ConfigError(f"node name {problem}")
    assert isinstance(name, str)
    return name


def default_node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
