# ruff: noqa: E501  (tables of DSNs and their exact messages read best one per line)
"""
The one DSN rule (`check_dsn`) at every entry point, and passwords kept out of every message.

What `check_dsn` accepts, asyncpg's own parser accepts too (checked here against the installed
asyncpg); what it refuses, `run` could not have used: refused at once, never retried forever.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
from asyncpg import connect_utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgbus
from pgbus._cli import main
from pgbus._config import parse_config
from pgbus._dsn import PASSWORD_ESCAPES, check_dsn, describe_dsn, redact_dsn
from pgbus._errors import SettingError

URI_EXAMPLE = "'postgresql://user:password@host:5432/dbname?sslmode=require'"
PORT_RULE = "a port is a whole number from 1 to 65535"


def asyncpg_parses(dsn: str) -> None:
    """Run asyncpg's own DSN parser (no connection) on *dsn*; raises what asyncpg would."""
    parse = connect_utils._parse_connect_dsn_and_args
    arguments: dict[str, object] = {
        "dsn": dsn,
        "host": None,
        "port": None,
        "user": "u",
        "password": "p",
        "passfile": None,
        "database": None,
        "ssl": None,
        "service": None,
        "servicefile": None,
        "direct_tls": None,
        "server_settings": None,
        "target_session_attrs": None,
        "krbsrvname": None,
        "gsslib": None,
    }
    # The parser's parameters differ between the asyncpg versions CI runs (0.29 has no service).
    accepted = inspect.signature(parse).parameters
    parse(**{key: value for key, value in arguments.items() if key in accepted})


ACCEPTED = [
    "postgresql://user@host:5432/db",
    "postgres://user:pw@host/db?sslmode=require",
    "postgresql:///db?host=/var/run/postgresql",
    "postgresql://postgres@/postgres?host=/tmp/pg&port=5433",
    "postgresql://user:secret@[::1]:5433/app",
    "postgresql://[2001:db8::7]/app?sslmode=disable",
    "postgresql://h1:5432,h2:5433/app?target_session_attrs=read-write",
    "postgresql:///app?host=h1:5433,[::1]:5434",
    "postgresql://u:p%40ss%2Fw%3Fd@host/app",
    "postgresql://%2Ftmp%2Fpg/app",
    "postgresql://host:/app",
    "postgresql://host/app?application_name=pgbus-x&options=-c%20statement_timeout%3D5s",
    "postgresql://host/app?sslnegotiation=direct&sslmode=require",
    "postgresql://host/app?ssl_min_protocol_version=TLSv1.3&gsslib=gssapi",
    "postgresql://",
]


@pytest.mark.parametrize("dsn", ACCEPTED)
def test_check_dsn_accepts_what_asyncpg_can_use(dsn: str) -> None:
    """Accepted DSNs are returned as written, and asyncpg's own parser takes them."""
    assert check_dsn(dsn) == dsn
    asyncpg_parses(dsn)


