"""
The dashboard: a read-only live page of the cluster (nodes, public actors, singletons, durable
groups, dead letters) and, when a bus serves it, of that bus (channels, bridges with rates,
actors). Served by the bus's metrics server on ``/`` and by ``pgbus dashboard``.

The page is plain HTML, CSS and a small script in ``static/``, shipped in the package: no CDN,
no build step. Its data is `read_overview`'s, the same as ``pgbus status --json``.
"""

from ._data import read_overview as read_overview
from ._server import DEFAULT_REFRESH as DEFAULT_REFRESH
from ._server import Dashboard as Dashboard
from ._server import DashboardApp as DashboardApp
from ._server import check_refresh as check_refresh
from ._server import serve_dashboard as serve_dashboard
