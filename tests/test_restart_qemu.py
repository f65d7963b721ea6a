"""restart_vm against a real QEMU, through a real sidecar.

* A backup job and a migration: a VM stopped while one runs is not restarted until it ends
  (the action waits without a slot, run again every second; ``jobs_timeout`` after the wait
  began the attempt fails and is retried), then it is.
* With ``max_concurrency: 1``, a VM whose restart waits for a running backup holds no slot:
  another VM's webhook reaches a loopback receiver meanwhile, the wait outlasts the action's
  ``timeout:`` without spending an attempt, and once the job is cancelled the restart happens
  in its first attempt.
* A restart waiting out its backoff when the sidecar is killed with SIGKILL: the next sidecar
  carries it out.
* With ``max_concurrency: 1``, a VM waiting out its backoff (the configuration's
  ``actions.restart.backoff``) holds no slot: another VM's webhook reaches a loopback receiver
  meanwhile, and the waiting restart then happens in one attempt.
* The tiny guest panicking again and again (``echo c > /proc/sysrq-trigger`` under
  ``-action panic=pause`` and pvpanic-pci): each restart dumps the guest's memory first (the
  dump holds the panic, DUMP_COMPLETED reaches the rules), consecutive restarts wait longer
  each time up to ``max``, a VM that ran ``reset_after`` starts over with no wait, and past
  the cap REACTOR_RESTART_SUPPRESSED leaves the VM as it is.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from reactor.demo.machine import ThrowawayQemu
from tests.support.guest import PROMPT, READY_MARKER, booted_guest
from tests.support.ops import Receiver
from tests.support.sidecar import Sidecar

pytestmark = pytest.mark.qemu

JOB_RULES = """\
rules:
  - name: stopped
    on: STOP
    actions:
      - type: restart_vm
        with: {jobs_timeout: 2s}
        retry: {attempts: 30, initial: 100ms, max: 500ms}
        timeout: 30s
"""


def _blockdev(name: str) -> list[str]:
    return ["-blockdev", json.dumps({"driver": "null-co", "node-name": name, "size": 1 << 30})]


def _resets(qemu: ThrowawayQemu, seconds: float) -> list[dict[str, Any]]:
    """The resets QMP asked for among the events of the next ``seconds`` (and those held)."""
    events = qemu.qmp.read_events(seconds)
    return [e for e in events if e["event"] == "RESET" and e["data"]["guest"] is False]


def _restarted_after(
    qemu: ThrowawayQemu, ending: str, *, until: str, data: dict[str, Any] | None = None
) -> None:
    """Nothing restarts the stopped VM until ``ending`` is run; then it runs again."""
    assert _resets(qemu, 1.0) == []
    assert qemu.qmp.execute("query-status")["status"] == "paused"
    qemu.qmp.execute(ending, {"device": "b0"} if ending == "block-job-cancel" else None)
    qemu.qmp.wait_event(until, 30, data)
    qemu.qmp.wait_event("RESET", 60, {"reason": "host-qmp-system-reset"})
    qemu.qmp.wait_event("RESUME", 30)
    assert qemu.qmp.execute("query-status")["status"] == "running"


def test_a_restart_waits_for_a_backup_and_for_a_migration(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(JOB_RULES)
    args = [*_blockdev("src"), *_blockdev("dst")]
    with (
        ThrowawayQemu(name="vm", extra_qmp=["vm"], extra_args=args, memory_mb=64) as qemu,
        Sidecar(tmp_path, [qemu.qmp_socket("vm")], [rules]) as sidecar,
    ):
        sidecar.wait_message("vm: connected", 30)
        backup = {"job-id": "b0", "device": "src", "target": "dst", "sync": "full", "speed": 65536}
        qemu.qmp.execute("blockdev-backup", backup)
        qemu.qmp.execute("stop")
        sidecar.wait_message("restart of VM vm waits: backup job 'b0' running", 30)
        sidecar.wait_message("not restarted: backup job 'b0' running after 2s", 60)
        _restarted_after(qemu, "block-job-cancel", until="BLOCK_JOB_CANCELLED")

        # The restart verifies the VM runs; a stop before it saw so would be continued.
        sidecar.wait_for(lambda _: bool(sidecar.outcomes("restart_vm", "ok")), 30, "restart ok")
        _resets(qemu, 0)  # what the first restart left
        events = [{"capability": "events", "state": True}]
        qemu.qmp.execute("migrate-set-capabilities", {"capabilities": events})
        qemu.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1024})
        qemu.qmp.execute("migrate", {"uri": "exec:cat > /dev/null"})
        qemu.qmp.execute("stop")
        sidecar.wait_message("restart of VM vm waits: migration active", 30)
        _restarted_after(qemu, "migrate_cancel", until="MIGRATION", data={"status": "cancelled"})
        assert qemu.qmp.execute("query-migrate")["status"] == "cancelled"

        def both() -> bool:
            return len(sidecar.outcomes("restart_vm", "ok")) == 2

        sidecar.wait_for(lambda _: both(), 30, "2 x restart_vm ok")
        assert not sidecar.outcomes("restart_vm", "failed")
    assert sidecar.returncode == 0
    assert "Traceback" not in sidecar.log_text()


KILL_RULES = """\
rules:
  - name: stopped
    on: STOP
    actions:
      - type: restart_vm
        with: {backoff: {initial: 20s, max: 20s, reset_after: 1h}}
        timeout: 2m
