"""qmp-reactor benchmarks: ``python benchmarks/bench.py [NAME...] [--quick]``.

Prints a table of medians over several runs. Each figure is compared with a
baseline measured in the same run, on the same machine, so ratios hold even on
a shared, noisy machine. Names: replay, startup (and the live ones when built).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from workload import event_lines, generated_rules, write_rules  # noqa: E402

Row = tuple[str, str, str, str]


def median_of(runs: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(runs))


def bench_replay(n: int, runs: int) -> list[Row]:
    """Replay dry run vs a bare json.loads loop over the same lines."""
    from reactor.matcher import RuleSet  # noqa: F401
    from reactor.replay import DryRunWriter, ReplayInput, replay
    from reactor.rules import load_rules

    lines = [x + "\n" for x in event_lines(n)]
    with tempfile.TemporaryDirectory() as tmp:
        rules, diags = load_rules([write_rules(Path(tmp), 100)])
    assert not [d for d in diags if d.severity == "error"], diags

    def bare() -> float:
        t = time.perf_counter()
        loads = json.loads
        for line in lines:
            loads(line)
        return n / (time.perf_counter() - t)

    def dry_run() -> float:
        out = io.StringIO()
        sink = DryRunWriter(out)
        t = time.perf_counter()
        result = replay([ReplayInput("bench", lines, "bench")], rules, sink=sink)
        rate = n / (time.perf_counter() - t)
        assert result.events == n
        return rate

    rows: list[Row] = []
    base = [bare() for _ in range(runs)]
    mine = [dry_run() for _ in range(runs)]
    b, m = statistics.median(base), statistics.median(mine)
    rows.append(("replay: bare json.loads loop", f"{b:,.0f} ev/s", "", f"{n:,} events"))
    rows.append(("replay: dry run, default pack + 100 rules", f"{m:,.0f} ev/s",
                 f"{m / b:.0%} of bare", "target >= 50%"))  # fmt: skip
    return rows


def bench_startup(runs: int) -> list[Row]:
    """``check`` of 1,000 rules, as a user runs it (a new process each time)."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "many.yaml"
        f.write_text(generated_rules(1000))
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}

        def once(*extra: str) -> float:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "reactor", *extra], env=env, check=True,
                           capture_output=True)  # fmt: skip
            return time.perf_counter() - t

        bare = median_of(runs, lambda: once("--version"))
        check = median_of(runs, lambda: once("check", str(f)))
    return [
        ("startup: python -m reactor --version", f"{bare:.2f} s", "", "interpreter + imports"),
        ("startup: check of 1,000 rules", f"{check:.2f} s", f"{check - bare:.2f} s over bare",
         "target < 1 s"),
    ]  # fmt: skip


def print_table(rows: list[Row]) -> None:
    head = ("benchmark", "median", "ratio / extra", "note")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=["replay", "startup"])
    parser.add_argument("--quick", action="store_true", help="100k events, 3 runs")
    args = parser.parse_args()
    n, runs = (100_000, 3) if args.quick else (1_000_000, 5)
    rows: list[Row] = []
    if "replay" in args.names:
        rows += bench_replay(n, runs)
    if "startup" in args.names:
        rows += bench_startup(runs)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {n:,} events, {runs} runs")
    print_table(rows)


if __name__ == "__main__":
    main()
