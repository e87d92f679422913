"""
A real PgBouncer (Debian's ``pgbouncer``) in front of the test server, for the pooler tests.

`run_pgbouncer(dsn, mode)` starts one on a free port with PgBouncer's default settings apart
from what a deployment must set (where to listen, the server, ``pool_mode``, trust auth for the
test's roles), waits until it accepts connections, and stops it on exit. When the tests run as
root it runs as the owner of the server's socket folder, or ``postgres`` (PgBouncer refuses to
run as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from conftest import require_system_tool
from proxy import via

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_of(dsn: str) -> tuple[str, int, str, str]:
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "127.0.0.1"
    port = int(query.get("port") or parts.port or 5432)
    return host, port, unquote(parts.path.lstrip("/")) or "postgres", parts.username or "postgres"


@contextmanager
def run_pgbouncer(dsn: str, mode: str, *, users: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield *dsn* rewritten to go through a fresh PgBouncer in *mode* (session | transaction)."""
    require_system_tool(PGBOUNCER, "pgbouncer")
    host, port, database, user = _server_of(dsn)
    listen = _free_port()
    folder = Path(tempfile.mkdtemp(prefix="pgbus-pgbouncer-"))
    folder.chmod(0o755)
    names = {user, *users}
    (folder / "userlist.txt").write_text("".join(f'"{name}" ""\n' for name in sorted(names)))
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{database} = host={host} port={port} dbname={database}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {listen}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {folder / 'userlist.txt'}\n"
        f"pool_mode = {mode}\n"
        f"logfile = {folder / 'pgbouncer.log'}\n"
    )
    for file in folder.iterdir():
        file.chmod(0o644)
    command = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        # As the user that owns the server's socket folder (an embedded server's is private),
        # else as postgres.
        owner = pwd.getpwuid(os.stat(host).st_uid) if host.startswith("/") else None
        user_entry = owner if owner and owner.pw_uid != 0 else pwd.getpwnam("postgres")
        os.chown(folder, user_entry.pw_uid, user_entry.pw_gid)
        command[1:1] = ["-u", user_entry.pw_name]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_accepting(listen, process, folder)
        yield via(dsn, listen)
    except BaseException:
        print(_log(folder))  # shown by pytest with the failure
        raise
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_accepting(port: int, process: subprocess.Popen[bytes], folder: Path) -> None:
    """Block until PgBouncer accepts a TCP connection (bounded: 10 s), or fail with its log."""
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited {process.returncode}: {_log(folder)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # nothing to wait on but the port itself
    raise RuntimeError(f"pgbouncer did not accept connections on port {port}: {_log(folder)}")


def _log(folder: Path) -> str:
    log = folder / "pgbouncer.log"
    return log.read_text() if log.exists() else "(no log)"
