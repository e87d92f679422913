"""
Command-line niceties: ``notify CHANNEL -`` reads stdin, ``--config`` gives notify and listen a
DSN, every example in the help works as written, and the README's table lists every option.
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from test_cli import ROOT, one_error_line, pgbus_env, running

from pgbus._cli import _EXAMPLE_DSN, build_parser

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 30


async def pgbus_with_stdin(
    *args: str, stdin: bytes, env: dict[str, str] | None = None
) -> tuple[int, str]:
    with trio.fail_after(WAIT):
        result = await trio.run_process(
            [sys.executable, "-m", "pgbus", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=pgbus_env() if env is None else env,
            cwd=ROOT,
        )
    return result.returncode, result.stderr.decode()


def config_with_dsn(tmp_path: Path, dsn: str | None) -> Path:
    path = tmp_path / "bus.toml"
    postgres = f'[postgres]\ndsn = "{dsn}"\n\n' if dsn is not None else ""
    path.write_text(f"{postgres}[channels.a]\ncapacity = 1\n")
    return path


# -- notify CHANNEL - --------------------------------------------------------------------------


async def test_notify_reads_the_payload_from_stdin(pg: PgHelper) -> None:
    """PAYLOAD "-": stdin is the payload, byte for byte, less one trailing newline."""
    async with pg.listen("from stdin") as received:
        status, err = await pgbus_with_stdin(
            "notify", "from stdin", "-", "--dsn", pg.dsn, stdin="line one\nzwei é\n".encode()
        )
        assert status == 0, err
        with trio.fail_after(WAIT):
            channel, payload, _ = await received.receive()
    assert (channel, payload) == ("from stdin", "line one\nzwei é")
    assert err == "pgbus: sent 16 bytes to 'from stdin' at " + err.split(" at ", 1)[1]


async def test_notify_stdin_json_is_checked_and_compacted(pg: PgHelper) -> None:
    """--codec json with "-": the JSON read from stdin is sent compacted."""
    async with pg.listen("json stdin") as received:
        status, err = await pgbus_with_stdin(
            "notify", "json stdin", "-", "--codec", "json", "--dsn", pg.dsn,
            stdin=b'{ "id" : 42 }\n',
        )  # fmt: skip
        assert status == 0, err
        with trio.fail_after(WAIT):
            _, payload, _ = await received.receive()
    assert payload == '{"id":42}'


async def test_notify_refuses_an_oversized_stdin_before_connecting() -> None:
    """More than a notification holds on stdin: exit 2, one line, nothing connects."""
    status, err = await pgbus_with_stdin(
        "notify", "big", "-", "--dsn", "postgresql://postgres@127.0.0.1:1/x", stdin=b"x" * 20000
    )
    assert status == 2
    assert one_error_line(err) == (
        "pgbus: error: the payload read from stdin is more than 8001 bytes; PostgreSQL accepts at "
        "most 7999. Send a reference (a row id) instead."
    )


async def test_notify_refuses_stdin_that_is_not_utf8() -> None:
    """Bytes that are not UTF-8: exit 2, saying so."""
    status, err = await pgbus_with_stdin(
        "notify", "x", "-", "--dsn", "postgresql://postgres@127.0.0.1:1/x", stdin=b"\xff\xfe\n"
    )
    assert status == 2
    assert one_error_line(err).startswith(
        "pgbus: error: the payload read from stdin is not valid UTF-8"
    )


# -- --config ------------------------------------------------------------------------------------


async def test_notify_takes_the_dsn_from_a_config(pg: PgHelper, tmp_path: Path) -> None:
    """notify --config bus.toml connects to bus.toml's [postgres] dsn."""
    config = config_with_dsn(tmp_path, pg.dsn)
    async with pg.listen("configured") as received:
        status, err = await pgbus_with_stdin(
            "notify", "configured", "hi", "--config", str(config), stdin=b""
        )
        assert status == 0, err
        with trio.fail_after(WAIT):
            assert (await received.receive())[1] == "hi"


async def test_listen_takes_the_dsn_from_a_config(pg: PgHelper, tmp_path: Path) -> None:
    """listen --config bus.toml: listens there; --count 1 ends it after one notification."""
    config = config_with_dsn(tmp_path, pg.dsn)
    async with running("listen", "configured in", "--count", "1", "--config", str(config)) as cli:
        await cli.expect("stderr", "listening on 'configured in'")
        await pg.execute("SELECT pg_notify('configured in', 'hello')")
        assert await cli.wait(timeout=WAIT) == 0
    assert cli.lines["stdout"][0].startswith('{"channel":"configured in","payload":"hello",')


async def test_config_without_a_dsn_is_refused_in_one_line(tmp_path: Path) -> None:
    """A config that would run an embedded server cannot serve notify: exit 2, naming it."""
    config = config_with_dsn(tmp_path, None)
    status, err = await pgbus_with_stdin("notify", "x", "y", "--config", str(config), stdin=b"")
    assert status == 2
    assert one_error_line(err) == (
        f"pgbus: error: {config} has no [postgres] dsn (run would start an embedded PostgreSQL "
        "of its own); pass --dsn or set PGBUS_DSN."
    )


