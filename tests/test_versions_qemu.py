"""QEMU 7.2 as it is, live: a BLOCK_IO_ERROR burst reaches the rules whole.

The tiny guest reads a sector that a ``blkdebug`` node fails with EIO (``rerror=report``,
so the VM keeps running and every read errors again): ten BLOCK_IO_ERRORs within some
50 ms. QEMU 7.2 does not rate-limit BLOCK_IO_ERROR (9.2 started to), so a ``qmp-reactor
run`` subprocess on one monitor must see every event QEMU delivered on a second monitor
(an ``EventTap``), none held by its QEMU stage; and at connect it warns about a rule
naming an event QEMU 7.2 cannot send.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.support.guest import booted_guest
from tests.support.ops import Sidecar, write_rules
from tests.support.tap import EventTap

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

BAD_SECTOR = 4096
READS = 5


def _blkdebug(image: Path) -> str:
    return json.dumps(
        {
            "driver": "raw",
            "node-name": "disk0",
            "file": {
                "driver": "blkdebug",
                "inject-error": [
                    {"event": "read_aio", "errno": 5, "once": False, "sector": BAD_SECTOR}
                ],
                "image": {"driver": "file", "filename": str(image)},
            },
        }
    )


def test_block_io_error_burst_on_qemu_7_2_reaches_the_rules_whole(tmp_path: Path) -> None:
    image = tmp_path / "disk0.raw"
    with image.open("wb") as fh:
        fh.truncate(4 * 1024 * 1024)
    rules = write_rules(
        tmp_path / "rules.yaml",
        {
            "name": "io-error",
            "on": "BLOCK_IO_ERROR",
            "actions": [
                {
                    "type": "log",
                    "with": {"message": "io {{ timestamp.seconds }}.{{ timestamp.microseconds }}"},
                }
            ],
        },
        {"name": "pv", "on": "GUEST_PVSHUTDOWN", "actions": [{"type": "log"}]},
    )
    with (
        booted_guest(
            name="blk",
            extra_qmp=["reactor", "tap"],
            devices=["virtio-blk-pci,drive=disk0,id=vdisk0,rerror=report,werror=report"],
            extra_args=["-blockdev", _blkdebug(image)],
        ) as qemu,
        EventTap(qemu.qmp_socket("tap")) as tap,
        Sidecar(tmp_path, {"qmp": [str(qemu.qmp_socket("reactor"))], "rules": [str(rules)]}) as sc,
    ):
        sc.start()
        connected = sc.wait_log(
            r"reactor: QEMU (\d+\.\d+\.\d+): following QEMU ([\d.]+)'s rate limits"
        )
        assert connected[2] == "7.2", connected[0]
        warning = sc.wait_log(r"reactor: \S+rules\.yaml:\d+:\d+: warning: GUEST_PVSHUTDOWN .*")
        assert "is not sent by QEMU 7.2" in warning[0] and "appeared in QEMU 9.1" in warning[0]

        read = f"dd if=/dev/vda of=/dev/null bs=512 skip={BAD_SECTOR} count=1 iflag=direct"
        qemu.run_in_guest(f"for i in $(seq {READS}); do {read}; done 2>&1 | grep -c error")
        delivered = tap.wait_count("BLOCK_IO_ERROR", READS, timeout=30)
        time.sleep(2.0)  # anything a throttle would hold has come out by now
        delivered = tap.events("BLOCK_IO_ERROR")
        stamps = [
            f"{e['timestamp']['seconds']}.{e['timestamp']['microseconds']}" for _, e in delivered
        ]
        assert delivered[-1][0] - delivered[0][0] < 1.0, "QEMU's own burst, within a second"

        def seen() -> list[str]:
            return re.findall(r"rule=\"io-error\" .*?message=\"io (\d+\.\d+)\"", sc.log_text())

        deadline = time.monotonic() + 30
        while len(seen()) < len(stamps) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(seen(), key=float) == sorted(stamps, key=float)
        samples = sc.scrape()
        assert samples.value("qmp_reactor_qemu_stage_holds_total") == 0
        assert samples.value("qmp_reactor_qemu_stage_replaced_total") == 0
        assert sc.stop() == 0
    assert "Traceback" not in sc.log_text()
