"""Reconciliation: probes of a real QEMU's run state against what the events implied.

* A relay in front of the VM's monitor loses QEMU's STOP (as a dropped
  connection would); the sidecar's next probe finds the VM paused and raises
  ``REACTOR_STATE_CHANGED {old: running, new: paused, probe: interval}``, which
  a rule sees; once the events flow again, a RESUME keeps probes quiet.
* The VM is stopped and its QEMU replaced by a new, running one: on reconnect
  the state QEMU reports differs from the last one implied (``probe: reconnect``).
* ``tail --json --reconcile`` records the probe's ``REACTOR_STATE_CHANGED``
  (the STOP itself lost), and a replay of that recording fires on it.
* ``run --reconcile`` and ``reconcile:`` reject a bad duration with a located
  error; ``0`` turns the probes off.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reactor.demo.machine import ThrowawayQemu
from reactor.sources.reconcile import RunState
from tests.support.guest import booted_guest
from tests.support.lossy import LossyRelay
from tests.support.ops import Sidecar, write_rules

STATE_RULE = {"name": "state-changed", "on": "REACTOR_STATE_CHANGED",
              "actions": [{"type": "log", "with": {"message": "{{ data | tojson }}"}}]}  # fmt: skip


def changes(log: str) -> list[dict[str, object]]:
    """The data of every REACTOR_STATE_CHANGED the rule logged."""
    found = re.findall(r'rule="state-changed" .* message="(.*)"', log)
    return [json.loads(m.replace('\\"', '"')) for m in found]


def test_run_state_follows_events_and_judges_probes() -> None:
    state = RunState()
    assert state.probed("running", True, [], "reconnect") is None  # nothing known yet
    state.observe("BLOCK_IO_ERROR", {"action": "stop"})
    state.observe("STOP", {})
    assert state.status == "io-error" and state.agrees("io-error")
    assert not state.agrees("paused")
    state.observe("RESUME", {})
    state.observe("STOP", {})  # why it stopped is unknown: any stopped state agrees
    assert state.agrees("postmigrate") and not state.agrees("running")
    changed = state.probed("running", True, [], "interval")
    assert changed == {"old": "paused", "new": "running", "running": True, "io_errors": [],
                       "probe": "interval"}  # fmt: skip
    assert state.status == "running" and state.exact


@pytest.mark.qemu
def test_a_lost_stop_is_found_by_the_next_probe(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml", STATE_RULE)
    with (
        ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as qemu,
        LossyRelay(qemu.qmp_socket("vm1"), tmp_path / "relay.qmp") as relay,
    ):
        cfg = {"rules": [str(rules)], "qmp": [str(tmp_path / "relay.qmp")], "reconcile": "300ms"}
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("relay: connected")
            relay.dropping = True
            qemu.qmp.execute("stop")
            sidecar.wait_log(r'rule="state-changed"', 30)
            relay.dropping = False
            qemu.qmp.execute("cont")
            sidecar.wait_log(r"relay RESUME", 30)
            samples = sidecar.wait_metric(
                lambda s: s.value("qmp_reactor_vm_run_state", vm="relay", state="running") == 1,
                what="run state running",
            )
            assert samples.value("qmp_reactor_vm_run_state", vm="relay", state="paused") == 0
            log = sidecar.log_text()
            assert sidecar.stop() == 0
    assert relay.dropped == ["STOP"]
    assert changes(log) == [
        {"old": "running", "new": "paused", "running": False, "io_errors": [], "probe": "interval"}
    ]
    assert "Traceback" not in log


@pytest.mark.qemu
def test_a_qemu_replaced_while_stopped_is_reconciled_on_reconnect(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml", STATE_RULE)
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as qemu:
        cfg = {"rules": [str(rules)], "qmp": [str(qemu.qmp_socket("vm1"))], "reconcile": 0}
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            qemu.qmp.execute("stop")
            sidecar.wait_log(r"vm1 STOP", 30)
            qemu.restart()
            sidecar.wait_log(r'rule="state-changed"', 30)
            log = sidecar.log_text()
            assert sidecar.stop() == 0
    assert changes(log) == [
        {"old": "paused", "new": "running", "running": True, "io_errors": [], "probe": "reconnect"}
    ]


@pytest.mark.qemu
@pytest.mark.guest
def test_panics_qemu_does_not_pause_for_and_throttled_firings_are_counted(tmp_path: Path) -> None:
    throttled = {"name": "stopped", "on": "STOP", "actions": [{"type": "log"}],
                 "throttle": {"mode": "once_within", "window": "1h"}}  # fmt: skip
    rules = write_rules(tmp_path / "rules.yaml", throttled)
    with booted_guest(
        name="vm1",
        extra_qmp=["vm1"],
        devices=["pvpanic-pci"],
        extra_args=["-action", "panic=none"],
    ) as qemu:
        cfg = {"rules": [str(rules)], "qmp": [str(qemu.qmp_socket("vm1"))]}
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            for _ in range(3):
                qemu.qmp.execute("stop")
                qemu.qmp.execute("cont")
            qemu.send_line("echo c > /proc/sysrq-trigger")
            qemu.qmp.wait_event("GUEST_PANICKED", 60)
            samples = sidecar.wait_metric(
                lambda s: (
                    s.value("qmp_reactor_guest_panics_total", vm="vm1") == 1
                    and s.value("qmp_reactor_firings_suppressed_total", reason="throttle") == 2
                ),
                what="one panic and two throttled STOPs",
            )
            assert sidecar.stop() == 0
    assert samples.value("qmp_reactor_firings_suppressed_total", reason="threshold") == 0
    assert samples.value("qmp_reactor_vm_run_state", vm="vm1", state="running") == 1


def test_a_bad_reconcile_duration_is_a_located_error(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "reactor", "run"]
    flag = subprocess.run([*run, "--reconcile", "soon"], capture_output=True, text=True)
    assert flag.returncode == 2 and "invalid duration 'soon'" in flag.stderr
    config = tmp_path / "config.yaml"
    config.write_text("qmp: []\nreconcile: often\n")
    bad = subprocess.run([*run, "--config", str(config)], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"{config}:2:12: error: 'reconcile': invalid duration 'often'" in bad.stderr


@pytest.mark.qemu
def test_tail_records_the_probes_and_a_replay_of_the_recording_fires_on_them(
    tmp_path: Path,
) -> None:
    rules = write_rules(tmp_path / "rules.yaml", STATE_RULE)
    recording = tmp_path / "recording.jsonl"

    def recorded(event: str) -> bool:
        return f'"event":"{event}"' in recording.read_text()

    with (
        ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as qemu,
        LossyRelay(qemu.qmp_socket("vm1"), tmp_path / "relay.qmp") as relay,
        recording.open("w") as out,
    ):
        argv = ["tail", "--json", "--reconcile", "300ms", str(tmp_path / "relay.qmp")]
        tail = subprocess.Popen([sys.executable, "-m", "reactor", *argv], stdout=out,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            wait_until(lambda: recorded("REACTOR_CONNECTED"), 30, "the connection")
            relay.dropping = True
            qemu.qmp.execute("stop")
            wait_until(lambda: recorded("REACTOR_STATE_CHANGED"), 30, "the probe")
        finally:
            tail.terminate()
            _, errors = tail.communicate(timeout=30)
    assert tail.returncode == 0, errors
    lines = [json.loads(line) for line in recording.read_text().splitlines()]
    assert "STOP" not in [line["event"] for line in lines] and relay.dropped == ["STOP"]
    [changed] = [line for line in lines if line["event"] == "REACTOR_STATE_CHANGED"]
    assert changed["vm"] == "relay" and changed["data"] == {
        "old": "running", "new": "paused", "running": False, "io_errors": [], "probe": "interval"
    }  # fmt: skip
    argv = ["replay", "--rules", str(rules), str(recording)]
    replay = subprocess.run([sys.executable, "-m", "reactor", *argv],
                            capture_output=True, text=True, check=True)  # fmt: skip
    fired = [json.loads(line) for line in replay.stdout.splitlines()]
    assert [(f["rule"], f["vm"], f["event"]) for f in fired] == [
        ("state-changed", "relay", "REACTOR_STATE_CHANGED")
    ]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)
