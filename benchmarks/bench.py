"""qmp-reactor benchmarks: ``python benchmarks/bench.py [NAME...] [--quick]``.

Prints the machine, then one table of medians over several runs. Where a ratio
is quoted, its baseline ran in the same process, alternately with the thing
measured, so the ratio holds even on a shared, noisy machine. NAMEs (default:
all): replay, startup, live, latency, isolation, scale, hostile, state, libvirt (needs
libvirtd: ``.ci/libvirt`` installs it). ``--quick`` runs fewer
events and fewer runs (a smoke test; quote the full run). docs/performance.md
has the latest table and what each figure means.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import Row, machine, print_table  # noqa: E402

NAMES = (
    "replay",
    "startup",
    "live",
    "latency",
    "isolation",
    "scale",
    "hostile",
    "state",
    "libvirt",
)


def plan(quick: bool) -> dict[str, Callable[[], list[Row]]]:
    """What each name runs, at full or quick size."""
    from bench_hostile import bench_hostile
    from bench_libvirt import bench_libvirt
    from bench_live import bench_isolation, bench_latency, bench_state, bench_throughput
    from bench_replay import bench_replay
    from bench_scale import bench_scale
    from bench_startup import bench_startup
    from bench_statewrite import bench_state_writes

    runs = 3 if quick else 5
    return {
        "replay": lambda: bench_replay(100_000 if quick else 1_000_000, runs),
        "startup": lambda: bench_startup(runs),
        "live": lambda: bench_throughput(100_000 if quick else 300_000, runs),
        "latency": lambda: bench_latency(3 if quick else 10, runs),
        "state": lambda: [
            *bench_state(100_000 if quick else 300_000, 3 if quick else 10, runs),
            *bench_state_writes(10_000, runs),
        ],
        "isolation": lambda: bench_isolation(3 if quick else 10, runs),
        "scale": lambda: bench_scale(200_000 if quick else 1_000_000, 1 if quick else 3),
        "hostile": lambda: bench_hostile(3 if quick else 10, 1 if quick else 3),
        "libvirt": lambda: bench_libvirt(50 if quick else 250, runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", choices=[[], *NAMES], metavar="NAME",
                        help=f"benchmarks to run: {', '.join(NAMES)} (default: all)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer events and runs")
    args = parser.parse_args()
    todo = plan(args.quick)
    started = time.monotonic()
    rows: list[Row] = []
    for name in args.names or NAMES:
        print(f"running {name}...", file=sys.stderr, flush=True)
        rows += todo[name]()
    print(f"machine: {machine()}")
    print(f"{'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s")
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
