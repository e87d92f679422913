"""
The dashboard: a read-only live page of the cluster (nodes, public actors, singletons, durable
groups, dead letters) and, when a bus serves it, of that bus (channels, bridges with rates,
actors). Served by the bus's metrics server on ``/`` and by ``pgbus dashboard``.

The page is plain HTML, CSS and a small script in ``static/``, shipped in the package: no CDN,
no build step. Its data is `read_overview`'s, the same as ``pgbus status --json``.
"""

from typing import TYPE_CHECKING, Any

DEFAULT_REFRESH = 1.0
"""Seconds: the dashboard reads the database at most this often (``--refresh``)."""

if TYPE_CHECKING:
    from ._data import read_overview as read_overview
    from ._server import Dashboard as Dashboard
    from ._server import DashboardApp as DashboardApp
    from ._server import check_refresh as check_refresh
    from ._server import serve_dashboard as serve_dashboard

_LAZY = {
    "read_overview": "_data",
    "Dashboard": "_server",
    "DashboardApp": "_server",
    "check_refresh": "_server",
    "serve_dashboard": "_server",
}


def __getattr__(name: str) -> Any:
    """The server and its queries (and the driver under them) only when used: building the
    command line's parser, for ``pgbus check``, loads none of them."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)
