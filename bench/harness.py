"""
``python -m bench``: start PostgreSQL, run every (workload, peer) pair, print medians and ratios.

Each run is a fresh peer process (`bench.runner`) on PostgreSQL channels of its own. Runs are
interleaved (for each repeat, every peer in turn) so that drift in the machine's speed spreads
over all peers instead of favouring one. A failed or stuck run becomes an error in its cell and
the harness goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from . import report
from .peers import PEERS
from .runner import RunOutcome, run_peer
from .server import Monitor, long_transaction, provide_postgres
from .workloads import REFERENCE, WORKLOADS, Sizes, Workload


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark pgbus against asyncpg (asyncio, uvloop), psycopg 3 and naive Trio.",
    )
    parser.add_argument("--dsn", help="use this PostgreSQL instead of starting an embedded one")
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell; medians are shown")
    parser.add_argument("--only", help=f"workloads to run, e.g. W1,W3 (of {','.join(WORKLOADS)})")
    parser.add_argument("--peers", help=f"peers to run (of {','.join(PEERS)})")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every size, e.g. 0.01")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a run may wait")
    parser.add_argument("--json", type=Path, help="also save every run and the medians here")
    parser.add_argument("--verbose", action="store_true", help="show a failed peer's stderr")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be a positive integer (got {args.repeat}).")
    if not args.scale > 0:
        parser.error(f"--scale must be a positive number (got {args.scale}).")
    if not args.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds (got {args.timeout}).")
    args.only = _names(parser, "--only", args.only, list(WORKLOADS), upper=True)
    args.peers_given = args.peers is not None
    args.peers = _names(parser, "--peers", args.peers, list(PEERS), upper=False)
    return args


def _names(
    parser: argparse.ArgumentParser, option: str, value: str | None, known: list[str], upper: bool
) -> list[str]:
    if value is None:
        return known
    names = [n.strip().upper() if upper else n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"{option} must name some of {', '.join(known)} (got {value!r}).")
    # Keep the canonical order, so the table reads the same however the option was written.
    return [n for n in known if n in names]


def peers_for(workload: Workload, args: argparse.Namespace) -> list[str]:
    """The peers that run *workload*: those asked for, or the workload's default set."""
    peers = list(args.peers)
    if workload.peers is not None:
        peers = [p for p in peers if p in workload.peers]
    if args.peers_given or workload.default_peers is None:
        return peers
    return [p for p in peers if p in workload.default_peers]


@attrs.define
class Results:
    """Everything the runs produced, in the order they ran."""

    outcomes: dict[tuple[str, str], list[RunOutcome]] = attrs.Factory(dict)
    """Per (workload, peer), one outcome per repeat."""
    records: list[dict[str, Any]] = attrs.Factory(list)
    warnings: list[str] = attrs.Factory(list)
    interrupted: bool = False


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workloads = [WORKLOADS[name] for name in args.only]
    sizes = {w.name: w.sizes(args.scale) for w in workloads}
    with provide_postgres(args.dsn) as server, contextlib.closing(Monitor(server.dsn)) as monitor:
        meta = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": report.machine(),
            "python": platform.python_version(),
            "postgresql": monitor.server_version(),
            "server": server.where,
            "repeat": args.repeat,
            "scale": args.scale,
        }
        print(_header(meta), flush=True)
        results = run_all(args, server.dsn, monitor, workloads, sizes)

    cells = {
        key: report.summarize(WORKLOADS[key[0]], runs) for key, runs in results.outcomes.items()
    }
    columns = [p for p in args.peers if any(key[1] == p for key in cells)]
    print()
    print(report.table(workloads, sizes, columns, cells))
    print()
    for line in _notes(workloads, args, cells, results):
        print(line)
    if args.json is not None:
        _save(args.json, meta, sizes, results.records, cells)
        print(f"saved: {args.json}")
    if results.interrupted:
        return 130
    failed = any(o.status == "error" for runs in results.outcomes.values() for o in runs)
    return 1 if failed or results.warnings else 0