REFUSED = [
    (
        "host=db port=6432 user=app password=secret dbname=app sslmode=require",
        "must be a URI: pgbus's driver does not read libpq key=value strings; write it "
        "as 'postgresql://app:***@db:6432/app?sslmode=require' "
        "(got 'host=db port=6432 user=app password=*** dbname=app sslmode=require').",
    ),
    (
        "host=/tmp dbname=x",
        "must be a URI: pgbus's driver does not read libpq key=value strings; write it "
        "as 'postgresql:///x?host=/tmp' (got 'host=/tmp dbname=x').",
    ),
    (
        "mysql://root:secret@db/app",
        f"must be a URI starting with postgresql:// or postgres://, e.g. {URI_EXAMPLE} "
        "(got 'mysql://root:***@db/app').",
    ),
    ("localhost", f"must be a URI starting with postgresql:// or postgres://, e.g. {URI_EXAMPLE} (got 'localhost')."),
    ("", f"must not be empty; write it as {URI_EXAMPLE}."),
    ("postgresql://u:secret@h:99999/db", f"has port '99999'; {PORT_RULE} (got 'postgresql://u:***@h:99999/db')."),
    ("postgresql://h:notaport/db", f"has port 'notaport'; {PORT_RULE} (got 'postgresql://h:notaport/db')."),
    ("postgresql://h:0/db", f"has port '0'; {PORT_RULE} (got 'postgresql://h:0/db')."),
    ("postgresql://h:+5432/db", f"has port '+5432'; {PORT_RULE} (got 'postgresql://h:+5432/db')."),
    ("postgresql:///db?port=5432,", "has ?port='5432,'; each port is a whole number from 1 to 65535 (got 'postgresql:///db?port=5432,')."),
    ("postgresql:///db?port=70000", f"has port '70000'; {PORT_RULE} (got 'postgresql:///db?port=70000')."),
    ("postgresql://h/db?port=5433", "has ?port= as well as a host before the path, and the driver then ignores ?port=; write host:port before the path (postgresql://user@host:5433/db) (got 'postgresql://h/db?port=5433')."),
    ("postgresql://h/db?host=other", "has ?host= as well as a host before the path, and the driver then ignores ?host=; write host:port before the path (postgresql://user@host:5433/db) (got 'postgresql://h/db?host=other')."),
    ("postgresql:///db?host=h:x", f"has port 'x'; {PORT_RULE} (got 'postgresql:///db?host=h:x')."),
    ("postgresql://u:pa/ss@h/db", PASSWORD_ESCAPES + " (got 'postgresql://u:***@h/db')."),
    ("postgresql://[::1/db", "cannot be parsed (Invalid IPv6 URL); an IPv6 address is written [::1] (got 'postgresql://[::1/db')."),
    (
        "postgresql://[::1]x/db",
        "has a broken IPv6 address '[::1]x'; write it in closed brackets, [2001:db8::1] or "
        "[2001:db8::1]:5432 (got 'postgresql://[::1]x/db').",
    ),
    ("postgresql://a,,b/db", "has an empty host in its host list (got 'postgresql://a,,b/db')."),
    ("postgresql:///db?host=h1,h2&port=1,2,3", "gives 3 ports for 2 hosts (one port, or one per host) (got 'postgresql:///db?host=h1,h2&port=1,2,3')."),
    (
        "postgresql://h/db?sslmode=bogus",
        "has sslmode='bogus'; the driver accepts disable, allow, prefer, require, verify-ca, "
        "verify-full (got 'postgresql://h/db?sslmode=bogus').",
    ),
    (
        "postgresql://h/db?target_session_attrs=master",
        "has target_session_attrs='master'; the driver accepts any, primary, standby, "
        "prefer-standby, read-write, read-only (got 'postgresql://h/db?target_session_attrs=master').",
    ),
    ("postgresql://h/db?gsslib=krb", "has gsslib='krb'; the driver accepts gssapi, sspi (got 'postgresql://h/db?gsslib=krb')."),
    (
        "postgresql://h/db?ssl_min_protocol_version=SSLv3",
        "has ssl_min_protocol_version='SSLv3'; the driver accepts TLSv1, TLSv1.1, TLSv1.2, TLSv1.3 "
        "(got 'postgresql://h/db?ssl_min_protocol_version=SSLv3').",
    ),
    (
        "postgresql://h/db?sslnegotiation=direct",
        "has sslnegotiation=direct, which needs sslmode=require, verify-ca or verify-full "
        "(got 'postgresql://h/db?sslnegotiation=direct').",
    ),
    (
        "postgresql://h/db?sslmdoe=require",
        "has an unknown parameter 'sslmdoe' (the driver would send it to the server as a setting); "
        "did you mean 'sslmode'? (got 'postgresql://h/db?sslmdoe=require').",
    ),
    (
        "postgresql://h/db?sslmode",
        "has a query part without '=' ('sslmode'); parameters are written ?key=value&key=value "
        "(a '&' in a value is written %26) (got 'postgresql://h/db?sslmode').",
    ),
    ("postgresql://h/db?a=1&&b=2", "has a query part without '=' (''); parameters are written ?key=value&key=value (a '&' in a value is written %26) (got 'postgresql://h/db?a=1&&b=2')."),
    ("postgresql://h/db?application_name=a%00b", "must not contain NUL characters (%00) (got 'postgresql://h/db?application_name=a%00b')."),
    ("postgresql://h/db\x00", "must not contain NUL characters (got 'postgresql://h/db\\x00')."),
    ("postgresql://h/db?x=%zz", "has an invalid percent-escape '%zz'; write '%' itself as %25 (got 'postgresql://h/db?x=%zz')."),
    # A password at fault is never quoted, not even a piece: the message says how to write it.
    ("postgresql://u:100%@h/db", PASSWORD_ESCAPES + " (got 'postgresql://u:***@h/db')."),
    ("postgresql://u:%ff@h/db", PASSWORD_ESCAPES + " (got 'postgresql://u:***@h/db')."),
    ("postgresql://u:p@ss@h/db", PASSWORD_ESCAPES + " (got 'postgresql://u:***@h/db')."),
    ("postgresql://u:pa#ss@h/db", PASSWORD_ESCAPES + " (got 'postgresql://u:***@h/db')."),
    ("postgresql://h/db\n", "must not contain control characters (a line break, a tab...) (got 'postgresql://h/db\\n')."),
    (" postgresql://h/db", "must not start or end with spaces (got ' postgresql://h/db')."),
    ("postgresql://h/\udcffdb", "must be valid UTF-8 (it holds a lone surrogate) (got 'postgresql://h/\\udcffdb')."),
]  # fmt: skip


