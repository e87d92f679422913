"""
Commands stop when asked and never wait on a lock for long: every one-shot command exits on
Ctrl-C or SIGTERM at once (130 / 143, one line), a lock wait gives up after
``PGBUS_LOCK_TIMEOUT`` seconds naming the backend that held the lock, and a stop signal the
process was started ignoring (``nohup``) stays ignored.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
from processes import ROOT, Pgbus, pgbus_env, run_to_completion, running
from test_cli import one_error_line

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30
COMMANDS = {
    "status": ["status"],
    "groups": ["groups"],
    "notify --durable": ["notify", "stop_jobs", "x", "--durable"],
    "dead-letters": ["dead-letters", "list", "stop_jobs", "--group", "g"],
    "migrate": ["migrate"],
}


@asynccontextmanager
async def pgbus_tables_locked(pg: PgHelper) -> AsyncIterator[None]:
    """Every table of schema pgbus locked (ACCESS EXCLUSIVE) by the helper's open transaction."""
    done = await run_to_completion("migrate", "--dsn", pg.dsn)
    assert done.returncode == 0, done.stderr.decode()
    tables = [
        row["name"]
        for row in await pg.fetch(
            "SELECT format('%I.%I', schemaname, tablename) AS name"
            " FROM pg_tables WHERE schemaname = 'pgbus'"
        )
    ]
    await pg.execute("BEGIN")
    try:
        await pg.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        await pg.execute("ROLLBACK")


async def wait_for_a_lock_wait(pg: PgHelper) -> None:
    """Until one of pgbus's backends waits for a lock (polled: the server has no event for it)."""
    with trio.fail_after(WAIT):
        while True:
            await pg.execute("SELECT pg_stat_clear_snapshot()")
            waiting = await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE starts_with(application_name, 'pgbus') AND wait_event_type = 'Lock'"
            )
            if waiting:
                return
            await trio.sleep(0.05)


def command(*args: str, **env: str) -> AbstractAsyncContextManager[Pgbus]:
    """``python -m pgbus *args*`` running, with *env* added to the environment."""
    return running(*args, env=pgbus_env(**env))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("name", list(COMMANDS))
async def test_a_command_waiting_on_a_lock_stops_on_a_signal(
    pg: PgHelper, name: str, signum: signal.Signals
) -> None:
    """Blocked on a lock, each command exits 128 + signal at once, saying so in one line."""
    async with pgbus_tables_locked(pg), command(*COMMANDS[name], "--dsn", pg.dsn) as running:
        await wait_for_a_lock_wait(pg)
        status = await running.stop(signum, timeout=WAIT)
    assert status == 128 + signum, running.output()
    assert one_error_line("\n".join(running.lines["stderr"])) == (
        f"pgbus: error: stopped by {signum.name}"
    )


async def test_a_lock_wait_gives_up_naming_the_blocker(pg: PgHelper) -> None:
    """After PGBUS_LOCK_TIMEOUT seconds the command exits 1 naming who holds the lock."""
    helper_pid = await pg.fetchval("SELECT pg_backend_pid()")
    async with pgbus_tables_locked(pg):
        done = await run_to_completion(
            "groups", "--dsn", pg.dsn, env=pgbus_env(PGBUS_LOCK_TIMEOUT="1"), timeout=WAIT
        )
    assert done.returncode == 1
    line = one_error_line(done.stderr.decode())
    assert "gave up after waiting 1s for a lock held by backend" in line, line
    assert f"backend {helper_pid} (role " in line
    assert "application_name 'testhelper'" in line


async def test_a_bad_lock_timeout_is_refused_in_one_line(pg: PgHelper) -> None:
    """PGBUS_LOCK_TIMEOUT must be a number of seconds > 0."""
    done = await run_to_completion("groups", "--dsn", pg.dsn, env=pgbus_env(PGBUS_LOCK_TIMEOUT="0"))
    assert done.returncode == 2
    assert "PGBUS_LOCK_TIMEOUT must be a number of seconds > 0 (got '0')" in done.stderr.decode()


async def test_nohup_keeps_sighup_ignored(pg: PgHelper) -> None:
    """Started with SIGHUP ignored (nohup), `run` ignores it; SIGTERM still stops it."""
    nohup = shutil.which("nohup")
    assert nohup is not None
    config = ROOT / "examples" / "quickstart.toml"
    async with running("run", str(config), "--dsn", pg.dsn, prefix=(nohup,)) as bus:
        await bus.expect("stderr", "running; stop with")
        bus.process.send_signal(signal.SIGHUP)
        bus.process.send_signal(signal.SIGTERM)
        status = await bus.wait(timeout=WAIT)
    assert status == 0, bus.output()
    stderr = "\n".join(bus.lines["stderr"])
    assert "SIGTERM received" in stderr
    assert "SIGHUP" not in stderr


SPY_ON_THE_FIRST_HANDLER = """
import _signal, sys
sys.argv = ["pgbus"]  # as the `pgbus` script: pgbus installs its early handlers
before = set(sys.modules)
install = _signal.signal
def spy(signum, handler):
    if not imported:
        imported.extend(sorted(set(sys.modules) - before))
    return install(signum, handler)
imported = []
_signal.signal = spy
import pgbus
print(" ".join(imported))
"""


def test_the_early_handlers_come_before_any_slow_import() -> None:
    """`pgbus` notes stop signals before it imports anything (`signal` takes milliseconds)."""
    # Until the handlers are in place, a Ctrl-C ends the process with a KeyboardInterrupt
    # traceback: seen in CI, inside `import signal`, at a random moment of start-up.
    done = subprocess.run(
        [sys.executable, "-c", SPY_ON_THE_FIRST_HANDLER], capture_output=True, check=True
    )
    assert done.stdout.decode().split() == ["pgbus", "pgbus._signals"]


async def test_a_server_that_is_down_is_said_and_stats_keep_coming() -> None:
    """Against a closed port: the retries are warned about (never 'in 0.0s'), stats still print."""
    config = ROOT / "examples" / "quickstart.toml"
    down = "postgresql://postgres@127.0.0.1:1/nowhere"
    async with command("run", str(config), "--dsn", down, "--stats-every", "0.2") as running:
        await running.expect("stderr", "stats:")
        output = running.output()
        status = await running.stop(signal.SIGTERM, timeout=WAIT)
    assert status == 0, running.output()
    assert "retrying now (1 failed attempt)" in output
    assert "retrying in 0.0s" not in running.output()
