"""``resume_vm`` against a real QEMU whose disk image lives on a full tmpfs.

The tiny guest writes 4 MiB with ``dd`` onto a virtio-blk disk (``werror=stop``)
whose sparse image sits on a 2 MiB tmpfs: QEMU pauses the VM (``io-error``)
with ``BLOCK_IO_ERROR {action: stop, nospace: true}``. ``qmp-reactor run`` (a
real subprocess) has a rule that answers with ``resume_vm``:

* with ``min_free`` on the tmpfs, it waits (tries fail, backed off) until the
  test enlarges the tmpfs, then continues the VM, and the guest's ``dd``
  finishes (its exit status read on the serial console);
* with the disk still full, each try continues the VM, QEMU pauses it again at
  once, and after ``max_tries`` the action raises ``REACTOR_RESUME_GAVE_UP``,
  which a second rule logs; the VM stays paused;
* a VM paused by an operator's ``stop`` is left alone.

Waits are parameters (backoff of a fraction of a second), never sleeps.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reactor.actions.resume_vm import Backoff, backoff_delay, parse_size
from reactor.demo.machine import ThrowawayQemu
from tests.support.guest import PROMPT, booted_guest
from tests.support.ops import Sidecar, write_rules
from tests.test_faults import tmpfs

MiB = 1024 * 1024
DD = "dd if=/dev/zero of=/dev/vda bs=64k count=64 oflag=direct; echo DD-EXIT=$?"
FAILED = "action resume_vm of rule 'resume-after-io-error' failed"
NOSPACE = "No space left on device"
QUICK_RETRY = {"attempts": 100, "initial": 0.05, "max": 0.2, "jitter": 0}


@contextlib.contextmanager
def guest_on_full_disk(mnt: Path) -> Iterator[ThrowawayQemu]:
    """The tiny guest with a 64 MiB sparse disk on ``mnt``, werror=stop, and a monitor for us."""
    image = mnt / "disk0.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    blockdev = {"driver": "raw", "node-name": "disk0",
                "file": {"driver": "file", "filename": str(image)}}  # fmt: skip
    with booted_guest(
        name="vm1",
        extra_qmp=["vm1"],
        devices=["virtio-blk-pci,drive=disk0,id=vdisk0,werror=stop,rerror=stop"],
        extra_args=["-blockdev", json.dumps(blockdev)],
    ) as qemu:
        yield qemu


def resume_rule(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "resume-after-io-error",
        "on": "BLOCK_IO_ERROR",
        "when": {"path": "$.data.action", "equals": "stop"},
        "mode": "single",
        "actions": [{"type": "resume_vm", "with": params, "retry": QUICK_RETRY}],
    }


GAVE_UP_RULE = {"name": "gave-up", "on": "REACTOR_RESUME_GAVE_UP", "actions": [{"type": "log"}]}


def status(qemu: ThrowawayQemu) -> str:
    return str(qemu.qmp.execute("query-status")["status"])


def test_sizes_and_backoff() -> None:
    assert parse_size("1GiB") == parse_size("1G") == 1 << 30
    assert parse_size("1GB") == 10**9 and parse_size(512) == 512
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("1 parsec")
    waits = [backoff_delay(Backoff(initial=10, max=60), n) for n in range(1, 6)]
    assert waits == [10, 20, 40, 60, 60]


@pytest.mark.qemu
@pytest.mark.guest
def test_resumes_once_space_is_freed_and_the_write_completes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "images", "2m") as mnt, guest_on_full_disk(mnt) as qemu:
        params = {"settle": "1s", "max_tries": 100, "backoff": {"initial": "100ms", "max": "300ms"},
                  "min_free": {"path": str(mnt), "bytes": "4MiB"}}  # fmt: skip
        rules = write_rules(tmp_path / "rules.yaml", resume_rule(params), GAVE_UP_RULE)
        cfg = {"rules": [str(rules)], "qmp": [str(qemu.qmp_socket("vm1"))]}
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            qemu.send_line(DD)
            qemu.qmp.wait_event("BLOCK_IO_ERROR", 60, data={"action": "stop"})
            sidecar.wait_log(rf"{FAILED} \(attempt 2\), retrying in .*bytes free on", 60)
            assert status(qemu) == "io-error"  # not continued while the space is missing

            subprocess.run(["mount", "-o", "remount,size=32m", str(mnt)], check=True)
            sidecar.wait_log(r"resume_vm ok rule=resume-after-io-error vm=vm1", 60)
            assert qemu.expect(r"DD-EXIT=(\d+)", 120)[1] == "0"
            qemu.expect(PROMPT, 30)
            assert status(qemu) == "running"
            assert sidecar.stop() == 0
        assert "REACTOR_RESUME_GAVE_UP" not in sidecar.log_text()
        assert "Traceback" not in sidecar.log_text()


@pytest.mark.qemu
@pytest.mark.guest
def test_still_full_backs_off_and_gives_up(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "images", "2m") as mnt, guest_on_full_disk(mnt) as qemu:
        params = {"settle": "2s", "max_tries": 3, "backoff": {"initial": "100ms", "max": "200ms"}}
        rules = write_rules(tmp_path / "rules.yaml", resume_rule(params), GAVE_UP_RULE)
        cfg = {"rules": [str(rules)], "qmp": [str(qemu.qmp_socket("vm1"))]}
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            qemu.send_line(DD)
            sidecar.wait_log(r"log ok rule=gave-up vm=vm1", 90)
            log = sidecar.log_text()
            assert status(qemu) == "io-error"
            samples = sidecar.wait_metric(
                lambda s: s.value("qmp_reactor_vm_run_state", vm="vm1", state="io-error") == 1,
                what="run state io-error",
            )
            assert sidecar.stop() == 0
    errors = samples.value(
        "qmp_reactor_block_io_errors_total", vm="vm1", device="disk0", reason=NOSPACE
    )
    assert errors is not None and errors >= 3  # the first, and one after each try's cont
    for n in (1, 2):
        again = rf"{FAILED} \(attempt {n}\), .*try {n} of 3\): paused again \(io-error\)"
        assert re.search(again, log), log
    assert log.count("resume_vm ok rule=resume-after-io-error") == 1  # the giving up
    assert "Traceback" not in log


@pytest.mark.qemu
def test_a_vm_stopped_by_an_operator_is_left_alone(tmp_path: Path) -> None:
    rule = resume_rule({"settle": 0})
    del rule["when"]
    rule["on"] = "STOP"
    rules = write_rules(tmp_path / "rules.yaml", rule)
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as qemu:
        cfg = {"rules": [str(rules)], "qmp": [str(qemu.qmp_socket("vm1"))]}
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            qemu.qmp.execute("stop")
            sidecar.wait_log(r"resume_vm ok rule=resume-after-io-error vm=vm1", 30)
            assert status(qemu) == "paused"
            assert sidecar.stop() == 0
