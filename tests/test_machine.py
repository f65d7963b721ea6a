"""Real-QEMU tests of the sandbox: the events QEMU 7.2 actually sends for what we provoke."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from reactor.demo.machine import (
    QemuStartError,
    QmpCommandError,
    QmpDriver,
    ThrowawayQemu,
    qemu_binary,
)
from tests.support.guest import booted_guest

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[1]


def _names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def test_qemu_is_installed() -> None:
    assert qemu_binary() is not None


def test_lifecycle_events_reach_driver_and_extra_monitor() -> None:
    with ThrowawayQemu(name="t-lifecycle", extra_qmp=["reactor"]) as qemu:
        assert qemu.qmp.greeting is not None
        assert qemu.qmp.greeting["QMP"]["version"]["qemu"]["major"] >= 7
        with QmpDriver(qemu.qmp_socket("reactor")) as sidecar:
            qemu.qmp.execute("stop")
            assert qemu.qmp.wait_event("STOP", 5)["event"] == "STOP"
            assert qemu.qmp.execute("query-status")["status"] == "paused"
            qemu.qmp.execute("cont")
            qemu.qmp.wait_event("RESUME", 5)
            qemu.qmp.execute("system_reset")
            reset = qemu.qmp.wait_event("RESET", 5)
            assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
            qemu.qmp.execute("quit")
            shutdown = qemu.qmp.wait_event("SHUTDOWN", 5)
            assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
            assert qemu.wait(10) == 0

            seen = sidecar.read_events(2)  # the socket is at EOF: returns at once
        host = [e for e in seen if not (e["event"] == "RESET" and e["data"]["guest"])]
        assert _names(host) == ["STOP", "RESUME", "RESET", "SHUTDOWN"]
        assert host[0]["timestamp"].keys() == {"seconds", "microseconds"}
        assert host[3]["data"]["reason"] == "host-qmp-quit"


def test_command_error_and_hmp() -> None:
    with ThrowawayQemu() as qemu:
        with pytest.raises(QmpCommandError) as info:
            qemu.qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert "running" in qemu.qmp.hmp("info status")


def test_quorum_report_bad_after_corrupting_r1() -> None:
    with (
        ThrowawayQemu(name="t-quorum", extra_qmp=["reactor"], quorum=True) as qemu,
        QmpDriver(qemu.qmp_socket("reactor")) as sidecar,
    ):
        qemu.read_quorum(2)
        assert not [e for e in qemu.qmp.events if e["event"] == "QUORUM_REPORT_BAD"]
        qemu.corrupt_child("r1")
        start = time.monotonic()
        qemu.read_quorum(5)
        first = qemu.qmp.wait_event("QUORUM_REPORT_BAD", 5)
        assert first["data"] == {
            "node-name": "r1",
            "sectors-count": 1,
            "sector-num": 0,
            "type": "read",
        }
        # QEMU throttles the event per node: the rest arrive as one event ~1 s later
        second = qemu.qmp.wait_event("QUORUM_REPORT_BAD", 3, data={"node-name": "r1"})
        assert time.monotonic() - start >= 0.8
        ts = second["timestamp"]
        assert ts["seconds"] + ts["microseconds"] / 1e6 < time.time() - 0.5
        got = sidecar.wait_event("QUORUM_REPORT_BAD", 3)
        assert got["data"]["node-name"] == "r1"


def test_restart_keeps_sockets_and_disks() -> None:
    with ThrowawayQemu(extra_qmp=["reactor"], quorum=True) as qemu:
        first_pid = qemu.pid
        qemu.corrupt_child("r1")
        qemu.kill(signal.SIGKILL)
        assert qemu.wait(10) == -signal.SIGKILL
        assert not qemu.alive
        qemu.restart()
        assert qemu.alive and qemu.pid != first_pid
        with QmpDriver(qemu.qmp_socket("reactor")) as sidecar:
            qemu.read_quorum(1)  # r1 is still corrupt on disk
            assert sidecar.wait_event("QUORUM_REPORT_BAD", 5)["data"]["node-name"] == "r1"
        qdir = qemu.dir
    assert not qdir.exists()


def test_early_exit_reports_qemu_stderr() -> None:
    with pytest.raises(QemuStartError, match="no-such-device"):
        ThrowawayQemu(devices=["no-such-device"])


def test_close_kills_qemu_and_removes_directory() -> None:
    qemu = ThrowawayQemu(extra_qmp=["a", "b"])
    pid = qemu.pid
    assert pid is not None
    assert qemu.qmp_socket("a").exists() and qemu.qmp_socket("b").exists()
    qemu.close()
    assert not qemu.dir.exists()
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


def test_recordings_are_qemu_events() -> None:
    files = sorted((REPO / "examples" / "events").glob("*.jsonl"))
    assert {f.name for f in files} >= {
        "quorum-bad.jsonl",
        "vserport-flap.jsonl",
        "guest-panic.jsonl",
        "lifecycle.jsonl",
        "recording.jsonl",
    }
    for path in files:
        for line in path.read_text().splitlines():
            event = json.loads(line)
            assert list(event)[-1] == "vm"
            assert set(event) <= {"timestamp", "event", "data", "vm"}
            assert event["timestamp"].keys() == {"seconds", "microseconds"}
    packaged = REPO / "reactor" / "data" / "events" / "recording.jsonl"
    assert packaged.read_bytes() == (REPO / "examples" / "events" / "recording.jsonl").read_bytes()


@pytest.mark.guest
def test_guest_vserport_balloon_and_panic(tmp_path: Path) -> None:
    devices = [
        "virtio-serial-pci",
        "virtserialport,chardev=ca,name=portA,id=portA",
        "virtio-balloon-pci,id=balloon0",
    ]
    chardev = ["-chardev", f"socket,id=ca,path={tmp_path}/portA.sock,server=on,wait=off"]
    with booted_guest(
        name="t-guest", extra_qmp=["reactor"], devices=devices, extra_args=chardev, panic_pause=True
    ) as qemu:
        assert qemu.run_in_guest("cat /sys/class/virtio-ports/vport0p1/name").strip() == "portA"
        with QmpDriver(qemu.qmp_socket("reactor")) as sidecar:
            qemu.run_in_guest("exec 3>/dev/vport0p1; exec 3>&-")
            opened = qemu.qmp.wait_event("VSERPORT_CHANGE", 5)
            assert opened["data"] == {"open": True, "id": "portA"}
            closed = qemu.qmp.wait_event("VSERPORT_CHANGE", 5)  # throttled: ~1 s later
            assert closed["data"] == {"open": False, "id": "portA"}
            assert _names(sidecar.read_events(0.2)) == ["VSERPORT_CHANGE", "VSERPORT_CHANGE"]

            qemu.qmp.execute("balloon", {"value": 192 * 1024 * 1024})
            deadline = time.monotonic() + 10
            actual = 0
            while actual != 192 * 1024 * 1024 and time.monotonic() < deadline:
                actual = qemu.qmp.wait_event("BALLOON_CHANGE", 5)["data"]["actual"]
            assert actual == 192 * 1024 * 1024

            qemu.send_line("echo c > /proc/sysrq-trigger")
            panicked = qemu.qmp.wait_event("GUEST_PANICKED", 20)
            assert panicked["data"]["action"] == "pause"
            qemu.qmp.wait_event("STOP", 5)
            assert qemu.qmp.execute("query-status")["status"] == "guest-panicked"
            assert sidecar.wait_event("GUEST_PANICKED", 5)["data"]["action"] == "pause"
