"""
The command line, as a user runs it: ``python -m pgbus run|check|notify|listen`` in a subprocess
against a real PostgreSQL, or ``main([...])`` in-process where nothing is connected.

Subprocess output is read line by line as it comes, each wait bounded by ``trio.fail_after``;
nothing sleeps for a fixed time. Errors are one line on stderr (``pgbus: error: ...``) with
exit status 2 (usage, configuration) or 1 (runtime), never a traceback.
"""

from __future__ import annotations

import json
import signal
import socket
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit, urlunsplit

import psutil
import pytest
import trio

from pgbus._cli import main

if TYPE_CHECKING:
    from conftest import PgHelper

from processes import ROOT, Pgbus, pgbus_env, run_to_completion, running

__all__ = ["Pgbus", "pgbus_env", "run_to_completion", "running"]
QUICKSTART = str(ROOT / "examples" / "quickstart.toml")


# -- running pgbus in a subprocess ---------------------------------------------------------------


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def one_error_line(stderr: str) -> str:
    """The single line of *stderr*, which must be ``pgbus: error: ...`` and no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pgbus: error: "), stderr
    return lines[0]


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


# -- help, version, check (nothing connects) ------------------------------------------------------


def test_help_lists_the_commands_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    """--help describes pgbus, lists the four commands and shows examples."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pgbus ")
    for command in ("run", "check", "notify", "listen"):
        assert f"\n    {command} " in out
    assert "examples:\n  pgbus run examples/quickstart.toml" in out
    assert "exit status: 0 success, 2 usage or configuration error, 1 runtime failure" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == "pgbus 0.1.0\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command: the usage line, one error line, exit 2."""
    assert main([]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: pgbus ")
    assert err[-1] == (
        "pgbus: error: the following arguments are required: COMMAND (see pgbus --help)"
    )


def test_check_prints_the_summary(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check exits 0 with the short summary on stdout."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    assert main(["check", QUICKSTART]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[:2] == [
        f"{QUICKSTART}: 2 channels, 2 bridges, 2 actors",
        "postgres: embedded (application_name 'pgbus')",
    ]


def test_check_shows_the_dsn_from_the_environment_redacted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PGBUS_DSN overrides the file; its password is never printed."""
    monkeypatch.setenv("PGBUS_DSN", "postgresql://app:s3cret@db.example.com:5433/app")
    assert main(["check", QUICKSTART]) == 0
    out = capsys.readouterr().out
    assert "postgres: postgresql://app:***@db.example.com:5433/app" in out
    assert "s3cret" not in out


def test_dsn_option_beats_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dsn overrides PGBUS_DSN."""
    monkeypatch.setenv("PGBUS_DSN", "postgresql://env@envhost/db")
    assert main(["check", QUICKSTART, "--dsn", "postgresql://option@optionhost/db"]) == 0
    assert "postgres: postgresql://option@optionhost/db " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[channels.orders]\ncapacity = -1\n",
            '[channels.orders] capacity must be 0, a positive integer or "inf" (got -1).',
        ),
        (
            '[channels.orders]\ncapacity = 1\n[[bridge]]\npostgres = "o"\nchannel = "order"\n'
            'direction = "in"\n',
            "[[bridge]] #1: channel 'order' is not declared under [channels]; "
            "did you mean 'orders'?",
        ),
        ("[channels.orders\n", "invalid TOML: "),
    ],
)
def test_check_reports_a_bad_config_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    message: str,
) -> None:
    """A broken rule: exit 2 and one line naming the file, the table and the rule."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    path = tmp_path / "bus.toml"
    path.write_text(text)
    assert main(["check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_error_line(captured.err).startswith(f"pgbus: error: {path}: {message}")


def test_check_reports_a_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A file that cannot be read: exit 2, one line."""
    path = tmp_path / "missing.toml"
    assert main(["check", str(path)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"pgbus: error: {path}: cannot read the file: No such file or directory"
    )


def test_a_bad_dsn_option_is_refused_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A DSN that is not PostgreSQL's: exit 2, the password redacted."""
    assert main(["run", QUICKSTART, "--dsn", "mysql://app:s3cret@db/app"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "pgbus: error: --dsn must be a URI starting with postgresql:// or postgres://, e.g. "
        "'postgresql://user:password@host:5432/dbname?sslmode=require' "
        "(got 'mysql://app:***@db/app')."
    )


async def test_check_in_a_subprocess_exits_2_with_one_line(tmp_path: Path) -> None:
    """python -m pgbus check on a bad file: exit 2, one stderr line, no traceback."""
    path = tmp_path / "bus.toml"
    path.write_text('[actors.x]\nclass = "no_such_module:Actor"\n')
    result = await run_to_completion("check", str(path))
    assert result.returncode == 2
    assert result.stdout == b""
    line = one_error_line(result.stderr.decode())
    assert line.startswith(
        f"pgbus: error: {path}: [actors.x] class 'no_such_module:Actor': cannot import module "
        "'no_such_module'"
    )


# -- notify and listen ---------------------------------------------------------------------------


async def test_notify_refuses_an_oversized_payload_before_connecting() -> None:
    """8000 bytes: exit 2 with the size and limit; the closed port is never tried (that is 1)."""
    dsn = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    result = await run_to_completion("notify", "orders", "é" * 4000, "--dsn", dsn)
    assert result.returncode == 2
    assert one_error_line(result.stderr.decode()) == (
        "pgbus: error: payload for channel 'orders' is 8000 bytes once encoded; PostgreSQL "
        "accepts at most 7999. Send a reference (a row id) instead of the data."
    )


async def test_notify_refuses_a_long_channel_name_before_connecting() -> None:
    """A 64-byte channel name: exit 2 before connecting."""
    dsn = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    result = await run_to_completion("notify", "c" * 64, "hello", "--dsn", dsn)
    assert result.returncode == 2
    assert one_error_line(result.stderr.decode()) == (
        f"pgbus: error: PostgreSQL channel name '{'c' * 64}' is 64 bytes; PostgreSQL allows at "
        "most 63 (LISTEN would silently truncate it)"
    )


def test_notify_without_a_dsn_says_how_to_give_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither --dsn nor PGBUS_DSN nor --config: exit 2, naming all three."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    assert main(["notify", "orders", "hello"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "pgbus: error: no PostgreSQL to connect to: pass --dsn postgresql://user@host/db or set "
        "PGBUS_DSN, or name a config file with --config."
    )


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["ask", "a", "1"],
        ["tell", "a", "1"],
        ["migrate"],
        ["groups"],
        ["dead-letters", "list", "c", "--group", "g"],
    ],
)
def test_commands_without_config_do_not_suggest_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """A command that takes no --config names only --dsn and PGBUS_DSN."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    assert main(args) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "pgbus: error: no PostgreSQL to connect to: pass --dsn postgresql://user@host/db or set "
        "PGBUS_DSN."
    )


def test_notify_json_codec_needs_json(capsys: pytest.CaptureFixture[str]) -> None:
    """--codec json with a payload that is not JSON: exit 2 before connecting."""
    assert main(["notify", "orders", "{oops", "--codec", "json", "--dsn", "postgresql://x/y"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(
        "pgbus: error: PAYLOAD is not valid JSON ("
    )


async def test_notify_to_an_unreachable_server_fails_with_exit_1() -> None:
    """A closed port: exit 1 and one line naming host and port (and no password)."""
    port = closed_port()
    dsn = f"postgresql://postgres:s3cret@127.0.0.1:{port}/postgres"
    result = await run_to_completion("notify", "orders", "hello", "--dsn", dsn)
    assert result.returncode == 1
    line = one_error_line(result.stderr.decode())
    assert line.startswith(f"pgbus: error: cannot reach PostgreSQL at 127.0.0.1:{port}/postgres: ")
    assert "s3cret" not in line


async def test_notify_and_listen_round_trip(pg_dsn: str) -> None:
    """listen --count 2 prints what notify sends as JSON lines with the sender's pid, then exits."""
    channel = "Pgbus CLI Test"  # exact name: mixed case and a space
    async with running("listen", channel, "--count", "2", "--dsn", pg_dsn) as listen:
        await listen.expect("stderr", f"pgbus: listening on {channel!r} at ")
        for payload in ("héllo", '{"not": "decoded"}'):
            sent = await run_to_completion(
                "notify", channel, payload, env=pgbus_env(PGBUS_DSN=pg_dsn)
            )
            assert sent.returncode == 0, sent.stderr
            assert sent.stderr.decode().startswith(f"pgbus: sent {len(payload.encode())} bytes ")
        assert await listen.wait(timeout=10) == 0
    lines = listen.lines["stdout"]
    assert '"payload":"héllo"' in lines[0]  # ensure_ascii=False
    records = [json.loads(line) for line in lines]
    assert [(r["channel"], r["payload"]) for r in records] == [
        (channel, "héllo"),
        (channel, '{"not": "decoded"}'),
    ]
    assert all(isinstance(r["pid"], int) and r["pid"] > 0 for r in records)


