"""End to end with the tiny real guest: the sidecar's rules against real guest-driven events.

Each test boots the cached guest (see tests/support/guest.py) with two virtio-serial ports
(portA, portB), a virtio-balloon and pvpanic-pci with ``-action panic=pause``, starts
``qmp-reactor run`` on its own QMP monitor with the repository's default rule pack plus
``EXTRA_RULES``, and watches QEMU's deliveries on a second monitor with an ``EventTap``:

* six quick open/close cycles of portA and one of portB in the guest: QEMU sends each port's
  final state a second later; the sidecar sees exactly QEMU's sequence and its port-closed
  rules fire once per port, for the final close, never for the stale ones; an ``absent``
  rule fires for a port closed for good at its deadline, never for one reopened in time;
* QMP ``balloon``: every BALLOON_CHANGE QEMU delivers reaches a rule;
* ``echo c > /proc/sysrq-trigger``: the default pack's guest-panic-restart resets and resumes the
  VM through restart_vm, which verifies it runs; the guest boots to its shell again, and the
  RESET and RESUME that the restart provoked carry ``caused_by``.

Run with ``-s`` to see boot and restart times.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reactor.demo.machine import ThrowawayQemu
from tests.support.guest import PROMPT, READY_MARKER, booted_guest
from tests.support.receiver import Hook, WebhookReceiver
from tests.support.sidecar import DEFAULT_RULES, Sidecar
from tests.support.tap import Event, EventTap

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

MiB = 1024 * 1024
GONE_WITHIN_S = 5

EXTRA_RULES = """\
rules:
  - name: test-up
    on: REACTOR_CONNECTED
    actions:
      - type: webhook
        with: {url: "URL/up"}
  - name: test-port-change
    on: VSERPORT_CHANGE
    actions:
      - type: webhook
        with: {url: "URL/port"}
  - name: test-port-closed
    on: VSERPORT_CHANGE
    when: {path: $.data.open, equals: false}
    actions:
      - type: log
        with: {message: "closed {{ data.id }}"}
  - name: test-port-gone
    on: VSERPORT_CHANGE
    when: {path: $.data.open, equals: false}
    absent:
      on: VSERPORT_CHANGE
      when: {path: $.data.open, equals: true}
      within: GONE_WITHIN
      key: [$.vm, $.data.id]
    actions:
      - type: log
        with: {message: "gone {{ data.id }}"}
  - name: test-balloon
    on: BALLOON_CHANGE
    actions:
      - type: webhook
        with: {url: "URL/balloon"}
  - name: test-cause
    on: [GUEST_PANICKED, STOP, RESET, RESUME]
    actions:
      - type: log
        with:
          message: >-
            {{ event }} {{ data.reason | default('-') }}
            {% if caused_by is defined %}{{ caused_by.rule }}/{{ caused_by.action }}
            {%- else %}none{% endif %}
