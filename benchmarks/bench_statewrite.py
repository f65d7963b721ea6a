"""What one durable-state write reads with a large state: the changed parts, not every part.

An engine on a virtual clock holds a ``once_within`` and a ``once_after`` window
for each of ``vms`` VMs (two large parts) and one more rule's window changes
between writes (a small part). Each figure is the median time of
``StateKeeper``'s look for changes, against a full dump and serialisation of
every part (what each write did before), alternated in the same run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from common import Row, median, spread

RULES = """rules:
  - {name: first, on: SUSPEND, actions: [{type: log}],
     throttle: {mode: once_within, window: 1h, key: [$.vm]}}
  - {name: settle, on: SUSPEND, actions: [{type: log}],
     throttle: {mode: once_after, window: 1h, key: [$.vm]}}
  - {name: stops, on: STOP, actions: [{type: log}],
     throttle: {mode: once_after, window: 1h, key: [$.vm]}}
"""


def bench_state_writes(vms: int, runs: int, writes: int = 20) -> list[Row]:
    """Milliseconds per write: changed parts only, and every part, with ``vms`` VMs' windows."""
    from reactor.clock import VirtualClock
    from reactor.engine import state
    from reactor.engine.core import Engine
    from reactor.rules.compiler import load_rules
    from reactor.service.enginestate import StateFile, StateKeeper

    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(RULES)
        rules, _ = load_rules([path])
        engine = Engine(rules, VirtualClock(1e9), lambda firing: None)

        def event(name: str, vm: str) -> None:
            engine.feed({"event": name, "data": {}, "vm": vm, "timestamp": None, "labels": {}})

        for i in range(vms):
            event("SUSPEND", f"vm{i}")
        keeper = StateKeeper(engine, StateFile(Path(tmp) / "state.sqlite3"))
        first = keeper._changes()
        assert first is not None
        keeper.file.write(*first)

        def changed() -> None:
            keeper._changes()

        def every() -> None:
            for doc in state.dump(engine, 0.0).values():
                json.dumps(doc, separators=(",", ":"), default=str)

        times: dict[str, list[float]] = {"changed": [], "every": []}
        for _ in range(runs):
            for name, look in (("changed", changed), ("every", every)):
                started = time.perf_counter()
                for _ in range(writes):
                    event("STOP", "vm1")
                    look()
                times[name].append((time.perf_counter() - started) / writes * 1e3)
        keeper.file.close()
    ms = {name: median(values) for name, values in times.items()}
    return [
        Row(f"state: one write, {vms:,} VMs' windows held, one small part changed",
            f"{ms['changed']:.2f} ms", f"runs {spread(times['changed'])}", "", ""),
        Row(f"state: a dump of every part, {vms:,} VMs' windows held (each write before)",
            f"{ms['every']:.2f} ms", f"runs {spread(times['every'])}", "", ""),
    ]  # fmt: skip