"""


def _oks(sidecar: Sidecar, count: int) -> None:
    def done() -> bool:
        return len(sidecar.outcomes("restart_vm", "ok")) >= count

    sidecar.wait_for(lambda _: done(), 60, f"{count} x restart_vm ok")


def test_a_restart_waiting_out_its_backoff_is_not_lost_to_a_kill_9(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(KILL_RULES)
    with ThrowawayQemu(name="vm", extra_qmp=["vm"], memory_mb=64) as qemu:
        with Sidecar(tmp_path, [qemu.qmp_socket("vm")], [rules]) as first:
            first.wait_message("vm: connected", 30)
            qemu.qmp.execute("stop")
            _oks(first, 1)  # the first restart at once
            qemu.qmp.execute("stop")
            first.wait_message("restart 2 in a row (backoff)", 30)
            first.proc.kill()
        assert first.returncode == -9
        assert qemu.qmp.execute("query-status")["status"] == "paused"
        _resets(qemu, 0)
        # The journaled invocation resumes: at once, or after what is left of the wait if the
        # guard's history outlived the process.
        with Sidecar(tmp_path, [qemu.qmp_socket("vm")], [rules]) as second:
            qemu.qmp.wait_event("RESET", 90, {"reason": "host-qmp-system-reset"})
            _oks(second, 1)
        assert qemu.qmp.execute("query-status")["status"] == "running"
    assert second.returncode == 0


ONE_SLOT = """\
actions:
  max_concurrency: 1
  restart: {backoff: {initial: 30s, max: 30s, reset_after: 1h}}
"""

SLOT_RULES = """\
rules:
  - name: stopped
    on: STOP
    actions:
      - type: restart_vm
        retry: {attempts: 1}
  - name: powered-down
    on: POWERDOWN
    actions:
      - type: webhook
        with: {url: URL}
