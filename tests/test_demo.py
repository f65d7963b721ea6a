"""`qmp-reactor demo`, as the README's first command runs it: real QEMU, real output."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _leftovers() -> set[str]:
    tmp = Path(tempfile.gettempdir())
    return {p.name for p in tmp.glob("qmp-reactor-*")}


def test_live_demo_fires_default_rules_and_cleans_up() -> None:
    before = _leftovers()
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "event  REACTOR_CONNECTED" in out
    for event in ("STOP", "RESUME", "RESET", "QUORUM_REPORT_BAD", "REACTOR_DISCONNECTED"):
        assert f"event  {event} " in out, event
    # Five reads of the corrupted child, throttled by QEMU: exactly two events reach us.
    assert out.count("event  QUORUM_REPORT_BAD") == 2
    assert "Quorum child r1 bad on demo-vm" in out
    assert "action notify     ok     rule quorum-child-corrupt" in out
    assert "action notify     ok     rule vm-vanished" in out
    assert "demo-vm went away without SHUTDOWN" in out
    assert "rules fired: audit-lifecycle, quorum-child-corrupt, vm-vanished" in out
    assert "Traceback" not in result.stderr
    assert _leftovers() - before == set()


def test_demo_without_qemu_replays_the_recording(tmp_path: Path) -> None:
    # A PATH with python but no qemu-system-x86_64 on it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bindir)}
    result = subprocess.run(
        [str(bindir / "python"), "-m", "reactor", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "apt-get install qemu-system-x86" in result.stdout
    assert "QUORUM_REPORT_BAD      seq  6 -> rule quorum-child-corrupt (notify)" in result.stdout
    assert "GUEST_PANICKED" in result.stdout
