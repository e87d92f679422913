"""The benchmark, at tiny sizes, so that it cannot rot: every peer and workload must still run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent


async def test_bench_runs_every_peer_and_workload_at_tiny_scale(pg_dsn: str, tmp_path) -> None:
    """`python -m bench --scale 0.01` exits 0 with a result for every cell of the table."""
    results = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--dsn", pg_dsn, "--scale", "0.01", "--repeat", "1"]
    command += ["--peers", "asyncpg_asyncio,asyncpg_uvloop,psycopg,naive_trio,pgbus"]
    command += ["--json", str(results), "--timeout", "60", "--only", "W1,W2,W3,W4,W5,W8,W8C"]
    with trio.fail_after(300):
        done = await trio.run_process(command, cwd=ROOT, capture_stdout=True, check=False)
    output = done.stdout.decode()
    assert done.returncode == 0, output
    assert "| W1 inbound burst" in output
    cells = json.loads(results.read_text())["medians"]
    pgbus_cells = {cell["workload"] for cell in cells if cell["peer"] == "pgbus"}
    assert pgbus_cells == {"W1", "W2", "W3", "W4", "W5", "W8", "W8C"}
    # W8 and W8C are written for asyncpg (asyncio, uvloop) and pgbus; the others say "n/a".
    unavailable = {(c["workload"], c["peer"]) for c in cells if "unavailable" in c}
    assert unavailable == {(w, p) for w in ("W8", "W8C") for p in ("psycopg", "naive_trio")}
    failed = [(c["workload"], c["peer"], c["errors"]) for c in cells if c["errors"]]
    assert failed == []


async def test_bench_runs_the_durable_workloads_at_tiny_scale(pg_dsn: str, tmp_path) -> None:
    """
    W6, W7 and W10 at --scale 0.01: every durable peer completes, and checks its messages (W10:
    pgqueuer's and procrastinate's scheduled jobs and pgbus, 100 delays within 0.1 s, none early).
    """
    results = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--dsn", pg_dsn, "--scale", "0.01", "--repeat", "1"]
    command += ["--only", "W6,W7,W10", "--peers", "pgqueuer,procrastinate,bare_queue,pgbus"]
    command += ["--json", str(results), "--timeout", "60"]
    with trio.fail_after(300):
        done = await trio.run_process(command, cwd=ROOT, capture_stdout=True, check=False)
    output = done.stdout.decode()
    assert done.returncode == 0, output
    document = json.loads(results.read_text())
    cells = document["medians"]
    assert {(c["workload"], c["peer"]) for c in cells} == {
        (w, p) for w in ("W6", "W7") for p in ("pgqueuer", "procrastinate", "bare_queue", "pgbus")
    } | {("W10", p) for p in ("pgqueuer", "procrastinate", "pgbus")}
    failed = [(c["workload"], c["peer"], c["errors"]) for c in cells if c["ok_runs"] != c["runs"]]
    assert failed == []
    w10 = {r["peer"]: r["result"] for r in document["runs"] if r["workload"] == "W10"}
    counts = {peer: (result["messages"], result["early"]) for peer, result in w10.items()}
    assert counts == dict.fromkeys(("pgqueuer", "procrastinate", "pgbus"), (100, 0))


async def test_bench_runs_the_keyed_workloads_at_tiny_scale(pg_dsn: str, tmp_path) -> None:
    """W9 (every keyed peer), W9A and W9C at --scale 0.01 complete and check every key's state."""
    results = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--dsn", pg_dsn, "--scale", "0.01", "--repeat", "1"]
    command += ["--only", "W9,W9A,W9C", "--peers", "dbos,keyed_fifo,pgbus"]
    command += ["--json", str(results), "--timeout", "120"]
    with trio.fail_after(600):
        done = await trio.run_process(command, cwd=ROOT, capture_stdout=True, check=False)
    output = done.stdout.decode()
    assert done.returncode == 0, output
    assert "| W9 keyed throughput" in output
    document = json.loads(results.read_text())
    cells = document["medians"]
    assert {(c["workload"], c["peer"]) for c in cells} == {
        ("W9", "dbos"),
        ("W9", "keyed_fifo"),
        ("W9", "pgbus"),
        ("W9A", "pgbus"),
        ("W9C", "pgbus"),
    }
    failed = [(c["workload"], c["peer"], c["errors"]) for c in cells if c["ok_runs"] != c["runs"]]
    assert failed == []
    runs = {(r["workload"], r["peer"]): r["result"] for r in document["runs"]}
    # W9A carries the W8 run just before it, W9C the same keys asked again once warm.
    assert runs[("W9A", "pgbus")]["w8_p50_us"] > 0
    assert runs[("W9C", "pgbus")]["warm_p50_us"] > 0


async def test_the_round_trip_traces_still_find_every_stage(pg_dsn: str) -> None:
    """The trace commands wrap or mimic pgbus internals: they must still match them."""
    w1 = [
        sys.executable,
        "-m",
        "bench.trace_w1",
        "--dsn",
        pg_dsn,
        "--messages",
        "500",
        "--repeat",
        "1",
    ]
    w3 = [sys.executable, "-m", "bench.trace_w3", "--dsn", pg_dsn, "--trips", "50"]
    w8 = [sys.executable, "-m", "bench.trace_w8", "--dsn", pg_dsn, "--asks", "50"]
    with trio.fail_after(120):
        traces = [await trio.run_process(c, cwd=ROOT, capture_stdout=True) for c in (w1, w3, w8)]
    w1_out, w3_out, w8_out = (t.stdout.decode() for t in traces)
    for stage in ("adapter", "+ Notification", "+ channel", "bus", "garbage collections"):
        assert stage in w1_out, w1_out
    for stage in (
        "ping: sender wrote the statement",
        "ping: notification at the sink",
        "responder handles",
        "pong: notification at the sink",
        "main task has the pong",
    ):
        assert stage in w3_out, w3_out
    for stage in ("A: request written", "B: actor's handle runs", "B: reply written"):
        assert stage in w8_out, w8_out