"""


@dataclass
class GuestRig:
    """A booted guest, a tap on its QMP events, a webhook receiver and the sidecar."""

    qemu: ThrowawayQemu
    tap: EventTap
    receiver: WebhookReceiver
    sidecar: Sidecar


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[GuestRig]:
    with ExitStack() as stack:
        receiver = stack.enter_context(WebhookReceiver())
        sockets = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qmp-reactor-e2e-")))
        started = time.monotonic()
        qemu = stack.enter_context(
            booted_guest(
                name="guest",
                extra_qmp=["guest", "tap"],
                devices=[
                    "virtio-serial-pci,id=vser0",
                    "virtserialport,chardev=ca,name=portA,id=portA",
                    "virtserialport,chardev=cb,name=portB,id=portB",
                    "virtio-balloon-pci,id=balloon0",
                ],
                extra_args=[
                    "-chardev",
                    f"socket,id=ca,path={sockets}/portA.sock,server=on,wait=off",
                    "-chardev",
                    f"socket,id=cb,path={sockets}/portB.sock,server=on,wait=off",
                ],
                panic_pause=True,
            )
        )
        print(f"\nguest booted to its shell in {time.monotonic() - started:.1f} s")
        tap = stack.enter_context(EventTap(qemu.qmp_socket("tap")))
        extra = tmp_path / "extra.yaml"
        extra.write_text(
            EXTRA_RULES.replace("URL", receiver.url).replace("GONE_WITHIN", f"{GONE_WITHIN_S}s")
        )
        sidecar = stack.enter_context(
            Sidecar(tmp_path, [qemu.qmp_socket("guest")], [DEFAULT_RULES, extra])
        )
        receiver.wait_for("/up", 1, timeout=30)
        yield GuestRig(qemu, tap, receiver, sidecar)
        assert sidecar.stop() == 0
        assert "Traceback" not in sidecar.log_text()


def _seen(event: Event) -> tuple[str, dict[str, object], dict[str, int]]:
    return event["event"], event.get("data", {}), event["timestamp"]


def _envelopes(hooks: list[Hook]) -> list[Event]:
    """The envelopes the webhooks carried, in the sidecar's order (actions run concurrently)."""
    return sorted((h.body["event"] for h in hooks), key=lambda env: int(env["seq"]))


