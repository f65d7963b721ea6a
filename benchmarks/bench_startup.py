"""Start-up, as a user meets it: a new process each time, timed from exec.

Each command runs alternately with a bare ``python -c pass`` (the interpreter's
own start, the floor of any command), from a directory with no ``./rules`` or
``./plugins``, so the default pack bundled in the package is what is loaded:

- ``--version``: the parser and nothing else;
- ``check`` of the default pack, and of 1,000 generated rules;
- ``replay`` of 100,000 events with the default pack, dry run to /dev/null, as a
  whole process, against a whole ``python -c`` process that only ``json.loads``
  each line of the same file;
- ``run`` with the 1,000 rules, no VMs, a fresh state directory: from exec to
  its ``ready`` log line.

Wall time is what a user waits for and what the targets are about; the CPU time
of the process is shown beside it, since other work on a shared machine moves it
much less. The package's bytecode is compiled first, as ``pip install`` does (and
as the first run does where writing it is allowed), so that no run pays for it.
"""

from __future__ import annotations

import compileall
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import Row, median, spread, verdict
from workload import event_lines, generated_rules

ROOT = Path(__file__).resolve().parent.parent
VERSION_TARGET = 0.08  # seconds over bare Python
DEFAULT_CHECK_TARGET = 0.25
CHECK_TARGET = 1.0
REPLAY_TARGET = 2.0  # times a bare process that json.loads each line
RUN_TARGET = 2.0
REPLAY_EVENTS = 100_000
BARE_LOADS = "import json, sys\nfor line in open(sys.argv[1]): json.loads(line)"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _timed(argv: Sequence[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one process, from exec to exit."""
    c, t = _cpu(), time.perf_counter()
    subprocess.run([sys.executable, *argv], env=_env(), check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    return time.perf_counter() - t, _cpu() - c


def _alternated(runs: int, cwd: Path, *argvs: Sequence[str]) -> list[list[tuple[float, float]]]:
    """Each argv run ``runs`` times, taking turns, so all see the same machine."""
    times: list[list[tuple[float, float]]] = [[] for _ in argvs]
    for _ in range(runs):
        for argv, mine in zip(argvs, times, strict=True):
            mine.append(_timed(argv, cwd))
    return times


def _until_ready(rules: Path, state: Path) -> float:
    """Seconds from starting ``run`` to its ``ready`` line; then it is stopped."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reactor", "run", "--rules", str(rules), "--state-dir", str(state),
         "--plugin-dir", str(state / "no-plugins")],
        env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "ready:" in line:
                return time.perf_counter() - t
        raise RuntimeError(f"run exited ({proc.wait()}) without saying it was ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def _wall(times: list[tuple[float, float]]) -> float:
    return median([w for w, _ in times])


def _cpu_of(times: list[tuple[float, float]]) -> float:
    return median([c for _, c in times])


def bench_startup(runs: int) -> list[Row]:
    """Median seconds of each start-up over ``runs`` new processes, bare Python alongside."""
    compileall.compile_dir(ROOT / "reactor", quiet=1)
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as name:
        tmp = Path(name)
        rules = tmp / "many.yaml"
        rules.write_text(generated_rules(1000))
        events = tmp / "events.jsonl"
        events.write_text("".join(x + "\n" for x in event_lines(REPLAY_EVENTS)))
        m = ["-m", "reactor"]
        bare, version, pack, many = _alternated(
            runs, tmp, ["-c", "pass"], [*m, "--version"], [*m, "check"], [*m, "check", str(rules)]
        )
        loads, replayed = _alternated(
            runs, tmp, ["-c", BARE_LOADS, str(events)], [*m, "replay", str(events)]
        )
        ready = [_until_ready(rules, tmp / f"state{i}") for i in range(runs)]
    b, v, p, c = _wall(bare), _wall(version), _wall(pack), _wall(many)
    ratios = [r[0] / x[0] for r, x in zip(replayed, loads, strict=True)]
    ratio, r = median(ratios), median(ready)
    return [
        Row("startup: python -c pass (bare Python)", f"{b:.3f} s",
            f"runs {spread([w for w, _ in bare])}", "the floor"),
        Row("startup: qmp-reactor --version", f"{v:.3f} s",
            f"+{v - b:.3f} s over bare; CPU {_cpu_of(version):.3f} s",
            f"<= bare + {VERSION_TARGET:g} s", verdict(v - b <= VERSION_TARGET)),
        Row("startup: check of the default pack", f"{p:.3f} s",
            f"+{p - b:.3f} s over bare; CPU {_cpu_of(pack):.3f} s",
            f"<= {DEFAULT_CHECK_TARGET:g} s", verdict(p <= DEFAULT_CHECK_TARGET)),
        Row("startup: check of 1,000 rules", f"{c:.2f} s", f"+{c - v:.2f} s over --version",
            f"< {CHECK_TARGET:g} s", verdict(c < CHECK_TARGET)),
        Row("startup: python -c json.loads per line", f"{_wall(loads):.3f} s",
            f"CPU {_cpu_of(loads):.3f} s", f"{REPLAY_EVENTS:,} events"),
        Row("startup: qmp-reactor replay, whole process", f"{_wall(replayed):.3f} s",
            f"{ratio:.2f}x the json.loads process (runs {min(ratios):.2f}..{max(ratios):.2f}); "
            f"CPU {_cpu_of(replayed) / _cpu_of(loads):.2f}x",
            f"<= {REPLAY_TARGET:g}x", verdict(ratio <= REPLAY_TARGET)),
        Row("startup: run with 1,000 rules, to ready", f"{r:.2f} s", f"runs {spread(ready)}",
            f"< {RUN_TARGET:g} s", verdict(r < RUN_TARGET)),
    ]  # fmt: skip