@pytest.mark.parametrize(("dsn", "rule"), REFUSED)
def test_check_dsn_refuses_what_asyncpg_cannot_use_in_one_line(dsn: str, rule: str) -> None:
    """A DSN asyncpg cannot use is one SettingError: key "dsn", the rule, never the password."""
    with pytest.raises(SettingError) as caught:
        check_dsn(dsn)
    assert (caught.value.key, caught.value.rule) == ("dsn", rule)
    assert str(caught.value) == f"dsn {rule}"
    assert "secret" not in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, pgbus.ConfigError)


ASYNCPG_REFUSES_TOO = [
    "mysql://root@db/app",
    "postgresql://h:notaport/db",
    "postgresql:///db?port=5432,",
    "postgresql:///db?host=h:x",
    "postgresql://[::1/db",
    "postgresql://a,,b/db",
    "postgresql:///db?host=h1,h2&port=1,2,3",
    "postgresql://h/db?sslmode=bogus",
    "postgresql://h/db?target_session_attrs=master",
    "postgresql://h/db?gsslib=krb",
    "postgresql://h/db?sslnegotiation=direct",
    "postgresql://h/db?sslmode",
    "postgresql://h/db?a=1&&b=2",
]


# Parameters the oldest supported asyncpg (0.29) does not know: it would send them to the server
# as settings (refused there, at connect) instead of refusing them itself.
NEWER_PARAMETERS = ("gsslib=", "sslnegotiation=")


@pytest.mark.parametrize("dsn", ASYNCPG_REFUSES_TOO)
def test_what_asyncpg_refuses_check_dsn_refuses_first(dsn: str) -> None:
    """Each of asyncpg's own parser's refusals is caught by check_dsn first, in one line."""
    knows = "gsslib" in inspect.signature(connect_utils._parse_connect_dsn_and_args).parameters
    if knows or not any(parameter in dsn for parameter in NEWER_PARAMETERS):
        with pytest.raises(Exception):  # noqa: B017 - asyncpg raises several kinds
            asyncpg_parses(dsn)
    with pytest.raises(SettingError):
        check_dsn(dsn)


def test_one_query_port_for_several_query_hosts_is_refused() -> None:
    """asyncpg 0.29 cannot share one ?port= among several ?host= hosts: refused for all."""
    with pytest.raises(SettingError, match=r"gives 1 port for 2 hosts in \?host=; give one port"):
        check_dsn("postgresql:///app?host=h1,h2&port=5432")
    assert check_dsn("postgresql:///app?host=h1,h2&port=5432,5433")


