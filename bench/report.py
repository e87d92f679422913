"""Medians, ratios against the reference, and the results table (Markdown, so it pastes)."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

from .peers import PEERS
from .runner import RunOutcome
from .workloads import Sizes, Workload

TIMES = "\N{MULTIPLICATION SIGN}"

METRICS = {
    "throughput": ("msg_per_s",),
    "latency": ("p50_us", "p99_us"),
    "memory": ("rss_growth_mb",),
}


def summarize(workload: Workload, outcomes: Sequence[RunOutcome]) -> dict[str, Any]:
    """One cell: median (and range) of each metric over the successful runs, and any errors."""
    ok = [o.result for o in outcomes if o.ok]
    summary: dict[str, Any] = {"runs": len(outcomes), "ok_runs": len(ok)}
    if ok:
        for key in dict.fromkeys((*METRICS[workload.metric], "msg_per_s")):
            if all(key in r for r in ok):
                values = [r[key] for r in ok]
                summary[key] = statistics.median(values)
                # The spread stays in --json output: it says how far to trust the median.
                summary[f"{key}_min"], summary[f"{key}_max"] = min(values), max(values)
    if outcomes and all(o.status == "unavailable" for o in outcomes):
        summary["unavailable"] = outcomes[0].message
    summary["errors"] = [o.message for o in outcomes if o.status == "error"]
    return summary


def machine() -> str:
    """Cores, RAM and CPU model of this machine, in one phrase."""
    cores = os.cpu_count() or 0
    physical = psutil.cpu_count(logical=False)
    ram = psutil.virtual_memory().total / 2**30
    model = _cpu_model()
    cores_text = f"{cores} cores" + (f" ({physical} physical)" if physical != cores else "")
    text = f"{platform.system()} {platform.machine()}, {cores_text}, {ram:.1f} GB RAM"
    return f"{text}, {model}" if model else text


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def table(
    workloads: Sequence[Workload],
    sizes: Mapping[str, Sizes],
    peers: Sequence[str],
    cells: Mapping[tuple[str, str], dict[str, Any]],
) -> str:
    """The results as a Markdown table: one row per workload, one column per peer."""
    header = ["workload", *(PEERS[p].label for p in peers)]
    rows = [header, ["---"] * len(header)]
    for workload in workloads:
        reference = cells.get((workload.name, workload.reference))
        row = [f"{workload.name} {workload.title} ({_size(workload, sizes[workload.name])})"]
        for peer in peers:
            cell = cells.get((workload.name, peer))
            row.append(_cell(workload, cell, None if peer == workload.reference else reference))
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _size(workload: Workload, sizes: Sizes) -> str:
    if workload.metric == "latency":
        return f"{_count(sizes.messages)} round trips"
    return f"{_count(sizes.messages)} msgs"


def _cell(workload: Workload, cell: dict[str, Any] | None, reference: dict[str, Any] | None) -> str:
    if cell is None:
        return "not run"
    if "unavailable" in cell:
        return "n/a"
    if not cell["ok_runs"]:
        return "error"
    if workload.metric == "throughput":
        text = f"{_rate(cell['msg_per_s'])} msg/s" + _ratios(cell, reference, ("msg_per_s",))
    elif workload.metric == "latency":
        text = f"{cell['p50_us']:.0f} / {cell['p99_us']:.0f} µs"
        text += _ratios(cell, reference, ("p50_us", "p99_us"))
    else:
        # A ratio of two small memory growths is noise; the absolute figure is the claim.
        text = f"+{cell['rss_growth_mb']:.1f} MB"
    if cell["ok_runs"] < cell["runs"]:
        text += f" [{cell['ok_runs']}/{cell['runs']} ok]"
    return text


def _ratios(cell: dict[str, Any], reference: dict[str, Any] | None, keys: Sequence[str]) -> str:
    if reference is None or not all(key in reference for key in keys):
        return ""
    return " (" + " / ".join(f"{cell[key] / reference[key]:.2f}{TIMES}" for key in keys) + ")"


def _rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e5:
        return f"{value / 1e3:.0f}k"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _count(value: int) -> str:
    if value >= 1_000_000 and value % 1_000_000 == 0:
        return f"{value // 1_000_000}M"
    if value >= 1_000 and value % 1_000 == 0:
        return f"{value // 1_000}k"
    return str(value)
