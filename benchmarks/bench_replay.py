"""Replay throughput: ``qmp-reactor replay`` (dry run) against a bare ``json.loads`` loop.

Both run in this process, alternately, over the same lines: the bare loop only
parses each line with the standard library (the floor for Python); the replay
reads them from a file as the command does, with the default pack and 100
generated rules, and writes its dry-run lines to /dev/null. Rule loading is not
timed (``startup`` measures it). The ratio is of CPU time, which other work on a
shared machine disturbs much less than wall time; both are shown.
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
    from reactor.engine.replay import DryRunWriter, open_inputs, replay
    from reactor.rules.compiler import require_rules

    lines = [x + "\n" for x in event_lines(n)]
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp:
        events = Path(tmp) / "events.jsonl"
        events.write_text("".join(lines))
        rules, _ = require_rules([write_rules(Path(tmp) / "rules", 100)])

        def bare() -> tuple[float, float]:
            loads = json.loads
            t, c = time.perf_counter(), time.process_time()
            for line in lines:
                loads(line)
            return n / (time.perf_counter() - t), n / (time.process_time() - c)

        def dry_run() -> tuple[float, float]:
            with open(os.devnull, "w") as out:
                t, c = time.perf_counter(), time.process_time()
                result = replay(
                    open_inputs([str(events)]), rules, sink=DryRunWriter(out), collect=False
                )
                out.flush()
                rates = n / (time.perf_counter() - t), n / (time.process_time() - c)
            assert result.events == n and not result.problems
            return rates

        base, mine = [], []
        for _ in range(runs):  # alternated, so both see the same machine
            base.append(bare())
            mine.append(dry_run())
    wall = [m[0] / b[0] for m, b in zip(mine, base, strict=True)]
    cpu = [m[1] / b[1] for m, b in zip(mine, base, strict=True)]
    ratio = median(cpu)
    bare_rate, replay_rate = median([b[0] for b in base]), median([m[0] for m in mine])
    return [
        Row("replay: bare json.loads loop", f"{bare_rate:,.0f} ev/s",
            f"runs {spread([b[0] for b in base])}", f"{n:,} events"),
        Row("replay: dry run, default pack + 100 rules", f"{replay_rate:,.0f} ev/s",
            f"{ratio:.0%} of bare in CPU time (pairs {min(cpu):.0%}..{max(cpu):.0%}); "
            f"{median(wall):.0%} in wall time",
            f">= {TARGET:.0%} of bare", verdict(ratio >= TARGET)),
    ]  # fmt: skip
