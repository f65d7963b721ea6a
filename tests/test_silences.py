"""Silences: the store, the filter a running sidecar uses, the CLI, replay, rule tests, QEMU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reactor.dispatch.silences import Silence, SilenceFilter, SilenceStore, silence_path
from reactor.errors import Location
from reactor.model import Firing, Rule

REPO = Path(__file__).resolve().parent.parent


def firing(rule: str, vm: str, event: str, at: float = 100.0) -> Firing:
    r = Rule(name=rule, events=(event,), actions=(), location=Location("r.yaml"))
    return Firing(r, {"vm": vm, "event": event, "seq": 1}, at, {"count": 1})


def test_globs_and_times() -> None:
    s = Silence("x", "web-*", "guest-panic-*", "*", starts=10.0, ends=20.0)
    assert s.matches("web-1", "guest-panic-restart", "GUEST_PANICKED", 10.0)
    assert not s.matches("web-1", "guest-panic-restart", "GUEST_PANICKED", 20.0)  # half-open
    assert not s.matches("db-1", "guest-panic-restart", "GUEST_PANICKED", 15.0)
    assert not s.matches("web-1", "disk-full", "BLOCK_IO_ERROR", 15.0)


def test_a_running_filter_sees_changes_made_by_another_process(tmp_path: Path) -> None:
    path = silence_path(tmp_path)
    seen: list[str] = []
    filt = SilenceFilter(path=path, on_silenced=lambda f, s: seen.append(s.id))
    sink: list[Firing] = []
    run = filt.wrap(sink.append)
    run(firing("r", "web-1", "STOP"))
    now = time.time()
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from reactor.dispatch.silences import Silence, SilenceStore\n"
        "s = SilenceStore(Path(sys.argv[1])).add(Silence('', 'web-*', starts=time.time() - 1,"
        " ends=time.time() + 600, comment='maintenance'))\n"
        "print(s.id)\n"
    )
    added = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    run(firing("r", "web-1", "STOP"))
    run(firing("r", "db-1", "STOP"))
    assert [f.envelope["vm"] for f in sink] == ["web-1", "db-1"]
    assert seen == [added] and filt.silenced == 1
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert SilenceStore(path).expire(added[:3], now=now) is not None
    run(firing("r", "web-1", "STOP"))
    assert len(sink) == 3  # expired: runs again


def test_expire_needs_one_match_and_old_silences_are_cleaned_up(tmp_path: Path) -> None:
    store = SilenceStore(silence_path(tmp_path))
    now = time.time()
    store.add(Silence("aa01", "x", starts=now, ends=now + 60))
    store.add(Silence("aa02", "y", starts=now, ends=now + 60))
    assert store.expire("aa") is None  # two match
    assert store.expire("zz") is None
    assert store.expire("aa01", now=now - 8 * 86400) is not None  # ended over a week ago
    store.add(Silence("bb01", "z", starts=now, ends=now + 60))
    assert [s.id for s in store.all()] == ["aa02", "bb01"]


def qmp_reactor(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reactor", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_line(tmp_path: Path) -> None:
    state = ["--state-dir", tmp_path]
    added = qmp_reactor("silence", "add", *state, "--vm", "web-1", "--for", "2h",
                        "--comment", "disk swap\x1b[2J")  # fmt: skip
    assert added.returncode == 0, added.stderr
    ident = added.stdout.strip()
    listed = qmp_reactor("silence", "list", *state)
    assert ident in listed.stdout and "web-1" in listed.stdout
    assert "\x1b" not in listed.stdout and "disk swap\\x1b[2J" in listed.stdout
    [doc] = json.loads(qmp_reactor("silence", "list", *state, "--json").stdout)
    assert (doc["vm"], doc["rule"], doc["event"], doc["active"]) == ("web-1", "*", "*", True)
    assert qmp_reactor("silence", "expire", *state, ident).returncode == 0
    assert "no silences in force" in qmp_reactor("silence", "list", *state).stdout
    assert ident in qmp_reactor("silence", "list", *state, "--all").stdout
    bad = qmp_reactor("silence", "expire", *state, "nope")
    assert bad.returncode == 1 and "no single silence with id 'nope'" in bad.stderr
    zero = qmp_reactor("silence", "add", *state, "--vm", "x", "--for", "0s", "--comment", "c")
    assert zero.returncode == 1 and "Traceback" not in zero.stderr


def test_replay_applies_a_state_dirs_silences_at_recorded_times(tmp_path: Path) -> None:
    recording = REPO / "examples/events/lifecycle.jsonl"
    first = json.loads(recording.read_text().splitlines()[0])["timestamp"]["seconds"]
    SilenceStore(silence_path(tmp_path)).add(
        Silence("s1", "vm-lifecycle", "audit-*", "RESET", starts=first, ends=first + 3600)
    )
    plain = qmp_reactor("replay", recording)
    silenced = qmp_reactor("replay", recording, "--state-dir", tmp_path, "--explain")
    assert plain.returncode == silenced.returncode == 0
    before = [json.loads(line)["event"] for line in plain.stdout.splitlines()]
    after = [json.loads(line)["event"] for line in silenced.stdout.splitlines()]
    assert before.count("RESET") == 3
    assert after == [e for e in before if e != "RESET"]
    assert silenced.stderr.count("silenced by silence s1") == 3


def test_rule_tests_take_silences(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "rules:\n  - name: stops\n    on: STOP\n    actions: [{type: log}]\n"
    )
    (tmp_path / "s_test.yaml").write_text(
        "rule_files: [r.yaml]\ntests:\n  - name: quiet for a minute\n"
        "    silences: [{vm: vm1, at: 10s, for: 1m}]\n"
        "    events: [{at: 0s, event: STOP}, {at: 30s, event: STOP}, {at: 70s, event: STOP}]\n"
        "    expect: [{rule: stops, at: 0s}, {rule: stops, at: 70s}]\n"
    )
    done = qmp_reactor("test", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.qemu
@pytest.mark.guest
def test_a_silence_keeps_a_real_panic_from_being_restarted_and_ends_on_time(
    tmp_path: Path,
) -> None:
    from tests.support.guest import booted_guest
    from tests.support.sidecar import DEFAULT_RULES, Sidecar

    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "rules:\n  - name: test-stop\n    on: [STOP, RESUME]\n"
        "    actions: [{type: log, with: {message: '{{ event }}'}}]\n"
    )
    state = ["--state-dir", tmp_path / "state"]
    with (
        booted_guest(name="guest", extra_qmp=["guest"], panic_pause=True) as qemu,
        Sidecar(tmp_path, [qemu.qmp_socket("guest")], [DEFAULT_RULES, extra]) as sidecar,
    ):
        if True:
            sidecar.wait_message("guest: connected", 30)
            add = ["silence", "add", *state, "--vm", "guest", "--comment", "maintenance"]
            assert qmp_reactor(*add, "--rule", "guest-panic-*", "--for", "1h").returncode == 0
            short = qmp_reactor(*add, "--rule", "test-stop", "--for", "4s")
            assert short.returncode == 0
            added = time.monotonic()
            qemu.send_line("echo c > /proc/sysrq-trigger")  # GUEST_PANICKED, then STOP
            qemu.qmp.wait_event("GUEST_PANICKED", 60)
            sidecar.wait_message("silenced: rule guest-panic-restart for guest", 30)
            sidecar.wait_message("silenced: rule test-stop for guest on STOP", 30)
            while time.monotonic() < added + 4.5:  # the short silence ends by itself
                time.sleep(0.1)
            qemu.qmp.execute("cont")
            [resumed] = sidecar.wait_audit("test-stop", 1, timeout=30)
            assert resumed["message"] == "RESUME"
            assert sidecar.outcomes("restart_vm", "ok") == []
            assert not [r for r in sidecar.records() if r.get("rule") == "guest-panic-restart"
                        and r.get("logger") == "reactor.action"]  # fmt: skip
            assert qemu.qmp.execute("query-status")["status"] == "running"  # by our cont
