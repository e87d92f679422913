"""
The command line: ``python -m pgbus run|check|notify|listen`` (also the ``pgbus`` script).

Thin on purpose: it parses arguments, prints, and turns outcomes into exit codes — 0 success,
2 usage or configuration error, 1 runtime failure — each failure said in one line on stderr,
``pgbus: error: <message>``, without a traceback (``--log-level debug`` adds one for runtime
failures). Running a configuration is `pgbus._run`'s job. DSNs are printed through `redact_dsn`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import Any, NoReturn

import trio

from . import __version__, _signals
from ._codec import CODECS, MAX_PAYLOAD_BYTES, decoder, encode, validate_channel_name
from ._config import BusConfig, load_config
from ._dsn import check_dsn, describe_dsn, redact_dsn
from ._durable._cli import add_durable_commands
from ._durable._rules import (
    DEFAULT_DEDUP_WINDOW,
    MAX_DURABLE_PAYLOAD_BYTES,
    validate_dedup_key,
    validate_dedup_window,
    validate_delay,
)
from ._entities._cli import add_entity_commands
from ._errors import CodecError, ConfigError, PgbusError, SettingError, unwrap_group
from ._grants import add_grants_command
from ._logs import LOG_FORMATS, formatter
from ._signals import stop_signals

ENV_DSN = "PGBUS_DSN"
_EXAMPLE_DSN = "postgresql://postgres@localhost/postgres"
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("pgbus")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument found after parsing (exit status 2, one line)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with *argv* (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser(_program_name())
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error argparse already printed
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    command: Callable[[argparse.Namespace], int] = args.command_function
    try:
        return command(args)
    except (ConfigError, UsageError) as exc:
        _say_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 130
    except BrokenPipeError:  # stdout closed early: pgbus check bus.toml | head -1
        _silence_stdout()
        return EXIT_FAILURE


# -- the parser --------------------------------------------------------------------------------

DESCRIPTION = """\
pgbus: a Trio actor message bus on PostgreSQL LISTEN/NOTIFY.

Run a whole bus (channels, bridges to Postgres channels, supervised actors) from a
TOML file, check such a file, or send and watch notifications by hand."""

EPILOG = """\
examples:
  {prog} run examples/quickstart.toml    # starts an embedded PostgreSQL: no setup
  {prog} run examples/shout.toml --dsn {dsn} --stats-every 60
  {prog} check examples/quickstart.toml
  {prog} listen orders 'Order Events' --count 10 --dsn {dsn}
  {prog} notify orders '{{"id": 42}}' --codec json --dsn {dsn}
  echo hello | {prog} notify orders - --dsn {dsn}

The DSN comes from --dsn, else the {env} environment variable, else [postgres] dsn
in the config file (notify and listen: --config CONFIG); with none of these, run
starts an embedded PostgreSQL for the run.
Channel names are exact: case-sensitive, spaces allowed, at most 63 bytes.

