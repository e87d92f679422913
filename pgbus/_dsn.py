"""DSN helpers: passwords never reach a log line or an error message."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote

REDACTED = "***"
_DEFAULT_PORT = 5432


_URI_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*://")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:ssl)?password=)([^&#]*)")
_KV_PAIR = re.compile(r"([A-Za-z_]\w*)\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)")
# An unquoted password runs to the next "key=": libpq would reject "password=a b", but "b" is
# still part of the secret.
_KV_SECRET = re.compile(
    r"(?i)\b((?:ssl)?password)\s*=\s*('(?:[^'\\]|\\.)*'?|\S*(?:\s+(?![A-Za-z_]\w*\s*=)\S+)*)"
)


def redact_dsn(dsn: str) -> str:
    """
    Return *dsn* with every password replaced by ``***``, for error messages and logs.

    Handles URIs (``postgresql://user:secret@host/db``, ``?password=secret``, ``sslpassword``)
    and libpq ``key=value`` strings (``password=secret``, ``password='s e c'``). When a URI is
    ambiguous (a raw ``@``, ``/`` or ``?`` in a password), more is hidden rather than less.
    """
    scheme = _URI_SCHEME.match(dsn)
    if scheme is None:
        return _KV_SECRET.sub(_redact_kv_pair, dsn)
    head, rest = dsn[: scheme.end()], dsn[scheme.end() :]
    at = _userinfo_end(rest)
    if at is not None:
        user, colon, password = rest[:at].partition(":")
        if colon and password:
            rest = f"{user}:{REDACTED}{rest[at:]}"
    return head + _QUERY_SECRET.sub(_redact_query_value, rest)


def _userinfo_end(rest: str) -> int | None:
    """Index of the ``@`` ending the userinfo of a URI (*rest* follows ``scheme://``)."""
    authority_end = len(rest)
    for delimiter in "/?#":
        index = rest.find(delimiter)
        if index != -1:
            authority_end = min(authority_end, index)
    at = rest.rfind("@", 0, authority_end)
    if at != -1:
        return at
    # A URI parser would end the authority at a raw '/', '?' or '#' inside a password, but the
    # password is still in the text: treat everything up to the last '@' as userinfo.
    at = rest.rfind("@")
    colon = rest.find(":")
    if at != -1 and colon != -1 and colon < at:
        return at
    return None


def _redact_query_value(match: re.Match[str]) -> str:
    return match.group(1) + (REDACTED if match.group(2) else "")


def _redact_kv_pair(match: re.Match[str]) -> str:
    key, value = match.group(1), match.group(2)
    return match.group(0) if value in ("", "''") else f"{key}={REDACTED}"


def describe_dsn(dsn: str) -> str:
    """
    A short, password-free name for the server *dsn* points at, for error messages.

    ``"db.example.com:5432/orders"``, ``"[::1]:5433/postgres"``,
    ``"socket /tmp/x (database postgres)"``; several hosts are joined with commas. Never raises.
    """
    try:
        scheme = _URI_SCHEME.match(dsn)
        if scheme is not None:
            hosts, ports, database = _uri_parts(redact_dsn(dsn)[scheme.end() :])
        else:
            hosts, ports, database = _kv_parts(dsn)
    except ValueError:
        return "PostgreSQL (unparsable DSN)"
    if not hosts:
        hosts = ["localhost"]
    if len(ports) == 1:
        ports = ports * len(hosts)
    places = []
    for index, host in enumerate(hosts):
        port = ports[index] if index < len(ports) and ports[index] else str(_DEFAULT_PORT)
        if host.startswith(("/", "@")):  # a socket directory, or a Linux abstract socket
            place = f"socket {host}"
            if port != str(_DEFAULT_PORT):
                place += f" port {port}"
        else:
            place = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        places.append(place)
    description = ",".join(places)
    if not database:
        return description
    if all(place.startswith("socket ") for place in places):
        return f"{description} (database {database})"
    return f"{description}/{database}"


def _uri_parts(rest: str) -> tuple[list[str], list[str], str]:
    """Hosts, ports and database of a URI; *rest* is what follows ``scheme://``."""
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    hostspec = authority.rpartition("@")[2]
    hosts: list[str] = []
    ports: list[str] = []
    for item in hostspec.split(",") if hostspec else []:
        if item.startswith("["):
            host, bracket, after = item[1:].partition("]")
            if not bracket:
                raise ValueError("unclosed IPv6 bracket")
            port = after[1:] if after.startswith(":") else ""
        else:
            host, _, port = item.partition(":")
        hosts.append(unquote(host))
        ports.append(port)
    database = unquote(path)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "host" and value:
            hosts = value.split(",")
        elif key == "port" and value:
            ports = value.split(",")
        elif key in ("dbname", "database") and value:
            database = value
    return hosts, ports, database


def _kv_parts(dsn: str) -> tuple[list[str], list[str], str]:
    settings: dict[str, str] = {}
    for match in _KV_PAIR.finditer(dsn):
        value = match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'"))
        settings[match.group(1).lower()] = value
    if not settings:
        raise ValueError("no key=value pairs")
    host = settings.get("host") or settings.get("hostaddr") or ""
    port = settings.get("port", "")
    hosts = host.split(",") if host else []
    ports = port.split(",") if port else []
    return hosts, ports, settings.get("dbname", "")
