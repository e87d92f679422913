"""Run one peer on one workload in a fresh subprocess and read its one JSON line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

from .peers import Peer
from .peers._protocol import EXIT_UNAVAILABLE
from .workloads import Sizes

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GRACE = 30.0
"""Seconds a peer gets beyond its own timeout (to connect, close, exit) before it is killed."""


@attrs.frozen
class RunOutcome:
    """One peer process's outcome: ``ok`` with metrics, ``error`` or ``unavailable``."""

    status: str
    result: dict[str, Any]
    message: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_peer(
    peer: Peer, workload: str, sizes: Sizes, *, dsn: str, channel: str, timeout: float
) -> RunOutcome:
    """
    Run ``python -m <peer.module> <workload> ...`` and return what it reported.

    The peer fails itself after *timeout* seconds of waiting; if it has not exited
    ``GRACE`` seconds after that, its whole process group is killed and the run is an error.
    """
    command = [
        sys.executable,
        "-m",
        peer.module,
        workload,
        f"--dsn={dsn}",
        f"--channel={channel}",
        f"--messages={sizes.messages}",
        f"--warmup={sizes.warmup}",
        f"--publishers={sizes.publishers}",
        f"--capacity={sizes.capacity}",
        f"--sample-every={sizes.sample_every}",
        f"--keys={sizes.keys}",
        f"--timeout={timeout:g}",
    ]
    # Its own session, so a stuck peer can be killed with everything it started.
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout + GRACE)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        stdout, stderr = process.communicate()
        return RunOutcome(
            "error", {}, f"killed: no result {timeout + GRACE:g}s after it started", stderr
        )
    finally:
        # Ctrl-C in the harness, or anything else unexpected: never leave a peer running.
        if process.poll() is None:
            _kill_group(process)
            process.wait()
    return _read_outcome(process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _read_outcome(returncode: int, stdout: str, stderr: str) -> RunOutcome:
    record: dict[str, Any] | None = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            break
    if record is None:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        return RunOutcome("error", {}, f"exited with status {returncode}: {last}", stderr)
    if record.get("ok") and returncode == 0:
        return RunOutcome("ok", record, stderr=stderr)
    if returncode == EXIT_UNAVAILABLE or "unavailable" in record:
        return RunOutcome("unavailable", record, str(record.get("unavailable", "")), stderr)
    return RunOutcome("error", record, str(record.get("error", f"status {returncode}")), stderr)