"""


@contextlib.contextmanager
def _beside_web(
    tmp_path: Path, name: str, rules: Path, config: Path, args: Sequence[str] = ()
) -> Iterator[tuple[ThrowawayQemu, ThrowawayQemu, Sidecar]]:
    """VM ``name`` and VM ``web``, both connected to one sidecar with ``config``."""
    with (
        ThrowawayQemu(name=name, extra_qmp=[name], extra_args=list(args), memory_mb=64) as vm,
        ThrowawayQemu(name="web", extra_qmp=["web"], memory_mb=64) as web,
        Sidecar(tmp_path, [vm.qmp_socket(name), web.qmp_socket("web")], [rules],
                extra_args=["--config", str(config)]) as sidecar,
    ):  # fmt: skip
        sidecar.wait_message(f"{name}: connected", 30)
        sidecar.wait_message("web: connected", 30)
        yield vm, web, sidecar


def test_a_restart_waiting_out_its_backoff_holds_no_slot(tmp_path: Path) -> None:
    receiver = Receiver()
    config = tmp_path / "config.yaml"
    config.write_text(ONE_SLOT)
    rules = tmp_path / "rules.yaml"
    rules.write_text(SLOT_RULES.replace("URL", receiver.url))
    try:
        with _beside_web(tmp_path, "crashy", rules, config) as (crashy, web, sidecar):
            crashy.qmp.execute("stop")
            _oks(sidecar, 1)  # the first restart at once
            crashy.qmp.execute("stop")
            sidecar.wait_message("restart 2 in a row (backoff)", 30)
            web.qmp.execute("system_powerdown")
            receiver.wait(lambda r: len(r.delivered) == 1, 25, "webhook")
            # Delivered while the other VM still waits out its 30 s, in the one slot there is.
            assert crashy.qmp.execute("query-status")["status"] == "paused"
            assert len(sidecar.outcomes("restart_vm", "ok")) == 1
            crashy.qmp.wait_event("RESET", 90, {"reason": "host-qmp-system-reset"})
            _oks(sidecar, 2)
            assert crashy.qmp.execute("query-status")["status"] == "running"
            oks = [r["message"] for r in sidecar.outcomes("restart_vm", "ok")]
            assert all(m.endswith(" attempt=1") for m in oks), oks
        assert sidecar.returncode == 0
        assert "Traceback" not in sidecar.log_text()
    finally:
        receiver.down()


JOB_SLOT_RULES = SLOT_RULES.replace(
    "        retry: {attempts: 1}\n",
    "        with: {jobs_timeout: 5m}\n        retry: {attempts: 1}\n        timeout: 15s\n",
)


def test_a_restart_waiting_for_a_backup_holds_no_slot(tmp_path: Path) -> None:
    receiver = Receiver()
    config = tmp_path / "config.yaml"
    config.write_text("actions:\n  max_concurrency: 1\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(JOB_SLOT_RULES.replace("URL", receiver.url))
    args = [*_blockdev("src"), *_blockdev("dst")]
    try:
        with _beside_web(tmp_path, "vm", rules, config, args) as (qemu, web, sidecar):
            backup = {"job-id": "b0", "device": "src", "target": "dst", "sync": "full"}
            qemu.qmp.execute("blockdev-backup", {**backup, "speed": 65536})
            qemu.qmp.execute("stop")
            sidecar.wait_message("restart of VM vm waits: backup job 'b0' running", 30)
            waiting = time.monotonic()
            web.qmp.execute("system_powerdown")
            receiver.wait(lambda r: len(r.delivered) == 1, 25, "webhook")
            # Delivered while the restart waits for the backup, in the one slot there is.
            assert qemu.qmp.execute("query-status")["status"] == "paused"
            assert not sidecar.outcomes("restart_vm", "ok")
            # Longer than the action's timeout: the wait is no attempt, so none times out.
            time.sleep(max(0.0, waiting + 20 - time.monotonic()))
            _restarted_after(qemu, "block-job-cancel", until="BLOCK_JOB_CANCELLED")
            _oks(sidecar, 1)
            sidecar.wait_message("restart of VM vm waited", 30)
            oks = [r["message"] for r in sidecar.outcomes("restart_vm", "ok")]
            assert len(oks) == 1 and oks[0].endswith(" attempt=1"), oks
            assert not sidecar.outcomes("restart_vm", "retry")
            assert not sidecar.outcomes("restart_vm", "failed")
            starts = [
                r
                for r in sidecar.records()
                if r.get("message", "").startswith("restart of VM vm waits:")
            ]
            assert len(starts) == 1  # logged once, when the wait began
        assert sidecar.returncode == 0
        assert "Traceback" not in sidecar.log_text()
    finally:
        receiver.down()


INITIAL_S, MAX_S, RESET_AFTER_S = 2, 3, 20

PANIC_RULES = f"""\
rules:
  - name: panic-restart
    on: GUEST_PANICKED
    actions:
      - type: restart_vm
        with:
          backoff: {{initial: {INITIAL_S}s, max: {MAX_S}s, reset_after: {RESET_AFTER_S}s}}
          limit: 4
          window: 10m
          dump: "DUMPS/{{{{ vm }}}}-{{{{ seq }}}}.elf"
          dump_timeout: 2m
        timeout: 4m
  - name: seen
    on: [DUMP_COMPLETED, REACTOR_RESTART_SUPPRESSED]
    actions:
      - type: log
        with: {{message: "{{{{ event }}}} {{{{ data.restarts | default('-') }}}}"}}
