"""The durable examples, run as the README tells a user to run them (tests/test_examples.py)."""

from __future__ import annotations

import json
import signal
import sys

import trio
from test_cli import ROOT, pgbus_env, run_to_completion, running

JOBS = 40


async def test_work_queue_is_shared_by_two_processes(pg_dsn: str) -> None:
    """Two `pgbus run examples/work_queue.toml`: every job is printed once, by one of them."""
    env = pgbus_env(PGBUS_DSN=pg_dsn)
    first = await run_to_completion("notify", "jobs", "warm-up", "--durable", env=env)
    assert first.returncode == 0, first.stderr
    async with (
        running("run", "examples/work_queue.toml", env=env) as one,
        running("run", "examples/work_queue.toml", env=env) as two,
    ):
        await one.expect("stderr", "pgbus: running;")
        await two.expect("stderr", "pgbus: running;")
        for i in range(JOBS):
            sent = await run_to_completion("notify", "jobs", f"job {i}", "--durable", env=env)
            assert sent.returncode == 0, sent.stderr
            assert sent.stderr.decode().startswith("pgbus: stored ")
        with trio.fail_after(30):
            while True:  # the two processes' stdout lines, collected as they come
                lines = one.lines["stdout"] + two.lines["stdout"]
                if sum('"payload":"job ' in line for line in lines) >= JOBS:
                    break
                await trio.sleep(0.05)
        assert await one.stop(signal.SIGINT) == 0
        assert await two.stop(signal.SIGINT) == 0
    jobs = [
        json.loads(line)["payload"]
        for line in one.lines["stdout"] + two.lines["stdout"]
        if '"payload":"job ' in line
    ]
    assert sorted(jobs) == sorted(f"job {i}" for i in range(JOBS))


async def test_exactly_once_example(pg_dsn: str) -> None:
    """examples/exactly_once.py: payment 3 fails once, is retried, and every row exists once."""
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / "exactly_once.py")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=pgbus_env(PGBUS_DSN=pg_dsn),
            cwd=ROOT,
        )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert "payment 3: attempt 1 failed, rolled back" in lines
    assert "payment 3: recorded (attempt 2)" in lines
    assert lines[-1] == "rows: [1, 2, 3, 4, 5]"
    assert result.stderr == b""  # a library logs nowhere until the program configures logging
