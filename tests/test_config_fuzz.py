"""
Generated configuration files through ``pgbus check``: exit 0, or exit 2 with exactly one line
starting ``pgbus: error:``; never a traceback, never another exit status.

Two kinds of file: random TOML-ish text (and valid files mangled at random), and structurally
plausible configs (the right tables and keys, right or wrong types and values). Most run
in-process through `pgbus._cli.main`; a handful through a real ``python -m pgbus check``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pgbus._cli import main

REPO = Path(__file__).parent.parent
QUICKSTART = (REPO / "examples" / "quickstart.toml").read_text(encoding="utf-8")
FULL = (Path(__file__).parent / "configs" / "full.toml").read_text(encoding="utf-8")


def check(text: str) -> tuple[int, str, str]:
    """``pgbus check`` on *text* written to a file, in-process: (status, stdout, stderr)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bus.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["check", str(path)])
    return status, out.getvalue(), err.getvalue()


def assert_exit_0_or_one_line(status: int, out: str, err: str) -> None:
    if status == 0:
        assert err == ""
        assert out.startswith(f"{out.split(':')[0]}:")  # the summary names the file
        return
    assert status == 2, (status, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pgbus: error: "), err
    assert "Traceback" not in err


@pytest.fixture(autouse=True)
def _no_dsn_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGBUS_DSN", raising=False)


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- the crashes found by hand ----------------------------------------------------------------

CRASHERS = {
    "integer over 4300 digits": "x = " + "1" * 5000 + "\n",
    "tables nested 1000 deep": "a = " + "[" * 1000 + "]" * 1000 + "\n",
    "inline tables nested 1000 deep": "a = " + "{b = " * 1000 + "1" + "}" * 1000 + "\n",
    "dotted keys 400 deep": "x." * 400 + "y = 1\n",
    "integer over 1e308 for seconds": "[supervisor]\nwithin_seconds = 1" + "0" * 400 + "\n",
    "integer over 1e308 for backoff": "[supervisor]\nbackoff_max = " + "9" * 310 + "\n",
}


@pytest.mark.parametrize("text", CRASHERS.values(), ids=CRASHERS.keys())
def test_files_that_used_to_crash_check_give_one_line(text: str) -> None:
    """What used to end in a traceback (exit 1) is one line and exit 2."""
    status, out, err = check(text)
    assert status == 2, err
    assert_exit_0_or_one_line(status, out, err)


def test_an_integer_too_large_for_seconds_is_named_without_its_digits() -> None:
    """The message names the key and the size of the number, not 400 digits."""
    status, _, err = check("[supervisor]\nwithin_seconds = 1" + "0" * 400 + "\n")
    assert status == 2
    assert err.endswith(
        "bus.toml: [supervisor] within_seconds must be a number of seconds > 0 "
        "(got an integer of 401 digits).\n"
    )


def test_too_deep_toml_is_named() -> None:
    """Python's TOML reader gives up on deep nesting: the message says so."""
    _, _, err = check(CRASHERS["tables nested 1000 deep"])
    assert err.endswith("bus.toml: invalid TOML: nested too deeply for Python's TOML reader.\n")


# --- random text ------------------------------------------------------------------------------

TOKENS = [
    *"[]{}=\"'.,\n #-+_:",
    " ",
    "a",
    "1",
    "0",
    "1e999",
    "9" * 320,
    "9" * 4400,
    "[" * 600,
    "{a=" * 400,
    "inf",
    "nan",
    "true",
    "1979-05-27",
    "07:32:00",
    '"""',
    "'''",
    "\\u00e9",
    "\\ud800",
    "é",
    "\x00",
    "\x7f",
    "postgres",
    "supervisor",
    "channels",
    "bridge",
    "actors",
    "dsn",
    "capacity",
    "direction",
    "class",
    "options",
    "within_seconds",
    "max_restarts",
    "keepalive",
]
toml_ish = st.lists(st.sampled_from(TOKENS), max_size=80).map("".join)


@st.composite
def mangled(draw: st.DrawFn) -> str:
    """A valid file with random edits: cut, insert or repeat a piece."""
    text = draw(st.sampled_from([QUICKSTART, FULL]))
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 40)))
        edit = draw(st.sampled_from(["cut", "insert", "repeat"]))
        if edit == "cut":
            text = text[:start] + text[end:]
        elif edit == "insert":
            text = text[:start] + draw(toml_ish) + text[start:]
        else:
            text = text[:end] + text[start:end] + text[end:]
    return text


@FUZZ
@given(st.one_of(toml_ish, mangled(), st.text(max_size=200)))
def test_random_text_gives_exit_0_or_one_line(text: str) -> None:
    """Whatever the bytes, check answers with a summary or one error line."""
    status, out, err = check(text)
    event(f"exit {status}")
    assert_exit_0_or_one_line(status, out, err)


