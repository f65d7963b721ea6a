"""End to end: ``qmp-reactor run`` against a real QEMU with a quorum disk.

The sidecar runs as a subprocess on its own QMP monitor. An ``EventTap`` on a second monitor
sees what QEMU delivered and when (QEMU sends each event to every monitor at once), and a
loopback webhook receiver sees what the sidecar did and when. So the tests compare the
sidecar's actions with QEMU's own deliveries:

* five quick reads of a corrupted child: QEMU sends two QUORUM_REPORT_BAD (one at once, the
  last a second later with its original timestamp), and the rule fires exactly twice;
* reads all through four seconds: every event QEMU delivers fires the rule, none is dropped by
  the sidecar's own QEMU rate-limit stage, and none is delayed by more than ``MAX_DELAY``;
* QEMU killed with SIGKILL: REACTOR_DISCONNECTED with ``shutdown_seen`` false fires a rule, and
  after a restart REACTOR_CONNECTED follows within two seconds and events flow again.

Run with ``-s`` to see the measured delays and the reconnect time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from reactor.sandbox import ThrowawayQemu
from tests.support.receiver import Hook, WebhookReceiver
from tests.support.sidecar import Sidecar
from tests.support.tap import Event, EventTap

pytestmark = pytest.mark.qemu

MAX_DELAY = 0.05
"""Seconds the sidecar may take from QEMU's delivery of an event to the start of its action."""

RECONNECT_WITHIN = 2.0
"""Seconds from QEMU being back to the sidecar's REACTOR_CONNECTED."""

RULES = """\
rules:
  - name: bad-read
    on: QUORUM_REPORT_BAD
    actions:
      - type: log
        with: {{message: "bad read on {{{{ data['node-name'] }}}}"}}
      - type: webhook
        with: {{url: "{url}/bad"}}
  - name: up
    on: REACTOR_CONNECTED
    actions:
      - type: webhook
        with: {{url: "{url}/up"}}
  - name: vanished
    on: REACTOR_DISCONNECTED
    when: {{path: $.data.shutdown_seen, equals: false}}
    actions:
      - type: webhook
        with: {{url: "{url}/gone"}}
"""


@dataclass
class Rig:
    """A QEMU with a quorum disk, a tap on it, a webhook receiver and the sidecar."""

    qemu: ThrowawayQemu
    tap: EventTap
    receiver: WebhookReceiver
    sidecar: Sidecar


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with ExitStack() as stack:
        receiver = stack.enter_context(WebhookReceiver())
        qemu = stack.enter_context(ThrowawayQemu(name="vm1", extra_qmp=["vm1", "tap"], quorum=True))
        tap = stack.enter_context(EventTap(qemu.qmp_socket("tap")))
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES.format(url=receiver.url))
        sidecar = stack.enter_context(Sidecar(tmp_path, [qemu.qmp_socket("vm1")], [rules]))
        receiver.wait_for("/up", 1, timeout=30)
        yield Rig(qemu, tap, receiver, sidecar)
        assert sidecar.stop() == 0
        assert "Traceback" not in sidecar.log_text()


def _delays(
    delivered: list[tuple[float, Event]], hooks: list[Hook], logged: list[dict[str, float]]
) -> list[float]:
    """Per event, seconds from QEMU's delivery to the webhook's arrival and to the log line."""
    assert len(hooks) == len(logged) == len(delivered)
    out = []
    for (arrival, event), hook, line in zip(delivered, hooks, logged, strict=True):
        assert hook.body["event"]["timestamp"] == event["timestamp"]
        out += [hook.arrival - arrival, line["time"] - arrival]
    return out


def test_five_quick_bad_reads_fire_twice(rig: Rig) -> None:
    rig.qemu.read_quorum(1)  # a clean read reports nothing
    rig.qemu.corrupt_child("r1")
    rig.qemu.read_quorum(5)
    delivered = rig.tap.wait_count("QUORUM_REPORT_BAD", 2, timeout=10)
    hooks = rig.receiver.wait_for("/bad", 2, timeout=10)
    rig.sidecar.wait_audit("bad-read", 2)
    time.sleep(1.5)  # QEMU's window after the second event closes with nothing held

    assert len(rig.tap.events("QUORUM_REPORT_BAD")) == 2
    hooks = rig.receiver.hooks("/bad")
    logged = rig.sidecar.audit("bad-read")
    assert [h.body["rule"] for h in hooks] == ["bad-read", "bad-read"]
    assert [line["message"] for line in logged] == ["bad read on r1"] * 2
    assert [h.body["event"]["data"]["node-name"] for h in hooks] == ["r1", "r1"]
    # The second one comes a second later, carrying the timestamp of the last bad read.
    (t1, e1), (t2, e2) = delivered
    assert 0.9 < t2 - t1 < 1.3
    assert 0.9 < hooks[1].arrival - hooks[0].arrival < 1.3
    stamps = [e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6 for e in (e1, e2)]
    assert 0 < stamps[1] - stamps[0] < 0.5
    delays = _delays(delivered, hooks, logged)
    print(f"\nfive quick reads: delays {[f'{d * 1000:.1f}' for d in delays]} ms")
    assert max(delays) < MAX_DELAY


def test_steady_bad_reads_are_neither_dropped_nor_delayed(rig: Rig) -> None:
    rig.qemu.corrupt_child("r1")
    end = time.monotonic() + 4.2
    while time.monotonic() < end:
        rig.qemu.read_quorum(1)
        time.sleep(0.15)
    time.sleep(1.5)  # the last held event comes out within a second
    delivered = rig.tap.events("QUORUM_REPORT_BAD")
    assert len(delivered) >= 5  # one at once, then one a second
    hooks = rig.receiver.wait_for("/bad", len(delivered), timeout=5)
    logged = rig.sidecar.wait_audit("bad-read", len(delivered))
    time.sleep(0.2)
    assert len(rig.receiver.hooks("/bad")) == len(delivered)
    delays = _delays(delivered, hooks, logged)
    print(
        f"\nsteady reads, {len(delivered)} events: delays {[f'{d * 1000:.1f}' for d in delays]} ms"
    )
    assert max(delays) < MAX_DELAY


def test_sigkill_then_restart_reconnects(rig: Rig) -> None:
    rig.qemu.kill()
    rig.qemu.wait(10)
    gone = rig.receiver.wait_for("/gone", 1, timeout=10)[0].body["event"]
    assert gone["event"] == "REACTOR_DISCONNECTED"
    assert gone["vm"] == "vm1"
    assert gone["data"]["shutdown_seen"] is False
    assert gone["data"]["reason"]

    started = time.time()
    rig.qemu.restart()
    back = time.time()  # the new QEMU's sockets are there and answer
    up = rig.receiver.wait_for("/up", 2, timeout=RECONNECT_WITHIN + 5)[1]
    reconnect = up.arrival - back
    print(f"\nQEMU restart {back - started:.2f} s, then REACTOR_CONNECTED after {reconnect:.2f} s")
    assert reconnect < RECONNECT_WITHIN
    assert up.body["event"]["data"]["status"] == "running"
    assert up.body["event"]["seq"] > gone["seq"]

    # Events flow again on the new session.
    rig.qemu.corrupt_child("r1")
    rig.qemu.read_quorum(1)
    bad = rig.receiver.wait_for("/bad", 1, timeout=10)[0].body["event"]
    assert bad["event"] == "QUORUM_REPORT_BAD"
    assert bad["seq"] > up.body["event"]["seq"]
    assert len(rig.receiver.hooks("/gone")) == 1