async def test_listen_json_codec_decodes_and_stops_on_sigint(pg_dsn: str, pg: PgHelper) -> None:
    """With --codec json payloads print decoded; SIGINT ends listen with exit 0."""
    async with running("listen", "cli_json", "--codec", "json", "--dsn", pg_dsn) as listen:
        await listen.expect("stderr", "pgbus: listening on 'cli_json'")
        await pg.execute('SELECT pg_notify(\'cli_json\', \'{"id": 42, "tags": ["a"]}\')')
        line = await listen.expect("stdout", '"channel":"cli_json"')
        assert json.loads(line)["payload"] == {"id": 42, "tags": ["a"]}
        assert await listen.stop(signal.SIGINT) == 0
    await pg.wait_for_no_backends()


async def test_listen_prints_a_gap_when_its_connection_is_killed(pg_dsn: str, pg: PgHelper) -> None:
    """The listening backend terminated: a gap line, then notifications flow again."""
    async with running("listen", "cli_gap", "--dsn", pg_dsn) as listen:
        await listen.expect("stderr", "pgbus: listening on 'cli_gap'")
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'pgbus:listen' AND datname = current_database()"
        )
        gap = await listen.expect("stdout", '"gap"')
        assert json.loads(gap) == {"channel": "cli_gap", "gap": "reconnect", "dropped": None}
        await pg.execute("SELECT pg_notify('cli_gap', 'after')")
        assert json.loads(await listen.expect("stdout", '"after"'))["channel"] == "cli_gap"
        assert await listen.stop(signal.SIGTERM) == 0


