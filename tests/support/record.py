"""Record real QMP event streams from a real QEMU into ``examples/events/*.jsonl``.

Each scenario starts a :class:`~reactor.demo.machine.ThrowawayQemu` with an extra QMP monitor called
``recorder``, connects a :class:`~reactor.demo.machine.QmpDriver` to it, provokes events through the
driver's own monitor (or the guest's serial console) and writes every event the recorder
monitor received, in arrival order, one per line. Each line is the event object exactly as
QEMU sent it (QEMU's own key order and spacing, which ``json.dumps`` reproduces byte for byte)
with a ``"vm"`` key added at the end naming the VM (also passed to QEMU as ``-name``).

Usage::

    python -m tests.support.record                 # all scenarios
    python -m tests.support.record quorum-bad      # some of them
    python -m tests.support.record --list

``recording.jsonl`` is also copied to ``reactor/data/events/recording.jsonl``. The
``block-io-error`` scenario mounts a 2 MiB tmpfs and needs root; it is skipped otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from reactor.demo.machine import QmpDriver, QmpError, ThrowawayQemu
from tests.support.guest import booted_guest

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "examples" / "events"
PACKAGE_COPY = REPO / "reactor" / "data" / "events" / "recording.jsonl"

Event = dict[str, Any]

VSERPORT_ARGS = [
    "virtio-serial-pci,id=vser0",
    "virtserialport,chardev=ca,name=portA,id=portA",
    "virtserialport,chardev=cb,name=portB,id=portB",
]


def _vserport_chardevs(qdir: Path) -> list[str]:
    return [
        "-chardev",
        f"socket,id=ca,path={qdir}/portA.sock,server=on,wait=off",
        "-chardev",
        f"socket,id=cb,path={qdir}/portB.sock,server=on,wait=off",
    ]


class Skip(Exception):
    """A scenario cannot run on this machine."""


class Recorder:
    """Reads every event of the ``recorder`` monitor in a thread, noting when each arrived."""

    def __init__(self, qemu: ThrowawayQemu, vm: str) -> None:
        self.vm = vm
        self.driver = QmpDriver(qemu.qmp_socket("recorder"))
        self.driver.connect()
        self.received: list[tuple[float, Event]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.driver.next_event(0.2)
            except TimeoutError:
                continue
            except (QmpError, OSError):
                return
            with self._lock:
                self.received.append((time.time(), event))

    def finish(self, settle: float = 0.0) -> list[Event]:
        """Wait ``settle`` seconds (less if QEMU exits), stop reading, return tagged events."""
        self._thread.join(settle)
        self._stop.set()
        self._thread.join()
        self.driver.close()
        with self._lock:
            ARRIVALS[self.vm] = [arrival for arrival, _ in self.received]
            return [{**event, "vm": self.vm} for _, event in self.received]

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.finish()


ARRIVALS: dict[str, list[float]] = {}
"""Wall-clock arrival time of each recorded event, per VM (for the summary only)."""


# -- scenarios ---------------------------------------------------------------------------


def record_lifecycle() -> list[Event]:
    """stop, cont, system_reset, quit on a diskless VM: STOP, RESUME, RESET, SHUTDOWN."""
    vm = "vm-lifecycle"
    with ThrowawayQemu(name=vm, extra_qmp=["recorder"]) as qemu, Recorder(qemu, vm) as rec:
        for command in ("stop", "cont", "system_reset"):
            time.sleep(0.5)
            qemu.qmp.execute(command)
        time.sleep(0.5)
        qemu.qmp.execute("quit")
        qemu.wait(10)
        events = rec.finish(2)
    return events


def record_quorum_bad() -> list[Event]:
    """One clean read, then r1 corrupted and five quick reads of ``quorum0``."""
    vm = "vm-quorum"
    with (
        ThrowawayQemu(name=vm, extra_qmp=["recorder"], quorum=True) as qemu,
        Recorder(qemu, vm) as rec,
    ):
        qemu.read_quorum(1)
        time.sleep(0.5)
        qemu.corrupt_child("r1")
        qemu.read_quorum(5)
        events = rec.finish(3)
    return events


def record_vserport_flap() -> list[Event]:
    """Six quick open/close cycles of portA, then one of portB, from inside the guest."""
    vm = "vm-vserport"
    with (
        tempfile.TemporaryDirectory(prefix="qmp-reactor-vser-") as tmp,
        booted_guest(
            name=vm,
            extra_qmp=["recorder"],
            devices=VSERPORT_ARGS,
            extra_args=_vserport_chardevs(Path(tmp)),
        ) as qemu,
        Recorder(qemu, vm) as rec,
    ):
        cycles = "; ".join(["exec 3>/dev/vport0p1; exec 3>&-"] * 6)
        qemu.run_in_guest(f"{cycles}; exec 3>/dev/vport0p2; exec 3>&-")
        events = rec.finish(3)
    return events


def record_guest_panic() -> list[Event]:
    """``echo c > /proc/sysrq-trigger`` with pvpanic-pci and ``-action panic=pause``."""
    vm = "vm-panic"
    with (
        booted_guest(name=vm, extra_qmp=["recorder"], panic_pause=True) as qemu,
        Recorder(qemu, vm) as rec,
    ):
        qemu.send_line("echo c > /proc/sysrq-trigger")
        qemu.qmp.wait_event("GUEST_PANICKED", 20)
        events = rec.finish(2)
    return events


def record_balloon() -> list[Event]:
    """QMP ``balloon`` to 128 MiB, then back to 256 MiB, with virtio-balloon in the guest."""
    vm = "vm-balloon"
    with (
        booted_guest(
            name=vm, extra_qmp=["recorder"], devices=["virtio-balloon-pci,id=balloon0"]
        ) as qemu,
        Recorder(qemu, vm) as rec,
    ):
        qemu.qmp.execute("balloon", {"value": 128 * 1024 * 1024})
        time.sleep(3)
        qemu.qmp.execute("balloon", {"value": 256 * 1024 * 1024})
        events = rec.finish(3)
    return events


@contextlib.contextmanager
def _tiny_tmpfs(size: str = "2m") -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        raise Skip("needs root to mount a tmpfs")
    mountpoint = Path(tempfile.mkdtemp(prefix="qmp-reactor-full-"))
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise Skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
    finally:
        mountpoint.rmdir()


def record_block_io_error() -> list[Event]:
    """Guest ``dd`` onto a 64 MiB sparse raw disk living on a 2 MiB tmpfs (werror=stop)."""
    vm = "vm-blockerr"
    with _tiny_tmpfs() as mnt:
        image = mnt / "disk0.raw"
        with open(image, "wb") as f:
            f.truncate(64 * 1024 * 1024)
        blockdev = {
            "driver": "raw",
            "node-name": "disk0",
            "file": {"driver": "file", "filename": str(image)},
        }
        with (
            booted_guest(
                name=vm,
                extra_qmp=["recorder"],
                devices=["virtio-blk-pci,drive=disk0,id=vdisk0,werror=stop,rerror=stop"],
                extra_args=["-blockdev", json.dumps(blockdev)],
            ) as qemu,
            Recorder(qemu, vm) as rec,
        ):
            qemu.send_line("dd if=/dev/zero of=/dev/vda bs=64k count=64 oflag=direct")
            qemu.qmp.wait_event("BLOCK_IO_ERROR", 30)
            time.sleep(1)
            qemu.qmp.execute("cont")  # the write fails again and the VM stops again
            qemu.qmp.wait_event("BLOCK_IO_ERROR", 30)
            time.sleep(1)
            qemu.qmp.execute("quit")
            qemu.wait(10)
            events = rec.finish(2)
    return events


def record_combined() -> list[Event]:
    """One guest VM with a quorum disk, virtio-serial and pvpanic going through everything.

    stop, cont, system_reset (the guest reboots), r1 corrupted + five quorum reads, the
    portA/portB flap, a guest panic (paused), quit.
    """
    vm = "demo-vm"
    with (
        tempfile.TemporaryDirectory(prefix="qmp-reactor-vser-") as tmp,
        booted_guest(
            name=vm,
            extra_qmp=["recorder"],
            devices=VSERPORT_ARGS,
            extra_args=_vserport_chardevs(Path(tmp)),
            panic_pause=True,
            quorum=True,
        ) as qemu,
        Recorder(qemu, vm) as rec,
    ):
        time.sleep(0.5)
        qemu.qmp.execute("stop")
        time.sleep(1)
        qemu.qmp.execute("cont")
        time.sleep(1)
        qemu.qmp.execute("system_reset")
        qemu.expect("GUEST-READY", 60)
        qemu.expect("guest# ", 60)
        time.sleep(0.5)
        qemu.corrupt_child("r1")
        qemu.read_quorum(5)
        time.sleep(2)
        cycles = "; ".join(["exec 3>/dev/vport0p1; exec 3>&-"] * 6)
        qemu.run_in_guest(f"{cycles}; exec 3>/dev/vport0p2; exec 3>&-")
        time.sleep(2)
        qemu.send_line("echo c > /proc/sysrq-trigger")
        qemu.qmp.wait_event("GUEST_PANICKED", 20)
        time.sleep(1)
        qemu.qmp.execute("quit")
        qemu.wait(10)
        events = rec.finish(2)
    return events


SCENARIOS: dict[str, Callable[[], list[Event]]] = {
    "lifecycle": record_lifecycle,
    "quorum-bad": record_quorum_bad,
    "vserport-flap": record_vserport_flap,
    "guest-panic": record_guest_panic,
    "balloon": record_balloon,
    "block-io-error": record_block_io_error,
    "recording": record_combined,
}


# -- output ------------------------------------------------------------------------------


def write_jsonl(path: Path, events: list[Event]) -> None:
    """Write one event per line with QEMU's own key order and spacing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for event in events:
            f.write(json.dumps(event) + "\n")


