"""State that survives: a real ``qmp-reactor run`` and a real QEMU, killed, stopped, reloaded.

Windows, held events and the restart guard's history live in
``engine-state.sqlite3`` in the state directory; each test checks the state is
there before it takes the sidecar down, then that the restarted (or reloaded)
sidecar goes on from it. Per-VM labels from the configuration select rules.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reactor.demo.machine import ThrowawayQemu
from tests.support.ops import Sidecar, write_rules

LONG = 60.0
"""Seconds any wait may take on a busy machine."""


def logged(name: str, message: str, **extra: Any) -> dict[str, Any]:
    """A rule on STOP whose ``log`` action says ``message``."""
    action = {"type": "log", "with": {"message": message}}
    return {"name": name, "on": "STOP", "actions": [action], **extra}


@contextlib.contextmanager
def running(
    workdir: Path, *rules: dict[str, Any], **config: Any
) -> Iterator[tuple[ThrowawayQemu, Sidecar]]:
    """A QEMU called vm1 and a sidecar on it with ``rules``, connected; stopped after."""
    path = write_rules(workdir / "rules.yaml", *rules)
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as qemu:
        address = str(qemu.qmp_socket("vm1"))
        settings = {"rules": [str(path)], "qmp": [address], **config}
        with Sidecar(workdir, settings).start() as sidecar:
            sidecar.wait_log("vm1 REACTOR_CONNECTED", LONG)
            yield qemu, sidecar
            assert sidecar.stop() == 0


def parts(workdir: Path) -> dict[str, Any]:
    """The engine state the sidecar wrote so far: part name → document."""
    path = workdir / "state" / "engine-state.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        return {name: json.loads(doc) for name, doc in db.execute("SELECT name, doc FROM parts")}


def wait_until(check: Callable[[], Any], what: str, sidecar: Sidecar) -> Any:
    deadline = time.monotonic() + LONG
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {LONG} s; log:\n{sidecar.log_text()}")
        time.sleep(0.05)
    return found


def counted(workdir: Path, rule: str) -> int:
    """How many events the threshold of ``rule`` holds in the written state."""
    for name, doc in parts(workdir).items():
        if name.startswith(f"gate:{rule}:"):
            return sum(len(row[5]) for row in doc["threshold"])
    return 0


def stop_and_go(qemu: ThrowawayQemu, sidecar: Sidecar, seen: int) -> None:
    """One STOP (and a RESUME after it); waits until the sidecar saw the STOP."""
    qemu.qmp.execute("stop")
    qemu.qmp.execute("cont")
    wait_until(lambda: sidecar.log_text(all_runs=False).count("vm1 STOP") > seen, "STOP", sidecar)


@pytest.mark.qemu
def test_kill9_between_the_2nd_and_3rd_event_of_a_threshold_then_the_3rd_fires(
    tmp_path: Path,
) -> None:
    threshold = {"count": 3, "window": "10m", "key": ["$.vm"]}
    rule = logged("panics", "panics {{ count }}", threshold=threshold)
    with running(tmp_path, rule) as (qemu, sidecar):
        stop_and_go(qemu, sidecar, 0)
        stop_and_go(qemu, sidecar, 1)
        wait_until(lambda: counted(tmp_path, "panics") == 2, "2 events written", sidecar)
        sidecar.kill9()
        assert "panics 3" not in sidecar.log_text()
        sidecar.start()
        sidecar.wait_log("vm1 REACTOR_CONNECTED", LONG)
        sidecar.wait_log(r"engine state: \d+ parts restored, 0 of changed", LONG)
        stop_and_go(qemu, sidecar, 0)
        sidecar.wait_log('message="panics 3"', LONG)


def held(workdir: Path, rule: str) -> int:
    """How many events the throttle of ``rule`` holds in the written state."""
    for name, doc in parts(workdir).items():
        if name.startswith(f"gate:{rule}:"):
            return sum(row[4] for row in doc["throttle"] if row[3] is not None)
    return 0


@pytest.mark.qemu
def test_a_once_after_window_spanning_a_sigterm_fires_after_the_restart(tmp_path: Path) -> None:
    throttle = {"mode": "once_after", "window": "5s", "key": ["$.vm"]}
    rule = logged("settle", "settled {{ count }}", throttle=throttle)
    with running(tmp_path, rule) as (qemu, sidecar):
        stop_and_go(qemu, sidecar, 0)
        stop_and_go(qemu, sidecar, 1)
        wait_until(lambda: held(tmp_path, "settle") == 2, "the held event written", sidecar)
        assert sidecar.stop() == 0
        assert "settled" not in sidecar.log_text()
        sidecar.start()
        sidecar.wait_log('message="settled 2"', LONG)
    assert sidecar.log_text().count('message="settled') == 1


@pytest.mark.qemu
def test_the_restart_guard_suppresses_the_4th_restart_after_a_restart_of_the_sidecar(
    tmp_path: Path,
) -> None:
    restart = {"type": "restart_vm", "with": {"method": "reset", "limit": 3, "window": "10m"}}
    with running(tmp_path, {"name": "revive", "on": "STOP", "actions": [restart]}) as (
        qemu,
        sidecar,
    ):
        for n in range(1, 4):
            qemu.qmp.execute("stop")
            ok = "restart_vm ok rule=revive"
            wait_until(lambda: sidecar.log_text().count(ok) == n, f"restart {n}", sidecar)  # noqa: B023
        sidecar.kill9()
        sidecar.start()
        sidecar.wait_log("vm1 REACTOR_CONNECTED", LONG)
        qemu.qmp.execute("stop")
        sidecar.wait_log("restart of VM vm1 suppressed: 3 restarts in 600s", LONG)
        assert qemu.qmp.execute("query-status")["status"] == "paused"


@pytest.mark.qemu
def test_a_reload_keeps_the_windows_of_unchanged_rules(tmp_path: Path) -> None:
    threshold = {"count": 3, "window": "10m", "key": ["$.vm"]}
    kept = logged("panics", "panics {{ count }}", threshold=threshold)
    changed = logged("other", "other {{ count }}", threshold=threshold)
    with running(tmp_path, kept, changed) as (qemu, sidecar):
        stop_and_go(qemu, sidecar, 0)
        stop_and_go(qemu, sidecar, 1)
        longer = logged("other", "other {{ count }}", threshold={**threshold, "window": "20m"})
        write_rules(tmp_path / "rules.yaml", kept, longer, logged("new", "new"))
        reload(sidecar, "reloaded: 3 rules")
        stop_and_go(qemu, sidecar, 2)
        sidecar.wait_log('message="panics 3"', LONG)
        stop_and_go(qemu, sidecar, 3)
        stop_and_go(qemu, sidecar, 4)
        sidecar.wait_log('message="other 3"', LONG)
    log = sidecar.log_text()
    assert log.count('message="panics 3"') == log.count('message="other 3"') == 1
    fifth = [i for i in range(len(log)) if log.startswith("vm1 STOP", i)][4]
    assert log.index('message="other 3"') > fifth  # counted afresh from the reload


def reload(sidecar: Sidecar, done: str) -> None:
    """SIGHUP, and wait until the log says ``done``."""
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGHUP)
    sidecar.wait_log(done, LONG)


@pytest.mark.qemu
def test_labels_from_the_configuration_select_rules(tmp_path: Path) -> None:
    def tiered(tier: str) -> dict[str, Any]:
        when = {"path": "$.labels.tier", "equals": tier}
        return logged(f"{tier}-stop", f"{tier} {{{{ labels.tier }}}} {{{{ labels.auto }}}}",
                      when=when)  # fmt: skip

    vms = [{"name": "vm*", "labels": {"tier": "prod"}}, {"name": "vm1", "labels": {"auto": True}}]
    with running(tmp_path, tiered("prod"), tiered("dev"), vms=vms) as (qemu, sidecar):
        stop_and_go(qemu, sidecar, 0)
        sidecar.wait_log('rule="prod-stop" .*message="prod prod True"', LONG)
        config = sidecar.config_path.read_text()
        sidecar.config_path.write_text(config.replace("tier: prod", "tier: dev"))
        reload(sidecar, "reloaded:")
        stop_and_go(qemu, sidecar, 1)
        sidecar.wait_log('rule="dev-stop" .*message="dev dev True"', LONG)
    assert sidecar.log_text().count('rule="prod-stop"') == 1


def test_check_knows_the_label_names_the_configuration_defines(tmp_path: Path) -> None:
    typo = logged("typo", "x", when={"path": "$.labels.teir", "equals": "prod"})
    fine = logged("fine", "x", throttle={"mode": "once_within", "window": "1m",
                                         "key": ["$.labels.tier"]})  # fmt: skip
    rules = write_rules(tmp_path / "rules.yaml", typo, fine)
    config = tmp_path / "config.yaml"
    config.write_text("vms:\n  - {name: 'web-*', labels: {tier: prod}}\n  - {name: x}\n")
    command = [sys.executable, "-m", "reactor", "check", str(rules), "--config", str(config),
               "--plugin-dir", str(tmp_path / "none")]  # fmt: skip
    bad = subprocess.run(command, capture_output=True, text=True, timeout=LONG)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"{config}:3:5: error:" in bad.stdout + bad.stderr  # an entry for nothing
    config.write_text("vms:\n  - {name: 'web-*', labels: {tier: prod}}\n")
    done = subprocess.run(command, capture_output=True, text=True, timeout=LONG)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "rule 'typo' reads $.labels.teir" in out and "did you mean 'tier'?" in out
    assert "'fine'" not in out
    strict = subprocess.run([*command, "--strict"], capture_output=True, text=True, timeout=LONG)
    assert strict.returncode == 1