# -- run -------------------------------------------------------------------------------------------


async def test_run_until_sigterm_leaves_no_connection(pg_dsn: str, pg: PgHelper) -> None:
    """run prints the summary, messages flow, --stats-every reports; SIGTERM: exit 0 in 5 s."""
    env = pgbus_env(PGBUS_DSN=pg_dsn)
    async with running("run", QUICKSTART, "--stats-every", "0.5", env=env) as bus:
        await bus.expect("stderr", f"pgbus: {QUICKSTART}: 2 channels, 2 bridges, 2 actors")
        await bus.expect("stderr", "pgbus: running; stop with Ctrl-C")
        record = json.loads(await bus.expect("stdout", '"payload":"tick 1"'))
        assert record["channel"] == "pgbus_quickstart"
        assert isinstance(record["pid"], int)
        stats = await bus.expect("stderr", " pgbus INFO stats: ")
        assert "in 'pgbus_quickstart' -> 'received': " in stats
        assert "actor 'heartbeat' running, 0 restarts" in stats
        assert await pg.backends()  # the check below can fail
        assert await bus.stop(signal.SIGTERM) == 0
    assert "SIGTERM received: stopping" in "\n".join(bus.lines["stderr"])
    assert "Traceback" not in bus.output()
    await pg.wait_for_no_backends()


async def test_run_prints_its_stacks_on_sigusr1_and_goes_on(pg_dsn: str, pg: PgHelper) -> None:
    """kill -USR1: every thread's stack on stderr (where a stuck bus is); messages still flow."""
    env = pgbus_env(PGBUS_DSN=pg_dsn)
    async with running("run", QUICKSTART, env=env) as bus:
        await bus.expect("stderr", "pgbus: running; stop with Ctrl-C")
        bus.process.send_signal(signal.SIGUSR1)
        await bus.expect("stderr", "most recent call first")
        await bus.expect("stderr", 'File "')
        await bus.expect("stdout", '"payload":"tick ')  # still running
        assert await bus.stop(signal.SIGTERM) == 0
    await pg.wait_for_no_backends()


async def test_run_keeps_going_while_the_server_is_unreachable() -> None:
    """A closed port: run says which host and port it cannot reach, keeps trying; SIGINT: 0."""
    port = closed_port()
    dsn = f"postgresql://postgres:s3cret@127.0.0.1:{port}/postgres"
    async with running("run", QUICKSTART, "--dsn", dsn) as bus:
        await bus.expect("stderr", f"  postgres: postgresql://postgres:***@127.0.0.1:{port}/")
        line = await bus.expect("stderr", f"cannot reach PostgreSQL at 127.0.0.1:{port}/postgres")
        assert " pgbus.bridge WARNING " in line
        assert bus.process.returncode is None
        assert await bus.stop(signal.SIGINT) == 0
    assert "s3cret" not in bus.output()


async def test_run_exits_1_when_the_database_does_not_exist(pg_dsn: str) -> None:
    """A fatal connection error (unknown database): one line, exit 1."""
    dsn = with_database(pg_dsn, "pgbus_no_such_database")
    async with running("run", QUICKSTART, "--dsn", dsn) as bus:
        assert await bus.wait(timeout=30) == 1
    last = bus.lines["stderr"][-1]
    assert last.startswith("pgbus: error: cannot reach PostgreSQL at ")
    assert last.endswith('database "pgbus_no_such_database" does not exist')
    assert "Traceback" not in bus.output()


