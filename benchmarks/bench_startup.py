"""Start-up, as a user meets it: a new process each time, timed from exec.

- ``check`` of 1,000 generated rules, next to ``--version`` (the interpreter and
  the imports every command pays);
- ``run`` with the same 1,000 rules, no VMs, a fresh state directory: from exec
  to its ``ready`` log line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row, median, runs_of, spread, verdict
from workload import generated_rules

ROOT = Path(__file__).resolve().parent.parent
CHECK_TARGET = 1.0
RUN_TARGET = 2.0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _once(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "reactor", *args], env=_env(), check=True,
                   capture_output=True, cwd=ROOT)  # fmt: skip
    return time.perf_counter() - t


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


def bench_startup(runs: int) -> list[Row]:
    """Median seconds of each start-up over ``runs`` new processes."""
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp:
        rules = Path(tmp) / "many.yaml"
        rules.write_text(generated_rules(1000))
        bare = runs_of(runs, lambda: _once("--version"))
        check = runs_of(runs, lambda: _once("check", str(rules)))
        ready = []
        for i in range(runs):
            ready.append(_until_ready(rules, Path(tmp) / f"state{i}"))
    b, c, r = median(bare), median(check), median(ready)
    return [
        Row("startup: python -m reactor --version", f"{b:.2f} s", f"runs {spread(bare)}",
            "interpreter + imports"),
        Row("startup: check of 1,000 rules", f"{c:.2f} s", f"{c - b:.2f} s over --version",
            f"< {CHECK_TARGET:g} s", verdict(c < CHECK_TARGET)),
        Row("startup: run with 1,000 rules, to ready", f"{r:.2f} s", f"runs {spread(ready)}",
            f"< {RUN_TARGET:g} s", verdict(r < RUN_TARGET)),
    ]  # fmt: skip