"""


def _stamp(event: dict[str, Any]) -> float:
    return float(event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6)


class _Panics:
    """Panics the guest and follows QEMU's events on the driver's monitor."""

    def __init__(self, qemu: ThrowawayQemu) -> None:
        self.qemu = qemu

    def panic(self) -> dict[str, Any]:
        self.qemu.send_line("echo c > /proc/sysrq-trigger")
        return self.qemu.qmp.wait_event("GUEST_PANICKED", 60)

    def restarted(self) -> tuple[dict[str, Any], float]:
        """The RESET of the restart, and when (our clock) the guest had its shell again."""
        reset = self.qemu.qmp.wait_event("RESET", 240, {"reason": "host-qmp-system-reset"})
        self.qemu.qmp.wait_event("RESUME", 60)
        resumed = time.monotonic()
        self.qemu.expect(READY_MARKER, 60)
        self.qemu.expect(re.escape(PROMPT), 60)
        return reset, resumed


def _waits(sidecar: Sidecar) -> list[str]:
    return [
        r["message"]
        for r in sidecar.records()
        if r.get("message", "").startswith("restart of VM guest waits")
    ]


@pytest.mark.guest
def test_a_crash_loop_backs_off_dumps_each_panic_and_is_capped(tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(PANIC_RULES.replace("DUMPS", str(dumps)))
    with (
        booted_guest(name="guest", extra_qmp=["guest"], panic_pause=True) as qemu,
        Sidecar(tmp_path, [qemu.qmp_socket("guest")], [rules]) as sidecar,
    ):
        sidecar.wait_message("guest: connected", 30)
        guest = _Panics(qemu)
        gaps = []
        for _ in range(3):
            panicked = guest.panic()
            reset, resumed = guest.restarted()
            gaps.append(_stamp(reset) - _stamp(panicked))
        # The first restart at once, then INITIAL_S, then twice that but at most MAX_S.
        assert gaps[1] >= INITIAL_S and gaps[2] >= MAX_S, gaps
        assert [w.split(": ")[1] for w in _waits(sidecar)] == [
            "restart 2 in a row (backoff)",
            "restart 3 in a row (backoff)",
        ]
        seen = [line["message"] for line in sidecar.wait_audit("seen", 3, timeout=30)]
        assert seen == ["DUMP_COMPLETED -"] * 3
        files = sorted(dumps.iterdir())
        assert len(files) == 3
        assert all(f.stat().st_mode & 0o077 == 0 for f in files)  # QEMU writes them 0400
        first = files[0].read_bytes()
        assert first[:4] == b"\x7fELF" and b"sysrq: Trigger a crash" in first
        for dump in files:
            dump.unlink()

        # Ran RESET_AFTER_S since the last restart: the next panic is restarted at once.
        while time.monotonic() < resumed + RESET_AFTER_S + 3:
            time.sleep(0.5)
        guest.panic()
        guest.restarted()
        assert len(_waits(sidecar)) == 2

        # The fifth restart in ten minutes is past the cap (limit: 4).
        guest.panic()
        [suppressed] = [
            line["message"]
            for line in sidecar.wait_audit("seen", 5, timeout=60)
            if line["message"].startswith("REACTOR_RESTART_SUPPRESSED")
        ]
        assert suppressed == "REACTOR_RESTART_SUPPRESSED 4"
        assert _resets(qemu, 2.0) == []
        assert qemu.qmp.execute("query-status")["status"] == "guest-panicked"
        assert len(sidecar.outcomes("restart_vm", "ok")) == 5
    assert sidecar.returncode == 0
    assert "Traceback" not in sidecar.log_text()
