"""Running ``python -m pgbus ...`` as a real subprocess, its output collected line by line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

ROOT = Path(__file__).parent.parent


def pgbus_env(**extra: str) -> dict[str, str]:
    """This process's environment without PGBUS_DSN (so nothing leaks in), plus *extra*."""
    env = {key: value for key, value in os.environ.items() if key != "PGBUS_DSN"}
    return env | extra


class Pgbus:
    """A running ``python -m pgbus ...``; its stdout and stderr lines, collected as they come."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._read = {"stdout": 0, "stderr": 0}
        self._open = {"stdout": True, "stderr": True}
        self._changed = trio.Event()

    async def _pump(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        while chunk := await stream.receive_some():
            *complete, pending = (pending + chunk).split(b"\n")
            self.lines[name] += [line.decode() for line in complete]
            self._wake()
        if pending:
            self.lines[name].append(pending.decode())
        self._open[name] = False
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def output(self) -> str:
        return "\n".join(
            [
                "--- stdout ---",
                *self.lines["stdout"],
                "--- stderr ---",
                *self.lines["stderr"],
            ]
        )

    async def expect(self, name: str, needle: str, *, timeout: float = 30) -> str:
        """The next line of *name* (stdout/stderr) containing *needle*; fails after *timeout*."""
        try:
            with trio.fail_after(timeout):
                while True:
                    lines = self.lines[name]
                    for index in range(self._read[name], len(lines)):
                        if needle in lines[index]:
                            self._read[name] = index + 1
                            return lines[index]
                    self._read[name] = len(lines)
                    if not self._open[name]:
                        break
                    await self._changed.wait()
        except trio.TooSlowError:
            pass
        raise AssertionError(f"no {name} line containing {needle!r}:\n{self.output()}")

    async def stop(self, signum: int, *, timeout: float = 5) -> int:
        """Send *signum*; the exit status, which must come within *timeout* seconds."""
        self.process.send_signal(signum)
        return await self.wait(timeout=timeout)

    async def wait(self, *, timeout: float) -> int:
        try:
            with trio.fail_after(timeout):
                status = await self.process.wait()
                while any(self._open.values()):
                    await self._changed.wait()
        except trio.TooSlowError:
            if self.process.returncode is None:  # where it is stuck (pgbus run: faulthandler)
                self.process.send_signal(signal.SIGUSR1)
                with trio.move_on_after(2):  # what it prints meanwhile (the dump)
                    while True:
                        await self._changed.wait()
            raise AssertionError(f"still running after {timeout:g}s:\n{self.output()}") from None
        return status


@asynccontextmanager
async def running(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> AsyncIterator[Pgbus]:
    """
    Start ``python -m pgbus *args*`` (after *prefix*: ``("nohup",)``); on exit, stop it
    (SIGTERM, then SIGKILL) if it runs.
    """
    process = await trio.lowlevel.open_process(
        [*prefix, sys.executable, "-m", "pgbus", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=pgbus_env() if env is None else env,
        cwd=ROOT,
    )
    pgbus = Pgbus(process)
    async with trio.open_nursery() as nursery:
        assert process.stdout is not None
        assert process.stderr is not None
        nursery.start_soon(pgbus._pump, "stdout", process.stdout)
        nursery.start_soon(pgbus._pump, "stderr", process.stderr)
        try:
            yield pgbus
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()  # SIGTERM first: an embedded server must not be orphaned
                    with trio.move_on_after(15):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


async def run_to_completion(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "pgbus", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=pgbus_env() if env is None else env,
            cwd=ROOT,
        )
