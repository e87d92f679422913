"""
Logging: silent by default as a library, ``run --log-format json`` for machines, and a reader
that goes away (``pgbus run ... | head -2``) costs no traceback and no restart loop.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from test_cli import ROOT, closed_port, pgbus_env, running

import pgbus
from pgbus._logs import JsonFormatter

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30


def test_the_library_logger_has_a_null_handler() -> None:
    """``pgbus`` carries a NullHandler: an application without logging config sees nothing."""
    handlers = logging.getLogger("pgbus").handlers
    assert any(type(h) is logging.NullHandler for h in handlers)
    assert pgbus.__name__ == "pgbus"


def test_json_formatter_has_the_text_formats_fields() -> None:
    """time, logger, level, message; the traceback as exc_info when there is one."""
    record = logging.LogRecord(
        "pgbus.supervisor", logging.ERROR, __file__, 1, "actor %r failed", ("x",), None
    )
    try:
        int("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert set(entry) == {"time", "logger", "level", "message", "exc_info"}
    assert entry["logger"] == "pgbus.supervisor"
    assert entry["level"] == "ERROR"
    assert entry["message"] == "actor 'x' failed"
    assert entry["exc_info"].startswith("Traceback (most recent call last):")
    assert entry["exc_info"].endswith("ValueError: invalid literal for int() with base 10: 'boom'")
    assert "T" in entry["time"]
    assert entry["time"][-6] in "+-"


async def test_run_log_format_json_writes_one_object_per_line(tmp_path: Path) -> None:
    """Every stderr line of ``run --log-format json`` is a JSON object, the summary included."""
    dsn = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    config = tmp_path / "bus.toml"
    config.write_text(
        '[channels.in]\ncapacity = 1\n\n[[bridge]]\npostgres = "x"\nchannel = "in"\n'
        'direction = "in"\n'
    )
    async with running("run", str(config), "--dsn", dsn, "--log-format", "json") as bus:
        await bus.expect("stderr", "cannot reach PostgreSQL")
        assert await bus.stop(signal.SIGTERM) == 0
    entries = [json.loads(line) for line in bus.lines["stderr"]]
    assert all(set(e) == {"time", "logger", "level", "message"} for e in entries), entries
    messages = [e["message"] for e in entries]
    assert messages[0] == f"{config}: 1 channel, 1 bridge, 0 actors"
    assert any(e["logger"] == "pgbus.bridge" and e["level"] == "WARNING" for e in entries)
    # A connection attempt in flight may still log its failure after the signal's line.
    assert any(m.startswith("SIGTERM received: stopping") for m in messages[1:]), messages


async def test_run_log_format_json_reports_a_failure_as_json(tmp_path: Path) -> None:
    """A fatal failure (the supervisor gives up) is a JSON line too, with the traceback in debug."""
    (tmp_path / "crashing.py").write_text(
        "import pgbus\n\nclass Crash(pgbus.Actor):\n"
        "    async def on_start(self):\n        raise ValueError('boom')\n"
    )
    config = tmp_path / "bus.toml"
    config.write_text(
        '[supervisor]\nmax_restarts = 0\n\n[actors.crash]\nclass = "crashing:Crash"\n'
    )
    async with running("run", str(config), "--log-format", "json", "--log-level", "debug") as bus:
        status = await bus.wait(timeout=60)
    assert status == 1
    entries = [json.loads(line) for line in bus.lines["stderr"]]
    last = entries[-1]
    assert last["level"] == "ERROR"
    assert "Last failure: ValueError('boom')" in last["message"]
    assert "Traceback" in last["exc_info"]


async def test_printer_stops_printing_when_stdout_is_closed(pg: PgHelper, tmp_path: Path) -> None:
    """``run ... | head -2``: two lines, then one warning; no traceback, no restart; exit 0."""
    config = tmp_path / "bus.toml"
    config.write_text(
        f'[postgres]\ndsn = "{pg.dsn}"\n\n'
        "[channels.ticks]\ncapacity = 100\n\n[channels.received]\ncapacity = 100\n\n"
        '[[bridge]]\npostgres = "pipe"\nchannel = "ticks"\ndirection = "out"\n\n'
        '[[bridge]]\npostgres = "pipe"\nchannel = "received"\ndirection = "in"\n\n'
        '[actors.heartbeat]\nclass = "pgbus.actors.heartbeat:Heartbeat"\n'
        'options = { to = "ticks", every = 0.02 }\n\n'
        '[actors.printer]\nclass = "pgbus.actors.printer:Printer"\ninbox = "received"\n'
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pgbus", "run", str(config), "--stats-every", "0.2"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=pgbus_env(),
        cwd=ROOT,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stderr = b""
    try:
        with trio.fail_after(WAIT):
            received = b""
            while received.count(b"\n") < 2:  # what head -2 reads
                received += await process.stdout.receive_some()
            await process.stdout.aclose()  # head exits
            while b"its output was closed" not in stderr:
                stderr += await process.stderr.receive_some()
            # The bus runs on; two status lines later the printer is still the one instance.
            while stderr.count(b"stats: ") < 2:
                stderr += await process.stderr.receive_some()
            process.send_signal(signal.SIGTERM)
            while chunk := await process.stderr.receive_some():
                stderr += chunk
            status = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = stderr.decode()
    assert status == 0, text
    assert "Traceback" not in text
    assert "Exception ignored" not in text
    assert text.count("its output was closed (broken pipe)") == 1
    last_stats = [line for line in text.splitlines() if "stats: " in line][-1]
    assert "actor 'printer' running, 0 restarts" in last_stats
    assert [json.loads(line)["payload"] for line in received.decode().splitlines()[:2]] == [
        "tick 1",
        "tick 2",
    ]