def test_check_dsn_refuses_what_is_not_a_string() -> None:
    """A DSN must be a str."""
    with pytest.raises(SettingError, match=r"^dsn must be a string \(got bytes\)\.$"):
        check_dsn(b"postgresql://h/db")


# --- every entry point uses the rule -----------------------------------------------------------


def parse(text: str) -> Any:
    return parse_config(textwrap.dedent(text), "bus.toml")


@pytest.mark.parametrize(
    "dsn", ["postgresql://user@host:5432/db", "postgres://h/db?sslmode=require"]
)
def test_config_accepts_a_good_dsn(dsn: str) -> None:
    """[postgres] dsn keeps a good DSN as written."""
    assert parse(f'[postgres]\ndsn = "{dsn}"\n').postgres.dsn == dsn


@pytest.mark.parametrize(
    ("dsn", "rule"),
    [
        ("postgresql://u:hunter2@h:99999/db", f"has port '99999'; {PORT_RULE} (got 'postgresql://u:***@h:99999/db')."),
        ("host=db password=hunter2", "must be a URI: pgbus's driver does not read libpq key=value strings; write it as 'postgresql://:***@db/' (got 'host=db password=***')."),
        ("mysql://root:hunter2@db/app", f"must be a URI starting with postgresql:// or postgres://, e.g. {URI_EXAMPLE} (got 'mysql://root:***@db/app')."),
        ("postgresql://h/db?sslmode=bogus&password=hunter2", "has sslmode='bogus'; the driver accepts disable, allow, prefer, require, verify-ca, verify-full (got 'postgresql://h/db?sslmode=bogus&password=***')."),
    ],
)  # fmt: skip
def test_config_refuses_a_bad_dsn_in_its_own_form(dsn: str, rule: str) -> None:
    """bus.toml: [postgres] dsn <rule>, the password redacted."""
    with pytest.raises(pgbus.ConfigError) as caught:
        parse(f'[postgres]\ndsn = "{dsn}"\n')
    assert str(caught.value) == f"bus.toml: [postgres] dsn {rule}"
    assert "hunter2" not in str(caught.value)


def test_config_refuses_nul_in_application_name() -> None:
    """PostgreSQL cannot carry a NUL in application_name: refused in the file."""
    with pytest.raises(
        pgbus.ConfigError,
        match=re.escape(
            "bus.toml: [postgres] application_name must not contain NUL characters "
            "(got 'pgbus\\x00x')."
        ),
    ):
        parse('[postgres]\napplication_name = "pgbus\\u0000x"\n')


def test_with_dsn_names_its_origin() -> None:
    """An override (--dsn, PGBUS_DSN) is refused under its own name."""
    with pytest.raises(SettingError) as caught:
        parse("").with_dsn("postgresql://h:99999/db", origin="PGBUS_DSN")
    assert (
        str(caught.value)
        == f"PGBUS_DSN has port '99999'; {PORT_RULE} (got 'postgresql://h:99999/db')."
    )