def describe(events: list[Event], arrivals: list[float] | None = None) -> str:
    """A human summary: per event, its timestamp and (if known) arrival relative to the first.

    ``lag`` is arrival minus the event's own timestamp (both are wall-clock times).
    """
    lines: list[str] = []
    first: float | None = None
    for i, event in enumerate(events):
        ts = event["timestamp"]
        t = ts["seconds"] + ts["microseconds"] / 1e6
        first = t if first is None else first
        data = json.dumps(event.get("data", {}), sort_keys=True)
        line = f"  ts +{t - first:7.3f}s"
        if arrivals is not None and i < len(arrivals):
            line += f"  arrived +{arrivals[i] - first:7.3f}s (lag {arrivals[i] - t:6.3f}s)"
        lines.append(f"{line}  {event['event']:<18} {data}")
    return "\n".join(lines)


def qemu_version() -> str:
    """``qemu-system-x86_64 --version`` first line."""
    out = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return out.splitlines()[0] if out else "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios (all by default) and write their recordings."""
    parser = argparse.ArgumentParser(description="Record real QMP event streams.")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        for name, func in SCENARIOS.items():
            print(f"{name:16} {(func.__doc__ or '').splitlines()[0]}")
        return 0
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    print(qemu_version())
    failed = False
    for name in names:
        start = time.monotonic()
        try:
            events = SCENARIOS[name]()
        except Skip as exc:
            print(f"{name}: skipped ({exc})")
            continue
        except Exception as exc:
            print(f"{name}: FAILED: {exc!r}")
            failed = True
            continue
        path = args.out / f"{name}.jsonl"
        write_jsonl(path, events)
        print(f"{name}: {len(events)} events in {time.monotonic() - start:.1f} s -> {path}")
        print(describe(events, ARRIVALS.get(events[0]["vm"]) if events else None))
        if name == "recording":
            PACKAGE_COPY.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, PACKAGE_COPY)
            print(f"  copied to {PACKAGE_COPY}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
