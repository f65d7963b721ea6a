"""Synthetic but realistic workloads for the benchmarks: events and rules.

Events have the shapes QEMU 7.2 sends (fields as in the recordings under
examples/events/), spread over many VMs, with timestamps advancing about a
millisecond apart. Rules are the default pack plus generated ones: names,
globs, one to three conditions each.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EVENT_SHAPES = [
    ("QUORUM_REPORT_BAD", lambda r: {"node-name": f"r{r.randrange(3)}", "sector-num": r.randrange(
        1 << 20), "sectors-count": 1, "type": "read"}),
    ("QUORUM_FAILURE", lambda r: {"reference": "quorum0", "sector-num": 0, "sectors-count": 1}),
    ("VSERPORT_CHANGE", lambda r: {"id": f"port{r.randrange(4)}", "open": r.random() < 0.5}),
    ("GUEST_PANICKED", lambda r: {"action": "pause"}),
    ("BLOCK_IO_ERROR", lambda r: {"device": "", "node-name": f"disk{r.randrange(2)}",
        "operation": "write", "action": "stop", "nospace": r.random() < 0.5,
        "reason": "No space left on device"}),
    ("WATCHDOG", lambda r: {"action": "reset"}),
    ("STOP", lambda r: {}),
    ("RESUME", lambda r: {}),
    ("RESET", lambda r: {"guest": True, "reason": "guest-reset"}),
    ("SHUTDOWN", lambda r: {"guest": True, "reason": "guest-shutdown"}),
    ("BALLOON_CHANGE", lambda r: {"actual": r.randrange(1 << 30)}),
    ("RTC_CHANGE", lambda r: {"offset": r.randrange(100),
        "qom-path": "/machine/unattached/device[8]"}),
    ("REACTOR_DISCONNECTED", lambda r: {"shutdown_seen": r.random() < 0.5, "reason": "EOF",
        "address": "/run/qemu/x.qmp"}),
]  # fmt: skip


def event_lines(count: int, vms: int = 500, seed: int = 7) -> list[str]:
    """``count`` JSON lines, each one QMP event as QEMU sends it plus ``vm``."""
    r = random.Random(seed)
    t = 1_795_238_424_000_000
    lines = []
    for _ in range(count):
        name, make = EVENT_SHAPES[r.randrange(len(EVENT_SHAPES))]
        t += r.randrange(200, 1800)
        ev = {
            "event": name,
            "data": make(r),
            "timestamp": {"seconds": t // 1_000_000, "microseconds": t % 1_000_000},
            "vm": f"vm-{r.randrange(vms)}",
        }
        lines.append(json.dumps(ev, separators=(",", ":")))
    return lines


def generated_rules(count: int, seed: int = 11) -> str:
    """YAML text of ``count`` rules: exact names and globs, one to three conditions."""
    r = random.Random(seed)
    names = [n for n, _ in EVENT_SHAPES]
    conds = {
        "QUORUM_REPORT_BAD": [
            "{path: $.data.node-name, equals: r1}",
            "{path: $.data.type, in: [read, write]}",
            "{path: $.data.sector-num, gt: 1000}",
        ],
        "VSERPORT_CHANGE": [
            "{path: $.data.open, equals: false}",
            "{path: $.data.id, matches: '^port[12]$'}",
        ],
        "BLOCK_IO_ERROR": [
            "{path: $.data.nospace, equals: true}",
            "{path: $.data.operation, equals: write}",
        ],
        "BALLOON_CHANGE": ["{path: $.data.actual, lt: 536870912}"],
    }
    # Rules aimed at groups of VMs, as operators write them: most events match
    # an event name somewhere but few rules' conditions.
    vm_filters = [
        "{path: $.vm, matches: '^vm-4[0-9]$'}",
        "{path: $.vm, in: [vm-1, vm-2, vm-3]}",
        "{path: $.vm, equals: vm-42}",
        "{path: $.vm, contains: '-49'}",
    ]
    out = ["rules:"]
    for i in range(count):
        if r.random() < 0.2:
            on = r.choice(['"QUORUM_*"', '"*_CHANGE"', '"BLOCK_*"'])
            pool: list[str] = []
        else:
            ev = r.choice(names)
            on, pool = ev, conds.get(ev, [])
        extra = r.sample(pool, k=min(len(pool), r.randint(0, 2)))
        when = [r.choice(vm_filters), *extra]
        out.append(f"  - name: gen-{i}\n    on: {on}\n    when: [{', '.join(when)}]")
        out.append("    actions: [{type: log, with: {message: 'gen {{ vm }}'}}]")
    return "\n".join(out) + "\n"


def write_rules(directory: Path, generated: int) -> Path:
    """A rules directory: the default pack plus ``generated`` rules."""
    directory.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent / "rules"
    for f in root.glob("*.yaml"):
        (directory / f.name).write_text(f.read_text())
    (directory / "generated.yaml").write_text(generated_rules(generated))
    return directory
