"""Shared test set-up: which tests need a real QEMU, and what happens when it is missing.

Tests that start ``qemu-system-x86_64`` are marked ``qemu`` (and ``guest`` when they
boot the tiny guest). When a selected test needs QEMU and it is missing, a root
session on Debian installs it; otherwise those tests fail with the command to run,
and every other test still runs. An unmarked test that starts a ``ThrowawayQemu``
fails and says to mark it, so the unit tests keep running without QEMU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

INSTALL = "apt-get install qemu-system-x86 qemu-utils"
QEMU_MARKERS = ("qemu", "guest")


def needs_qemu(item: pytest.Item) -> bool:
    """Whether the test is marked as one that starts a real QEMU."""
    return any(item.get_closest_marker(name) for name in QEMU_MARKERS)


def _install_qemu() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "qemu-system-x86", "qemu-utils"], check=False, env=env
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    if shutil.which("qemu-system-x86_64") is None and any(map(needs_qemu, session.items)):
        _install_qemu()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if needs_qemu(item) and shutil.which("qemu-system-x86_64") is None:
        pytest.fail(f"this test needs a real QEMU: {INSTALL}", pytrace=False)


@pytest.fixture(autouse=True)
def _qemu_only_when_marked(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if not needs_qemu(request.node):
        from reactor.demo.machine import ThrowawayQemu

        def refuse(self: ThrowawayQemu) -> None:
            raise AssertionError(f"{request.node.nodeid} starts QEMU: mark it @pytest.mark.qemu")

        monkeypatch.setattr(ThrowawayQemu, "start", refuse)
    yield