# --- structurally plausible configs -----------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (surrogates, DEL: the reader refuses them)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_file(tables: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, value in tables.items():
        if key == "bridge" and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            for entry in value:
                lines.append("[[bridge]]")
                lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in entry.items()]
        elif key in ("channels", "actors") and isinstance(value, dict):
            for name, table in value.items():
                if isinstance(table, dict):
                    lines.append(f"[{key}.{json.dumps(name)}]")
                    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
                else:
                    lines.append(f"{key}.{json.dumps(name)} = {toml_value(table)}")
        elif isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()]
        else:
            lines.insert(0, f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


anything = st.recursive(
    st.booleans()
    | st.integers()
    | st.integers(-(10**400), 10**400)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
names = st.sampled_from(
    ["orders", "in", "out", "ticks", "Mixed Case", "ü", "", "x" * 70]
) | st.text(max_size=6)
seconds = st.sampled_from([0, 0.1, 1, 5.0, -1, 1e-320, 1e308, 10**400, math.inf, math.nan])
CLASSES = [
    "pgbus.actors.heartbeat:Heartbeat",
    "pgbus.actors.relay:Relay",
    "pgbus.actors.printer:Printer",
    "pgbus.actors.table_changes:TableChanges",
    "pgbus.actors.heartbeat:Nope",
    "pgbus:Actor",
    "pgbus:open_bus",
    "no_such_module_for_pgbus:X",
    "not a class path",
]
DSNS = [
    "postgresql://u:secret@host:5432/db",
    "postgres://host/db?sslmode=require",
    "postgresql://host:99999/db",
    "postgresql://host:notaport/db",
    "postgresql://[::1/db",
    "postgresql://host/db?sslmode=bogus",
    "host=db user=u",
    "mysql://x",
    "postgresql://h/db?application_name=a%00b",
    "postgresql://h/db?x=%zz",
]


def maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, so that later rules are reached too; sometimes anything."""
    return st.one_of(good, good, good, anything)


def table(keys: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={k: maybe(v) for k, v in keys.items()})


configs = st.fixed_dictionaries(
    {},
    optional={
        "postgres": table(
            {
                "dsn": st.sampled_from(DSNS) | st.just("postgresql://u:secret@host:5432/db"),
                "application_name": st.sampled_from(["pgbus", "pgbus-x", "other", "pgbus\x00"]),
                "keepalive": seconds,
            }
        ),
        "supervisor": table(
            {
                "strategy": st.sampled_from(["one_for_one", "one_for_all", "rest_for_one", "x"]),
                "max_restarts": st.integers(-2, 10),
                "within_seconds": seconds,
                "backoff_initial": seconds,
                "backoff_max": seconds,
                "stop_timeout": seconds,
            }
        ),
        "channels": st.dictionaries(
            names, table({"capacity": st.sampled_from([0, 1, 100, "inf", -1, 2.5])}), max_size=4
        ),
        "bridge": st.lists(
            table(
                {
                    "postgres": names,
                    "channel": names,
                    "direction": st.sampled_from(["in", "out", "both"]),
                    "codec": st.sampled_from(["text", "json", "xml"]),
                    "overflow": st.sampled_from(["block", "drop_newest", "drop_oldest", "x"]),
                    "ignore_own": st.booleans(),
                }
            ),
            max_size=4,
        ),
        "actors": st.dictionaries(
            names,
            table(
                {
                    "class": st.sampled_from(CLASSES),
                    "inbox": names,
                    "restart": st.sampled_from(["permanent", "transient", "temporary", "x"]),
                    "options": st.fixed_dictionaries(
                        {},
                        optional={
                            "to": names,
                            "every": seconds,
                            "message": anything,
                            "table": names,
                            "schema": names,
                            "channel": names,
                        },
                    ),
                }
            ),
            max_size=3,
        ),
    },
)


@FUZZ
@given(configs.map(toml_file))
def test_plausible_configs_give_exit_0_or_one_line(text: str) -> None:
    """Right tables, right or wrong values: a summary or one error line, never a traceback."""
    status, out, err = check(text)
    event(f"exit {status}")
    assert_exit_0_or_one_line(status, out, err)


# --- a handful through a real subprocess ------------------------------------------------------


def check_in_a_subprocess(path: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pgbus check PATH`` in a real process, without PGBUS_DSN."""
    return subprocess.run(
        [sys.executable, "-m", "pgbus", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "PGBUS_DSN"},
        check=False,
    )


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(configs.map(toml_file), mangled()))
def test_generated_files_through_python_m_pgbus_check(text: str) -> None:
    """The real command line agrees: exit 0, or exit 2 and one line on stderr."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bus.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        done = check_in_a_subprocess(path)
    assert_exit_0_or_one_line(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("text", CRASHERS.values(), ids=CRASHERS.keys())
def test_files_that_used_to_crash_check_in_a_subprocess(text: str, tmp_path: Path) -> None:
    """``python -m pgbus check`` on each former crasher: exit 2, one line, no traceback."""
    path = tmp_path / "bus.toml"
    path.write_text(text, encoding="utf-8")
    done = check_in_a_subprocess(path)
    assert done.returncode == 2, done.stderr
    assert_exit_0_or_one_line(done.returncode, done.stdout, done.stderr)