@pytest.mark.parametrize(
    "command", [["notify", "c", "x"], ["listen", "c"], ["check", "examples/quickstart.toml"]]
)
def test_the_command_line_refuses_a_bad_dsn_option(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--dsn goes through the same rule: exit 2, one line, before connecting."""
    assert main([*command, "--dsn", "postgresql://u:s3cret@h:notaport/db"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"pgbus: error: --dsn has port 'notaport'; {PORT_RULE} (got 'postgresql://u:***@h:notaport/db').\n"
    )


def test_the_command_line_refuses_a_bad_pgbus_dsn(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """PGBUS_DSN too, named as such."""
    monkeypatch.setenv("PGBUS_DSN", "host=db")
    assert main(["notify", "c", "x"]) == 2
    assert capsys.readouterr().err.startswith("pgbus: error: PGBUS_DSN must be a URI: ")


async def test_open_bus_refuses_a_bad_dsn_before_connecting() -> None:
    """open_bus() checks the DSN first: a ConfigError, not a retry loop or 'unexpected failure'."""
    with pytest.raises(SettingError, match=r"^dsn has port '99999'; "):
        async with pgbus.open_bus("postgresql://127.0.0.1:99999/db"):
            pass
    with pytest.raises(SettingError, match=r"^dsn has a broken IPv6 address "):
        async with pgbus.open_bus("postgresql://[::1]junk/db"):
            pass


# --- redaction and description -------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://user:secret@db.example.com:5432/app", "postgresql://user:***@db.example.com:5432/app"),
        ("postgres://user:s%40cr%2Fet@host/app", "postgres://user:***@host/app"),
        ("postgresql://user:p@ss@host/app", "postgresql://user:***@host/app"),
        ("postgresql://user:pa/ss?x@host/app", "postgresql://user:***@host/app"),
        ("postgresql://user:secret@[::1]:5433/app", "postgresql://user:***@[::1]:5433/app"),
        ("postgresql://user@[2001:db8::7]/app?sslmode=require", "postgresql://user@[2001:db8::7]/app?sslmode=require"),
        ("postgresql://user@host/app?sslmode=require&password=secret&application_name=x", "postgresql://user@host/app?sslmode=require&password=***&application_name=x"),
        ("postgresql://host/app?password=secret", "postgresql://host/app?password=***"),
        ("postgresql://user:secret@h1:5432,h2:5433/app", "postgresql://user:***@h1:5432,h2:5433/app"),
        ("postgresql://user@host:5432/app", "postgresql://user@host:5432/app"),
        ("postgresql://postgres@/postgres?host=/tmp/pg&port=5432", "postgresql://postgres@/postgres?host=/tmp/pg&port=5432"),
        ("host=db user=app password=secret dbname=app", "host=db user=app password=*** dbname=app"),
        ("host=db password = 'se cr\\'et' dbname=app", "host=db password=*** dbname=app"),
        ("host=db PASSWORD=secret", "host=db PASSWORD=***"),
        ("host=db sslpassword=secret dbname=app", "host=db sslpassword=*** dbname=app"),
        ("host=db user=app dbname=app", "host=db user=app dbname=app"),
    ],
)  # fmt: skip
def test_redact_dsn_hides_every_password(dsn: str, expected: str) -> None:
    """redact_dsn() replaces the password, wherever it is written, with ***."""
    assert redact_dsn(dsn) == expected
    assert "secret" not in redact_dsn(dsn)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://user:secret@db.example.com:5433/app", "db.example.com:5433/app"),
        ("postgresql://user@db.example.com/app", "db.example.com:5432/app"),
        ("postgresql://user:secret@[::1]:5433/app", "[::1]:5433/app"),
        ("postgresql://user:pa/ss@host/app", "host:5432/app"),
        ("postgresql://h1:5432,h2:5433/app", "h1:5432,h2:5433/app"),
        ("postgresql://postgres@/postgres?host=/tmp/pg", "socket /tmp/pg (database postgres)"),
        ("postgresql:///app", "localhost:5432/app"),
        ("host=db port=6432 password=secret dbname=app", "db:6432/app"),
        ("not a dsn", "PostgreSQL (unparsable DSN)"),
    ],
)  # fmt: skip
def test_describe_dsn_names_the_server_without_secrets(dsn: str, expected: str) -> None:
    """describe_dsn() gives host:port/db (or the socket) and never the password."""
    assert describe_dsn(dsn) == expected


# --- generated: the password never shows ---------------------------------------------------------


def refusal(dsn: str) -> str:
    """check_dsn's message for *dsn*, or "" if it is accepted."""
    try:
        check_dsn(dsn)
    except SettingError as exc:
        return str(exc)
    return ""


# A "§" in each password keeps it from matching the messages' own words by chance.
_pieces = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=3, max_size=10)
passwords = st.builds(lambda a, b: f"{a}§{b}", _pieces, _pieces).filter(lambda pw: pw.strip() == pw)
ports = st.sampled_from(["", ":5432", ":99999", ":x", ":"])
queries = st.sampled_from(["", "?sslmode=require", "?sslmode=bogus", "?a", "?port=1", "#f"])


