"""
The one DSN rule (`check_dsn`), and DSN helpers: passwords never reach a log line or an error
message (`redact_dsn`, `describe_dsn`).
"""

from __future__ import annotations

import difflib
import re
from urllib.parse import parse_qsl, quote, unquote, unquote_to_bytes, urlsplit

from ._errors import SettingError
from ._rules import check_seconds

REDACTED = "***"
_DEFAULT_PORT = 5432


_URI_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*://")
# A query password runs to the next "&key=" or the end: a raw '#' or '&' in it is still secret.
_QUERY_SECRET = re.compile(r"(?i)([?&](?:ssl)?password=)((?:[^&]|&(?![^&=]*=))*)")
_KV_PAIR = re.compile(r"([A-Za-z_]\w*)\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)")
# An unquoted password runs to the next "key=": libpq would reject "password=a b", but "b" is
# still part of the secret; so does what follows a quoted one without a space.
_KV_SECRET = re.compile(
    r"(?i)\b((?:ssl)?password)\s*=\s*('(?:[^'\\]|\\.)*'?\S*|\S*(?:\s+(?![A-Za-z_]\w*\s*=)\S+)*)"
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
    """
    Index of the ``@`` ending the userinfo of a URI (*rest* follows ``scheme://``).

    A URI parser ends the authority at the first ``/``, ``?`` or ``#``, but a password may
    hold any of them, and ``@`` too: when a ``:`` comes before the last ``@``, everything up to
    that ``@`` is taken as userinfo (a ``@`` in a query value then hides more than needed).
    """
    last = rest.rfind("@")
    colon = rest.find(":")
    if last != -1 and colon != -1 and colon < last:
        return last
    authority_end = len(rest)
    for delimiter in "/?#":
        index = rest.find(delimiter)
        if index != -1:
            authority_end = min(authority_end, index)
    at = rest.rfind("@", 0, authority_end)
    return at if at != -1 else None


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


def _kv_settings(dsn: str) -> dict[str, str]:
    """The settings of a libpq ``key=value`` string, quotes and escapes removed."""
    settings: dict[str, str] = {}
    for match in _KV_PAIR.finditer(dsn):
        value = match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'"))
        settings[match.group(1).lower()] = value
    return settings


def _kv_parts(dsn: str) -> tuple[list[str], list[str], str]:
    settings = _kv_settings(dsn)
    if not settings:
        raise ValueError("no key=value pairs")
    host = settings.get("host") or settings.get("hostaddr") or ""
    port = settings.get("port", "")
    hosts = host.split(",") if host else []
    ports = port.split(",") if port else []
    return hosts, ports, settings.get("dbname", "")


# -- connection settings -----------------------------------------------------------------------

DEFAULT_KEEPALIVE = 10.0
"""Seconds: how often an idle connection is checked, and the bound on every wait on it."""


def check_keepalive(keepalive: object) -> float:
    """
    Return *keepalive* as float seconds if it is a finite number > 0, else raise `SettingError`
    (``key == "keepalive"``). The rule of ``open_bus(keepalive=...)`` and ``[postgres] keepalive``.
    """
    return check_seconds("keepalive", keepalive)


DEFAULT_POOL_SIZE = 10
"""The most pooled connections a bus's calls (publishing, transactions, keyed tells and asks,
status) hold at once; its services (bridges, the cluster, hosts) have their own."""
MAX_POOL_SIZE = 1000


def check_pool_size(pool_size: object) -> int:
    """The rule of ``open_bus(pool_size=...)`` and ``[postgres] pool_size``."""
    if (
        isinstance(pool_size, bool)
        or not isinstance(pool_size, int)
        or not 1 <= pool_size <= MAX_POOL_SIZE
    ):
        raise SettingError(
            "pool_size", f"must be an integer from 1 to {MAX_POOL_SIZE}", value=pool_size
        )
    return pool_size


POOL_MODES = ("session", "transaction")
"""``pool_mode``: how pgbus's connections reach PostgreSQL. ``session``: directly or through a
session-pooling proxy (everything works). ``transaction``: through a transaction-pooling proxy
(PgBouncer ``pool_mode = transaction``): no prepared statements are kept, durable in-bridges
poll, and what needs a session of its own (LISTEN bridges, the cluster) is refused at once."""


def check_pool_mode(pool_mode: object) -> str:
    """The rule of ``open_bus(pool_mode=...)`` and ``[postgres] pool_mode``."""
    if pool_mode not in POOL_MODES:
        raise SettingError("pool_mode", "must be 'session' or 'transaction'", value=pool_mode)
    return str(pool_mode)


# -- the one DSN rule --------------------------------------------------------------------------

DSN_SCHEMES = ("postgresql://", "postgres://")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""The driver's ``sslmode`` values (libpq's, spelled with hyphens)."""
_SSL_NEGOTIATIONS = ("postgres", "direct")
_TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
_GSSLIBS = ("gssapi", "sspi")
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_CHOICES = {
    "sslmode": SSL_MODES,
    "sslnegotiation": _SSL_NEGOTIATIONS,
    "target_session_attrs": _TARGET_SESSION_ATTRS,
    "gsslib": _GSSLIBS,
    "ssl_min_protocol_version": _TLS_VERSIONS,
    "ssl_max_protocol_version": _TLS_VERSIONS,
}
# What the driver reads from the query string itself; any other key is sent to the server as a
# setting (``?application_name=x``), where an unknown name fails the connection.
_DRIVER_PARAMETERS = (
    "host",
    "port",
    "dbname",
    "database",
    "user",
    "password",
    "passfile",
    "service",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "krbsrvname",
    *_CHOICES,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PERCENT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_IPV6 = re.compile(r"\[([^\[\]]+)\](?::(.*))?")
_MAX_PORT = 65535
_URI_EXAMPLE = "postgresql://user:password@host:5432/dbname?sslmode=require"


def check_dsn(dsn: object) -> str:
    """
    Return *dsn* if pgbus's driver can connect with it, else raise `SettingError`.

    Accepted: a URI ``postgresql://`` or ``postgres://``, with ports 1..65535, closed IPv6
    brackets, valid percent-escapes, no NUL, and driver parameters (``sslmode``,
    ``target_session_attrs``, ...) that the driver accepts. A libpq ``key=value`` string is
    refused with its URI form. The rule raised (``exc.key == "dsn"``, ``exc.rule``) never holds
    the password. Does no I/O and reads no environment variable.
    """
    if not isinstance(dsn, str):
        raise SettingError("dsn", f"must be a string (got {type(dsn).__name__}).")
    if not dsn:
        raise SettingError("dsn", f"must not be empty; write it as {_URI_EXAMPLE!r}.")
    problem = _dsn_problem(dsn)
    if problem is not None:
        raise SettingError("dsn", f"{_problem_shown(dsn, problem)} (got {_shown(dsn)}).")
    return dsn


PASSWORD_ESCAPES = (
    "cannot be read as written: its password holds a character that URIs take as a delimiter "
    "or an escape; percent-encode it ('/' as %2F, '?' %3F, '#' %23, '@' %40, '%' %25, '&' %26)"
)


def _problem_shown(dsn: str, problem: str) -> str:
    """
    *problem* as found in the redacted DSN: the one redaction rule for every message about a
    DSN is that what it quotes comes from `redact_dsn`'s form, so no piece of a password (a
    "port" that is the tail of a password holding '/') is ever shown. When only the password
    is at fault, the message says how to write it, quoting nothing.
    """
    redacted = redact_dsn(dsn)
    if redacted == dsn:
        return problem
    return _dsn_problem(redacted) or PASSWORD_ESCAPES


def _shown(dsn: str) -> str:
    text = redact_dsn(dsn)
    if len(text) > 200:
        text = text[:150] + f"... ({len(text)} characters)"
    return repr(text)


def _dsn_problem(dsn: str) -> str | None:
    """Why the driver could not use *dsn* (the rest of a sentence starting "dsn"), or None."""
    try:
        dsn.encode()
    except UnicodeEncodeError:
        return "must be valid UTF-8 (it holds a lone surrogate)"
    if "\x00" in dsn:
        return "must not contain NUL characters"
    if _CONTROL.search(dsn):
        return "must not contain control characters (a line break, a tab...)"
    if dsn != dsn.strip():
        return "must not start or end with spaces"
    if not dsn.startswith(DSN_SCHEMES):
        if "://" not in dsn and "=" in dsn:
            return (
                "must be a URI: pgbus's driver does not read libpq key=value strings; "
                f"write it as {_as_uri(dsn)!r}"
            )
        return "must be a URI starting with postgresql:// or postgres://, e.g. " + repr(
            _URI_EXAMPLE
        )
    if "#" in dsn:
        return "must not contain '#' (the driver would cut the DSN there; write it %23)"
    bad = _BAD_PERCENT.search(dsn)
    if bad is not None:
        return (
            f"has an invalid percent-escape {dsn[bad.start() : bad.start() + 3]!r}; "
            "write '%' itself as %25"
        )
    for run in _PERCENT_RUN.findall(dsn):
        try:
            unquote_to_bytes(run).decode()
        except UnicodeDecodeError:
            return f"has percent-escapes that are not UTF-8 ({run!r})"
        if "%00" in run:
            return "must not contain NUL characters (%00)"
    try:
        parts = urlsplit(dsn)
    except ValueError as exc:  # "Invalid IPv6 URL"
        return f"cannot be parsed ({exc}); an IPv6 address is written [::1]"
    rest = dsn.split("://", 1)[1]
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    if authority.count("@") > 1:
        return "has more than one '@' before the host; write '@' in a user name or password as %40"
    hostspec = authority.rpartition("@")[2]
    query, problem = _query(parts.query)
    if problem is not None:
        return problem
    if hostspec and ("host" in query or "port" in query):
        given = "?host=" if "host" in query else "?port="
        return (
            f"has {given} as well as a host before the path, and the driver then ignores {given}; "
            "write host:port before the path (postgresql://user@host:5433/db)"
        )
    hosts: list[str] = []
    ports: list[str] = []
    if hostspec:
        problem = _hostlist(hostspec, hosts, ports, unquoted=True)
        if problem is not None:
            return problem
    if "host" in query:
        hosts = []
        query_ports: list[str] = []
        problem = _hostlist(query["host"], hosts, query_ports, unquoted=False)
        if problem is not None:
            return f"?host= {problem.removeprefix('has ')}"
        ports = query_ports if any(query_ports) else ports
    if "port" in query:
        ports = query["port"].split(",")
        if "" in ports:
            return f"has ?port={query['port']!r}; each port is a whole number from 1 to {_MAX_PORT}"
    for port in ports:
        problem = _port_problem(port)
        if problem is not None:
            if "@" in rest[len(authority) :]:
                problem += "; a '/' or '?' in a password must be written %2F or %3F"
            return problem
    if len(ports) > 1 and len(ports) != max(len(hosts), 1):
        return f"gives {len(ports)} ports for {len(hosts)} hosts (one port, or one per host)"
    if "port" in query and len(hosts) > 1 and len(ports) != len(hosts):
        # The oldest driver pgbus supports cannot share one ?port= among several hosts.
        return f"gives 1 port for {len(hosts)} hosts in ?host=; give one port per host"
    return _parameters_problem(query)


def _query(text: str) -> tuple[dict[str, str], str | None]:
    """The query's parameters as the driver reads them (last one wins), or why it cannot."""
    if not text:
        return {}, None
    fields = text.split("&")
    for index, field in enumerate(fields):
        if "=" not in field:
            after_secret = index and "password=" in fields[index - 1].lower()
            shown = "" if after_secret else f" ({unquote(field)!r})"  # it may be a password's
            return {}, (
                f"has a query part without '='{shown}; parameters are written "
                "?key=value&key=value (a '&' in a value is written %26)"
            )
    return dict(parse_qsl(text, keep_blank_values=False)), None