def _by_seq(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(lines, key=lambda line: int(line["seq"]))


def test_port_flap_fires_for_the_final_closes_only(rig: GuestRig) -> None:
    names = rig.qemu.run_in_guest("cat /sys/class/virtio-ports/vport0p*/name").split()
    assert names == ["portA", "portB"]
    cycles = "; ".join(["exec 3>/dev/vport0p1; exec 3>&-"] * 6)
    rig.qemu.run_in_guest(f"{cycles}; exec 3>/dev/vport0p2; exec 3>&-")
    rig.tap.wait_count("VSERPORT_CHANGE", 4, timeout=10)
    rig.receiver.wait_for("/port", 4, timeout=10)
    time.sleep(1.5)  # QEMU's windows close; nothing else may come

    delivered = rig.tap.events("VSERPORT_CHANGE")
    states = [(e["data"]["id"], e["data"]["open"]) for _, e in delivered]
    assert states == [("portA", True), ("portB", True), ("portA", False), ("portB", False)]
    seen = _envelopes(rig.receiver.hooks("/port"))
    assert [_seen(env) for env in seen] == [_seen(e) for _, e in delivered]

    closed = _by_seq(rig.sidecar.wait_audit("test-port-closed", 2))
    assert [line["message"] for line in closed] == ["closed portA", "closed portB"]
    assert [line["seq"] for line in closed] == [env["seq"] for env in seen[2:]]
    # Neither port opens again: the absent rule fires for each final close, once.
    gone = _by_seq(rig.sidecar.wait_audit("test-port-gone", 2, timeout=GONE_WITHIN_S + 30))
    assert [line["message"] for line in gone] == ["gone portA", "gone portB"]
    assert [line["seq"] for line in gone] == [env["seq"] for env in seen[2:]]


def test_a_port_reopened_in_time_is_not_gone(rig: GuestRig) -> None:
    """Closed and opened again within the window: nothing; closed for good: one firing, late."""
    port = "/dev/vport0p1"
    # QEMU sends a port's change at once when its last one is over a second old.
    rig.qemu.run_in_guest(f"exec 3>{port}; sleep 1.5; exec 3>&-; sleep 1.5; exec 3>{port}")
    rig.tap.wait_count("VSERPORT_CHANGE", 3, timeout=15)
    reopened = time.monotonic()
    rig.qemu.run_in_guest("sleep 1.5; exec 3>&-")
    rig.tap.wait_count("VSERPORT_CHANGE", 4, timeout=15)
    closed = time.monotonic()
    states = [e["data"]["open"] for _, e in rig.tap.events("VSERPORT_CHANGE")]
    assert states == [True, False, True, False]
    [gone] = rig.sidecar.wait_audit("test-port-gone", 1, timeout=GONE_WITHIN_S + 30)
    fired = time.monotonic()
    assert gone["message"] == "gone portA"
    assert int(gone["seq"]) == max(
        int(r["seq"]) for r in rig.sidecar.wait_audit("test-port-closed", 2)
    )
    # The first close was cancelled by the reopening; the second fired at its deadline.
    assert fired - closed >= GONE_WITHIN_S - 0.5
    assert reopened < closed
    time.sleep(1.0)
    assert len(rig.sidecar.wait_audit("test-port-gone", 1)) == 1


def test_balloon_change_reaches_a_rule(rig: GuestRig) -> None:
    asked = time.time()
    rig.qemu.qmp.execute("balloon", {"value": 128 * MiB})
    rig.tap.wait(
        lambda evs: any(e.get("data", {}).get("actual") == 128 * MiB for _, e in evs), timeout=15
    )
    time.sleep(1.5)  # a held BALLOON_CHANGE would come within a second

    def after(event: Event) -> bool:
        stamp = event["timestamp"]
        return float(stamp["seconds"] + stamp["microseconds"] / 1e6) >= asked

    delivered = [e for _, e in rig.tap.events("BALLOON_CHANGE") if after(e)]
    assert delivered[-1]["data"] == {"actual": 128 * MiB}
    hooks = rig.receiver.wait_for("/balloon", len(delivered), timeout=5)
    seen = [env for env in _envelopes(hooks) if after(env)]
    assert [_seen(e) for e in seen] == [_seen(e) for e in delivered]
    assert {h.body["rule"] for h in hooks} == {"test-balloon"}


def test_guest_panic_is_restarted_by_the_default_pack(rig: GuestRig) -> None:
    panicked_at = time.monotonic()
    rig.qemu.send_line("echo c > /proc/sysrq-trigger")
    rig.tap.wait_count("GUEST_PANICKED", 1, timeout=30)
    rig.tap.wait_count("RESUME", 1, timeout=60)
    resumed_at = time.monotonic()
    rig.qemu.expect(READY_MARKER, timeout=60)
    rig.qemu.expect(re.escape(PROMPT), timeout=60)
    booted_at = time.monotonic()
    print(
        f"\npanic -> RESUME {resumed_at - panicked_at:.1f} s, "
        f"RESUME -> shell {booted_at - resumed_at:.1f} s"
    )
    assert rig.qemu.console is not None
    assert rig.qemu.console.output.count(READY_MARKER.encode()) == 2
    assert rig.qemu.run_in_guest("echo alive-$((6*7))").strip() == "alive-42"
    assert rig.qemu.qmp.execute("query-status")["status"] == "running"

    rig.sidecar.wait_for(
        lambda _: bool(rig.sidecar.outcomes("restart_vm", "ok")), timeout=30, what="restart_vm ok"
    )
    restarts = rig.sidecar.outcomes("restart_vm", "ok")
    assert [(r["rule"], r["vm"]) for r in restarts] == [("guest-panic-restart", "guest")]
    assert not rig.sidecar.outcomes("restart_vm", "failed")

    events = [e for _, e in rig.tap.events()]
    names = [e["event"] for e in events]
    panic = names.index("GUEST_PANICKED")
    assert names[panic : panic + 4] == ["GUEST_PANICKED", "STOP", "RESET", "RESUME"]
    assert events[panic + 2]["data"]["reason"] == "host-qmp-system-reset"

    causes = [line["message"] for line in _by_seq(rig.sidecar.wait_audit("test-cause", 4))]
    assert causes[:4] == [
        "GUEST_PANICKED - none",
        "STOP - none",
        "RESET host-qmp-system-reset guest-panic-restart/restart_vm",
        "RESUME - guest-panic-restart/restart_vm",
    ]
    # SeaBIOS resets the machine once or twice more by itself: not our doing.
    assert all(c == "RESET guest-reset none" for c in causes[4:])
