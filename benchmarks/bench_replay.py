"""Replay throughput: ``qmp-reactor replay`` (dry run) against a bare ``json.loads`` loop.

Both run in this process, alternately, over the same lines: the bare loop only
parses each line with the standard library (the floor for Python); the replay
reads them from a file as the command does, with the default pack and 100
generated rules, and writes its dry-run lines to /dev/null. Rule loading is not
timed (``startup`` measures it).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from common import Row, median, spread, verdict
from workload import event_lines, write_rules

TARGET = 0.5


def bench_replay(n: int, runs: int) -> list[Row]:
    """Events per second of a dry-run replay and of the bare loop, median of ``runs`` pairs."""
    from reactor.replay import DryRunWriter, open_inputs, replay
    from reactor.rules import require_rules

    lines = [x + "\n" for x in event_lines(n)]
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp:
        events = Path(tmp) / "events.jsonl"
        events.write_text("".join(lines))
        rules, _ = require_rules([write_rules(Path(tmp) / "rules", 100)])

        def bare() -> float:
            loads = json.loads
            t = time.perf_counter()
            for line in lines:
                loads(line)
            return n / (time.perf_counter() - t)

        def dry_run() -> float:
            with open(os.devnull, "w") as out:
                t = time.perf_counter()
                result = replay(
                    open_inputs([str(events)]), rules, sink=DryRunWriter(out), collect=False
                )
                out.flush()
                rate = n / (time.perf_counter() - t)
            assert result.events == n and not result.problems
            return rate

        base, mine = [], []
        for _ in range(runs):  # alternated, so both see the same machine
            base.append(bare())
            mine.append(dry_run())
    ratios = [m / b for m, b in zip(mine, base, strict=True)]
    ratio = median(ratios)
    return [
        Row("replay: bare json.loads loop", f"{median(base):,.0f} ev/s",
            f"runs {spread(base)}", f"{n:,} events"),
        Row("replay: dry run, default pack + 100 rules", f"{median(mine):,.0f} ev/s",
            f"{ratio:.0%} of bare (pairs {min(ratios):.0%}..{max(ratios):.0%})",
            f">= {TARGET:.0%} of bare", verdict(ratio >= TARGET)),
    ]  # fmt: skip
