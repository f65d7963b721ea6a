"""Shared test set-up: real QEMU must be there, and is installed when it can be."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _ensure_qemu() -> None:
    if shutil.which("qemu-system-x86_64"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "qemu-system-x86", "qemu-utils"],
            check=True,
            env=env,
        )
    if not shutil.which("qemu-system-x86_64"):
        pytest.exit(
            "the tests need a real QEMU: apt-get install qemu-system-x86 qemu-utils", returncode=3
        )


def pytest_sessionstart(session: pytest.Session) -> None:
    _ensure_qemu()
