"""DSN helpers: passwords never reach a log line or an error message."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

_URI_PASSWORD = re.compile(r"^(?P<head>[a-z]+://[^:/@]*:)(?P<password>[^@]*)(?P<tail>@)", re.I)
_PARAM_PASSWORD = re.compile(
    r"(?P<head>(?:^|[?&\s])password=)(?P<password>'(?:[^'\\]|\\.)*'|[^&\s]*)", re.I
)


def redact_dsn(dsn: str) -> str:
    """*dsn* with any password replaced by ``***``."""
    redacted = _URI_PASSWORD.sub(
        lambda m: f"{m['head']}***{m['tail']}" if m["password"] else m[0], dsn
    )
    return _PARAM_PASSWORD.sub(lambda m: f"{m['head']}***", redacted)


def describe_dsn(dsn: str) -> str:
    """A short, password-free description of where *dsn* points: ``host:port/db`` or a socket."""
    if "://" not in dsn:
        return redact_dsn(dsn)
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    database = parts.path.lstrip("/") or "postgres"
    if "host" in query and query["host"][0].startswith("/"):
        return f"socket {query['host'][0]} (database {database})"
    host = parts.hostname or query.get("host", ["localhost"])[0]
    port = parts.port or 5432
    return f"{host}:{port}/{database}"
