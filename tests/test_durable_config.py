"""Durable keys of ``[[bridge]]``: accepted, summarised by check, refused in one line (exit 2)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from test_cli import one_error_line

from pgbus._cli import main

CHANNELS = """
[channels.orders_out]
capacity = 100
[channels.orders_in]
capacity = 50
[channels.unbounded]
capacity = "inf"
"""

OUT = """
[[bridge]]
postgres = "orders"
channel = "orders_out"
direction = "out"
durable = true
"""

IN = """
[[bridge]]
postgres = "orders"
channel = "orders_in"
direction = "in"
durable = true
"""


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "bus.toml"
    path.write_text(textwrap.dedent(text))
    status = main(["check", str(path)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_check_summarises_durable_bridges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every durable key shows up in check's summary."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    text = CHANNELS + OUT + IN + 'group = "billing"\nstart = "earliest"\nmax_attempts = 3\n'
    text += "retry_after = 0.5\nlease = 10\npoll = 0.25\n"
    status, out, err = check(tmp_path, text, capsys)
    assert (status, err) == (0, "")
    assert "bridge #1: channel 'orders_out' -> durable 'orders' (out, text)" in out
    assert (
        "bridge #2: durable 'orders' -> channel 'orders_in' (in, text, group 'billing', "
        "start earliest, max_attempts 3, retry_after 0.5s, lease 10s, retention 604800s, "
        "polls every 0.25s)"
    ) in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (IN, '[[bridge]] #1: group is required for a durable "in" bridge'),
        (OUT + 'group = "g"\n', '[[bridge]] #1: group applies only to durable "in" bridges'),
        (IN + 'group = ""\n', "[[bridge]] #1: group must be a non-empty string"),
        (IN + 'group = "g"\nstart = "middle"\n', "[[bridge]] #1: start must be one of 'latest'"),
        (IN + 'group = "g"\nmax_attempts = 0\n', "[[bridge]] #1: max_attempts must be an integer"),
        (IN + 'group = "g"\nlease = -1\n', "[[bridge]] #1: lease must be a number of seconds"),
        (IN + 'group = "g"\nretry_after = "soon"\n', "[[bridge]] #1: retry_after must be"),
        (IN + 'group = "g"\nretention = 5\n', "[[bridge]] #1: retention must be at least 300"),
        (IN + 'group = "g"\npoll = 0\n', "[[bridge]] #1: poll must be a number of seconds"),
        (OUT + "poll = 1\n", '[[bridge]] #1: poll applies only to durable "in" bridges'),
        (IN + 'group = "g"\noverflow = "drop_oldest"\n', "[[bridge]] #1: overflow does not apply"),
        (IN + 'group = "g"\ndurable = 1\n', ""),  # duplicate key: invalid TOML
        (
            IN.replace("orders_in", "unbounded") + 'group = "g"\n',
            "[[bridge]] #1: channel 'unbounded' has capacity inf; a durable \"in\" bridge",
        ),
        (
            IN.replace("durable = true", "") + 'group = "g"\n',
            "[[bridge]] #1: group applies only to durable bridges",
        ),
        (IN.replace("true", '"yes"') + 'group = "g"\n', "[[bridge]] #1: durable must be true or"),
    ],
)
def test_bad_durable_keys_exit_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: str,
    message: str,
) -> None:
    """Each broken durable rule: exit 2, nothing on stdout, one line naming file, table, key."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    status, out, err = check(tmp_path, CHANNELS + extra, capsys)
    assert status == 2
    assert out == ""
    assert one_error_line(err).startswith(f"pgbus: error: {tmp_path / 'bus.toml'}: {message}")
