"""Memory at scale, each scenario in a fresh process so nothing else counts in its RSS.

- 500 VMs connected (the journal on), each sending 10 events a second for 5
  seconds through the whole path: the process's RSS once every action ran,
  and once they were all connected, before any event.
- The same 500 VMs each bursting 100 events at full speed (50,000 at once):
  the RSS afterwards, which keeps the burst's high-water mark.
- A soak of ``events`` events on one connection (journal on): RSS after the
  first fifth and at the end; flat means within 5%.

Run as ``python benchmarks/bench_scale.py rate|burst|soak ...`` it is that child, printing JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import Row, median, spread, verdict  # noqa: E402

RSS_TARGET = 100e6  # bytes: MB as in the target, 10**6
FLAT_TARGET = 0.05


def _child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run([sys.executable, str(HERE / "bench_scale.py"), *args], env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _vms(vms: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    from live import rss, scenario

    before: list[int] = []
    result = asyncio.run(scenario(vms, expected, True, lambda rig: before.append(rss())))
    return {"before": before[0], "after": rss(), "events": result.events}


def _rate(count: int, rate: int, seconds: int) -> dict[str, Any]:
    vms = [{"name": f"vm{i}", "kind": "rate", "event": "SUSPEND", "rate": rate,
            "seconds": seconds} for i in range(count)]  # fmt: skip
    return _vms(vms, count * rate * seconds)


def _burst(count: int, per_vm: int) -> dict[str, Any]:
    from live import flood_plan

    return _vms(flood_plan(count, per_vm), count * per_vm)


def _soak(events: int) -> dict[str, Any]:
    from live import Rig, flood_plan, rss, scenario

    first = events // 5
    samples: dict[int, int] = {}

    def prepare(rig: Rig) -> None:
        for mark in (first, events):
            rig.recorder.marks[mark] = lambda mark=mark: samples.__setitem__(mark, rss())

    asyncio.run(scenario(flood_plan(1, events), events, True, prepare))
    return {"first": samples[first], "last": samples[events], "events": events}


def bench_scale(soak_events: int, runs: int) -> list[Row]:
    """RSS with 500 VMs, and its growth over a soak, medians of ``runs`` fresh processes."""
    mb = 1e6
    rate = [_child("rate", "500", "10", "5") for _ in range(runs)]
    burst = [_child("burst", "500", "100") for _ in range(runs)]
    soaks = [_child("soak", str(soak_events)) for _ in range(runs)]
    after, before = median([v["after"] for v in rate]), median([v["before"] for v in rate])
    peak = median([v["after"] for v in burst])
    growth = [(s["last"] - s["first"]) / s["first"] for s in soaks]
    g = median(growth)
    return [
        Row("scale: RSS, 500 VMs at 10 ev/s each", f"{after / mb:.0f} MB",
            f"{before / mb:.0f} MB once connected, before any event", "<= 100 MB",
            verdict(after <= RSS_TARGET)),
        Row("scale: RSS, 500 VMs after 100 events each at once", f"{peak / mb:.0f} MB",
            "the burst's high-water mark stays", "<= 100 MB", verdict(peak <= RSS_TARGET)),
        Row(f"scale: RSS over a soak of {soak_events:,} events", f"{g:+.1%}",
            f"{median([s['first'] for s in soaks]) / mb:.0f} -> "
            f"{median([s['last'] for s in soaks]) / mb:.0f} MB; runs "
            f"{spread([x * 100 for x in growth])} %", "within 5%", verdict(abs(g) <= FLAT_TARGET)),
    ]  # fmt: skip


if __name__ == "__main__":
    kind, *numbers = sys.argv[1:]
    values = [int(n) for n in numbers]
    child = {"rate": _rate, "burst": _burst, "soak": _soak}[kind]
    print(json.dumps(child(*values)))
