"""
CI's smoke of the installed wheel, run by the wheel's own venv from a folder outside the checkout.

Usage: python smoke_installed.py EXAMPLES_DIR DSN

Checks what a user of ``pip install pgbus-*.whl`` meets first: every public name imports, the
command runs, ``check`` accepts the examples, a durable message goes round trip, a cluster ask
reaches an actor in another process, and a keyed actor answers from another process. Exits
non-zero with one line on the first failure.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

import pgbus


def step(text: str) -> None:
    print(f"smoke: {text}", flush=True)


def imports() -> None:
    where = Path(pgbus.__file__).resolve()
    assert "site-packages" in where.parts, f"pgbus imported from {where}, not the installed wheel"
    for name in pgbus.__all__:
        getattr(pgbus, name)
    for module in pkgutil.walk_packages(pgbus.__path__, "pgbus."):
        if module.name != "pgbus.testing":  # needs pytest: loaded below through the plugin
            __import__(module.name)
    step(f"{len(pgbus.__all__)} public names and every module import from {where.parent}")


def command(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pgbus", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"pgbus {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


async def durable_round_trip(dsn: str) -> None:
    async with pgbus.open_bus(dsn) as bus:
        bus.add_channel("jobs_in", capacity=10)
        await bus.bridge_in("smoke_jobs", "jobs_in", durable=True, group="smoke")
        command("notify", "smoke_jobs", '{"n": 1}', "--durable", "--dsn", dsn)
        with trio.fail_after(30):
            message = await bus.channel("jobs_in").receive()
        assert message.payload == '{"n": 1}', message
    step("a durable message went round trip (pgbus notify --durable -> bridge_in)")


async def cluster_ask(dsn: str, examples: Path) -> None:
    await _ask_a_running_config(dsn, examples, "cluster.toml", _greet)
    step("a cluster ask reached the greeter in another process")


async def keyed_ask(dsn: str, examples: Path) -> None:
    await _ask_a_running_config(dsn, examples, "bank.toml", _deposit)
    step("a keyed actor (examples/bank.toml) answered from another process")


async def _greet(bus: pgbus.Bus) -> None:
    answer = await bus.ask("greeter", "Ada", timeout=10)
    assert "Ada" in str(answer), answer


async def _deposit(bus: pgbus.Bus) -> None:
    key = f"smoke-{os.getpid()}"
    account = bus.entity("account", key)
    await account.tell({"op": "deposit", "amount": 5})
    answer = await account.ask({"op": "deposit", "amount": 2}, timeout=20)
    assert answer["balance"] == 7, answer


async def _ask_a_running_config(dsn: str, examples: Path, config: str, ask: Any) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pgbus", "run", config, "--dsn", dsn],
        cwd=examples,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with trio.fail_after(60):
            seen = b""
            assert process.stdout is not None
            while b"pgbus: running" not in seen:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise SystemExit(f"pgbus run exited before running: {seen.decode()}")
                seen += chunk
            async with pgbus.open_bus(dsn) as bus:
                await ask(bus)
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()


def main() -> None:
    examples, dsn = Path(sys.argv[1]), sys.argv[2]
    imports()
    assert "usage" in command("--help").lower()
    step("python -m pgbus --help works")
    for config in sorted(examples.glob("*.toml")):
        command("check", config.name, cwd=examples)
    step("check accepts every example")
    trio.run(durable_round_trip, dsn)
    trio.run(cluster_ask, dsn, examples)
    trio.run(keyed_ask, dsn, examples)
    plugin = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(examples / "pytest_plugin")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PGBUS_TEST_DSN": dsn},
    )
    if plugin.returncode != 0:
        raise SystemExit(f"the pytest plugin's example failed: {plugin.stdout[-2000:]}")
    step("the pytest plugin's example passes: " + plugin.stdout.strip().splitlines()[-1])
    print(json.dumps({"smoke": "passed"}))


if __name__ == "__main__":
    main()