def run_all(
    args: argparse.Namespace,
    dsn: str,
    monitor: Monitor,
    workloads: Sequence[Workload],
    sizes: dict[str, Sizes],
) -> Results:
    """
    Run every (workload, peer) pair *args.repeat* times; Ctrl-C stops early, keeping what ran.

    After each run, the peer's backends must be gone: any left behind is terminated and
    reported, so one sloppy run cannot slow down the next.
    """
    results = Results()
    try:
        for workload in workloads:
            for repeat in range(1, args.repeat + 1):
                for peer in peers_for(workload, args):
                    cell = results.outcomes.setdefault((workload.name, peer), [])
                    if cell and cell[-1].status == "unavailable":
                        continue  # it will not become available on the next repeat
                    run = len(results.records)
                    outcome = _run_one(args, dsn, workload, sizes[workload.name], peer, run)
                    print(
                        f"  [{workload.name} {repeat}/{args.repeat}] {peer:<16} "
                        f"{_brief(workload, outcome)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    cell.append(outcome)
                    results.records.append(_record(workload, peer, repeat, outcome))
                    left = monitor.leftover_backends()
                    if left:
                        results.warnings.append(
                            f"{workload.name} {peer} run {repeat} left backends behind "
                            f"(terminated): {', '.join(left)}"
                        )
    except KeyboardInterrupt:
        results.interrupted = True
        print("interrupted: showing the runs that finished", file=sys.stderr)
    return results


def _run_one(
    args: argparse.Namespace, dsn: str, workload: Workload, sizes: Sizes, peer: str, run: int
) -> RunOutcome:
    # A channel name per run, so a late notification from one run never counts in another.
    channel = f"bench_{workload.name.lower()}_{os.getpid()}_{run}"
    if workload.name == "W7L":
        outcome = _run_w7l(args, dsn, sizes, peer, channel)
    elif workload.name == "W9A":
        outcome = _run_w9a(args, dsn, sizes, peer, channel)
    else:
        outcome = run_peer(
            PEERS[peer], workload.name, sizes, dsn=dsn, channel=channel, timeout=args.timeout
        )
    if args.verbose and outcome.status == "error" and outcome.stderr:
        print(outcome.stderr, file=sys.stderr, flush=True)
    return outcome


def _run_w7l(
    args: argparse.Namespace, dsn: str, sizes: Sizes, peer: str, channel: str
) -> RunOutcome:
    """
    W7, then W7 again while a writing transaction is open in another database: the second
    run's latencies, with the first's and their ratios (``w7_p50_us``, ``ratio_p50``, ...).
    """
    base = run_peer(
        PEERS[peer], "W7", sizes, dsn=dsn, channel=channel + "_w7", timeout=args.timeout
    )
    if not base.ok:
        return base
    with long_transaction(dsn):
        outcome = run_peer(PEERS[peer], "W7", sizes, dsn=dsn, channel=channel, timeout=args.timeout)
    if outcome.ok:
        for key in ("p50_us", "p99_us"):
            outcome.result[f"w7_{key}"] = base.result[key]
            outcome.result[f"ratio_{key[:3]}"] = outcome.result[key] / base.result[key]
    return outcome


def _run_w9a(
    args: argparse.Namespace, dsn: str, sizes: Sizes, peer: str, channel: str
) -> RunOutcome:
    """
    W8 (the named-actor ask across processes), then W9A (the keyed ask) at the same sizes: the
    second run's latencies, with the first's and their ratios (``w8_p50_us``, ``ratio_p50``).
    """
    base = run_peer(
        PEERS[peer], "W8", sizes, dsn=dsn, channel=channel + "_w8", timeout=args.timeout
    )
    if not base.ok:
        return base
    outcome = run_peer(PEERS[peer], "W9A", sizes, dsn=dsn, channel=channel, timeout=args.timeout)
    if outcome.ok:
        for key in ("p50_us", "p99_us"):
            outcome.result[f"w8_{key}"] = base.result[key]
            outcome.result[f"ratio_{key[:3]}"] = outcome.result[key] / base.result[key]
    return outcome


def _brief(workload: Workload, outcome: RunOutcome) -> str:
    if outcome.status == "unavailable":
        return f"n/a: {outcome.message}"
    if not outcome.ok:
        return f"ERROR: {outcome.message}"
    r = outcome.result
    if workload.name == "W9A" and "ratio_p50" in r:
        return (
            f"p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs (W8 just before: "
            f"{r['w8_p50_us']:.0f} / {r['w8_p99_us']:.0f} µs; {r['ratio_p50']:.2f}x / "
            f"{r['ratio_p99']:.2f}x)"
        )
    if workload.name == "W9C" and "warm_p50_us" in r:
        return (
            f"cold p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs; the same keys warm: "
            f"p50 {r['warm_p50_us']:.0f} µs (activation: {r['activation_p50_us']:+.0f} µs p50)"
        )
    if workload.metric == "latency" and "ratio_p50" in r:
        return (
            f"p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs (W7 just before: "
            f"{r['w7_p50_us']:.0f} / {r['w7_p99_us']:.0f} µs; {r['ratio_p50']:.2f}x / "
            f"{r['ratio_p99']:.2f}x)"
        )
    if workload.metric == "latency":
        return f"p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs"
    if workload.metric == "memory":
        return f"RSS +{r['rss_growth_mb']:.1f} MB, {r['msg_per_s']:.0f} msg/s"
    return f"{r['msg_per_s']:.0f} msg/s ({r['seconds']:.2f}s)"


def _header(meta: dict[str, Any]) -> str:
    return (
        f"pgbus bench | {meta['date']} | {meta['machine']} | Python {meta['python']} | "
        f"PostgreSQL {meta['postgresql']} ({meta['server']}) | "
        f"medians of {meta['repeat']} | scale {meta['scale']:g}"
    )


def _notes(
    workloads: Sequence[Workload],
    args: argparse.Namespace,
    cells: dict[tuple[str, str], dict[str, Any]],
    results: Results,
) -> list[str]:
    notes = [
        f"Ratios are against {PEERS[REFERENCE].label} in this run (W6, W7: against "
        f"{PEERS['pgqueuer'].label}; W9: against {PEERS['dbos'].label}; W10: against "
        f"{PEERS['pgbus'].label}): higher is better "
        "for msg/s, lower for µs. W5 shows RSS growth of the consuming process (lower is "
        "better)."
    ]
    for reference in dict.fromkeys(w.reference for w in workloads):
        if reference not in args.peers:
            notes.append(f"No ratios: the reference, {reference}, was not among --peers.")
    for workload in workloads:
        if workload.default_peers is not None and not args.peers_given:
            labels = ", ".join(PEERS[p].label for p in workload.default_peers)
            notes.append(
                f"{workload.name} ran only for {labels} (the others implement it: "
                "name them with --peers to include them)."
            )
    for (workload_name, peer), cell in cells.items():
        if "unavailable" in cell:
            notes.append(f"n/a: {peer} {workload_name}: {cell['unavailable']}")
        for error in dict.fromkeys(cell["errors"]):
            count = cell["errors"].count(error)
            notes.append(f"error: {workload_name} {peer} ({count}/{cell['runs']} runs): {error}")
    limit, ours = cells.get(("W9", "keyed_fifo")), cells.get(("W9", "pgbus"))
    if limit and ours and "msg_per_s" in limit and "msg_per_s" in ours:
        notes.append(
            f"W9: pgbus {ours['msg_per_s'] / limit['msg_per_s']:.2f}x the hand-written per-key "
            "FIFO (the limit) in this run."
        )
    for (workload_name, peer), runs in results.outcomes.items():
        ratios = [o.result for o in runs if o.ok and "ratio_p50" in o.result]
        if workload_name == "W9A" and ratios:
            p50 = statistics.median(r["ratio_p50"] for r in ratios)
            p99 = statistics.median(r["ratio_p99"] for r in ratios)
            notes.append(
                f"W9A {peer}: the keyed ask's p50 {p50:.2f}x and p99 {p99:.2f}x W8's (the "
                f"named-actor ask) run just before it (medians of {len(ratios)}; target p50 "
                "<= 1.2x)."
            )
        cold = [o.result for o in runs if o.ok and "activation_p50_us" in o.result]
        if workload_name == "W9C" and cold:
            warm = statistics.median(r["warm_p50_us"] for r in cold)
            extra = statistics.median(r["activation_p50_us"] for r in cold)
            notes.append(
                f"W9C {peer}: each key asked again right after, once active: p50 {warm:.0f} µs; "
                f"activating a key (loading its state, claiming it) added {extra:+.0f} µs to "
                f"its ask (median of the pairs' differences; medians of {len(cold)} runs; "
                "target: activation p50 <= 2 ms)."
            )
        handled_again = [
            o.result["handled_again"] for o in runs if o.ok and o.result.get("handled_again")
        ]
        if handled_again:
            notes.append(
                f"{workload_name} {peer}: handlers were called again for already handled "
                f"messages ({', '.join(map(str, handled_again))} in the runs that had any); "
                "their effects committed once (the keys' counts checked)."
            )
        on_time = [o for o in runs if o.ok and "early" in o.result]
        if workload_name == "W10" and on_time:
            notes.append(
                f"W10 {peer}: {sum(o.result['early'] for o in on_time)} messages handled early "
                f"in {len(on_time)} run(s) (one early message fails its run)."
            )
        if workload_name == "W7L" and ratios:
            p50 = statistics.median(r["ratio_p50"] for r in ratios)
            p99 = statistics.median(r["ratio_p99"] for r in ratios)
            notes.append(
                f"W7L {peer}: with a writing transaction open in another database, p50 "
                f"{p50:.2f}x and p99 {p99:.2f}x W7 run just before it (medians of "
                f"{len(ratios)}; target within 1.5x)."
            )
    notes += [f"warning: {w}" for w in results.warnings]
    if results.interrupted:
        notes.append("interrupted: the table holds only the runs that finished.")
    return notes


def _record(workload: Workload, peer: str, repeat: int, outcome: RunOutcome) -> dict[str, Any]:
    return {
        "workload": workload.name,
        "peer": peer,
        "repeat": repeat,
        "status": outcome.status,
        "message": outcome.message,
        "result": outcome.result,
    }


def _save(
    path: Path,
    meta: dict[str, Any],
    sizes: dict[str, Sizes],
    records: list[dict[str, Any]],
    cells: dict[tuple[str, str], dict[str, Any]],
) -> None:
    document = {
        "meta": meta,
        "reference": REFERENCE,
        "sizes": {name: attrs.asdict(s) for name, s in sizes.items()},
        "medians": [{"workload": w, "peer": p, **cell} for (w, p), cell in cells.items()],
        "runs": records,
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
