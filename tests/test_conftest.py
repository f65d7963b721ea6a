"""The test session's own promises: unit tests run without QEMU, QEMU tests say so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = """
import pytest
from reactor.demo.machine import ThrowawayQemu


def test_unit():
    assert 1 + 1 == 2


@pytest.mark.qemu
def test_marked():
    ThrowawayQemu().close()


def test_unmarked_but_starts_qemu():
    ThrowawayQemu().close()
"""


def _session(tmp_path: Path, *, fake_qemu: bool) -> str:
    """Run the sample under the suite's conftest, with only the interpreter's directory on
    PATH (so no qemu-system-x86_64 and no apt-get), plus a fake QEMU if asked."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if fake_qemu:
        (bindir / "qemu-system-x86_64").write_text("#!/bin/sh\nexit 1\n")
        (bindir / "qemu-system-x86_64").chmod(0o755)
    path = f"{bindir}{os.pathsep}{Path(sys.executable).parent}"
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    qemu: q\n    guest: g\nfilterwarnings = error\n"
    )
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    return result.stdout


def test_without_qemu_the_unit_tests_run_and_qemu_tests_fail_with_the_command(
    tmp_path: Path,
) -> None:
    out = _session(tmp_path, fake_qemu=False)
    assert "PASSED test_sample.py::test_unit" in out
    assert "ERROR test_sample.py::test_marked" in out
    assert "this test needs a real QEMU: apt-get install qemu-system-x86 qemu-utils" in out
    assert "1 passed" in out


def test_an_unmarked_test_that_starts_qemu_is_told_to_mark_itself(tmp_path: Path) -> None:
    # A QEMU on PATH that is never run: the unmarked test is stopped before it starts one.
    out = _session(tmp_path, fake_qemu=True)
    assert "test_unmarked_but_starts_qemu starts QEMU: mark it @pytest.mark.qemu" in out
    assert "PASSED test_sample.py::test_unit" in out