exit status: 0 success, 2 usage or configuration error, 1 runtime failure."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Lists the commands without argparse's extra ``COMMAND`` line above them."""

    def _format_action(self, action: argparse.Action) -> str:
        text = super()._format_action(action)
        if action.nargs == argparse.PARSER:
            text = text.split("\n", 1)[1]
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        _say_error(f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


def build_parser(prog: str = "pgbus") -> argparse.ArgumentParser:
    """The argument parser of the whole command line."""
    formatter = _Formatter
    parser = _Parser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG.format(prog=prog, env=ENV_DSN, dsn=_EXAMPLE_DSN),
        formatter_class=formatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"pgbus {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the bus a config file declares, until Ctrl-C or SIGTERM",
        description="Run the channels, bridges and actors CONFIG declares, until SIGINT\n"
        "(Ctrl-C) or SIGTERM, then shut down cleanly and exit 0. Logs go to stderr.\n"
        "Without a DSN, an embedded PostgreSQL is started for the run and a psql\n"
        "command line to reach it is printed.",
        epilog=f"examples:\n  {prog} run examples/quickstart.toml --stats-every 10\n"
        f"  {prog} run examples/quickstart.toml --metrics 127.0.0.1:9464 --log-format json",
        formatter_class=formatter,
    )
    run.add_argument("config", metavar="CONFIG", help="the TOML configuration file")
    _add_dsn(run, f"overrides {ENV_DSN} and [postgres] dsn")
    run.add_argument(
        "--stats-every",
        metavar="SECONDS",
        type=_positive_seconds,
        help="log a status line (messages per bridge, restarts per actor) every SECONDS",
    )
    run.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on /metrics and health on /healthz at HOST:PORT "
        "(overrides [metrics] listen; needs pip install 'pgbus[metrics]')",
    )
    run.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=str.lower,
        choices=LOG_LEVELS,
        default="info",
        help="debug, info, warning or error (default: info); debug shows tracebacks",
    )
    run.add_argument(
        "--log-format",
        metavar="FORMAT",
        type=str.lower,
        choices=LOG_FORMATS,
        default="text",
        help="text (default) or json: one JSON object per line with time, logger, level, "
        "message (and exc_info)",
    )
    run.set_defaults(command_function=_run)

    check = commands.add_parser(
        "check",
        help="validate a config file without connecting",
        description="Check CONFIG (and the DSN run would use) without connecting to\n"
        "anything: print a short summary and exit 0, or what is wrong and exit 2.",
        formatter_class=formatter,
    )
    check.add_argument("config", metavar="CONFIG", help="the TOML configuration file")
    _add_dsn(check, f"check this DSN instead of {ENV_DSN} or [postgres] dsn")
    check.set_defaults(command_function=_check)

    notify = commands.add_parser(
        "notify",
        help="send one notification (pg_notify)",
        description="Send PAYLOAD to the Postgres channel CHANNEL with pg_notify (the name\n"
        "is used exactly as given). PostgreSQL accepts payloads of at most\n"
        f"{MAX_PAYLOAD_BYTES} bytes; a larger one is refused before connecting.",
        epilog=f"examples:\n  {prog} notify pgbus_quickstart hello --dsn {_EXAMPLE_DSN}\n"
        f"  {prog} notify orders '{{\"id\": 42}}' --codec json --dsn {_EXAMPLE_DSN}\n"
        f"  echo hello | {prog} notify orders - --dsn {_EXAMPLE_DSN}",
        formatter_class=formatter,
    )
    notify.add_argument("channel", metavar="CHANNEL", help="the Postgres channel, exactly")
    notify.add_argument(
        "payload",
        metavar="PAYLOAD",
        help="the payload; - reads it from stdin (one trailing newline is dropped)",
    )
    _add_dsn(notify, f"default: {ENV_DSN}, else --config's [postgres] dsn")
    _add_config(notify)
    _add_codec(notify, "json: PAYLOAD must be JSON and is sent compacted")
    notify.add_argument(
        "--durable",
        action="store_true",
        help="store it in the durable channel CHANNEL instead (payloads up to 1 MiB)",
    )
    notify.add_argument(
        "--delay",
        metavar="SECONDS",
        type=float,
        help="with --durable: deliver it SECONDS from now (by the database's clock)",
    )
    notify.add_argument(
        "--dedup-key",
        metavar="KEY",
        help="with --durable: store nothing if a message of CHANNEL holds KEY (prints its id)",
    )
    notify.add_argument(
        "--dedup-window",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_DEDUP_WINDOW,
        help=f"with --dedup-key: how long the key stays taken (default {DEFAULT_DEDUP_WINDOW:g})",
    )
    notify.set_defaults(command_function=_notify)

    listen = commands.add_parser(
        "listen",
        help="print notifications as JSON lines",
        description="LISTEN on each CHANNEL (exact names) and print one JSON object per\n"
        'notification, one per line: {"channel", "payload", "pid"}. Where notifications\n'
        'may be missing (the connection was lost), a line {"channel", "gap", "dropped"}\n'
        "says so. Stops after --count notifications, or on Ctrl-C or SIGTERM.",
        epilog=f"example:\n  {prog} listen orders 'Order Events' --count 10 --dsn {_EXAMPLE_DSN}",
        formatter_class=formatter,
    )
    listen.add_argument(
        "channels", metavar="CHANNEL", nargs="+", help="a Postgres channel, exactly"
    )
    _add_dsn(listen, f"default: {ENV_DSN}, else --config's [postgres] dsn")
    _add_config(listen)
    listen.add_argument(
        "--count",
        metavar="N",
        type=_positive_int,
        help="exit after N notifications",
    )
    _add_codec(listen, "json: print payloads decoded")
    listen.set_defaults(command_function=_listen)
    _add_cluster_commands(commands, prog)
    add_grants_command(commands, _Formatter, prog)
    _add_dashboard_command(commands, prog)
    add_durable_commands(commands, formatter, prog, _add_dsn, ENV_DSN)
    add_entity_commands(commands, formatter, prog, _add_dsn, ENV_DSN)
    return parser