@given(passwords, ports, queries)
def test_no_refusal_shows_a_password_in_the_userinfo(pw: str, port: str, query: str) -> None:
    """Whatever the password holds (raw '@', '/', '?', '#', '%'...), a refusal never shows it."""
    message = refusal(f"postgresql://user:{pw}@db.example.com{port}/app{query}")
    assert pw not in message
    assert "\n" not in message


@given(passwords, st.sampled_from(["", "host=db ", "dbname=x user=u "]))
def test_no_refusal_shows_a_password_in_key_value_or_query_form(pw: str, before: str) -> None:
    """password=... in a key=value string or a query string is never shown either."""
    quoted = "'" + pw.replace("\\", "\\\\").replace("'", "\\'") + "'"
    assert pw not in refusal(f"{before}password={quoted}")
    bare = "".join(pw.split())  # unquoted, a space ends a libpq value
    assert bare not in refusal(f"{before}password={bare}")
    in_query = pw.replace("&", "")  # a raw '&' starts the next parameter
    assert in_query not in refusal(f"postgresql://db/app?password={in_query}&sslmode=x")


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://user:@pw#x[@db:5432/app",
        "postgresql://db/app?password=#secret&sslmode=x",
        "postgresql://db/app?password=sec&ret&sslmode=x",
        "host=db password=''secret",
    ],
)
def test_passwords_found_by_the_generated_tests_stay_hidden(dsn: str) -> None:
    """The shapes hypothesis found leaking (a '@' or '#' in a password, ...) are redacted."""
    message = refusal(dsn)
    assert message
    assert "pw#x" not in message
    assert "secret" not in message
    assert "ret" not in message.replace("written", "").replace("got", "")


# -- one redaction rule, every entry point ---------------------------------------------------

# Markers at both ends of each password: a message holding either one has quoted a piece of it.
marked_passwords = st.builds(
    lambda middle: f"Zq9{middle}Xk7",
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
)
dsn_shapes = st.sampled_from(
    [
        "postgresql://user:{pw}@db.example.com:5432/app",
        "postgresql://user:{pw}@db.example.com/app?sslmode=require",
        "postgresql://user:{pw}@[::1]:5432/app",
        "postgresql://db.example.com/app?password={pw}",
        "postgresql://db.example.com/app?user=u&password={pw}&sslmode=x",
        "host=db user=u password={pw}",
    ]
)


def assert_no_piece_of(password: str, text: str) -> None:
    assert password not in text
    assert "Zq9" not in text, text
    assert "Xk7" not in text, text


# No deadline: each example runs a whole command; on a loaded machine one can take over 200 ms.
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(marked_passwords, dsn_shapes)
def test_no_entry_point_ever_shows_a_piece_of_a_password(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    password: str,
    shape: str,
) -> None:
    """--dsn, PGBUS_DSN, the TOML file and open_bus: accepted or refused, no message quotes it."""
    dsn = shape.format(pw=password)
    config = tmp_path / "bus.toml"
    config.write_text(f"[postgres]\ndsn = {json.dumps(dsn)}\n")
    outputs = [refusal(dsn)]
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    main(["check", str(config)])
    main(["check", str(config), "--dsn", dsn])
    monkeypatch.setenv("PGBUS_DSN", dsn)
    main(["check", str(config)])
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err]
    try:
        check_dsn(dsn)
    except SettingError:
        with pytest.raises(SettingError) as refused:
            trio.run(_open_and_close, dsn)
        outputs.append(str(refused.value))
    for text in outputs:
        assert_no_piece_of(password, text)


async def _open_and_close(dsn: str) -> None:
    async with pgbus.open_bus(dsn):
        pass