async def test_run_exits_1_when_the_supervisor_gives_up(tmp_path: Path, pg_dsn: str) -> None:
    """An actor failing beyond the restart intensity: exit 1 with one clear last line."""
    (tmp_path / "crashing.py").write_text(
        textwrap.dedent(
            """
            import pgbus

            class Crash(pgbus.Actor):
                async def on_start(self):
                    raise ValueError("boom")
            """
        )
    )
    config = tmp_path / "bus.toml"
    config.write_text(
        "[supervisor]\nmax_restarts = 1\nbackoff_initial = 0.01\n"
        '[actors.crash]\nclass = "crashing:Crash"\n'
    )
    async with running("run", str(config), "--dsn", pg_dsn) as bus:
        assert await bus.wait(timeout=30) == 1
    assert bus.lines["stderr"][-1] == (
        "pgbus: error: actor 'crash' needed more than 1 restarts within 5s; the supervisor "
        "stopped its actors. Last failure: ValueError('boom')"
    )


async def test_run_embedded_stops_its_server() -> None:
    """No DSN: an embedded PostgreSQL, a psql-ready DSN printed; SIGINT: exit 0, server gone."""
    async with running("run", QUICKSTART) as bus:
        line = await bus.expect("stderr", "pgbus: embedded PostgreSQL ", timeout=120)
        prefix, _, dsn = line.partition("; connect with: psql ")
        assert prefix.startswith("pgbus: embedded PostgreSQL 18.")
        dsn = dsn.strip("'")
        socket_dir = parse_qs(urlsplit(dsn).query)["host"][0]
        assert await trio.Path(socket_dir).is_dir()
        assert servers_using(socket_dir)  # the check after exit can fail
        await bus.expect("stdout", '"payload":"tick 1"')
        assert await bus.stop(signal.SIGINT, timeout=10) == 0
    assert servers_using(socket_dir) == []
    assert not await trio.Path(socket_dir).exists()


def servers_using(directory: str) -> list[int]:
    """Pids of processes whose command line names *directory*."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        if directory in " ".join(process.info["cmdline"] or ()):
            pids.append(process.pid)
    return pids


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ("[" * 5000 + "]" * 5000, "PAYLOAD is nested too deeply for Python's JSON decoder"),
        ("NaN", "PAYLOAD holds NaN, which is not JSON and which PostgreSQL's jsonb refuses"),
        ('"\\ud800"', "PAYLOAD string holds a lone surrogate (U+D800 at index 0)"),
    ],
)
def test_notify_json_codec_refuses_what_jsonb_would(
    capsys: pytest.CaptureFixture[str], payload: str, problem: str
) -> None:
    """--codec json checks PAYLOAD with the strict codec: exit 2, one line, no traceback."""
    assert main(["notify", "orders", payload, "--codec", "json", "--dsn", "postgresql://x/y"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"pgbus: error: {problem}")


def test_grants_prints_the_sql_and_refuses_a_bad_role(capsys: pytest.CaptureFixture[str]) -> None:
    """`pgbus grants ROLE` prints grants to the quoted role, connecting to nothing."""
    assert main(["grants", 'app "worker"']) == 0
    out = capsys.readouterr().out
    assert 'GRANT USAGE ON SCHEMA "pgbus" TO "app ""worker""";' in out
    assert "ALTER DEFAULT PRIVILEGES IN SCHEMA" in out
    assert main(["grants", ""]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "pgbus: error: ROLE must be a role name of 1 to 63 bytes, without NUL (got '')."
    )


CHECK_AND_LIST_THE_DRIVER = """
import sys
from pgbus._cli import main
for config in sys.argv[1:]:
    try:
        main(["check", config])
    except SystemExit as exit:
        assert exit.code in (0, None), (config, exit.code)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("asyncpg", "trio_asyncio")))
"""


def test_check_never_loads_the_driver() -> None:
    """`pgbus check` of every example (actors, durable bridges, the cluster, keyed actors,
    schedules) imports neither asyncpg nor trio-asyncio: it reads files, nothing more."""
    import subprocess
    import sys

    configs = sorted(str(p) for p in (ROOT / "examples").glob("*.toml"))
    assert len(configs) >= 5
    result = subprocess.run(
        [sys.executable, "-c", CHECK_AND_LIST_THE_DRIVER, *configs],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=pgbus_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