def _hostlist(spec: str, hosts: list[str], ports: list[str], *, unquoted: bool) -> str | None:
    """Append each host and port of a comma-separated *spec* (the driver's parsing), or say why."""
    for item in spec.split(","):
        if not item:
            return "has an empty host in its host list"
        if item.startswith("["):
            match = _IPV6.fullmatch(item)
            if match is None:
                return (
                    f"has a broken IPv6 address {item!r}; write it in closed brackets, "
                    "[2001:db8::1] or [2001:db8::1]:5432"
                )
            host, port = match.group(1), match.group(2) or ""
        elif item.startswith("/"):
            host, port = item, ""
        else:
            host, _, port = item.partition(":")
        hosts.append(unquote(host) if unquoted else host)
        ports.append(unquote(port) if unquoted else port)
    return None


def _port_problem(port: str) -> str | None:
    if port == "":
        return None
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= _MAX_PORT:
        return f"has port {port!r}; a port is a whole number from 1 to {_MAX_PORT}"
    return None


def _parameters_problem(query: dict[str, str]) -> str | None:
    for key, allowed in _CHOICES.items():
        value = query.get(key)
        if value is not None and value not in allowed:
            return f"has {key}={value!r}; the driver accepts " + ", ".join(allowed)
    if query.get("sslnegotiation") == "direct" and query.get("sslmode") not in SSL_MODES[3:]:
        return "has sslnegotiation=direct, which needs sslmode=require, verify-ca or verify-full"
    for key in query:
        if key in _DRIVER_PARAMETERS:
            continue
        close = difflib.get_close_matches(key, _DRIVER_PARAMETERS, n=1, cutoff=0.8)
        if close:
            return (
                f"has an unknown parameter {key!r} (the driver would send it to the server as a "
                f"setting); did you mean {close[0]!r}?"
            )
    return None


def _as_uri(dsn: str) -> str:
    """The URI form of a libpq ``key=value`` string, the password redacted, for messages."""
    settings = _kv_settings(dsn)
    user = quote(settings.pop("user", ""), safe="")
    if settings.pop("password", ""):
        user += f":{REDACTED}"
    host = settings.pop("host", "") or settings.pop("hostaddr", "")
    query: dict[str, str] = {}
    if host.startswith("/"):
        query["host"] = host
        host = ""
    elif ":" in host:
        host = f"[{host}]"
    port = settings.pop("port", "")
    if port and not query:
        host += f":{port}"
    elif port:
        query["port"] = port
    database = quote(settings.pop("dbname", ""), safe="")
    settings.pop("hostaddr", None)
    query.update(settings)
    uri = f"postgresql://{user + '@' if user else ''}{host}/{database}"
    if query:
        uri += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in query.items())
    return uri