def _add_dsn(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--dsn",
        metavar="DSN",
        help=f"PostgreSQL to connect to, e.g. postgresql://user@host/db; {default}",
    )


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help="take the DSN from this TOML file's [postgres] dsn (checked as run would)",
    )


def _add_codec(parser: argparse.ArgumentParser, json_help: str) -> None:
    parser.add_argument(
        "--codec",
        choices=CODECS,
        default="text",
        help=f"text (default): the payload as it is; {json_help}",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 (got {text!r})")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return value


def _program_name() -> str:
    """How the user ran us: ``python -m pgbus`` or the ``pgbus`` script (or main() in-process)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "python -m pgbus" if getattr(spec, "name", None) == "pgbus.__main__" else "pgbus"


# -- the commands ------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    config = _load_config(args.config, args.dsn)
    print(config.summary(), flush=True)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from ._run import run_config  # the driver is imported only by the commands that connect

    config = _load_config(args.config, args.dsn)
    if args.metrics is not None:
        config = config.with_metrics(args.metrics)
    _dump_stacks_on_sigusr1()
    with _logging_to_stderr(args.log_level, args.log_format):
        first, *rest = config.summary().splitlines()
        if args.log_format == "json":
            # Everything on stderr is then one JSON object per line, the summary included.
            for line in [first, *rest]:
                log.info("%s", line)
            return _trio_run(
                partial(run_config, config, stats_every=args.stats_every, report=_log_info),
                debug=args.log_level == "debug",
                say_error=_log_error,
                handles_signals=True,
            )
        print("\n".join([f"pgbus: {first}", *(f"  {line}" for line in rest)]), file=sys.stderr)
        return _trio_run(
            partial(run_config, config, stats_every=args.stats_every, report=_say),
            debug=args.log_level == "debug",
            handles_signals=True,
        )


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack to stderr (a bus that seems stuck
    says where it is); the bus goes on."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _notify(args: argparse.Namespace) -> int:
    channel: str = _checked_channel(args.channel)
    timed = args.delay is not None or args.dedup_key is not None
    if timed and not args.durable:
        raise UsageError("--delay and --dedup-key apply only to durable messages; add --durable.")
    try:
        delay = validate_delay(args.delay)
        dedup_key = validate_dedup_key(args.dedup_key)
        window = validate_dedup_window(args.dedup_window)
    except SettingError as exc:
        raise UsageError(f"--{exc.key.replace('_', '-')} {exc.rule}") from None
    if args.payload == "-":
        text = _payload_from_stdin(MAX_DURABLE_PAYLOAD_BYTES if args.durable else MAX_PAYLOAD_BYTES)
    else:
        text = _checked_utf8(args.payload, "PAYLOAD")
    message: Any = text
    if args.codec == "json":
        try:
            message = decoder("json")(channel, text)
        except CodecError as exc:
            raise UsageError(
                f"PAYLOAD {exc.detail.removeprefix('payload ')}; "
                "pass --codec text to send it as it is."
            ) from None
    limit = MAX_DURABLE_PAYLOAD_BYTES if args.durable else MAX_PAYLOAD_BYTES
    try:
        size = len(encode(channel, message, args.codec, limit).encode())
    except PgbusError as exc:  # too large, or a NUL character
        raise UsageError(str(exc)) from None
    dsn = _dsn_for_client(args.dsn, args.config, accepts_config=True)
    ids: list[int | None] = []
    send = partial(_send_one, dsn, channel, message, args.codec, args.durable, ids)
    with _logging_to_stderr("warning"):
        status = _trio_run(partial(send, delay=delay, dedup_key=dedup_key, dedup_window=window))
    if status == EXIT_OK:
        what = "stored" if args.durable else "sent"
        line = f"{what} {size} bytes to {channel!r} at {describe_dsn(dsn)}"
        if timed:
            line += f" as message {ids[0]}"
            if delay:
                line += f", due in {delay:g}s"
            if dedup_key is not None:
                line += f" (or the message already holding key {dedup_key!r})"
        _say(line)
    return status


async def _send_one(
    dsn: str,
    channel: str,
    message: object,
    codec: str,
    durable: bool = False,
    ids: list[int | None] | None = None,
    **options: Any,
) -> None:
    from ._bus import open_bus

    async with open_bus(dsn) as bus:
        message_id = await bus.notify(channel, message, codec=codec, durable=durable, **options)
        if ids is not None:
            ids.append(message_id)


def _listen(args: argparse.Namespace) -> int:
    channels = [_checked_channel(name) for name in args.channels]
    dsn = _dsn_for_client(args.dsn, args.config, accepts_config=True)
    with _logging_to_stderr("warning"):
        return _trio_run(
            partial(_print_notifications, dsn, channels, args.codec, args.count),
            handles_signals=True,
        )


async def _print_notifications(
    dsn: str, channels: list[str], codec: str, count: int | None
) -> None:
    from ._bus import open_bus
    from ._inbound import Gap

    with trio.open_signal_receiver(*stop_signals()) as signals:
        if _signals.early:  # one came before this receiver was in place
            return
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            async with open_bus(dsn) as bus:
                inbox = bus.add_channel("listen", math.inf)
                for name in dict.fromkeys(channels):
                    await bus.bridge_in(name, "listen", codec=codec)
                names = ", ".join(map(repr, dict.fromkeys(channels)))
                _say(f"listening on {names} at {describe_dsn(dsn)}; stop with Ctrl-C")
                received = 0
                while count is None or received < count:
                    item = await inbox.receive()
                    if not _print_line(_notification_json(item)):
                        break  # stdout was closed (listen ... | head -1)
                    received += not isinstance(item, Gap)
            nursery.cancel_scope.cancel()


def _notification_json(item: Any) -> str:
    """One JSON line per notification or Gap: the very line the ready-made Printer prints."""
    from .actors.printer import format_line

    return format_line(item, item.channel)


def _print_line(line: str) -> bool:
    """Print *line* to stdout, flushed; False once stdout is a closed pipe."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        _silence_stdout()
        return False
    return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's own flush at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# -- helpers -----------------------------------------------------------------------------------


def _load_config(path: str, dsn_option: str | None) -> BusConfig:
    """The checked config at *path*, with the DSN ``--dsn`` or ``PGBUS_DSN`` gives, if any."""
    config = load_config(path)
    if dsn_option is not None:
        return config.with_dsn(dsn_option, origin="--dsn")
    env_dsn = os.environ.get(ENV_DSN)
    if env_dsn:
        return config.with_dsn(env_dsn, origin=ENV_DSN)
    return config


def _dsn_for_client(
    dsn_option: str | None, config_path: str | None = None, *, accepts_config: bool = False
) -> str:
    """
    The DSN for notify and listen: ``--dsn``, else ``PGBUS_DSN``, else ``--config``'s
    ``[postgres] dsn``; checked, never guessed.
    """
    origin, dsn = "--dsn", dsn_option
    if dsn is None:
        origin, dsn = ENV_DSN, os.environ.get(ENV_DSN) or None
    if dsn is None and config_path is not None:
        dsn = load_config(config_path).postgres.dsn  # a broken file: its one-line error
        if dsn is None:
            raise UsageError(
                f"{config_path} has no [postgres] dsn (run would start an embedded PostgreSQL "
                f"of its own); pass --dsn or set {ENV_DSN}."
            )
        return dsn  # checked by load_config
    if dsn is None:
        # Only the commands that take --config suggest it.
        or_config = ", or name a config file with --config" if accepts_config else ""
        raise UsageError(
            "no PostgreSQL to connect to: pass --dsn postgresql://user@host/db or set "
            f"{ENV_DSN}{or_config}."
        )
    try:
        return check_dsn(dsn)
    except SettingError as exc:
        raise UsageError(f"{origin} {exc.rule}") from None


def _payload_from_stdin(limit: int) -> str:
    """
    PAYLOAD ``-``: all of stdin, one newline dropped; at most *limit* bytes (a notification's
    limit, or a durable message's with --durable).
    """
    data = sys.stdin.buffer.read(limit + 3)  # + room for the newline we drop
    if len(data) > limit + 2:
        where = "a durable message holds" if limit != MAX_PAYLOAD_BYTES else "PostgreSQL accepts"
        raise UsageError(
            f"the payload read from stdin is more than {limit + 2} bytes; {where} at most "
            f"{limit}. Send a reference (a row id) instead."
        )
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(
            f"the payload read from stdin is not valid UTF-8 ({data[:20]!r}...)."
        ) from None


def _checked_channel(name: str) -> str:
    try:
        return validate_channel_name(_checked_utf8(name, "CHANNEL"))
    except PgbusError as exc:
        raise UsageError(str(exc)) from None


def _checked_utf8(text: str, what: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 (got {text!r}).") from None
    return text


def _trio_run(
    function: Callable[[], Awaitable[None]],
    *,
    debug: bool = False,
    say_error: Callable[[str, BaseException | None], None] | None = None,
    handles_signals: bool = False,
) -> int:
    """
    Run *function* under Trio; a failure becomes one line on stderr and exit status 1.

    *say_error* (for ``--log-format json``) reports the failure instead, given the exception
    when ``debug`` wants its traceback. Unless *function* *handles_signals* itself (run,
    listen), it is a one-shot command: a stop signal ends it at once (one line, exit status
    128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM), and every lock wait of its
    statements is bounded (`_pg.COMMAND_LOCK_TIMEOUT`).
    """
    stopped_by: list[int] = []
    if not handles_signals:
        from ._pg import COMMAND_LOCK_TIMEOUT

        COMMAND_LOCK_TIMEOUT.set(_command_lock_timeout())
        function = partial(_stoppable, function, stopped_by)
    try:
        trio.run(function)
    except KeyboardInterrupt:  # SIGINT outside the part that handles it
        return 130
    except BaseException as exc:
        error = unwrap_group(exc, skip_cancelled=True)
        if isinstance(error, KeyboardInterrupt):
            return 130
        if not isinstance(error, Exception):
            raise
        if debug and say_error is None:
            traceback.print_exception(exc)
        traced = exc if debug else None
        say = say_error or (lambda message, _: _say_error(message))
        if isinstance(error, ConfigError):
            say(str(error), traced)
            return EXIT_USAGE
        if isinstance(error, PgbusError):
            say(str(error), traced)
        else:
            name = type(error).__name__
            detail = f"{name}: {error}" if str(error) else name
            hint = "" if debug else " (run with --log-level debug for the traceback)"
            say(f"unexpected failure: {detail}{hint}", traced)
        return EXIT_FAILURE
    if stopped_by:
        _say_error(f"stopped by {signal.Signals(stopped_by[0]).name}")
        return 128 + stopped_by[0]
    return EXIT_OK


async def _stoppable(function: Callable[[], Awaitable[None]], stopped_by: list[int]) -> None:
    """Run *function*; a stop signal (or one noted before) cancels it and is put in *stopped_by*."""
    with trio.open_signal_receiver(*stop_signals()) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                if _signals.early:
                    stopped_by.append(_signals.early[0])
                else:
                    async for signum in signals:
                        stopped_by.append(signum)
                        break
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            await function()
            nursery.cancel_scope.cancel()


def _command_lock_timeout() -> float:
    """Seconds a command waits for a lock: ``PGBUS_LOCK_TIMEOUT``, else 10."""
    from ._pg import ENV_LOCK_TIMEOUT

    text = os.environ.get(ENV_LOCK_TIMEOUT, "10")
    try:
        return _positive_seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{ENV_LOCK_TIMEOUT} {exc}.") from None


@contextlib.contextmanager
def _logging_to_stderr(level: str, log_format: str = "text") -> Iterator[None]:
    """
    Log to stderr while inside: as ``2026-11-22 15:00:00 pgbus.bridge WARNING message``, or
    one JSON object per line (`pgbus._logs.JsonFormatter`).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def _log_info(line: str) -> None:
    log.info("%s", line)


def _log_error(message: str, exc: BaseException | None) -> None:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    log.error("%s", redact_dsn(one_line), exc_info=exc)


def _say(line: str) -> None:
    print(f"pgbus: {line}", file=sys.stderr, flush=True)


def _say_error(message: str) -> None:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"pgbus: error: {redact_dsn(one_line)}", file=sys.stderr, flush=True)


# -- the cluster: status, ask, tell --------------------------------------------------------------

DEFAULT_ASK_TIMEOUT = 10.0


def _add_cluster_commands(commands: Any, prog: str) -> None:
    formatter = _Formatter
    status = commands.add_parser(
        "status",
        help="show the cluster: nodes, public actors, singletons",
        description="Show the processes of the cluster that share this PostgreSQL (live\n"
        "sessions only), their public actors and inbound channels, and each singleton\n"
        "with the node holding it.",
        epilog=f"example:\n  {prog} status --dsn postgresql://app@db/app --json",
        formatter_class=formatter,
    )
    _add_dsn(status, f"default: {ENV_DSN}")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(command_function=_status)

    for name, verb in (("ask", "ask"), ("tell", "tell")):
        command = commands.add_parser(
            name,
            help=f"{verb} a public actor of the cluster (JSON in"
            + (", JSON out)" if name == "ask" else ")"),
            description="Send the JSON message MESSAGE to the public actor ACTOR, wherever it\n"
            "runs in the cluster"
            + (", and print its reply as one JSON line." if name == "ask" else "."),
            epilog=f"examples:\n  {prog} {name} billing '{{\"invoice\": 42}}'\n"
            f"  {prog} {name} account --key 42 '{{\"amount\": 5}}'",
            formatter_class=formatter,
        )
        command.add_argument(
            "actor", metavar="ACTOR", help="the actor's name (with --key: a keyed actor's kind)"
        )
        command.add_argument("message", metavar="MESSAGE", help="a JSON value")
        command.add_argument(
            "--key",
            metavar="KEY",
            help="address the keyed actor (ACTOR, KEY): its message is stored in its mailbox",
        )
        _add_dsn(command, f"default: {ENV_DSN}")
        if name == "ask":
            command.add_argument(
                "--timeout",
                metavar="SECONDS",
                type=_positive_seconds,
                default=DEFAULT_ASK_TIMEOUT,
                help=f"give up after SECONDS (default: {DEFAULT_ASK_TIMEOUT:g})",
            )
        command.set_defaults(command_function=_ask if name == "ask" else _tell)


def _status(args: argparse.Namespace) -> int:
    dsn = _dsn_for_client(args.dsn)
    found: list[dict[str, Any]] = []

    async def read() -> None:
        from ._dashboard import read_overview  # the dashboard shows the very same data
        from ._pg import open_database

        async with (
            open_database(dsn, "pgbus") as database,
            database.connection("status") as connection,
        ):
            found.append(await read_overview(connection))

    with _logging_to_stderr("warning"):
        status = _trio_run(read)
    if status != EXIT_OK:
        return status
    (overview,) = found
    if args.json:
        _print_line(json.dumps(overview, ensure_ascii=False))
        return EXIT_OK
    for line in _status_lines(overview, describe_dsn(dsn)):
        if not _print_line(line):
            break
    return EXIT_OK


def _status_lines(overview: dict[str, Any], where: str) -> Iterator[str]:
    nodes = overview["nodes"]
    yield f"cluster at {where}: {len(nodes)} node{'' if len(nodes) == 1 else 's'}"
    for node in nodes:
        yield (
            f"node {node['name']!r}: host {node['host']}, pid {node['os_pid']}, "
            f"backend {node['pid']}, since {node['started']}"
        )
        yield f"  public actors: {', '.join(node['public']) or '-'}"
        if node["singletons"]:
            yield f"  singletons: {', '.join(node['singletons'])}"
        yield f"  inbound channels: {', '.join(map(repr, node['inbound'])) or '-'}"
    for singleton in overview["singletons"]:
        holder, foreign = singleton["holder"], singleton.get("foreign_holder")
        if holder:
            held = f"held by {holder!r}"
        elif foreign:
            held = f"held by {foreign}, which is not a node of the cluster"
        else:
            held = "held by nobody"
        candidates = ", ".join(map(repr, singleton["candidates"]))
        yield f"singleton {singleton['name']!r}: {held} (candidates: {candidates})"
    for kind in overview.get("entities") or ():
        hosts = ", ".join(
            f"{h['node']!r} {h['activations']} active / {h['shards']} shards" for h in kind["hosts"]
        )
        yield (
            f"entities {kind['kind']!r}: {kind['keys']} keys, {kind['waiting']} waiting, "
            f"{kind['dead']} dead; " + (f"hosted by {hosts}" if hosts else "hosted by no node")
        )
    for group in overview["durable"] or ():
        yield (
            f"durable {group['channel']!r} group {group['group']!r}: lag {group['lag']}, "
            f"in flight {group['in_flight']}, dead letters {group['dead_letters']}"
        )
    for schedule in overview.get("schedules", ()):
        rule = (
            f"cron {schedule['cron']!r} in {schedule['timezone']}"
            if schedule["cron"] is not None
            else f"every {schedule['every']:g}s"
        )
        yield (
            f"schedule {schedule['name']!r} -> {schedule['postgres']!r} ({rule}, missed "
            f"{schedule['missed']}): last slot {schedule['last_slot'] or '-'}, next slot "
            f"{schedule['next_slot'] or '-'}, "
            + (
                f"run by {schedule['runner'] or '-'}"
                if schedule.get("running", True)
                else f"not running (last run by {schedule['runner'] or '-'} at "
                f"{schedule['seen_at']})"
            )
        )
    for letter in overview["dead_letters"]:
        yield (
            f"dead letter {letter['id']} of {letter['channel']!r} group {letter['group']!r} "
            f"after {letter['attempts']} attempt(s): {letter['error'] or '(no reason recorded)'}"
        )


def _json_message(text: str) -> Any:
    """MESSAGE as strict JSON (what crosses between nodes), or one line saying what is wrong."""
    try:
        return decoder("json")("MESSAGE", _checked_utf8(text, "MESSAGE"))
    except CodecError as exc:
        detail = exc.detail.removeprefix("payload ")
        if detail.startswith("is not valid JSON"):
            detail += "; quote strings: '\"text\"'"
        raise UsageError(f"MESSAGE {detail}.") from None


def _ask(args: argparse.Namespace) -> int:
    message = _json_message(args.message)
    dsn = _dsn_for_client(args.dsn)
    replies: list[Any] = []

    async def ask() -> None:
        from ._bus import open_bus

        async with open_bus(dsn) as bus:
            if args.key is not None:
                entity = bus.entity(args.actor, args.key)
                replies.append(await entity.ask(message, timeout=args.timeout))
            else:
                replies.append(await bus.ask(args.actor, message, timeout=args.timeout))

    with _logging_to_stderr("warning"):
        status = _trio_run(ask)
    if status == EXIT_OK:
        _print_line(json.dumps(replies[0], ensure_ascii=False, separators=(",", ":")))
    return status


# -- the dashboard -------------------------------------------------------------------------------

ENV_DASHBOARD_TOKEN = "PGBUS_DASHBOARD_TOKEN"
DEFAULT_DASHBOARD_LISTEN = "127.0.0.1:8080"


def _add_dashboard_command(commands: Any, prog: str) -> None:
    from ._dashboard import DEFAULT_REFRESH

    dashboard = commands.add_parser(
        "dashboard",
        help="serve a live, read-only web page of the cluster",
        description="Serve a web page of the cluster that shares this PostgreSQL, refreshed\n"
        "live: nodes with their public actors, singletons with their holders, durable\n"
        "groups with lag, in-flight and dead letters (with their reasons). The same data\n"
        "as status --json, read on one connection at most every --refresh seconds for\n"
        "all viewers, only while a page is open. Needs the 'metrics' extra. Runs until\n"
        "Ctrl-C or SIGTERM. A bus run with [metrics] serves the same page on /.",
        epilog=f"examples:\n  {prog} dashboard --dsn postgresql://app@db/app"
        " --listen 127.0.0.1:8080\n"
        f"  {ENV_DASHBOARD_TOKEN}=s3cret {prog} dashboard --allow-actions",
        formatter_class=_Formatter,
    )
    _add_dsn(dashboard, f"default: {ENV_DSN}, else --config's [postgres] dsn")
    _add_config(dashboard)
    dashboard.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_DASHBOARD_LISTEN,
        help=f"where to serve the page (default: {DEFAULT_DASHBOARD_LISTEN}; port 0 picks one)",
    )
    dashboard.add_argument(
        "--refresh",
        metavar="SECONDS",
        type=_refresh_seconds,
        default=DEFAULT_REFRESH,
        help=f"read the database at most every SECONDS (default: {DEFAULT_REFRESH:g})",
    )
    dashboard.add_argument(
        "--allow-actions",
        action="store_true",
        help="let the page retry and purge dead letters, given the token in "
        f"{ENV_DASHBOARD_TOKEN} (one is made up and printed if it is unset)",
    )
    dashboard.set_defaults(command_function=_dashboard)


def _refresh_seconds(text: str) -> float:
    from ._dashboard import check_refresh

    try:
        return check_refresh(float(text))
    except ValueError as exc:
        message = str(exc) if "must be" in str(exc) else f"must be a number (got {text!r})"
        raise argparse.ArgumentTypeError(message) from None


def _dashboard(args: argparse.Namespace) -> int:
    import secrets

    from ._dashboard import serve_dashboard

    dsn = _dsn_for_client(args.dsn, args.config, accepts_config=True)
    application_name = "pgbus"
    if args.config is not None:
        application_name = load_config(args.config).postgres.application_name
    token = None
    if args.allow_actions:
        token = os.environ.get(ENV_DASHBOARD_TOKEN) or None
        if token is None:
            token = secrets.token_urlsafe(18)
            _say(f"dashboard actions token (set {ENV_DASHBOARD_TOKEN} to choose one): {token}")

    async def serve() -> None:
        with trio.open_signal_receiver(*stop_signals()) as signals:
            if _signals.early:
                return
            async with trio.open_nursery() as nursery:
                url = await nursery.start(
                    partial(
                        serve_dashboard,
                        dsn,
                        args.listen,
                        refresh=args.refresh,
                        actions_token=token,
                        application_name=application_name,
                    )
                )
                mode = "actions allowed with the token" if token else "read-only"
                _say(f"dashboard of {describe_dsn(dsn)} on {url} ({mode}); stop with Ctrl-C")
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

    with _logging_to_stderr("warning"):
        return _trio_run(serve, handles_signals=True)


def _tell(args: argparse.Namespace) -> int:
    message = _json_message(args.message)
    dsn = _dsn_for_client(args.dsn)

    async def tell() -> None:
        from ._bus import open_bus

        async with open_bus(dsn) as bus:
            if args.key is not None:
                await bus.entity(args.actor, args.key).tell(message)
            else:
                await bus.tell(args.actor, message)

    with _logging_to_stderr("warning"):
        status = _trio_run(tell)
    if status == EXIT_OK:
        whom = repr(args.actor) if args.key is None else f"{args.actor}/{args.key}"
        _say(f"told {whom} at {describe_dsn(dsn)}")
    return status