async def test_a_broken_config_is_its_one_line_error(tmp_path: Path) -> None:
    """--config names a file with a mistake: the config's own one-line error, exit 2."""
    config = tmp_path / "bus.toml"
    config.write_text("[channels.a]\ncapacity = -1\n")
    status, err = await pgbus_with_stdin("listen", "x", "--config", str(config), stdin=b"")
    assert status == 2
    assert one_error_line(err).startswith(f"pgbus: error: {config}: [channels.a] capacity must")


# -- the help's examples and the README's table ------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser("pgbus")
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def help_examples() -> list[str]:
    """Every example command line in ``pgbus --help`` and each command's ``--help``."""
    texts = [build_parser("pgbus").format_help()]
    texts += [p.format_help() for p in subcommands().values()]
    lines = [
        # A comment and environment assignments before the command (VAR=value pgbus ...).
        re.sub(r"^([A-Z_]+=\S+\s+)+", "", re.sub(r"\s+#.*$", "", line.strip()))
        for text in texts
        for line in text.split("example", 1)[-1].splitlines()
        if line.startswith("  ") and "pgbus " in line and line.strip()[0] != "-"
    ]
    return list(dict.fromkeys(lines))


def test_help_has_examples_for_every_command() -> None:
    """The examples cover run, check, notify (also from stdin) and listen."""
    examples = help_examples()
    for command in ("run", "check", "notify", "listen"):
        assert any(f"pgbus {command} " in e for e in examples), examples
    assert any(e.startswith("echo hello | pgbus notify orders - ") for e in examples)


@pytest.mark.parametrize("example", help_examples())
def test_help_example_parses_and_names_existing_files(example: str) -> None:
    """Each example is a valid command line; the files it names exist."""
    argv = shlex.split(example.split("|")[-1])
    assert argv[0] == "pgbus"
    args = build_parser("pgbus").parse_args(argv[1:])
    config = getattr(args, "config", None)
    if config is not None:
        assert (ROOT / config).is_file(), config


async def test_help_examples_of_notify_and_listen_work_as_written(pg: PgHelper) -> None:
    """Run against this test's server (only the example DSN replaced), they succeed."""
    examples = [e for e in help_examples() if " notify " in e or " listen " in e]
    assert len(examples) >= 4
    for example in examples:
        command = example.replace(_EXAMPLE_DSN, pg.dsn)
        stdin = b""
        if command.startswith("echo "):
            echoed, command = command.split("|", 1)
            stdin = (shlex.split(echoed)[1] + "\n").encode()
        argv = shlex.split(command)[1:]
        if argv[0] == "notify":
            status, err = await pgbus_with_stdin(*argv, stdin=stdin)
            assert status == 0, (example, err)
            continue
        async with running(*argv) as cli:
            count = int(argv[argv.index("--count") + 1])
            channels = list(argv[1 : argv.index("--count")])
            await cli.expect("stderr", "listening on")
            for n in range(count):
                await pg.execute("SELECT pg_notify($1, $2)", channels[n % len(channels)], str(n))
            assert await cli.wait(timeout=WAIT) == 0, cli.output()
        assert len(cli.lines["stdout"]) == count


def readme_cli_rows() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `python -m pgbus ([\w-]+) ([^`]*)` \|", readme, flags=re.M)
    return dict(rows)


def test_readme_cli_table_lists_every_option() -> None:
    """Each command's row in the README's table names every option the parser knows."""
    rows = readme_cli_rows()
    assert set(rows) == set(subcommands())
    for command, parser in subcommands().items():
        for action in parser._actions:
            long_options = [o for o in action.option_strings if o.startswith("--")]
            if not long_options or long_options == ["--help"]:
                continue
            assert long_options[0] in rows[command], (command, long_options[0])


async def test_a_config_that_needs_no_database_starts_no_server(tmp_path: Path) -> None:
    """Heartbeat -> Printer, no DSN: the bus runs without starting an embedded PostgreSQL."""
    config = tmp_path / "ticks.toml"
    config.write_text(
        "[channels.ticks]\ncapacity = 10\n\n"
        '[actors.beat]\nclass = "pgbus.actors.heartbeat:Heartbeat"\n'
        'options = { to = "ticks", every = 0.05 }\n\n[actors.printer]\n'
        'class = "pgbus.actors.printer:Printer"\ninbox = "ticks"\n'
    )
    async with running("run", str(config)) as bus:
        await bus.expect("stdout", '"payload":"tick 2"')
        status = await bus.stop(signal.SIGTERM, timeout=30)
    assert status == 0, bus.output()
    stderr = "\n".join(bus.lines["stderr"])
    assert "postgres: none (nothing here needs PostgreSQL)" in stderr
    assert "embedded PostgreSQL" not in stderr
