"""What every benchmark shares: rows of the table, medians, the machine, the printer."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One line of the table: what was measured, the median, a ratio or extra, the target."""

    name: str
    median: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``min..max`` of the runs, to show the noise next to the median."""
    return f"{min(values):,.3g}..{max(values):,.3g}"


def runs_of(runs: int, fn: Callable[[], float]) -> list[float]:
    """``fn()`` run ``runs`` times."""
    return [fn() for _ in range(runs)]


def verdict(ok: bool) -> str:
    """``met`` or ``MISSED``."""
    return "met" if ok else "MISSED"


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's guess)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ram_gib() -> float:
    """Total memory in GiB, from /proc/meminfo."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def machine() -> str:
    """One line naming the machine the figures came from."""
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
        f"{ram_gib():.1f} GiB RAM, Python {sys.version.split()[0]}, {platform.platform()}"
    )


def print_table(rows: Sequence[Row]) -> None:
    """The rows as an aligned Markdown table."""
    head = Row("benchmark", "median", "ratio / detail", "target", "verdict")
    cells = [[r.name, r.median, r.ratio, r.target, r.verdict] for r in [head, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = [cells[0], ["-" * w for w in widths], *cells[1:]]
    for line in lines:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
