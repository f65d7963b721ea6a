"""`qmp-reactor demo`, as the README's first command runs it: real QEMU, real output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def own_tmp() -> Iterator[Path]:
    """A temporary directory of the demo's own (short: it holds unix sockets).

    Others' tests share /tmp, so what the demo leaves behind is looked for here.
    """
    path = Path(tempfile.mkdtemp(prefix="qr-demo-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.qemu
def test_live_demo_fires_default_rules_and_cleans_up(own_tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(own_tmp)},
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
    assert list(own_tmp.iterdir()) == []


def test_demo_without_qemu_replays_the_recording(tmp_path: Path) -> None:
    # A PATH without qemu-system-x86_64 on it. The interpreter is run by its own
    # path: a venv's python found through a symlink elsewhere loses the venv.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = {**os.environ, "PATH": str(bindir)}
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "demo"],
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
