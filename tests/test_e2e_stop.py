"""A clean stop of the sidecar must not tell people that the VM went away."""

from __future__ import annotations

from pathlib import Path

import pytest

from reactor.demo.machine import ThrowawayQemu
from tests.support.sidecar import DEFAULT_RULES, Sidecar

pytestmark = pytest.mark.qemu


def test_sigterm_of_the_sidecar_does_not_fire_vm_vanished(tmp_path: Path) -> None:
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as qemu:
        with Sidecar(tmp_path, [qemu.qmp_socket("vm1")], [DEFAULT_RULES]) as sidecar:
            sidecar.wait_message("vm1: connected to")
            assert sidecar.stop() == 0
        assert qemu.alive
    fired = [r for r in sidecar.records() if r.get("rule") == "vm-vanished"]
    assert fired == [], sidecar.log_text()
